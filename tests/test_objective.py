"""Tests of fnbp.objective: the training objective E = L(y; d) (+ lambda Omega) as nodes of the walker's graph.

Oracle: numpy by hand (softmax cross-entropy and Omega = 1/2 sum ||W||^2 over the weights only) for the value,
and ``jax.grad`` of that plain-jnp formula for the gradients the explicit walker returns (float64).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbp
from fnbp.graph import Input, Param
from fnbp.objective import objective
from marks import slow_except

jax.config.update("jax_enable_x64", True)


def _net_and_data():
    nodes = [fnbp.graph.node("h", fnbp.dense, Param(0, "W"), Param(0, "b"), Input("x")),
             fnbp.graph.node("a", fnbp.tanh, "h"),
             fnbp.graph.node("y", fnbp.dense, Param(1, "W"), Param(1, "b"), "a")]
    net = fnbp.graph.make(nodes, "y")
    rng = np.random.default_rng(3)
    params = [{"W": rng.normal(size=(5, 4)), "b": rng.normal(size=5)}, {"W": rng.normal(size=(3, 5)),
                                                                          "b": rng.normal(size=3)}]
    x, d = rng.normal(size=(6, 4)), rng.integers(0, 3, 6)
    return net, jax.tree_util.tree_map(jnp.asarray, params), jnp.asarray(x), jnp.asarray(d)


def _by_hand(params, x, d, lam, reduction):
    y = jnp.tanh(x @ params[0]["W"].T + params[0]["b"]) @ params[1]["W"].T + params[1]["b"]
    log_p = y - jax.scipy.special.logsumexp(y, axis=1, keepdims=True)
    nll = -log_p[jnp.arange(len(d)), d]
    L = nll.sum() if reduction == "sum" else nll.mean()
    omega = 0.5 * sum(jnp.sum(p["W"] ** 2) for p in params)            # weights only, never the biases
    return L + lam * omega


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("lam", [pytest.param(0.0, marks=pytest.mark.slow), 0.3])
def test_objective_value_and_walker_gradients_equal_the_formula(reduction, lam):
    net, params, x, d = _net_and_data()
    loss = functools.partial(fnbp.losses.softmax_cross_entropy, reduction=reduction)
    obj = objective(net, loss, l2=bool(lam))
    inputs = {"x": x, "d": d, **({"l2": jnp.asarray(lam)} if lam else {})}
    (E, _), grads = fnbp.graph.value_and_grad(obj, params, inputs)
    E_ref, g_ref = jax.value_and_grad(_by_hand)(params, x, d, lam, reduction)
    np.testing.assert_allclose(E, E_ref, rtol=1e-13)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    assert {n.name for n in obj.nodes} >= ({"E", "L", "penalty"} if lam else {"E"})


def test_the_penalty_is_one_node_that_sees_every_weight_and_no_bias():
    net, params, x, d = _net_and_data()
    obj = objective(net, fnbp.losses.softmax_cross_entropy, l2=True)
    inputs = {"x": x, "d": d, "l2": jnp.asarray(1.0)}
    (E_with, _), _ = fnbp.graph.value_and_grad(obj, params, inputs)
    bigger_bias = [dict(p, b=p["b"] + 10.0) for p in params]
    plain = objective(net, fnbp.losses.softmax_cross_entropy)
    (L, _), _ = fnbp.graph.value_and_grad(plain, params, {"x": x, "d": d})
    np.testing.assert_allclose(E_with - L, 0.5 * sum(float(jnp.sum(p["W"] ** 2)) for p in params), rtol=1e-13)
    (E_b, _), _ = fnbp.graph.value_and_grad(obj, bigger_bias, inputs)
    (L_b, _), _ = fnbp.graph.value_and_grad(plain, bigger_bias, {"x": x, "d": d})
    np.testing.assert_allclose(E_b - L_b, E_with - L, rtol=1e-12)       # the biases are not penalised
    assert [n.name for n in obj.nodes if n.name == "penalty"] == ["penalty"]


def test_a_bad_loss_is_a_named_error():
    net, *_ = _net_and_data()
    with pytest.raises((ValueError, TypeError), match="fnbp.objective"):
        objective(net, "no_such_loss")
