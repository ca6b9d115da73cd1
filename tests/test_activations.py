"""Tests of the activation rules (fnbp.activations).

Each rule's custom VJP is compared with three independent oracles: ``jax.vjp``
of the plain-jnp reference (fnbp.reference), central finite differences of our
forward, and g'(a) written out by hand in numpy (softmax: the full Jacobian
diag(p) - p p^T).  Inputs are drawn away from the kinks at 0 (ReLU, leaky ReLU,
PReLU, step, sign).  Also: forward values against numpy, the conventions at the
kink, PReLU's alpha gradient for a scalar and a per-unit alpha, float32
stability for |a| up to 1e4, jit/vmap agreement and the ``.rule.fwd/.bwd``
contract the explicit backprop loop relies on.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbp
from fnbp import activations, reference

from vjp_oracle import assert_within_tolerances, away_from_zero, max_rel, vjp_check


N = 5   # units


def _a(rng, lead):
    return away_from_zero(2 * rng.standard_normal(lead + (N,)))


# name -> (our rule, reference, numpy forward, args maker(rng, lead))
CASES = {
    "identity": (fnbp.identity, reference.identity, lambda a: a, lambda rng, lead: (_a(rng, lead),)),
    "sigmoid": (fnbp.sigmoid, reference.sigmoid, lambda a: 1 / (1 + np.exp(-a)), lambda rng, lead: (_a(rng, lead),)),
    "tanh": (fnbp.tanh, reference.tanh, np.tanh, lambda rng, lead: (_a(rng, lead),)),
    "relu": (fnbp.relu, reference.relu, lambda a: np.maximum(a, 0), lambda rng, lead: (_a(rng, lead),)),
    "leaky_relu": (fnbp.leaky_relu, reference.leaky_relu, lambda a: np.where(a > 0, a, 0.01 * a),
                   lambda rng, lead: (_a(rng, lead),)),
    "leaky_relu(slope=0.2)": (functools.partial(fnbp.leaky_relu, slope=0.2),
                              functools.partial(reference.leaky_relu, slope=0.2),
                              lambda a: np.where(a > 0, a, 0.2 * a), lambda rng, lead: (_a(rng, lead),)),
    "prelu(scalar alpha)": (fnbp.prelu, reference.prelu, lambda a, al: np.where(a > 0, a, al * a),
                            lambda rng, lead: (_a(rng, lead), np.float64(0.25 + 0.1 * rng.standard_normal()))),
    "prelu(per-unit alpha)": (fnbp.prelu, reference.prelu, lambda a, al: np.where(a > 0, a, al * a),
                              lambda rng, lead: (_a(rng, lead), 0.25 + 0.1 * rng.standard_normal(N))),
    "prelu(alpha of shape (1,))": (fnbp.prelu, reference.prelu, lambda a, al: np.where(a > 0, a, al * a),
                                   lambda rng, lead: (_a(rng, lead), 0.25 + 0.1 * rng.standard_normal(1))),
    "step": (fnbp.step, reference.step, lambda a: (a > 0).astype(float), lambda rng, lead: (_a(rng, lead),)),
    "sign": (fnbp.sign, reference.sign, np.sign, lambda rng, lead: (_a(rng, lead),)),
    "softmax": (fnbp.softmax, reference.softmax,
                lambda a: np.exp(a) / np.sum(np.exp(a), axis=-1, keepdims=True), lambda rng, lead: (_a(rng, lead),)),
}
LEADS = [(), (7,), (2, 3)]   # one example, a batch, two leading batch axes


def test_every_activation_is_covered():
    assert set(activations.ACTIVATIONS) == {name.split("(")[0] for name in CASES}


# --- g'(a) written out by hand -------------------------------------------------------------------
def _sum_to(x, shape):
    """Sum x over the axes that broadcasting added or stretched to go from shape to x.shape."""
    x = x.sum(axis=tuple(range(x.ndim - len(shape)))) if x.ndim > len(shape) else x
    return x.sum(axis=tuple(i for i, n in enumerate(shape) if n == 1), keepdims=True) if shape else x


def _softmax_vjp_from_p(p, g):
    """J^T g with the full Jacobian J = diag(p) - p p^T (dp_i/da_j = p_i ([i = j] - p_j)), row by row."""
    out = np.empty_like(g)
    for idx in np.ndindex(*p.shape[:-1]):
        out[idx] = (np.diag(p[idx]) - np.outer(p[idx], p[idx])).T @ g[idx]
    return out


def _hand_vjp(name, args, g):
    a = args[0]
    if name == "identity":
        return (g,)
    if name == "sigmoid":
        s = 1 / (1 + np.exp(-a))
        return (g * s * (1 - s),)
    if name == "tanh":
        return (g * (1 - np.tanh(a) ** 2),)
    if name == "relu":
        return (g * (a > 0),)
    if name.startswith("leaky_relu"):
        slope = 0.2 if "0.2" in name else 0.01
        return (g * np.where(a > 0, 1.0, slope),)
    if name.startswith("prelu"):
        alpha = args[1]
        return g * np.where(a > 0, 1.0, alpha), _sum_to(g * np.where(a > 0, 0.0, a), np.shape(alpha))
    if name in ("step", "sign"):
        return (np.zeros_like(g),)
    if name == "softmax":
        return (_softmax_vjp_from_p(np.exp(a) / np.sum(np.exp(a), axis=-1, keepdims=True), g),)
    raise KeyError(name)


# --- forward and backward against numpy, g'(a) by hand, autodiff of the reference, finite differences ----
@pytest.fixture(scope="module")
def checked():
    """All activations x LEADS, checked in one compiled program: name -> [result per lead]."""
    rng = np.random.default_rng(2)
    inputs = {name: [CASES[name][3](rng, lead) for lead in LEADS] for name in CASES}
    checks = [(CASES[name][0], CASES[name][1], args, tuple(range(len(args))))
              for name in CASES for args in inputs[name]]
    results = iter(vjp_check(checks))
    return {name: [(args, next(results)) for args in inputs[name]] for name in CASES}


@pytest.mark.parametrize("name", list(CASES))
def test_rule_vs_numpy_hand_derivative_reference_autodiff_and_finite_differences(name, checked):
    """Forward = numpy; VJP = g'(a) by hand, = jax.vjp of the reference (<= 1e-10 rel), = finite
    differences (<= 1e-6 rel); for one example, a batch and two leading batch axes."""
    _, _, np_fwd, _ = CASES[name]
    assert_within_tolerances([res for _, res in checked[name]])
    for lead, (args, res) in zip(LEADS, checked[name]):
        assert sorted(res["ad"]) == list(range(len(args)))      # prelu: alpha's gradient is checked too
        assert res["out"].shape == lead + (N,)
        np.testing.assert_allclose(res["out"], np_fwd(*args), rtol=1e-14, atol=1e-15)
        want = _hand_vjp(name, args, res["c"])
        assert len(res["grads"]) == len(want)
        for i, w in enumerate(want):
            assert np.shape(res["grads"][i]) == np.shape(w)
            np.testing.assert_allclose(res["grads"][i], w, rtol=1e-13, atol=1e-15)


def test_prelu_alpha_gradient_by_hand_arithmetic():
    a = np.array([[2.0, -1.0, -3.0], [-0.5, 4.0, -2.0]])
    g = np.array([[1.0, 2.0, -1.0], [3.0, 1.0, 0.5]])
    # scalar alpha: sum over a <= 0 of g * a = 2(-1) + (-1)(-3) + 3(-0.5) + 0.5(-2) = -2 + 3 - 1.5 - 1 = -1.5
    _, grad_alpha = jax.vjp(fnbp.prelu, a, np.float64(0.3))[1](g)
    assert grad_alpha.shape == () and float(grad_alpha) == pytest.approx(-1.5, abs=1e-15)
    # per-unit alpha: unit 0: 3(-0.5) = -1.5; unit 1: 2(-1) = -2; unit 2: (-1)(-3) + 0.5(-2) = 2
    delta, grad_alpha = jax.vjp(fnbp.prelu, a, np.array([0.1, 0.2, 0.3]))[1](g)
    np.testing.assert_allclose(grad_alpha, [-1.5, -2.0, 2.0], atol=1e-15)
    np.testing.assert_allclose(delta, [[1.0, 0.4, -0.3], [0.3, 1.0, 0.15]], atol=1e-15)


# --- conventions at the kinks and for hyperparameters --------------------------------------------
def test_values_and_derivatives_at_zero():
    z = np.zeros(3)
    g = np.array([1.0, -2.0, 3.0])
    assert np.all(fnbp.relu(z) == 0) and np.all(jax.vjp(fnbp.relu, z)[1](g)[0] == 0)       # g'(0) = 0
    assert np.all(fnbp.step(z) == 0) and np.all(jax.vjp(fnbp.step, z)[1](g)[0] == 0)       # step(0) = 0
    assert np.all(fnbp.sign(z) == 0) and np.all(jax.vjp(fnbp.sign, z)[1](g)[0] == 0)
    np.testing.assert_array_equal(jax.vjp(lambda a: fnbp.leaky_relu(a, 0.1), z)[1](g)[0], 0.1 * g)
    d_a, d_alpha = jax.vjp(fnbp.prelu, z, np.float64(0.3))[1](g)
    np.testing.assert_allclose(d_a, 0.3 * g, rtol=1e-15)
    assert float(d_alpha) == 0.0


def test_step_and_sign_pass_no_gradient():
    a = np.array([-5.0, -0.3, 0.2, 7.0])
    for fn in (fnbp.step, fnbp.sign):
        # d/da sum(fn(a) * a) = fn(a) + a * fn'(a) = fn(a): only the explicit factor a contributes
        np.testing.assert_array_equal(jax.grad(lambda a: jnp.sum(fn(a) * a))(a), fn(a))


def test_leaky_relu_slope_is_a_hyperparameter():
    a = np.array([-2.0, 1.0, -0.5])
    _, d_slope = jax.vjp(fnbp.leaky_relu, a, 0.1)[1](np.ones(3))
    assert float(d_slope) == 0.0                              # documented: no gradient for the slope


def test_rule_fwd_and_bwd_match_jax_vjp():
    """fn.rule.fwd / fn.rule.bwd (what the explicit backprop loop calls) agree with jax.vjp."""
    rng = np.random.default_rng(4)
    for name in ["identity", "sigmoid", "tanh", "relu", "leaky_relu", "prelu(per-unit alpha)", "step", "sign",
                 "softmax"]:
        rule, _, _, make = CASES[name]
        args = make(rng, (3,))
        g = rng.standard_normal((3, N))
        extra = args[1:] if name.startswith("prelu") else (0.01,) if name == "leaky_relu" else ()
        h, res = rule.rule.fwd(args[0], *extra)
        np.testing.assert_allclose(h, rule(*args), rtol=1e-15)
        grads = rule.rule.bwd(res, g)
        want = jax.vjp(rule, *args)[1](g)
        np.testing.assert_allclose(grads[0], want[0], rtol=1e-15, atol=1e-15)
        if name.startswith("prelu"):
            np.testing.assert_allclose(grads[1], want[1], rtol=1e-15, atol=1e-15)


# --- float32 stability for |a| up to 1e4 ---------------------------------------------------------
BIG = np.array([1e4, -1e4, 1e3, -1e3, 0.0, 30.0, -30.0], np.float32)


def _stable_sigmoid(a):
    return 0.5 * (1 + np.tanh(np.asarray(a, np.float64) / 2))


STABLE = {   # name -> (fn, float64 forward, float64 derivative g'(a)), written independently
    "identity": (fnbp.identity, lambda a: a, lambda a: np.ones_like(a)),
    "sigmoid": (fnbp.sigmoid, _stable_sigmoid, lambda a: _stable_sigmoid(a) * _stable_sigmoid(-a)),
    "tanh": (fnbp.tanh, np.tanh, lambda a: 1 / np.cosh(np.clip(a, -300, 300)) ** 2),
    "relu": (fnbp.relu, lambda a: np.maximum(a, 0), lambda a: (a > 0) * 1.0),
    "leaky_relu": (fnbp.leaky_relu, lambda a: np.where(a > 0, a, 0.01 * a), lambda a: np.where(a > 0, 1, 0.01)),
    "prelu": (lambda a: fnbp.prelu(a, np.float32(0.25)), lambda a: np.where(a > 0, a, 0.25 * a),
              lambda a: np.where(a > 0, 1, 0.25)),
    "step": (fnbp.step, lambda a: (a > 0) * 1.0, np.zeros_like),
    "sign": (fnbp.sign, np.sign, np.zeros_like),
}


@pytest.mark.parametrize("name", list(STABLE))
def test_elementwise_activations_stable_in_float32(name):
    fn, f64, df64 = STABLE[name]
    h, vjp = jax.vjp(fn, BIG)
    delta = vjp(np.ones_like(BIG))[0]
    assert h.dtype == jnp.float32 and delta.dtype == jnp.float32
    assert np.all(np.isfinite(h)) and np.all(np.isfinite(delta))
    a64 = BIG.astype(np.float64)
    np.testing.assert_allclose(h, f64(a64), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(delta, df64(a64), rtol=1e-6, atol=1e-6)


def test_sigmoid_and_tanh_saturate_exactly_in_float32():
    x = np.array([1e4, -1e4], np.float32)
    np.testing.assert_array_equal(fnbp.sigmoid(x), [1.0, 0.0])
    np.testing.assert_array_equal(fnbp.tanh(x), [1.0, -1.0])
    assert float(fnbp.sigmoid(np.float32(0))) == 0.5


def test_softmax_stable_in_float32():
    np.testing.assert_array_equal(fnbp.softmax(np.array([1e4, 0.0], np.float32)), [1.0, 0.0])
    a = np.array([[1e4, 0.0, 0.0, 0.0], [-1e4, 1e4, 0.0, 1e3], [1e4, 1e4, -1e4, -1e3], [0.0, 0.0, 0.0, 0.0],
                  [-1e4, -1e4, -1e4, -1e4 + 1]], np.float32)
    e = math.e
    want = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0.5, 0.5, 0, 0], [0.25] * 4,   # by hand (exp(-1e3) = 0)
                     [1 / (3 + e), 1 / (3 + e), 1 / (3 + e), e / (3 + e)]])
    g = np.random.default_rng(5).standard_normal(a.shape).astype(np.float32)
    p, vjp = jax.vjp(fnbp.softmax, a)
    delta = vjp(g)[0]
    assert p.dtype == jnp.float32 and delta.dtype == jnp.float32
    assert np.all(np.isfinite(p)) and np.all(np.isfinite(delta))
    np.testing.assert_allclose(p, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(delta, _softmax_vjp_from_p(want, g.astype(np.float64)), rtol=1e-5, atol=1e-6)


# --- jit and vmap agree with the plain call ------------------------------------------------------
@pytest.fixture(scope="module")
def transformed():
    """For every activation: value and VJP under jax.jit, and under jax.vmap over a stack of two input
    sets (alpha stacked too), each in one program for all activations.  (The vmap program is jitted to
    keep the test fast; jit alone is compared with the plain call, and fnbp.check's eager vmap
    comparison runs in test_crosscheck.)"""
    rng = np.random.default_rng(6)
    sets = {name: [CASES[name][3](rng, (4,)) for _ in range(2)] for name in CASES}
    cts = {name: rng.standard_normal((4, N)) for name in CASES}

    def value_and_vjp(name, args):
        out, f = jax.vjp(CASES[name][0], *args)
        return out, f(cts[name])

    def all_rules(args_by_name):
        return {name: value_and_vjp(name, args) for name, args in args_by_name.items()}

    jitted = jax.jit(all_rules)({name: s[0] for name, s in sets.items()})
    stacked = {name: tuple(np.stack(xs) for xs in zip(*s)) for name, s in sets.items()}
    vmapped = jax.jit(jax.vmap(all_rules))(stacked)
    return sets, value_and_vjp, jitted, vmapped


@pytest.mark.parametrize("name", list(CASES))
def test_jit_and_vmap_match_plain_call(name, transformed):
    sets, value_and_vjp, jitted, vmapped = transformed
    plain = [value_and_vjp(name, args) for args in sets[name]]
    leaves = jax.tree_util.tree_leaves
    assert len(leaves(jitted[name])) == len(leaves(vmapped[name])) == len(leaves(plain[0])) >= 2   # value + VJP
    for x, y in zip(leaves(jitted[name]), leaves(plain[0])):
        assert max_rel(x, y) <= 1e-12
    for k in range(2):
        for x, y in zip(leaves(vmapped[name]), leaves(plain[k])):
            assert max_rel(x[k], y) <= 1e-12
    if len(sets[name][0]) == 2:     # prelu: vmap over the rows of a, alpha shared, equals the batched call
        a, alpha = sets[name][0]
        assert max_rel(jax.vmap(lambda row: CASES[name][0](row, alpha))(a), CASES[name][0](a, alpha)) <= 1e-12
