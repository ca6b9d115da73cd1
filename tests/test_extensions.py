"""Tests of fnbp.extensions: the per-rule registry that per-example, DP and curvature quantities read.

A student's own parametrised rule (a dense layer written from scratch, so a different ``Rule`` from
``fnbp.dense``) is refused by name until it registers a view; once registered, its per-example gradients and
norms equal ``vmap(grad)`` of a plain-jnp reference (float64, 1e-12).  A wrong view is caught by the same
oracle, a coupling rule is refused with its reason, and second derivatives are looked up as registered.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbp
from fnbp import extensions, per_example
from fnbp import reference as R
from fnbp.graph import Input, Param

jax.config.update("jax_enable_x64", True)
B, N_IN, N_HID, N_OUT = 5, 4, 6, 3


def _my_dense():
    """y = h W^T + b, written by a student: a new Rule object each call (the registry is global)."""
    def fwd(W, b, h):
        return h @ W.T + b, (W, h)

    def bwd(res, delta):
        W, h = res
        return delta.T @ h, delta.sum(0), delta @ W
    return fnbp.rule(fwd, bwd, name="my_dense")


def _case(rule):
    net = fnbp.graph.make([fnbp.graph.node("hidden", rule, Param("a", 0, "W"), Param("a", 0, "b"), Input("x")),
                           fnbp.graph.node("act", fnbp.tanh, "hidden"),
                           fnbp.graph.node("y", fnbp.dense, Param("a", 1, "W"), Param("a", 1, "b"), "act")], "y")
    rng = np.random.default_rng(0)
    params = {"a": [{"W": jnp.asarray(rng.normal(size=(N_HID, N_IN))), "b": jnp.asarray(rng.normal(size=N_HID))},
                    {"W": jnp.asarray(rng.normal(size=(N_OUT, N_HID))), "b": jnp.asarray(rng.normal(size=N_OUT))}]}
    x, d = jnp.asarray(rng.normal(size=(B, N_IN))), jnp.asarray(rng.normal(size=(B, N_OUT)))

    def loss_n(p, x_n, d_n):
        h = R.tanh(R.dense(p["a"][0]["W"], p["a"][0]["b"], x_n[None]))
        return R.half_sse(R.dense(p["a"][1]["W"], p["a"][1]["b"], h), d_n[None], reduction="sum")
    ref = jax.vmap(jax.grad(loss_n), in_axes=(None, 0, 0))(params, x, d)
    return net, params, x, d, ref


def _rows(args, options, delta):
    W, _, h = args
    return extensions.Rows(h[:, None, :], delta[:, None, :])


def test_a_rule_without_a_view_is_refused_by_name():
    rule = _my_dense()
    net, params, x, d, _ = _case(rule)
    assert extensions.per_example(rule) is None
    with pytest.raises(ValueError, match=r"fnbp.per_example.*'hidden'.*my_dense"):
        per_example.grad_norms(params, x, d, arch=net, loss=fnbp.losses.half_sse)


def test_a_registered_view_gives_per_example_gradients_and_norms_equal_to_vmap_grad():
    rule = _my_dense()
    extensions.register(rule, view=_rows)
    assert extensions.per_example(rule).view is _rows and extensions.per_example(rule.rule).weight == 0
    net, params, x, d, ref = _case(rule)
    got = per_example.grads(params, x, d, arch=net, loss=fnbp.losses.half_sse)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    norms = per_example.grad_norms(params, x, d, arch=net, loss=fnbp.losses.half_sse)
    ref_norms = np.sqrt(sum(np.sum(np.asarray(v).reshape(B, -1) ** 2, 1) for v in jax.tree_util.tree_leaves(ref)))
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-12)


def test_a_wrong_view_is_caught_by_the_oracle():
    """Mutation: a view that pairs example n's delta with example n+1's input (rolled rows)."""
    rule = _my_dense()
    extensions.register(rule, view=lambda args, options, delta: extensions.Rows(
        jnp.roll(args[2], 1, axis=0)[:, None, :], delta[:, None, :]))
    net, params, x, d, ref = _case(rule)
    got = per_example.grads(params, x, d, arch=net, loss=fnbp.losses.half_sse)
    assert np.max(np.abs(np.asarray(got["a"][0]["W"]) - np.asarray(ref["a"][0]["W"]))) > 1e-3


def test_a_coupling_rule_is_refused_with_its_reason():
    rule = _my_dense()
    extensions.register_coupling(rule, "it mixes the examples of a batch (a test's reason)")
    assert extensions.couples_examples(rule) == "it mixes the examples of a batch (a test's reason)"
    net, params, x, d, _ = _case(rule)
    with pytest.raises(ValueError, match="a test's reason"):
        per_example.grad_norms(params, x, d, arch=net, loss=fnbp.losses.half_sse)
    assert extensions.couples_examples(fnbp.batch_norm) and extensions.couples_examples(fnbp.dense) is None


def test_second_derivatives_are_looked_up_as_registered():
    assert extensions.second_derivative(fnbp.relu) == (True, extensions.LINEAR)
    registered, g2 = extensions.second_derivative(fnbp.tanh)
    a = jnp.linspace(-2.0, 2.0, 7)
    np.testing.assert_allclose(g2(a, jnp.tanh(a)), jax.vmap(jax.grad(jax.grad(jnp.tanh)))(a), rtol=1e-12, atol=1e-15)
    assert registered
    rule = _my_dense()
    assert extensions.second_derivative(rule) == (False, None)


def _two_weights():
    """y = W h + U h^2 + b: a student's rule with two weights, one of them without a bias."""
    def fwd(W, U, b, h):
        return h @ W.T + (h * h) @ U.T + b, (W, U, h)

    def bwd(res, delta):
        W, U, h = res
        return delta.T @ h, delta.T @ (h * h), delta.sum(0), delta @ W + 2 * h * (delta @ U)
    return fnbp.rule(fwd, bwd, name="two_weights")


def test_a_rule_with_several_weights_registers_one_view_per_weight():
    rule = _two_weights()
    with pytest.raises(ValueError, match=r"fnbp.extensions.register: weight and bias must both be"):
        extensions.register(rule, view=_rows, weight=(0, 1), bias=2)
    extensions.register(rule, weight=(0, 1), bias=(2, None), view=lambda args, options, delta: (
        extensions.Rows(args[3][:, None, :], delta[:, None, :]),
        extensions.Rows((args[3] ** 2)[:, None, :], delta[:, None, :])))
    assert [(p.weight, p.bias) for p in extensions.parts(extensions.per_example(rule))] == [(0, 2), (1, None)]
    net = fnbp.graph.make([fnbp.graph.node("y", rule, Param("W"), Param("U"), Param("b"), Input("x"))], "y")
    rng = np.random.default_rng(1)
    params = {k: jnp.asarray(rng.normal(size=s)) for k, s in [("W", (N_OUT, N_IN)), ("U", (N_OUT, N_IN)),
                                                             ("b", (N_OUT,))]}
    x, d = jnp.asarray(rng.normal(size=(B, N_IN))), jnp.asarray(rng.normal(size=(B, N_OUT)))

    def loss_n(p, x_n, d_n):
        return R.half_sse(x_n[None] @ p["W"].T + (x_n[None] ** 2) @ p["U"].T + p["b"], d_n[None], reduction="sum")
    ref = jax.vmap(jax.grad(loss_n), in_axes=(None, 0, 0))(params, x, d)
    got = per_example.grads(params, x, d, arch=net, loss=fnbp.losses.half_sse)
    for k in params:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-12, atol=1e-12)
    ref_norms = np.sqrt(sum(np.sum(np.asarray(v).reshape(B, -1) ** 2, 1) for v in ref.values()))
    np.testing.assert_allclose(per_example.grad_norms(params, x, d, arch=net, loss=fnbp.losses.half_sse), ref_norms,
                               rtol=1e-12)
