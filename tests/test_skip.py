"""Tests of fnbp.skip: the skip-connection example (fan-out at h1).

The hand-written backward sums the gradients of both paths at h1; it is compared with ``jax.grad``
through the fnbp layers and with ``jax.grad`` of a plain-jnp reference (``fnbp.reference``), in float64 to
<= 1e-10 relative per leaf, and dropping either summand is caught.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbp
import fnbp.skip
from fnbp import losses
from fnbp import reference as ref
from vjp_oracle import max_rel as rel_err, tree_rel_err

F64 = jnp.float64
RTOL = 1e-10


def skip_reference(params, x, g):
    """The skip-connection network in plain jnp (fnbp.reference), no fnbp layers."""
    p = params
    h1 = g(ref.dense(p["dense1"]["W"], p["dense1"]["b"], x))
    h2 = g(ref.dense(p["dense2"]["W"], p["dense2"]["b"], h1))
    return ref.dense(p["out"]["W"], p["out"]["b"], h2) + ref.dense(p["skip"]["W"], p["skip"]["b"], h1)


SKIP_CASES = [("relu", "half_sse", "single"), ("relu", "mse", "batch"), ("tanh", "sse", "batch"),
              ("sigmoid", "softmax_cross_entropy", "batch")]


def skip_case(act_name, loss_name, mode, seed=0):
    """Parameters (numpy, in skip_connection_init's layout), x, d, and the fnbp/reference functions."""
    rng = np.random.default_rng(seed)
    layout = jax.eval_shape(lambda: fnbp.skip.skip_connection_init(jax.random.key(0), 6, 9, 7, 4, dtype=F64))
    params = jax.tree_util.tree_map(lambda leaf: rng.uniform(-1, 1, leaf.shape), layout)
    lead = (5,) if mode == "batch" else ()
    x = rng.normal(size=lead + (6,))
    d = rng.integers(0, 4, size=lead) if loss_name == "softmax_cross_entropy" else rng.normal(size=lead + (4,))
    return params, x, d, getattr(fnbp, act_name), getattr(ref, act_name), getattr(losses, loss_name), \
        getattr(ref, loss_name)


def skip_gradients(params, x, d, act, ref_act, loss, ref_loss):
    """(E, grads) by the hand-written backward, by jax.grad through the fnbp layers, by the reference."""
    hand = fnbp.skip.skip_connection_backprop(params, x, d, activation=act, loss=loss)
    through = jax.value_and_grad(lambda p: loss(fnbp.skip.skip_connection(p, x, activation=act), d))(params)
    reference = jax.value_and_grad(lambda p: ref_loss(skip_reference(p, x, ref_act), d))(params)
    return hand, through, reference


@pytest.mark.parametrize("act_name,loss_name,mode", SKIP_CASES)
def test_skip_connection_hand_backward(act_name, loss_name, mode):
    params, x, d, act, ref_act, loss, ref_loss = skip_case(act_name, loss_name, mode)
    (E_hand, g_hand), (E_grad, g_grad), (E_ref, g_ref) = jax.jit(
        lambda p, x, d: skip_gradients(p, x, d, act, ref_act, loss, ref_loss))(params, x, d)
    assert rel_err(E_hand, E_ref) <= 1e-12 and rel_err(E_grad, E_ref) <= 1e-12
    assert tree_rel_err(g_hand, g_ref) <= RTOL
    assert tree_rel_err(g_grad, g_ref) <= RTOL
    assert tree_rel_err(g_hand, g_grad) <= RTOL
    # the two paths really both carry gradient to h1 (otherwise the sum would be untested)
    assert np.any(np.asarray(g_ref["skip"]["W"]) != 0) and np.any(np.asarray(g_ref["dense2"]["W"]) != 0)


@pytest.mark.parametrize("keep", [0, 1])
def test_skip_connection_dropping_a_summand_is_wrong(monkeypatch, keep):
    """Replace the sum at h1 by one of its two terms: dense1's gradient goes wrong, the rest stays."""
    params, x, d, act, ref_act, loss, ref_loss = skip_case("relu", "half_sse", "batch")
    monkeypatch.setattr(fnbp.graph, "accumulate", lambda *grads: grads[keep])
    (_, g_wrong), _, (_, g_ref) = jax.jit(
        lambda p, x, d: skip_gradients(p, x, d, act, ref_act, loss, ref_loss))(params, x, d)
    assert rel_err(g_wrong["dense1"]["W"], g_ref["dense1"]["W"]) > 1e-2
    assert rel_err(g_wrong["dense1"]["b"], g_ref["dense1"]["b"]) > 1e-2
    for name in ("dense2", "out", "skip"):
        assert tree_rel_err(g_wrong[name], g_ref[name]) <= RTOL


def test_skip_connection_init():
    params = jax.jit(lambda key: fnbp.skip.skip_connection_init(key, 2, 3, 4, 5, dtype=F64))(
        jax.random.key(3))
    assert set(params) == set(fnbp.skip.SKIP_LAYERS)
    shapes = {name: (layer["W"].shape, layer["b"].shape) for name, layer in params.items()}
    assert shapes == {"dense1": ((3, 2), (3,)), "dense2": ((4, 3), (4,)), "out": ((5, 4), (5,)),
                      "skip": ((5, 3), (5,))}
    leaves = np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(params)])
    assert leaves.dtype == np.float64 and np.all(np.abs(leaves) <= 1) and np.all(leaves != 0)

