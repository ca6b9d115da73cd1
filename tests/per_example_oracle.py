"""Shared oracle for the per-example and DP tests: small MLP cases and vmap(grad) of a plain-jnp reference."""
import functools

import jax
import jax.numpy as jnp

import fnbp
from fnbp import reference as R

jax.config.update("jax_enable_x64", True)

SIZES = (5, 7, 6, 3)
B = 6
CASES = {   # name: (fnbp activation, reference activation, fnbp loss, reference loss, targets)
    "tanh-softmax_ce": (fnbp.tanh, R.tanh, fnbp.losses.softmax_cross_entropy, R.softmax_cross_entropy, "labels"),
    "relu-half_sse": (fnbp.relu, R.relu, fnbp.losses.half_sse, R.half_sse, "real"),
    "sigmoid-mse": (fnbp.sigmoid, R.sigmoid, functools.partial(fnbp.losses.mse, reduction="mean"), R.mse, "real"),
}


def make_case(case, seed=0):
    act, ref_act, loss, ref_loss, kind = CASES[case]
    k0, k1, k2 = jax.random.split(jax.random.key(seed), 3)
    params = fnbp.mlp.init(k0, SIZES, init="uniform", dtype=jnp.float64)
    x = jax.random.normal(k1, (B, SIZES[0]), jnp.float64)
    d = (jax.random.randint(k2, (B,), 0, SIZES[-1]) if kind == "labels"
         else jax.random.normal(k2, (B, SIZES[-1]), jnp.float64))
    return act, ref_act, loss, ref_loss, params, x, d


def reference_loss(ref_act, ref_loss, params, x_n, d_n, masks=None):
    """Example n's own loss L(y_n; d_n), plain jnp (autodiff differentiates it)."""
    h = x_n
    for k, layer in enumerate(params):
        a = R.dense(layer["W"], layer["b"], h)
        h = ref_act(a) if k < len(params) - 1 else a
        if masks is not None and k < len(params) - 1:
            h = h * masks[k]
    return ref_loss(h, d_n)


def reference_grads(case, params, x, d, masks=None):
    _, ref_act, _, ref_loss, _ = CASES[case]
    fn = jax.grad(functools.partial(reference_loss, ref_act, ref_loss))
    if masks is None:
        return jax.vmap(fn, in_axes=(None, 0, 0))(params, x, d)
    return jax.vmap(fn, in_axes=(None, 0, 0, 0))(params, x, d, masks)


def max_abs_diff(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb) and all(u.shape == v.shape for u, v in zip(la, lb))
    return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(la, lb))


def flat_norms(per_ex):
    return jnp.sqrt(sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in jax.tree_util.tree_leaves(per_ex)))


# --- CNN cases: a small LeNet (8 x 8 x 1 images, channels (4, 6)) and walker graphs with stride / padding ---------
CNN_B = 5
LENET = fnbp.cnn.LeNet(image_shape=(8, 8, 1), channels=(4, 6), kernel=3, padding="SAME", hidden=(7,), n_classes=3)
# name: [(C_out, kernel, stride, padding) per conv layer], then dense 3; input 8 x 8 x 2
CONV_GRAPHS = {
    "stride2-same": [(5, 3, 2, "SAME"), (12, 3, 1, 1)],      # 8 -> 4 -> 4: 16 positions, auto picks 'gram' on conv 2
    "int-pad-valid": [(4, 3, 1, 1), (3, 2, 2, "VALID")],     # 8 -> 8 -> 4
}


def make_cnn_case(seed=0, arch=LENET):
    k0, k1, k2 = jax.random.split(jax.random.key(seed), 3)
    params = fnbp.cnn.init(k0, arch, dtype=jnp.float64)
    x = jax.random.normal(k1, (CNN_B,) + arch.image_shape, jnp.float64)
    d = jax.random.randint(k2, (CNN_B,), 0, arch.n_classes)
    return params, x, d


def lenet_reference_loss(arch, params, x_n, d_n, masks=None):
    """Example n's own loss through the LeNet with lax's conv2d / reduce_window (plain jnp, autodiff)."""
    h = x_n[None]
    for layer in params["conv"]:
        h = R.max_pool(R.relu(R.conv2d(layer["W"], layer["b"], h, padding=arch.padding)), arch.pool)
    h = R.flatten(h)
    for k, layer in enumerate(params["dense"]):
        if masks is not None:
            h = h * masks[k]
        h = R.dense(layer["W"], layer["b"], h)
        h = R.relu(h) if k < len(params["dense"]) - 1 else h
    return R.softmax_cross_entropy(h, d_n[None])


def lenet_reference_grads(params, x, d, arch=LENET, masks=None):
    """jit(vmap(grad)) of ``lenet_reference_loss`` (jit: one compile instead of one per eager op)."""
    fn = jax.grad(functools.partial(lenet_reference_loss, arch))
    if masks is None:
        return jax.jit(jax.vmap(fn, in_axes=(None, 0, 0)))(params, x, d)
    return jax.jit(jax.vmap(fn, in_axes=(None, 0, 0, 0)))(params, x, d, masks)


def conv_graph_case(name, seed=0, with_reference=True):
    """(net, params, x, d, reference per-example grads or None): conv -> relu per layer, flatten, dense 3, on
    8 x 8 x 2."""
    from fnbp.graph import Input, Param
    layers = CONV_GRAPHS[name]
    keys = iter(jax.random.split(jax.random.key(seed), 2 * len(layers) + 3))
    nodes, prev, c_in, size, conv_params = [], Input("x"), 2, 8, []
    for k, (c_out, kernel, stride, padding) in enumerate(layers):
        conv_params.append({"W": 0.5 * jax.random.normal(next(keys), (c_out, c_in, kernel, kernel), jnp.float64),
                            "b": 0.1 * jax.random.normal(next(keys), (c_out,), jnp.float64)})
        nodes += [fnbp.graph.node(f"conv{k}", fnbp.conv2d, Param("conv", k, "W"), Param("conv", k, "b"), prev,
                                  stride=stride, padding=padding),
                  fnbp.graph.node(f"relu{k}", fnbp.relu, f"conv{k}")]
        prev, c_in = f"relu{k}", c_out
        size = fnbp.conv.conv_output_size(size, kernel, stride, padding)
    nodes += [fnbp.graph.node("flatten", fnbp.flatten, prev),
              fnbp.graph.node("y", fnbp.dense, Param("dense", 0, "W"), Param("dense", 0, "b"), "flatten")]
    net = fnbp.graph.make(nodes, "y")
    n_in = size * size * c_in
    params = {"conv": conv_params, "dense": [{"W": jax.random.normal(next(keys), (3, n_in), jnp.float64) / n_in ** 0.5,
                                               "b": jnp.zeros((3,), jnp.float64)}]}
    x = jax.random.normal(next(keys), (CNN_B, 8, 8, 2), jnp.float64)
    d = jax.random.randint(next(keys), (CNN_B,), 0, 3)

    def loss(params, x_n, d_n):
        h = x_n[None]
        for layer, (_, _, stride, padding) in zip(params["conv"], layers):
            h = R.relu(R.conv2d(layer["W"], layer["b"], h, stride=stride, padding=padding))
        y = R.dense(params["dense"][0]["W"], params["dense"][0]["b"], R.flatten(h))
        return R.softmax_cross_entropy(y, d_n[None])

    if not with_reference:
        return net, params, x, d, None
    return net, params, x, d, jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0)))(params, x, d)
