"""Tests of the loss rules (fnbp.losses).

Every loss, in both reductions, for one example, a batch and two leading batch
axes: forward against numpy, the VJP against grad_y E written out by hand,
against ``jax.vjp`` of the plain-jnp reference (<= 1e-10 relative) and against
central finite differences of our forward (<= 1e-6 relative), in float64, with
mae's inputs kept away from its kink y = d.  Also hypothesis-drawn shapes,
integer labels as ordinary arguments (float0 cotangent, nothing but the
reduction string in nondiff_argnums), trace-time errors, float32 stability of
softmax_cross_entropy, the notes' two worked examples recomputed with the math
module, the l2 penalty, and jit/vmap agreement.
"""
import functools
import inspect
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fnbp
from fnbp import losses, reference

from vjp_oracle import assert_within_tolerances, away_from_zero, max_rel, vjp_check


def _np_softmax(u):
    e = np.exp(u - np.max(u, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def _inputs(kind, rng, lead, n):
    if kind == "regression":
        y = rng.standard_normal(lead + (n,))
        return y, y + away_from_zero(rng.standard_normal(lead + (n,)))        # |y - d| >= 0.1: no mae kink
    if kind == "probabilities":
        return _np_softmax(rng.standard_normal(lead + (n,))), _np_softmax(rng.standard_normal(lead + (n,)))
    if kind == "labels":
        return 3 * rng.standard_normal(lead + (n,)), rng.integers(0, n, lead)
    raise KeyError(kind)


# name -> (kind, per-example numpy forward, numpy grad_y of the per-example loss, grad of the 2nd argument)
NP = {
    "half_sse": ("regression", lambda y, d: 0.5 * np.sum((y - d) ** 2, -1), lambda y, d: y - d,
                 lambda y, d: d - y),
    "sse": ("regression", lambda y, d: np.sum((y - d) ** 2, -1), lambda y, d: 2 * (y - d),
            lambda y, d: 2 * (d - y)),
    "mse": ("regression", lambda y, d: np.mean((y - d) ** 2, -1), lambda y, d: 2 * (y - d) / y.shape[-1],
            lambda y, d: 2 * (d - y) / y.shape[-1]),
    "mae": ("regression", lambda y, d: np.mean(np.abs(y - d), -1), lambda y, d: np.sign(y - d) / y.shape[-1],
            lambda y, d: np.sign(d - y) / y.shape[-1]),
    "cross_entropy": ("probabilities", lambda p, d: -np.sum(d * np.log(p), -1), lambda p, d: -d / p,
                      lambda p, d: -np.log(p)),
    "softmax_cross_entropy": (
        "labels",
        lambda u, t: (np.log(np.sum(np.exp(u - u.max(-1, keepdims=True)), -1)) + u.max(-1)
                      - np.take_along_axis(u, t[..., None], -1)[..., 0]),
        lambda u, t: _np_softmax(u) - np.eye(u.shape[-1])[t],                 # softmax(u) - onehot(t)
        None),
}
LEADS = [(), (7,), (2, 3)]
REDUCTIONS = ["mean", "sum"]
N = 6


def test_every_loss_is_covered():
    assert set(NP) == set(losses.LOSSES)


@pytest.fixture(scope="module")
def checked():
    """Every loss x reduction x LEADS, plus one-hot cross-entropy targets and the l2 penalty, checked in
    one compiled program: key -> [(args, result)]."""
    rng = np.random.default_rng(1)
    inputs, rules = {}, {}
    for name, (kind, *_) in NP.items():
        for reduction in REDUCTIONS:
            rules[name, reduction] = (functools.partial(getattr(losses, name), reduction=reduction),
                                      functools.partial(getattr(reference, name), reduction=reduction),
                                      (0,) if kind == "labels" else (0, 1))    # integer labels: not differentiated
            inputs[name, reduction] = [_inputs(kind, rng, lead, N) for lead in LEADS]
    for reduction in REDUCTIONS:
        rules["one-hot", reduction] = rules["cross_entropy", reduction]
        inputs["one-hot", reduction] = [(_np_softmax(rng.standard_normal((5, 4))), np.eye(4)[rng.integers(0, 4, 5)])]
    rules["l2_penalty"] = (losses.l2_penalty, reference.l2_penalty, (0, 1))
    inputs["l2_penalty"] = [(_params(rng), np.float64(0.3))]
    checks = [(rules[key][0], rules[key][1], args, rules[key][2]) for key in rules for args in inputs[key]]
    results = iter(vjp_check(checks))
    return {key: [(args, next(results)) for args in inputs[key]] for key in rules}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", list(NP))
def test_loss_vs_numpy_hand_gradient_reference_autodiff_and_finite_differences(name, reduction, checked):
    _, np_fwd, np_grad_y, np_grad_d = NP[name]
    assert_within_tolerances([res for _, res in checked[name, reduction]])
    for lead, ((y, d), res) in zip(LEADS, checked[name, reduction]):
        m = math.prod(lead) if reduction == "mean" else 1    # 'mean' divides by the number of examples
        assert res["out"].shape == ()
        np.testing.assert_allclose(res["out"], np.sum(np_fwd(y, d)) / m, rtol=1e-13)
        c = float(res["c"])
        np.testing.assert_allclose(res["grads"][0], c * np_grad_y(y, d) / m, rtol=1e-12, atol=1e-14)
        if np_grad_d is not None:
            np.testing.assert_allclose(res["grads"][1], c * np_grad_d(y, d) / m, rtol=1e-12, atol=1e-14)
        else:
            assert sorted(res["ad"]) == [0]


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_one_hot_targets_for_cross_entropy(reduction, checked):
    assert_within_tolerances([res for _, res in checked["one-hot", reduction]])


@pytest.mark.slow          # hypothesis-drawn shapes, ~40 s under load
@settings(max_examples=15, deadline=None)
@given(name=st.sampled_from(sorted(NP)), reduction=st.sampled_from(REDUCTIONS),
       batch=st.one_of(st.none(), st.integers(1, 16)), n=st.integers(1, 32), seed=st.integers(0, 2**31 - 1))
def test_losses_hypothesis_shapes(name, reduction, batch, n, seed):
    kind = NP[name][0]
    args = _inputs(kind, np.random.default_rng(seed), () if batch is None else (batch,), n)
    rule = functools.partial(getattr(losses, name), reduction=reduction)
    ref = functools.partial(getattr(reference, name), reduction=reduction)
    assert_within_tolerances(vjp_check([(rule, ref, args, (0,) if kind == "labels" else (0, 1))], seed=seed))


def test_softmax_then_cross_entropy_gives_p_minus_d_at_the_logits():
    """The notes: composing the softmax layer and the cross-entropy gives delta = p - d."""
    rng = np.random.default_rng(3)
    u, d = rng.standard_normal((4, 5)), _np_softmax(rng.standard_normal((4, 5)))
    g = jax.grad(lambda u: losses.cross_entropy(fnbp.softmax(u), d, reduction="sum"))(u)
    np.testing.assert_allclose(g, _np_softmax(u) - d, rtol=1e-12, atol=1e-15)


def test_mae_subgradient_at_the_kink_is_zero():
    y = np.array([1.0, 2.0, 3.0])
    d = np.array([1.0, 0.0, 3.0])
    g = jax.grad(losses.mae)(y, d)
    np.testing.assert_array_equal(g, [0.0, 1 / 3, 0.0])        # sign(0) = 0, as the docstring says


# --- the notes' worked examples, recomputed with the math module ------------------------------------
def test_notes_softmax_and_cross_entropy_example():
    u = [-2.0, 3.0, 1.0]
    total = sum(math.exp(x) for x in u)
    p = [math.exp(x) / total for x in u]
    np.testing.assert_allclose(fnbp.softmax(np.array(u)), p, rtol=1e-15)
    np.testing.assert_allclose(p, [0.00589975, 0.8756006, 0.11849965], atol=5e-9)   # the notes' printout
    ce = -math.log(p[1])                                     # class index 1, y = [0, 1, 0]
    assert round(ce, 4) == 0.1328
    assert ce == pytest.approx(-u[1] + math.log(total), abs=1e-15)      # J(u, t) = -u_t + ln sum_j e^{u_j}
    assert float(losses.softmax_cross_entropy(np.array(u), 1)) == pytest.approx(ce, rel=1e-15)
    assert float(losses.cross_entropy(fnbp.softmax(np.array(u)), np.array([0.0, 1.0, 0.0]))) == \
        pytest.approx(ce, rel=1e-14)


def test_notes_squared_error_example():
    u, y = np.array([1.0, 0.0]), np.array([0.8, 0.5])
    by_hand = (0.2 ** 2 + 0.5 ** 2) / 2                     # (0.04 + 0.25) / 2
    assert by_hand == pytest.approx(0.145, abs=1e-15)
    assert float(losses.mse(u, y)) == pytest.approx(0.145, abs=1e-15)       # mean over the 2 components
    assert float(losses.half_sse(u, y)) == pytest.approx(0.145, abs=1e-15)  # the notes' E = 1/2 sum_P
    assert float(losses.sse(u, y)) == pytest.approx(0.29, abs=1e-15)
    # The two coincide only because P = 2: with 3 outputs the notes' E = 1/2 sum_P is half_sse, not mse,
    u3, y3 = np.array([1.0, 0.0, 2.0]), np.array([0.8, 0.5, 1.0])
    assert float(losses.half_sse(u3, y3)) == pytest.approx(0.5 * (0.04 + 0.25 + 1.0), abs=1e-15)
    assert float(losses.mse(u3, y3)) == pytest.approx((0.04 + 0.25 + 1.0) / 3, abs=1e-15)
    # and the notes' MSE = 1/(2N) sum_N sum_P (u - y)^2 over N examples is half_sse with reduction='mean'.
    U, Y = np.array([[1.0, 0.0, 2.0], [0.5, 1.0, -1.0]]), np.array([[0.8, 0.5, 1.0], [0.0, 0.0, 0.0]])
    notes_mse = sum((U[n, k] - Y[n, k]) ** 2 for n in range(2) for k in range(3)) / (2 * 2)
    assert float(losses.half_sse(U, Y, reduction="mean")) == pytest.approx(notes_mse, abs=1e-15)


# --- integer labels are ordinary arguments ----------------------------------------------------------
def test_labels_get_a_float0_cotangent():
    logits, labels = np.array([[1.0, 2.0, 0.5], [0.1, -1.0, 2.0]]), np.array([2, 0])
    out, vjp = jax.vjp(losses.softmax_cross_entropy, logits, labels)
    g_logits, g_labels = vjp(1.0)
    assert g_labels.dtype == jax.dtypes.float0 and g_labels.shape == labels.shape
    np.testing.assert_allclose(g_logits, (_np_softmax(logits) - np.eye(3)[labels]) / 2, rtol=1e-13)
    g = jax.grad(losses.softmax_cross_entropy, argnums=1, allow_int=True)(logits, labels)
    assert g.dtype == jax.dtypes.float0


def test_labels_of_any_integer_kind():
    logits = np.array([[1.0, 2.0, 0.5], [0.1, -1.0, 2.0]])
    want = float(losses.softmax_cross_entropy(logits, np.array([2, 0])))
    for labels in [np.array([2, 0], np.int32), np.array([2, 0], np.uint8), jnp.array([2, 0])]:
        assert float(losses.softmax_cross_entropy(logits, labels)) == want
    assert float(losses.softmax_cross_entropy(logits[0], 2)) == pytest.approx(   # a Python int label
        math.log(sum(math.exp(x) for x in logits[0])) - logits[0, 2], rel=1e-15)
    assert float(jax.jit(losses.softmax_cross_entropy)(logits, np.array([2, 0]))) == pytest.approx(want, rel=1e-15)


def _custom_vjp_rules():
    rules = {name: fn.rule for name, fn in losses.LOSSES.items()}
    rules["l2_penalty"] = losses.l2_penalty.rule
    rules["dense"] = fnbp.dense.rule
    rules.update({name: fn.rule for name, fn in fnbp.activations.ACTIVATIONS.items()})
    return rules


def test_nothing_but_the_reduction_string_is_a_static_option():
    """Keyword-only parameters of a rule's fwd are its static options; everything else is traced."""
    rules = _custom_vjp_rules()
    for name, rule in rules.items():
        assert isinstance(rule, fnbp.Rule), name
        params = inspect.signature(rule.fwd).parameters.values()
        static = [p.name for p in params if p.kind == p.KEYWORD_ONLY]
        assert static == (["reduction"] if name in losses.LOSSES else []), (name, static)
    sce = rules["softmax_cross_entropy"]
    assert list(inspect.signature(sce.fwd).parameters)[1] == "labels"


# --- errors at trace time ------------------------------------------------------------------------------
def _maybe_jit(fn, jit):
    return jax.jit(fn) if jit else fn


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("name", ["half_sse", "sse", "mse", "mae", "cross_entropy"])
def test_y_and_d_shapes_must_match(name, jit):
    fn = _maybe_jit(getattr(losses, name), jit)
    with pytest.raises(ValueError, match=rf"fnbp\.losses\.{name}: y and d .*y \(3, 4\) and d \(3, 5\)"):
        fn(np.ones((3, 4)), np.ones((3, 5)))
    with pytest.raises(ValueError, match=rf"fnbp\.losses\.{name}: .*y \(4,\) and d \(2, 4\)"):
        fn(np.ones(4), np.ones((2, 4)))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_bad_reduction(name, jit):
    args = (np.ones((2, 3)), np.zeros(2, int)) if name == "softmax_cross_entropy" else (np.ones((2, 3)),) * 2
    for bad in ["avg", "MEAN", None]:
        fn = _maybe_jit(functools.partial(getattr(losses, name), reduction=bad), jit)
        with pytest.raises(ValueError, match=rf"fnbp\.losses\.{name}: reduction must be 'mean' or 'sum', "
                                             rf"got {re.escape(repr(bad))}"):
            fn(*args)


@pytest.mark.parametrize("jit", [False, True])
def test_softmax_cross_entropy_shape_and_dtype_errors(jit):
    fn = _maybe_jit(losses.softmax_cross_entropy, jit)
    with pytest.raises(ValueError, match=r"softmax_cross_entropy: .*logits \(3, 4\) and labels \(2,\).*batch"):
        fn(np.ones((3, 4)), np.zeros(2, int))
    with pytest.raises(ValueError, match=r"softmax_cross_entropy: .*logits \(4,\) and labels \(2,\)"):
        fn(np.ones(4), np.zeros(2, int))
    with pytest.raises(ValueError, match=r"softmax_cross_entropy: labels must be integer.*float"):
        fn(np.ones((2, 4)), np.zeros(2))
    with pytest.raises(ValueError, match=r"softmax_cross_entropy: labels must be integer"):
        fn(np.ones((2, 4)), np.zeros(2, bool))


def test_labels_out_of_range_raise_outside_jit():
    logits = np.zeros((3, 4))
    for bad in ([0, 4, 1], [0, -1, 1]):
        with pytest.raises(ValueError, match=r"softmax_cross_entropy: labels must be in \[0, 4\) for 4 classes"):
            losses.softmax_cross_entropy(logits, np.array(bad))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        losses.softmax_cross_entropy(np.zeros(3), 3)


def test_labels_out_of_range_inside_jit_loss_and_gradient_agree():
    """Inside jit nothing is raised: a label outside [0, n_classes) -- too large or negative -- makes that
    example's loss NaN and its gradient row NaN (loss and gradient agree: training stops on it), while the
    other examples' rows stay exact softmax(y) - onehot(d) over M."""
    logits = np.array([[1.0, 2.0, 0.5], [0.1, -1.0, 2.0], [0.3, 0.2, 0.1]])
    for bad in (3, -1):
        labels = np.array([0, bad, 2])
        loss = jax.jit(losses.softmax_cross_entropy)(logits, labels)
        assert np.isnan(loss)
        g = np.asarray(jax.jit(jax.grad(losses.softmax_cross_entropy))(logits, labels))
        assert np.isnan(g[1]).all()
        want = (_np_softmax(logits) - np.eye(3)[[0, 0, 2]]) / 3
        np.testing.assert_allclose(g[[0, 2]], want[[0, 2]], rtol=1e-13)
        per_example = jax.jit(jax.vmap(losses.softmax_cross_entropy))(logits, labels)
        assert np.isfinite(per_example[0]) and np.isnan(per_example[1]) and np.isfinite(per_example[2])


# --- float32 stability ---------------------------------------------------------------------------------
def test_softmax_cross_entropy_stable_in_float32():
    logits = np.array([[1e4, 0.0], [0.0, 1e4], [-1e4, 1e4], [1e3, -1e3], [1e4, 1e4]], np.float32)
    labels = np.array([0, 0, 0, 1, 1])
    # by hand: E_n = logsumexp(u_n) - u_n[t_n] = 0, 1e4, 2e4, 2e3, log 2
    per_example = np.array([0.0, 1e4, 2e4, 2e3, math.log(2)])
    # grad = softmax(u) - onehot(t): p = [1, 0], [0, 1], [0, 1], [1, 0], [1/2, 1/2]
    grad_sum = np.array([[0.0, 0.0], [-1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [0.5, -0.5]])
    for reduction, m in [("sum", 1), ("mean", 5)]:
        loss, g = jax.value_and_grad(functools.partial(losses.softmax_cross_entropy, reduction=reduction))(
            logits, labels)
        assert loss.dtype == jnp.float32 and g.dtype == jnp.float32
        assert np.isfinite(loss) and np.all(np.isfinite(g))
        assert float(loss) == pytest.approx(per_example.sum() / m, rel=1e-6)
        np.testing.assert_allclose(g, grad_sum / m, atol=1e-7)
    big = np.array([-1e4, 1e4, 0.0, 1e3, -1e3], np.float32)
    for t, want in [(1, 0.0), (0, 2e4), (2, 1e4), (3, 9e3)]:
        loss, g = jax.value_and_grad(losses.softmax_cross_entropy)(big, t)
        assert float(loss) == pytest.approx(want, abs=1e-3) and np.all(np.isfinite(g))


# --- the L2 penalty -----------------------------------------------------------------------------------
def _params(rng):
    return [{"W": rng.standard_normal((4, 3)), "b": rng.standard_normal(4)},
            {"W": rng.standard_normal((2, 4)), "b": rng.standard_normal(2), "gamma": rng.standard_normal(2)}]


def test_l2_penalty_value_and_gradient_by_hand():
    rng = np.random.default_rng(4)
    params, lam = _params(rng), 0.3
    omega = 0.5 * sum(float(np.sum(layer["W"] ** 2)) for layer in params)    # weights only
    assert float(losses.l2_penalty(params, lam)) == pytest.approx(lam * omega, rel=1e-14)
    g_params, g_lam = jax.grad(losses.l2_penalty, argnums=(0, 1))(params, lam)
    for layer, g in zip(params, g_params):
        np.testing.assert_allclose(g["W"], lam * layer["W"], rtol=1e-15)          # grad_W = lambda W
        assert np.all(g["b"] == 0) and np.all(g.get("gamma", np.zeros(1)) == 0)   # biases etc. not penalised
    assert float(g_lam) == pytest.approx(omega, rel=1e-14)                        # grad_lambda = Omega


def test_l2_penalty_vs_reference_autodiff_and_finite_differences(checked):
    ((params, lam), res), = checked["l2_penalty"]
    assert sorted(res["ad"]) == [0, 1]             # the parameters and lambda
    assert_within_tolerances([res])


# --- jit and vmap agree with the plain call -------------------------------------------------------
JV_KEYS = [(name, reduction) for name in NP for reduction in REDUCTIONS] + ["l2_penalty"]


@pytest.fixture(scope="module")
def transformed():
    """For every loss and reduction (and l2_penalty): value and VJP under jax.jit for two input sets, and
    under jax.vmap over the stack of the two, each in one program for all of them.  (The vmap program is jitted to keep
    the test fast; jit alone is compared with the plain call, and fnbp.check's eager vmap comparison
    runs in test_crosscheck.)"""
    rng = np.random.default_rng(6)
    rules, sets = {}, {}
    for key in JV_KEYS:
        if key == "l2_penalty":
            rules[key], sets[key] = losses.l2_penalty, [(_params(rng), np.float64(0.1 + k)) for k in range(2)]
        else:
            name, reduction = key
            rules[key] = functools.partial(getattr(losses, name), reduction=reduction)
            sets[key] = [_inputs(NP[name][0], rng, (4,), N) for _ in range(2)]

    def value_and_vjp(key, args):
        out, f = jax.vjp(rules[key], *args)
        return out, f(np.float64(1.7))

    def all_rules(args_by_key):
        return [value_and_vjp(key, args) for key, args in zip(JV_KEYS, args_by_key)]

    jitted = jax.jit(lambda both: [all_rules(args) for args in both])(
        [[sets[key][k] for key in JV_KEYS] for k in range(2)])
    jitted = [dict(zip(JV_KEYS, j)) for j in jitted]
    stacked = [jax.tree_util.tree_map(lambda *xs: np.stack(xs), *sets[key]) for key in JV_KEYS]
    vmapped = jax.jit(jax.vmap(all_rules))(stacked)
    return sets, value_and_vjp, jitted, dict(zip(JV_KEYS, vmapped))


@pytest.mark.parametrize("key", JV_KEYS, ids=str)
def test_jit_and_vmap_match_plain_call(key, transformed):
    sets, value_and_vjp, jitted, vmapped = transformed
    leaves = jax.tree_util.tree_leaves
    for x, y in zip(leaves(jitted[0][key]), leaves(value_and_vjp(key, sets[key][0]))):   # jit == plain
        if x.dtype != jax.dtypes.float0:            # the labels' cotangent
            assert max_rel(x, y) <= 1e-12
    for k in range(2):                                                                 # vmap == jit
        for x, y in zip(leaves(vmapped[key]), leaves(jitted[k][key])):
            if x.dtype != jax.dtypes.float0:
                assert max_rel(x[k], y) <= 1e-12
