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
