"""Tests of fnbp.rules: the Rule type and its one constructor ``fnbp.rule``.

A student's own rule must work in jax.grad, jit, vmap, in fnbp.check and in fnbp.train (tests/test_train.py); the
constructor is the only place a custom VJP is built, and cotangents come back in the primal's dtype.
"""
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbp
from fnbp import reference
from student_rules import softplus, softplus_fwd, softplus_bwd   # noqa: F401  (the shared student rule)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_rule_object_name_doc_and_signature():
    assert isinstance(softplus.rule, fnbp.Rule)
    assert softplus.rule == fnbp.Rule(softplus_fwd, softplus_bwd, "softplus")
    assert softplus.__name__ == "softplus" and softplus.__doc__.startswith("softplus g(a)")
    assert fnbp.rules.rule_of(softplus) is softplus.rule and fnbp.rules.rule_of(jnp.tanh) is None
    for fn in [fnbp.dense, fnbp.relu, fnbp.losses.half_sse, fnbp.batch_norm, fnbp.dropout, fnbp.losses.l2_penalty]:
        assert isinstance(fnbp.rules.rule_of(fn), fnbp.Rule), fn


def test_student_rule_under_grad_jit_vmap_is_its_own_backward():
    a = np.linspace(-3, 3, 12).reshape(3, 4)
    g = jax.jit(jax.grad(lambda a: jnp.sum(softplus(a) ** 2)))(a)
    want = 2 * np.logaddexp(a, 0) / (1 + np.exp(-a))
    np.testing.assert_allclose(g, want, rtol=1e-6)
    per_row = jax.vmap(jax.grad(lambda r: jnp.sum(softplus(r))))(a)
    np.testing.assert_allclose(per_row, 1 / (1 + np.exp(-a)), rtol=1e-6)
    wrong = fnbp.rule(softplus_fwd, lambda a, g: (2 * g * jax.nn.sigmoid(a),))
    np.testing.assert_allclose(jax.grad(lambda a: jnp.sum(wrong(a)))(a), 2 / (1 + np.exp(-a)), rtol=1e-6)


def test_static_options_reach_fwd_and_bwd():
    def scaled_fwd(a, *, scale=2.0):
        return scale * a, None

    def scaled_bwd(_, g, *, scale):
        return (scale * g,)
    scaled = fnbp.rule(scaled_fwd, scaled_bwd)
    assert float(jax.grad(lambda a: scaled(a, scale=5.0))(1.0)) == 5.0
    assert float(jax.grad(scaled)(1.0)) == 2.0
    with pytest.raises(TypeError, match="fnbp.scaled: options scale must be hashable"):
        scaled(1.0, scale=[1.0])


def test_constructor_errors_are_named():
    with pytest.raises(TypeError, match="fnbp.rule: fwd and bwd must be callables"):
        fnbp.rule(softplus_fwd, None)
    with pytest.raises(TypeError, match="no \\*args/\\*\\*kwargs"):
        fnbp.rule(lambda *a: (a[0], None), softplus_bwd)
    too_few = fnbp.rule(lambda a, b: (a * b, (a, b)), lambda res, g: (g * res[1],), name="mul")
    with pytest.raises(ValueError, match="fnbp.rule 'mul': bwd returned 1 cotangents for 2 inputs \\(a, b\\)"):
        jax.grad(too_few)(2.0, 3.0)
    with pytest.raises(TypeError, match="fnbp.softplus: a must be an array, got a Python list"):
        softplus([1.0, 2.0])
    with pytest.raises(TypeError, match="fnbp.softplus: "):
        softplus(1.0, 2.0)


def test_cotangents_keep_the_primal_dtype():
    """float16 in, float16 gradient out (plain jnp does the same), for rules that compute in float32."""
    x16 = jnp.ones((3, 4), jnp.float16)
    W16, b16 = jnp.ones((2, 4), jnp.float16), jnp.zeros((2,), jnp.float16)
    cases = {
        "dense": lambda x: fnbp.dense(W16, b16, x).astype(jnp.float32).sum(),
        "prelu": lambda x: fnbp.prelu(x, jnp.float32(0.25)).astype(jnp.float32).sum(),
        "half_sse": lambda x: fnbp.losses.half_sse(x, jnp.zeros_like(x)).astype(jnp.float32),
        "batch_norm": lambda x: (fnbp.batch_norm(x * jnp.arange(3, dtype=jnp.float16)[:, None],
                                                  jnp.ones(4, jnp.float32), jnp.zeros(4, jnp.float32)) ** 2).sum(),
    }
    for name, f in cases.items():
        assert jax.grad(f)(x16).dtype == jnp.float16, name
    # and the gradient of a float32 parameter used with float16 data stays float32
    g_alpha = jax.grad(lambda al: fnbp.prelu(-x16, al).astype(jnp.float32).sum())(jnp.float32(0.25))
    assert g_alpha.dtype == jnp.float32


def test_cotangent_cast_is_what_makes_the_dtype():
    """Mutation guard: a bwd that returns float32 for a float16 input is cast back by the wrapper."""
    def up_fwd(a):
        return a, None

    def up_bwd(_, g):
        return (g.astype(jnp.float32),)
    up = fnbp.rule(up_fwd, up_bwd)
    assert jax.grad(lambda a: up(a).sum())(jnp.ones(3, jnp.float16)).dtype == jnp.float16


def test_no_private_jax_api_in_the_package():
    """Nothing in fnbp/ touches jax._src or custom_vjp objects' attributes; rules.py alone builds custom VJPs."""
    for path in (ROOT / "fnbp").rglob("*.py"):
        text = path.read_text()
        assert "_src" not in text, path
        code = "\n".join(line.split("#")[0] for line in text.splitlines())
        if path.name != "rules.py":
            assert not re.search(r"custom_vjp\(|\.defvjp\(|nondiff_argnums", code), path
        assert not re.search(r"\.rule\.(fun|nondiff_argnums)\b", code), path


# --- named errors of the rules (issue #16) ----------------------------------------------------
def test_bad_inputs_to_rules_are_named_errors():
    x = np.ones((3, 4), np.float32)
    with pytest.raises(TypeError, match="fnbp.sigmoid: the pre-activation a must be a floating-point array"):
        fnbp.sigmoid(np.arange(3))
    with pytest.raises(TypeError, match="fnbp.relu: a must be an array, got a Python list"):
        fnbp.relu([1.0, -2.0])
    with pytest.raises(ValueError, match="fnbp.prelu: alpha must broadcast to a's shape"):
        fnbp.prelu(x, np.ones(3, np.float32))
    with pytest.raises(ValueError, match="fnbp.losses.half_sse: the batch is empty"):
        fnbp.losses.half_sse(np.zeros((0, 4)), np.zeros((0, 4)))
    with pytest.raises(ValueError, match="fnbp.losses.softmax_cross_entropy: the batch is empty"):
        fnbp.losses.softmax_cross_entropy(np.zeros((0, 4)), np.zeros((0,), np.int32))
    with pytest.raises(ValueError, match="fnbp.dropout: training-mode dropout needs an explicit jax.random key"):
        fnbp.dropout(x, 0.5, None)
    for p in (jnp.float32(-0.5), np.float64(1.0), jnp.asarray(float("nan"))):
        with pytest.raises(ValueError, match="fnbp.dropout: the drop probability p must be in \\[0, 1\\)"):
            fnbp.dropout(x, p, jax.random.PRNGKey(0))
    assert fnbp.dropout(x, jnp.float32(0.5), jax.random.PRNGKey(0)).shape == x.shape


def test_nan_propagates_through_every_activation():
    a = jnp.array([jnp.nan, -1.0, 2.0])
    for name, g in fnbp.activations.ACTIVATIONS.items():
        out = g(a, jnp.float32(0.25)) if name == "prelu" else g(a)
        assert jnp.isnan(out[0]) if name != "softmax" else jnp.isnan(out).all(), name
    for name in ["relu", "step", "sign", "sigmoid", "tanh"]:
        assert jnp.isnan(getattr(reference, name)(a)[0]), name       # the references agree


# --- malformed rules: named errors at trace time (issue #30, item 4) -------------------------------------------
RuleError = fnbp.rules.RuleError


def _mul_rule(bwd, **kw):
    return fnbp.rule(lambda a, b: (a * b, (a, b)), bwd, name="mul", **kw)


def test_fwd_returning_a_bare_array_is_refused_not_sliced():
    """The issue's exact rule: fwd returns a*2 instead of (a*2, residuals); it used to return (a*2)[0]."""
    doubled = fnbp.rule(lambda a: a * 2, lambda r, g: (2 * g,), name="doubled")
    a = jnp.arange(6.0).reshape(2, 3)
    for call in (lambda: doubled(a), lambda: jax.jit(doubled)(a), lambda: jax.grad(lambda a: doubled(a).sum())(a)):
        with pytest.raises(RuleError, match=r"fnbp.rule 'doubled': fwd must return the pair \(out, residuals\), "
                                            r"got \w+ float\d+\[2, 3\]"):
            call()
    triple = fnbp.rule(lambda a: (a, a, a), lambda r, g: (g,), name="triple")
    with pytest.raises(RuleError, match="fnbp.rule 'triple': fwd must return the pair .*got a tuple of 3"):
        triple(a)


@pytest.mark.parametrize("bwd, message", [
    (lambda res, g: (g * res[1],), r"bwd returned 1 cotangents for 2 inputs \(a, b\)"),
    (lambda res, g: (g * res[1], g * res[0], g), r"bwd returned 3 cotangents for 2 inputs"),
    (lambda res, g: (jnp.sum(g * res[1], axis=0), g * res[0]), r"input a: the cotangent has shape \(3,\) but the "
                                                                r"input has shape \(2, 3\)"),
    (lambda res, g: ((g * res[1]).astype(jnp.int32), g * res[0]), r"input a: the cotangent has dtype int32 but the "
                                                                  r"input is float\d+; a non-float cotangent"),
    (lambda res, g: (g * res[1], (g * res[0]).astype(jnp.complex64)), r"input b: .* dtype complex64 .* a complex "
                                                                       r"cotangent is not cast silently"),
    (lambda res, g: (g * res[1], g > 0), r"input b: the cotangent has dtype bool"),
    (lambda res, g: (g * res[1], None), r"input b: bwd returned None for a float input of shape \(2, 3\); .*"
                                        r"nondiff"),
    (lambda res, g: (g * res[1], "x"), r"input b: the cotangent must be an array, got str"),
])
def test_malformed_cotangents_are_named_errors(bwd, message):
    mul = _mul_rule(bwd)
    a, b = jnp.ones((2, 3)), jnp.full((2, 3), 2.0)
    with pytest.raises(RuleError, match="fnbp.rule 'mul': " + message):
        jax.grad(lambda a, b: jnp.sum(mul(a, b)))(a, b)
    with pytest.raises(ValueError):                # RuleError is a ValueError and a TypeError
        jax.jit(jax.grad(lambda a, b: jnp.sum(mul(a, b))))(a, b)


def test_nondiff_declares_float_inputs_without_a_cotangent():
    scale = fnbp.rule(lambda x, s: (x * s, s), lambda s, g: (g * s, None), name="scale", nondiff=("s",))
    g_x, g_s = jax.grad(lambda x, s: jnp.sum(scale(x, s)), argnums=(0, 1))(jnp.ones(3), 2.5)
    np.testing.assert_array_equal(g_x, np.full(3, 2.5)) and np.testing.assert_array_equal(g_s, 0.0)
    assert scale.nondiff == ("s",)
    with pytest.raises(TypeError, match=r"fnbp.rule: scale's nondiff names 'slope', which are not positional "
                                        r"inputs of fwd \(x, s\)"):
        fnbp.rule(lambda x, s: (x * s, s), lambda s, g: (g * s, None), name="scale", nondiff=("slope",))
    # fnbp's own rules with hyperparameter inputs declare them
    assert fnbp.leaky_relu.nondiff == ("slope",) and fnbp.regularization._dropout.nondiff == ("p", "key")
    assert fnbp.feedback.dense_fa.nondiff == ("B",) and fnbp.feedback.sign_ste.nondiff == ("window",)


def test_pytree_input_cotangent_structure_is_checked():
    total = fnbp.rule(lambda p: (p["w"].sum() + p["b"].sum(), p), lambda p, g: ({"w": g * jnp.ones_like(p["w"])},),
                      name="total")
    with pytest.raises(RuleError, match="fnbp.rule 'total': input p: the cotangent must have the input's structure"):
        jax.grad(total)({"w": jnp.ones(2), "b": jnp.ones(3)})


def test_numpy_and_jax_scalar_options_are_static_python_numbers():
    seen = []

    def pow_fwd(a, *, k=2):
        seen.append(type(k))
        return a ** k, a

    power = fnbp.rule(pow_fwd, lambda a, g, *, k: (g * k * a ** (k - 1),), name="power")
    for k in (np.int64(3), jnp.int32(3), np.uint8(3)):
        assert float(jax.jit(jax.grad(lambda a: power(a, k=k)))(2.0)) == 12.0
    assert set(seen) == {int}
    with pytest.raises(TypeError, match="fnbp.power: option k must be a static value, got a traced int32"):
        jax.jit(lambda a, k: power(a, k=k))(2.0, jnp.int32(3))


def test_check_cotangents_gives_the_walker_the_same_checks():
    """fnbp.rules.check_cotangents: what op_bwd checks, for code that calls rule.bwd directly."""
    check = fnbp.rules.check_cotangents
    a, b = jnp.ones((2, 3)), jnp.full((2, 3), 2.0)
    assert len(check(fnbp.ops.mul, (a, b), (a, b))) == 2
    with pytest.raises(RuleError, match=r"fnbp.rule 'mul': input v: the cotangent has shape \(3,\)"):
        check(fnbp.ops.mul, (a, b), (a, b[0]))
    with pytest.raises(RuleError, match=r"fnbp.rule 'mul': bwd returned 1 cotangents for 2 inputs"):
        check(fnbp.ops.mul, (a, b), a)
    assert check(fnbp.leaky_relu, (a, 0.1), (a, None))[1] is None                 # slope: declared nondiff
    with pytest.raises(TypeError, match="was not made by fnbp.rule"):
        check(jnp.tanh, (a,), (a,))
