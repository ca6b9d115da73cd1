"""Run by tests/test_parallel.py in a subprocess with 4 simulated CPU devices (not collected by pytest).

Every rule's gradient on a user's mesh vs one device: for each model below (dense
with every activation, every loss, the L2 penalty, batch norm; in float64 also a small LeNet with
per-channel batch norm, and a strided, padded conv2d + avg_pool + global_avg_pool), ``jax.grad`` of
its loss with respect to its parameters, computed

* ``explicit``: data parallel on ``jax.make_mesh((4,), ("data",))`` (Explicit axes,
  JAX 0.10's default), batch sharded, parameters replicated, under ``jax.set_mesh``;
* ``auto``: the same on an Auto mesh (GSPMD decides the layout);
* ``tensor``: a 2 x 2 Explicit mesh ("data", "model"): batch sharded on "data",
  the hidden layer's W1 (and b1, gamma, beta, alpha) sharded along n_out on
  "model" (column parallel), the output layer replicated; the first conv's W
  and b sharded along C_out on "model" as well;
* ``shard_map``: ``jax.shard_map(..., check_vma=True)`` over "data", parameters
  replicated (``P()``), each device's loss on its own shard, summed with ``psum``;
  its one-device reference is the sum over the 4 shards of the shard's gradient;

and compared with the one-device gradient: whole-vector relative difference
max |g_mesh - g_1| / max |g_1| over every leaf.  Also checks that each gradient
leaf has its parameter's sharding (the cotangent type) and dtype.

Prints one line ``RESULT {json}``: {dtype: {mode: {model: rel} or {"error": msg}}, ...}.
"""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

jax.config.update("jax_enable_x64", True)

import fnbp  # noqa: E402
from fnbp import losses  # noqa: E402

B, N_IN, H, C = 16, 6, 8, 4
IMAGE = (8, 8, 1)
ARCH = fnbp.cnn.lenet(IMAGE, n_classes=C, channels=(4, 6), hidden=(H,))          # 3x3 SAME convs, 8 -> 4 -> 2
ARCH_BN = fnbp.cnn.lenet(IMAGE, n_classes=C, channels=(4, 6), hidden=(H,), batch_norm=True)


def lenet_params(p, bn=False):
    """fnbp.cnn's parameter pytree (``ARCH`` / ``ARCH_BN``) from the flat dict of parameters."""
    conv = [{"W": p[f"Wc{i}"], "b": p[f"bc{i}"]} for i in (1, 2)]
    dense = [{"W": p["Wl"], "b": p["b1"]}, {"W": p["W2"], "b": p["b2"]}]
    if bn:
        for i, layer in enumerate(conv, 1):
            layer.update(gamma=p[f"gc{i}"], beta=p[f"betac{i}"])
        dense[0].update(gamma=p["gamma"], beta=p["beta"])
    return {"conv": conv, "dense": dense}


def lenet_loss(p, b, bn=False):
    """fnbp.cnn's LeNet in training mode (batch statistics when ``bn``) on the images b[4]."""
    params = lenet_params(p, bn)
    logits, _ = fnbp.cnn.apply_stateful(params, fnbp.cnn.init_state(params), b[4], arch=ARCH_BN if bn else ARCH,
                                        train=True)
    return losses.softmax_cross_entropy(logits, b[1])


def strided_conv_loss(p, b):
    """conv2d stride 2, padding 1 -> ReLU -> avg_pool 2 -> global_avg_pool -> dense (the pool rules)."""
    a = fnbp.relu(fnbp.conv2d(p["Wc1"], p["bc1"], b[4], stride=2, padding=1))          # (B, 4, 4, 4)
    h = fnbp.pool.global_avg_pool(fnbp.avg_pool(a, window=2))                           # (B, 4)
    return losses.softmax_cross_entropy(fnbp.dense(p["Ws"], p["b2"], h), b[1])


def models(conv=True):
    """{name: loss(params, batch)}; batch = (x, labels, onehot, targets, images).  ``conv``: with the
    convolutional models (run in float64 only: they are the costly compiles of this check)."""
    out = {}

    def mlp(p, x, act):
        return fnbp.dense(p["W2"], p["b2"], act(p, fnbp.dense(p["W1"], p["b1"], x)))

    acts = {name: (lambda f: lambda p, a: f(a))(f) for name, f in fnbp.activations.ACTIVATIONS.items()}
    acts["leaky_relu"] = lambda p, a: fnbp.leaky_relu(a, 0.1)
    acts["prelu"] = lambda p, a: fnbp.prelu(a, p["alpha"])
    for name, act in acts.items():
        out[f"dense+{name}"] = (lambda act: lambda p, b: losses.softmax_cross_entropy(mlp(p, b[0], act), b[1]))(act)
    tanh = acts["tanh"]
    for name, loss in losses.LOSSES.items():
        if name == "softmax_cross_entropy":
            fn = (lambda p, b: loss(mlp(p, b[0], tanh), b[1], reduction="sum"))
        elif name == "cross_entropy":
            fn = (lambda loss: lambda p, b: loss(fnbp.softmax(mlp(p, b[0], tanh)), b[2]))(loss)
        else:
            fn = (lambda loss: lambda p, b: loss(mlp(p, b[0], tanh), b[3]))(loss)
        out[f"loss:{name}"] = fn
    out["l2_penalty"] = lambda p, b: (losses.softmax_cross_entropy(mlp(p, b[0], tanh), b[1])
                                      + losses.l2_penalty(p, 0.05))
    out["batch_norm"] = lambda p, b: losses.softmax_cross_entropy(
        mlp(p, b[0], lambda p, a: fnbp.relu(fnbp.batch_norm(a, p["gamma"], p["beta"]))), b[1])
    if conv:
        out["lenet+batch_norm"] = lambda p, b: lenet_loss(p, b, bn=True)  # conv2d, per-channel bn, max_pool, flatten
        out["conv_stride2+avg_pool"] = strided_conv_loss
    return out


def init(key, dtype):
    k = jax.random.split(key, 8)
    p = {"W1": jax.random.normal(k[0], (H, N_IN), dtype) / 2, "b1": jax.random.normal(k[1], (H,), dtype) / 4,
         "W2": jax.random.normal(k[2], (C, H), dtype) / 2, "b2": jax.random.normal(k[3], (C,), dtype) / 4,
         "alpha": jnp.full((H,), 0.2, dtype), "gamma": 1 + jax.random.normal(k[4], (H,), dtype) / 4,
         "beta": jax.random.normal(k[5], (H,), dtype) / 4}
    x = jax.random.normal(k[6], (B, N_IN), dtype)
    labels = jax.random.randint(k[7], (B,), 0, C)
    onehot = jax.nn.one_hot(labels, C, dtype=dtype)
    targets = jax.random.normal(jax.random.fold_in(key, 9), (B, C), dtype)
    kc = jax.random.split(jax.random.fold_in(key, 10), 5)
    n_features = 2 * 2 * 6
    p.update(Wc1=jax.random.normal(kc[0], (4, 1, 3, 3), dtype) / 2, bc1=jax.random.normal(kc[1], (4,), dtype) / 4,
             Wc2=jax.random.normal(kc[2], (6, 4, 3, 3), dtype) / 4, bc2=jax.random.normal(kc[3], (6,), dtype) / 4,
             Wl=jax.random.normal(kc[4], (H, n_features), dtype) / 4,
             Ws=jax.random.normal(jax.random.fold_in(key, 11), (C, 4), dtype) / 2)
    for i, n in ((1, 4), (2, 6)):
        p[f"gc{i}"] = 1 + jax.random.normal(jax.random.fold_in(key, 11 + 2 * i), (n,), dtype) / 4
        p[f"betac{i}"] = jax.random.normal(jax.random.fold_in(key, 12 + 2 * i), (n,), dtype) / 4
    images = jax.random.normal(jax.random.fold_in(key, 20), (B,) + IMAGE, dtype)
    return p, (x, labels, onehot, targets, images)


PARAM_SPECS_TP = {"W1": P("model", None), "b1": P("model"), "alpha": P("model"), "gamma": P("model"),
                  "beta": P("model"), "Wc1": P("model", None, None, None), "bc1": P("model"), "gc1": P("model"),
                  "betac1": P("model")}


def leaves(t):
    return [np.asarray(v, dtype=np.float64) for v in jax.tree_util.tree_leaves(t)]


def rel(a, b):
    la, lb = leaves(a), leaves(b)
    return max(float(np.max(np.abs(u - v))) for u, v in zip(la, lb)) / max(float(np.max(np.abs(v))) for v in lb)


def grads_all(fns, params, batch):
    return {name: jax.grad(fn)(params, batch) for name, fn in fns.items()}


def check(dtype):
    dt = jnp.dtype(dtype)
    fns = models(conv=dt == jnp.float64)
    params, batch = init(jax.random.PRNGKey(0), dt)
    grads_jit = jax.jit(lambda p, b: grads_all(fns, p, b))
    one = grads_jit(params, batch)
    shards = [tuple(v[i * B // 4:(i + 1) * B // 4] for v in batch) for i in range(4)]
    one_sharded = jax.tree_util.tree_map(lambda *g: sum(g), *[grads_jit(params, s) for s in shards])
    explicit = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Explicit,))
    auto = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))
    tp = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    report = {}

    def compare(mode, got, ref, mesh, specs):
        r = {name: rel(got[name], ref[name]) for name in fns}
        r["_dtypes_ok"] = all(v.dtype == dt for v in jax.tree_util.tree_leaves(got))
        # each gradient leaf laid out as its parameter (the cotangent type): same devices, same split
        r["_sharding_ok"] = all(got[name][k].sharding.is_equivalent_to(
            NamedSharding(mesh, specs.get(k, P())), got[name][k].ndim) for name in fns for k in params)
        report[mode] = r

    for mode, mesh, specs in (("explicit", explicit, {}), ("auto", auto, {}), ("tensor", tp, PARAM_SPECS_TP)):
        try:
            place_p = {k: jax.device_put(v, NamedSharding(mesh, specs.get(k, P()))) for k, v in params.items()}
            place_b = tuple(jax.device_put(v, NamedSharding(mesh, P("data"))) for v in batch)
            with jax.set_mesh(mesh):
                got = jax.jit(lambda p, b: grads_all(fns, p, b))(place_p, place_b)
            compare(mode, got, one, mesh, specs)
        except Exception as e:                                  # reported, the test names the mode
            report[mode] = {"error": f"{type(e).__name__}: {str(e)[:800]}"}

    try:
        def per_device(p, b):
            return {name: jax.grad(lambda p, b: jax.lax.psum(fn(p, b), "data"))(p, b) for name, fn in fns.items()}
        place_b = tuple(jax.device_put(v, NamedSharding(explicit, P("data"))) for v in batch)
        got = jax.jit(jax.shard_map(per_device, mesh=explicit, in_specs=(P(), P("data")), out_specs=P(),
                                    check_vma=True))(params, place_b)
        compare("shard_map", got, one_sharded, explicit, {})
    except Exception as e:
        report["shard_map"] = {"error": f"{type(e).__name__}: {str(e)[:800]}"}
    return report


if __name__ == "__main__":
    out = {"devices": len(jax.devices())}
    for dtype in sys.argv[1:] or ["float32", "float64"]:
        out[dtype] = check(dtype)
    print("RESULT " + json.dumps(out))
