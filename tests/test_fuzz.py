"""A hypothesis fuzz over the public API: every call either raises a named ValueError/TypeError
(the message names the fnbp function) or returns a correct result: equal to the plain-jnp reference
(``fnbp.reference``) where the inputs are finite, and NaN wherever a NaN went in (NaN never passes
silently).  Bounded: few examples per property, small shapes, no deadline."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings, strategies as st

import fnbp
from fnbp import mlp, optim, reference

# Fuzzing (hypothesis draws of malformed inputs, ~100 s on 2 cores): CI's full run, not the fast loop.
pytestmark = pytest.mark.slow

FUZZ = settings(max_examples=30, deadline=None, derandomize=True, phases=(Phase.explicit, Phase.generate),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])   # no shrinking: bounded
SPECIAL = [0.0, -0.0, 1.0, -1.0, 3.5, -2.25, 1e30, -1e30, np.nan, np.inf, -np.inf]
DTYPES = ["float32", "float64", "float16", "int32"]


@st.composite
def arrays(draw, shape=None, dtypes=DTYPES, special=True):
    shape = shape or draw(st.sampled_from([(1, 1), (2, 3), (3, 2), (4,)]))
    dtype = draw(st.sampled_from(dtypes))
    n = int(np.prod(shape))
    pool = st.sampled_from(SPECIAL) if special else st.floats(-4, 4)
    values = draw(st.lists(st.one_of(st.floats(-4, 4), pool), min_size=n, max_size=n))
    a = np.array(values, np.float64).reshape(shape)
    if dtype == "int32":
        a = np.nan_to_num(a, nan=0, posinf=7, neginf=-7).clip(-7, 7).round()
    with np.errstate(over="ignore"):
        return a.astype(dtype)


def _named_error_or(name, call, check):
    try:
        out = call()
    except (ValueError, TypeError) as e:
        assert name in str(e), f"{name}: {type(e).__name__} does not name the function: {e}"
        return
    check(out)


def _tol(dtype):
    return {"float16": 2e-2, "float32": 1e-5}.get(np.dtype(dtype).name, 1e-10)


def _ref_input(a):
    """The reference's input: the same floating dtype (so overflow to inf matches), ints as float32."""
    return jnp.asarray(a, a.dtype if np.issubdtype(a.dtype, np.floating) else np.float32)


def _same(out, ref, inputs_nan, dtype):
    dtype = np.asarray(out).dtype if np.issubdtype(np.asarray(out).dtype, np.floating) else np.float32
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape
    assert np.all(np.isnan(out[inputs_nan])), "a NaN input did not give a NaN output"
    ok = ~inputs_nan & np.isfinite(ref)
    np.testing.assert_allclose(out[ok], ref[ok], rtol=_tol(dtype), atol=_tol(dtype))
    assert np.all(np.isfinite(out[ok])), "finite reference, non-finite result"


ELEMENTWISE = {"relu": (fnbp.relu, reference.relu), "sigmoid": (fnbp.sigmoid, reference.sigmoid),
               "tanh": (fnbp.tanh, reference.tanh), "leaky_relu": (fnbp.leaky_relu, reference.leaky_relu),
               "identity": (fnbp.identity, reference.identity), "step": (fnbp.step, reference.step),
               "sign": (fnbp.sign, reference.sign)}


@pytest.mark.parametrize("name", list(ELEMENTWISE))
@FUZZ
@given(a=arrays())
@example(a=np.array([[np.nan]], np.float32))          # inputs of bugs this fuzz found (fixed)
@example(a=np.array([[0]], np.int32))
@example(a=np.array([0, 0, 0, -1], np.int32))
def test_activation_is_a_named_error_or_the_reference(name, a):
    fn, ref = ELEMENTWISE[name]
    _named_error_or(f"fnbp.{name}" if name != "identity" else "fnbp", lambda: fn(jnp.asarray(a)),
                    lambda out: _same(out, ref(_ref_input(a)), np.isnan(a), a.dtype))


@FUZZ
@given(a=arrays(shape=(2, 3)))
def test_softmax_is_a_named_error_or_the_reference(a):
    rows_nan = np.broadcast_to(np.isnan(a).any(axis=-1, keepdims=True), a.shape)
    _named_error_or("fnbp.softmax", lambda: fnbp.softmax(jnp.asarray(a)),
                    lambda out: _same(out, reference.softmax(_ref_input(a)), rows_nan, a.dtype))


@FUZZ
@given(data=st.data(), n_out=st.integers(1, 3), n_in=st.integers(1, 3), batch=st.integers(1, 3))
def test_dense_is_a_named_error_or_the_reference(data, n_out, n_in, batch):
    dtype = data.draw(st.sampled_from(["float32", "float64"]))
    W = data.draw(arrays(shape=(n_out, n_in), dtypes=[dtype]))
    b = data.draw(arrays(shape=(n_out,), dtypes=[dtype]))
    h = data.draw(arrays(shape=(batch, n_in), dtypes=[dtype]))
    nan_rows = np.isnan(h).any(-1)[:, None] | np.isnan(W).any(-1)[None, :] | np.isnan(b)[None, :]
    ref = reference.dense(*(_ref_input(v) for v in (W, b, h)))
    finite_in = np.isfinite(h).all(-1)[:, None] & np.isfinite(W).all(-1)[None, :] & np.isfinite(b)[None, :]
    _named_error_or("fnbp.dense", lambda: fnbp.dense(jnp.asarray(W), jnp.asarray(b), jnp.asarray(h)),
                    lambda out: _same(np.where(finite_in | nan_rows, out, np.nan),
                                      np.where(finite_in, ref, np.nan), nan_rows, dtype))


LOSSES = ["half_sse", "sse", "mse", "mae"]


@pytest.mark.parametrize("name", LOSSES)
@FUZZ
@given(data=st.data(), reduction=st.sampled_from(["mean", "sum"]))
def test_loss_is_a_named_error_or_the_reference(name, data, reduction):
    y = data.draw(arrays(shape=(3, 2), dtypes=["float32", "float64"]))
    d = data.draw(arrays(shape=(3, 2), dtypes=[y.dtype.name]))
    fn, ref = getattr(fnbp.losses, name), getattr(reference, name)
    with np.errstate(all="ignore"):
        expect = ref(_ref_input(y), _ref_input(d), reduction=reduction)
    _named_error_or(f"fnbp.losses.{name}", lambda: fn(jnp.asarray(y), jnp.asarray(d), reduction=reduction),
                    lambda out: _same(np.reshape(out, (1,)), np.reshape(expect, (1,)),
                                      np.array([np.isnan(y).any() or np.isnan(d).any()]), y.dtype))


@FUZZ
@given(logits=arrays(shape=(3, 4), dtypes=["float32", "float64"]),
       labels=st.lists(st.integers(-2, 5), min_size=3, max_size=3))
def test_softmax_cross_entropy_is_a_named_error_or_the_reference(logits, labels):
    labels = np.array(labels, np.int32)
    in_range = bool(((labels >= 0) & (labels < 4)).all())
    expect = reference.softmax_cross_entropy(_ref_input(logits), jnp.asarray(labels))

    def check(out):
        # an out-of-range label must not give a finite loss silently (outside jit it is an error)
        assert in_range, f"labels {labels} out of [0, 4) gave {out}"
        _same(np.reshape(out, (1,)), np.reshape(expect, (1,)), np.array([np.isnan(logits).any()]), logits.dtype)

    _named_error_or("fnbp.losses.softmax_cross_entropy",
                    lambda: fnbp.losses.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels)), check)


@FUZZ
@example(sizes=[None], x=np.zeros((2, 3), np.float32))
@given(sizes=st.lists(st.one_of(st.integers(-1, 5), st.sampled_from([2.5, True, "3", None])), min_size=0,
                      max_size=4),
       x=arrays(shape=(2, 3), dtypes=["float32", "float64"], special=False))
def test_mlp_init_and_apply_are_named_errors_or_the_reference(sizes, x):
    def check(params):
        assert all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes), \
            f"fnbp.mlp.init accepted sizes {sizes}"
        assert [tuple(np.shape(p["W"])) for p in params] == list(zip(sizes[1:], sizes[:-1]))
        if sizes[0] != 3:
            return
        h = jnp.asarray(x, np.float64)
        for k, p in enumerate(params):
            h = reference.dense(jnp.asarray(p["W"], np.float64), jnp.asarray(p["b"], np.float64), h)
            h = reference.relu(h) if k < len(params) - 1 else h
        _named_error_or("fnbp.mlp.apply", lambda: mlp.apply(params, jnp.asarray(x)),
                        lambda out: _same(out, h, np.zeros(np.shape(h), bool), x.dtype))

    _named_error_or("fnbp.mlp.init", lambda: mlp.init(jax.random.PRNGKey(0), sizes), check)


FACTORIES = ["sgd", "momentum", "ema_momentum", "nesterov", "simplified_nesterov", "adagrad", "rmsprop", "adadelta",
             "adam", "delta_bar_delta"]


@pytest.mark.parametrize("name", FACTORIES)
@settings(FUZZ, max_examples=12)
@example(lr=-0.1)
@given(lr=st.one_of(st.sampled_from([0.1, 1e-3, 0.0, -0.1, np.nan, np.inf, "0.1", True, None, 3]),
                    st.floats(-1, 1)))
def test_optimizer_factory_is_a_named_error_or_a_finite_step(name, lr):
    params = {"W": jnp.ones((2, 2), jnp.float32), "b": jnp.zeros((2,), jnp.float32)}
    grads = {"W": jnp.full((2, 2), 0.5, jnp.float32), "b": jnp.ones((2,), jnp.float32)}

    def check(opt):
        ok = isinstance(lr, (int, float)) and not isinstance(lr, bool) and np.isfinite(lr) and lr >= 0
        assert ok, f"fnbp.optim.{name} accepted learning_rate {lr!r}"
        updates, _ = opt.update(grads, opt.init(params), params)
        new = optim.apply_updates(params, updates)
        for leaf in jax.tree_util.tree_leaves(new):
            assert leaf.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(leaf)))

    _named_error_or(f"fnbp.optim.{name}", lambda: getattr(optim, name)(lr), check)


# --- fnbp.rule with drawn malformed fwd/bwd pairs: a named RuleError or the correct gradient ---------------------
FWD_KINDS = ["pair", "list_pair", "bare", "triple", "single_tuple"]
BWD_KINDS = ["ok", "list", "too_few", "too_many", "bare", "wrong_shape", "int", "bool", "complex", "none_for_a",
             "none_for_b", "python_float", "tree"]


def _fuzz_pair(fwd_kind, bwd_kind):
    """f(a, b) = a (.) b, its fwd returning ``fwd_kind`` and its bwd ``bwd_kind`` (see FWD_KINDS, BWD_KINDS)."""
    def mul_fwd(a, b):
        out, res = a * b, (a, b)
        return {"pair": (out, res), "list_pair": [out, res], "bare": out, "triple": (out, res, None),
                "single_tuple": (out,)}[fwd_kind]

    def mul_bwd(res, g):
        a, b = res
        ga, gb = g * b, g * a
        return {"ok": (ga, gb), "list": [ga, gb], "too_few": (ga,), "too_many": (ga, gb, gb), "bare": ga,
                "wrong_shape": (jnp.sum(ga, axis=0), gb), "int": (ga.astype(jnp.int32), gb),
                "bool": (ga, gb > 0), "complex": (ga.astype(jnp.complex64), gb), "none_for_a": (None, gb),
                "none_for_b": (ga, None), "python_float": (ga, 1.0), "tree": ({"a": ga}, gb)}[bwd_kind]
    return mul_fwd, mul_bwd


def _rule_outcome(fwd_kind, bwd_kind, nondiff, a, b):
    """A named error, or the gradient of sum(w (.) f(a, b)) checked against the hand-derived one."""
    fwd, bwd = _fuzz_pair(fwd_kind, bwd_kind)
    f = fnbp.rule(fwd, bwd, name="fuzzed", nondiff=nondiff)
    w = np.linspace(-1, 1, a.size).reshape(a.shape).astype(a.dtype)
    try:
        value = f(a, b)
        ga, gb = jax.grad(lambda a, b: jnp.sum(w * f(a, b)), argnums=(0, 1))(a, b)
    except (ValueError, TypeError) as e:
        assert "fnbp.rule 'fuzzed'" in str(e) and isinstance(e, fnbp.rules.RuleError), f"unnamed {type(e).__name__}: {e}"
        return "named error"
    np.testing.assert_allclose(value, a * b, rtol=1e-6)
    np.testing.assert_allclose(ga, w * b, rtol=1e-6)
    np.testing.assert_allclose(gb, np.zeros_like(b) if nondiff else w * a, rtol=1e-6)
    assert ga.dtype == a.dtype and gb.dtype == b.dtype
    return "correct"


WELL_FORMED = {("pair", "ok"), ("pair", "list"), ("list_pair", "ok"), ("list_pair", "list")}


@settings(FUZZ, max_examples=150)
@given(fwd_kind=st.sampled_from(FWD_KINDS), bwd_kind=st.sampled_from(BWD_KINDS), nondiff=st.sampled_from([(), ("b",)]),
       shape=st.sampled_from([(2, 3), (3,), (1, 4)]), dtype=st.sampled_from(["float32", "float64"]))
def test_rule_with_malformed_fwd_bwd_is_a_named_error_or_the_correct_gradient(fwd_kind, bwd_kind, nondiff, shape,
                                                                              dtype):
    with jax.enable_x64(dtype == "float64"):
        rng = np.random.default_rng(0)
        a, b = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
        outcome = _rule_outcome(fwd_kind, bwd_kind, nondiff, a, b)
    well_formed = (fwd_kind, bwd_kind) in WELL_FORMED or (nondiff and fwd_kind in ("pair", "list_pair")
                                                          and bwd_kind in ("none_for_b", "python_float", "bool"))
    assert outcome == ("correct" if well_formed else "named error"), (fwd_kind, bwd_kind, nondiff, outcome)
