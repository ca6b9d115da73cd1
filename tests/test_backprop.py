"""Tests of fnbp.backprop (the notes' explicit loop) and fnbp.examples (fan-out).

Every gradient is compared three ways, in float64, to <= 1e-10 relative per leaf:

* ``fnbp.backprop``               -- the explicit loop calling the rules' fwd/bwd;
* ``jax.grad`` through ``fnbp.mlp.apply`` -- JAX running our custom_vjp rules;
* ``jax.grad`` of a plain-jnp reference network written here from
  ``fnbp.reference`` (JAX's own autodiff, no custom rule, no fnbp.mlp).

Also: the loop is jit-compatible and uses no autodiff (source grep), it takes its
backward from each activation's ``.rule`` (a deliberately wrong rule changes
the loop and jax.grad identically), the skip-connection example sums the
gradients of both paths at h1 (and dropping either summand is caught), and the
chain-rule example of the notes (d/dx log(xy) = 1/x).
"""
import functools
import inspect
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbp
import fnbp.examples
from fnbp import losses
from fnbp import reference as ref

F64 = jnp.float64
RTOL = 1e-10

# name -> (fnbp activation, reference activation taking (a, layer)); leaky_relu's slope is per case.
ACTIVATIONS = {
    "identity": (fnbp.identity, lambda a, layer: ref.identity(a)),
    "sigmoid": (fnbp.sigmoid, lambda a, layer: ref.sigmoid(a)),
    "tanh": (fnbp.tanh, lambda a, layer: ref.tanh(a)),
    "relu": (fnbp.relu, lambda a, layer: ref.relu(a)),
    "prelu": (fnbp.prelu, lambda a, layer: ref.prelu(a, layer["alpha"])),   # learnable alpha
    "step": (fnbp.step, lambda a, layer: ref.step(a)),
    "sign": (fnbp.sign, lambda a, layer: ref.sign(a)),
    "softmax": (fnbp.softmax, lambda a, layer: ref.softmax(a)),
}
HIDDEN = ["identity", "sigmoid", "tanh", "relu", "leaky_relu", "prelu", "step", "sign"]
LOSSES = ["half_sse", "sse", "mse", "mae", "cross_entropy", "softmax_cross_entropy"]
REDUCTIONS = ["mean", "sum"]
REGRESSION_OUTPUTS = ["identity", "sigmoid", "tanh", "relu", "leaky_relu", "softmax", "sign"]


def activation_pair(name, slope):
    if name == "leaky_relu":
        return (functools.partial(fnbp.leaky_relu, slope=slope),
                lambda a, layer: ref.leaky_relu(a, slope=slope))
    return ACTIVATIONS[name]


def rel_err(a, b):
    """max |a - b| / max |b| (absolute when b is all zero)."""
    a, b = np.asarray(a), np.asarray(b)
    scale = np.max(np.abs(b)) if b.size else 0.0
    return float(np.max(np.abs(a - b)) / (scale if scale > 0 else 1.0)) if b.size else 0.0


def tree_rel_err(a, b):
    """Largest per-leaf relative error; the two trees must have the same structure."""
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    return max(rel_err(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def reference_network(params, x, ref_acts):
    """Plain-jnp forward (fnbp.reference only): h_k = g_k(W_k h_{k-1} + b_k)."""
    h = x
    for layer, g in zip(params, ref_acts):
        h = g(ref.dense(layer["W"], layer["b"], h), layer)
    return h


# ------------------------------------------------------------------ random cases
N_CASES = 48   # = 6 losses x 2 reductions x (single, batch) x (no l2, l2): every combination once


def make_case(i):
    """Case i: loss, reduction, single/batch and l2 from i's digits; architecture random from seed i."""
    rng = np.random.default_rng(1000 + i)
    loss_name = LOSSES[i % 6]
    reduction = REDUCTIONS[(i // 6) % 2]
    batch = (i // 12) % 2 == 1
    l2 = 0.0 if (i // 24) % 2 == 0 else float(rng.uniform(0.01, 0.5))
    depth = 1 + i % 5
    widths = [int(rng.integers(1, 65)) for _ in range(depth + 1)]
    if loss_name in ("cross_entropy", "softmax_cross_entropy"):
        widths[-1] = max(widths[-1], 2)
    # hidden activations: the first hidden layer cycles through every activation, the rest random
    hidden = [HIDDEN[(i // 5 + k) % len(HIDDEN)] if k == 0 else HIDDEN[rng.integers(len(HIDDEN))]
              for k in range(depth - 1)]
    if loss_name == "cross_entropy":
        out = "softmax"
    elif loss_name == "softmax_cross_entropy":
        out = ["identity", "tanh", "leaky_relu"][i % 3]           # logits
    else:
        out = REGRESSION_OUTPUTS[i % len(REGRESSION_OUTPUTS)]
    slope = float(rng.uniform(0.01, 0.5))
    use_prelu = "prelu" in hidden
    init = fnbp.mlp.INITS[i % 3]
    params = fnbp.mlp.init(jax.random.key(i), widths, init=init, dtype=F64,
                           prelu_alpha=0.25 if use_prelu else None)
    # glorot/he start with b = 0; give biases random values so nothing sits at a kink by construction
    params = [dict(layer, b=jnp.asarray(rng.uniform(-0.5, 0.5, layer["b"].shape)),
                   **({"alpha": layer["alpha"] + jnp.asarray(rng.uniform(-0.2, 0.2, layer["alpha"].shape))}
                      if "alpha" in layer else {}))
              for layer in params]
    lead = (int(rng.integers(2, 9)),) if batch else ()
    x = jnp.asarray(rng.normal(size=lead + (widths[0],)))
    n_out = widths[-1]
    if loss_name == "softmax_cross_entropy":
        d = jnp.asarray(rng.integers(0, n_out, size=lead))
    elif loss_name == "cross_entropy":
        if i % 2:
            d = jax.nn.one_hot(rng.integers(0, n_out, size=lead), n_out, dtype=F64)
        else:
            d = jax.nn.softmax(jnp.asarray(rng.normal(size=lead + (n_out,))), axis=-1)
    else:
        d = jnp.asarray(rng.normal(size=lead + (n_out,)))
    return dict(loss_name=loss_name, reduction=reduction, l2=l2, hidden=hidden, out=out, slope=slope,
                params=params, x=x, d=d, widths=widths, init=init)


def three_gradients(case):
    """(E, grads) from fnbp.backprop, jax.grad through fnbp.mlp.apply, jax.grad of the reference."""
    c = case
    acts = [activation_pair(n, c["slope"]) for n in c["hidden"] + [c["out"]]]
    fn_hidden, fn_out = [a[0] for a in acts[:-1]], acts[-1][0]
    ref_acts = [a[1] for a in acts]
    loss = functools.partial(getattr(losses, c["loss_name"]), reduction=c["reduction"])
    ref_loss = functools.partial(getattr(ref, c["loss_name"]), reduction=c["reduction"])

    E_bp, g_bp = fnbp.backprop(c["params"], c["x"], c["d"], activation=fn_hidden, output=fn_out,
                               loss=loss, l2=c["l2"])

    def through_apply(params):
        y = fnbp.mlp.apply(params, c["x"], activation=fn_hidden, output=fn_out)
        return loss(y, c["d"]) + losses.l2_penalty(params, c["l2"])

    def reference(params):
        return ref_loss(reference_network(params, c["x"], ref_acts), c["d"]) + ref.l2_penalty(params, c["l2"])

    E_apply, g_apply = jax.value_and_grad(through_apply)(c["params"])
    E_ref, g_ref = jax.value_and_grad(reference)(c["params"])
    return (E_bp, g_bp), (E_apply, g_apply), (E_ref, g_ref)


def test_cases_cover_every_activation_loss_and_mode():
    cases = [make_case(i) for i in range(N_CASES)]
    used = {n for c in cases for n in c["hidden"] + [c["out"]]}
    assert used >= set(HIDDEN) | {"softmax"}
    combos = {(c["loss_name"], c["reduction"], c["x"].ndim, c["l2"] > 0) for c in cases}
    assert len(combos) == 6 * 2 * 2 * 2
    assert {len(c["widths"]) - 1 for c in cases} == {1, 2, 3, 4, 5}
    assert max(max(c["widths"]) for c in cases) > 48 and min(min(c["widths"]) for c in cases) <= 2
    assert any("prelu" in c["hidden"] for c in cases)


@pytest.mark.parametrize("i", range(N_CASES))
def test_backprop_equals_grad_through_apply_and_reference(i):
    case = make_case(i)
    (E_bp, g_bp), (E_apply, g_apply), (E_ref, g_ref) = three_gradients(case)
    assert rel_err(E_bp, E_ref) <= 1e-12 and rel_err(E_apply, E_ref) <= 1e-12
    assert tree_rel_err(g_bp, g_ref) <= RTOL, case
    assert tree_rel_err(g_apply, g_ref) <= RTOL, case
    assert tree_rel_err(g_bp, g_apply) <= RTOL, case
    # PReLU's alpha is learnable: it gets a gradient, and a non-zero one where it is used
    for k, name in enumerate(case["hidden"]):
        assert ("alpha" in g_bp[k]) == ("alpha" in case["params"][k])
        if name == "prelu" and np.any(np.asarray(g_ref[k]["alpha"]) != 0):
            assert np.any(np.asarray(g_bp[k]["alpha"]) != 0)


def test_prelu_alpha_gradient_by_hand():
    """One PReLU hidden unit, checked against the chain rule written out in plain Python."""
    W1, b1, W2, b2, alpha, x, d = 1.5, -2.0, 0.7, 0.1, 0.25, 0.4, 1.0
    params = [{"W": jnp.array([[W1]]), "b": jnp.array([b1]), "alpha": jnp.array([alpha])},
              {"W": jnp.array([[W2]]), "b": jnp.array([b2])}]
    a1 = W1 * x + b1                 # -1.4 < 0: the alpha branch
    h1 = alpha * a1
    y = W2 * h1 + b2
    dE_dy = y - d                    # half_sse
    dE_dalpha = dE_dy * W2 * a1      # dh1/dalpha = a1 where a1 <= 0
    dE_dW1 = dE_dy * W2 * alpha * x
    E, g = fnbp.backprop(params, jnp.array([x]), jnp.array([d]), activation=fnbp.prelu)
    assert math.isclose(float(E), 0.5 * (y - d) ** 2, rel_tol=1e-14)
    assert math.isclose(float(g[0]["alpha"][0]), dE_dalpha, rel_tol=1e-14)
    assert math.isclose(float(g[0]["W"][0, 0]), dE_dW1, rel_tol=1e-14)
    assert math.isclose(float(g[1]["W"][0, 0]), dE_dy * h1, rel_tol=1e-14)


def test_l2_penalty_adds_lambda_W_to_weights_only():
    params = fnbp.mlp.init(jax.random.key(2), (4, 5, 3), init="uniform", dtype=F64, prelu_alpha=0.25)
    x = jax.random.normal(jax.random.key(3), (6, 4), F64)
    d = jax.random.normal(jax.random.key(4), (6, 3), F64)
    E0, g0 = fnbp.backprop(params, x, d, activation=fnbp.prelu)
    E1, g1 = fnbp.backprop(params, x, d, activation=fnbp.prelu, l2=0.3)
    omega = 0.5 * sum(float(np.sum(np.asarray(p["W"]) ** 2)) for p in params)   # 1/2 sum ||W_k||^2
    assert math.isclose(float(E1 - E0), 0.3 * omega, rel_tol=1e-12)
    for p, a, b in zip(params, g0, g1):
        np.testing.assert_allclose(b["W"] - a["W"], 0.3 * np.asarray(p["W"]), rtol=1e-12, atol=1e-14)
        np.testing.assert_array_equal(b["b"], a["b"])                            # biases: no penalty
        if "alpha" in p:
            np.testing.assert_array_equal(b["alpha"], a["alpha"])                # nor PReLU slopes


# ------------------------------------------------------------------ jit, no autodiff, rule reuse
def test_backprop_is_jit_compatible():
    case = make_case(29)   # batch, softmax_cross_entropy / mean or similar -- any case works
    acts = [activation_pair(n, case["slope"])[0] for n in case["hidden"]]
    out = activation_pair(case["out"], case["slope"])[0]
    loss = functools.partial(getattr(losses, case["loss_name"]), reduction=case["reduction"])

    @jax.jit
    def jitted(params, x, d, l2):          # l2 traced
        return fnbp.backprop(params, x, d, activation=acts, output=out, loss=loss, l2=l2)

    E_e, g_e = fnbp.backprop(case["params"], case["x"], case["d"], activation=acts, output=out, loss=loss, l2=0.2)
    E_j, g_j = jitted(case["params"], case["x"], case["d"], 0.2)
    assert rel_err(E_j, E_e) <= 1e-12
    assert tree_rel_err(g_j, g_e) <= 1e-12
    # and inside jit(vmap(...)): per-example gradients equal one backprop call per example
    params = fnbp.mlp.init(jax.random.key(3), (4, 6, 2), dtype=F64)
    xs = jax.random.normal(jax.random.key(4), (5, 4), F64)
    ds = jax.random.normal(jax.random.key(5), (5, 2), F64)
    per_example = jax.jit(jax.vmap(lambda x, d: fnbp.backprop(params, x, d)[1]))(xs, ds)
    for n in range(5):
        g_n = fnbp.backprop(params, xs[n], ds[n])[1]
        assert tree_rel_err(jax.tree_util.tree_map(lambda v: v[n], per_example), g_n) <= 1e-12


def test_backprop_source_has_no_autodiff():
    src = pathlib.Path(inspect.getsourcefile(fnbp.backprop)).read_text()
    code = "\n".join(line.split("#")[0] for line in src.splitlines())           # ignore comments
    code = re.sub(r'"""(.|\n)*?"""', "", code)                                   # and docstrings
    for name in ("jax.grad", "jax.vjp", "value_and_grad", "jax.jvp", "jax.linearize", "custom_vjp"):
        assert name not in code, name
    assert not re.search(r"\b(grad|vjp|jvp|linearize)\(", code)
    assert not re.search(r"from jax import .*\b(grad|vjp|jvp|linearize)\b", code)


def wrong_tanh():
    """A copy of fnbp.tanh whose rule has a deliberately wrong backward (g' = 2 (1 - h^2) + 0.5)."""
    @jax.custom_vjp
    def rule(a):
        return jnp.tanh(a)

    def fwd(a):
        h = jnp.tanh(a)
        return h, h

    def bwd(h, grad_h):
        return (grad_h * (2 * (1 - h * h) + 0.5),)

    rule.defvjp(fwd, bwd)

    def my_tanh(a):
        return rule(a)

    my_tanh.rule = rule
    return my_tanh


def test_backprop_and_jax_grad_take_the_backward_from_rule():
    """Swap in a wrong rule: jax.grad through apply and the loop both change, identically."""
    params = fnbp.mlp.init(jax.random.key(7), (5, 7, 6, 3), init="uniform", dtype=F64)
    x = jax.random.normal(jax.random.key(8), (4, 5), F64)
    d = jax.random.normal(jax.random.key(9), (4, 3), F64)
    bad = wrong_tanh()

    def through_apply(act):
        return jax.grad(lambda p: losses.half_sse(fnbp.mlp.apply(p, x, activation=act), d))(params)

    g_ref = jax.grad(lambda p: ref.half_sse(reference_network(
        p, x, [lambda a, l: ref.tanh(a)] * 2 + [lambda a, l: a]), d))(params)
    good_bp, good_apply = fnbp.backprop(params, x, d, activation=fnbp.tanh)[1], through_apply(fnbp.tanh)
    bad_bp, bad_apply = fnbp.backprop(params, x, d, activation=bad)[1], through_apply(bad)
    assert tree_rel_err(good_bp, g_ref) <= RTOL and tree_rel_err(good_apply, g_ref) <= RTOL
    assert tree_rel_err(bad_bp, bad_apply) <= 1e-12          # both follow the altered rule ...
    assert rel_err(bad_bp[0]["W"], g_ref[0]["W"]) > 0.1       # ... and it is wrong
    assert rel_err(bad_apply[0]["W"], g_ref[0]["W"]) > 0.1
    # the output layer (identity) is below no tanh: its gradient is unaffected in both
    assert rel_err(bad_bp[2]["W"], g_ref[2]["W"]) <= RTOL


def test_backprop_needs_a_rule():
    params = fnbp.mlp.init(jax.random.key(0), (3, 4, 2), dtype=F64)
    x, d = jnp.ones(3), jnp.ones(2)
    with pytest.raises(ValueError, match="no hand-written rule"):
        fnbp.backprop(params, x, d, activation=jnp.tanh)
    with pytest.raises(ValueError, match="no hand-written rule"):
        fnbp.backprop(params, x, d, loss=ref.half_sse)
    with pytest.raises(ValueError, match="l2= argument"):
        fnbp.backprop(params, x, d, loss=losses.l2_penalty)
    with pytest.raises(ValueError, match="reduction"):
        fnbp.backprop(params, x, d, loss=functools.partial(losses.half_sse, reduction="avg"))
    with pytest.raises(ValueError, match=r"same shape"):
        fnbp.backprop(params, x, jnp.ones(3))
    with pytest.raises(ValueError, match="labels"):
        fnbp.backprop(params, jnp.ones((5, 3)), jnp.zeros(4, jnp.int32), loss=losses.softmax_cross_entropy)


# ------------------------------------------------------------------ fan-out (skip connection)
def skip_reference(params, x, g):
    """The skip-connection network in plain jnp (fnbp.reference), no fnbp layers."""
    p = params
    h1 = g(ref.dense(p["dense1"]["W"], p["dense1"]["b"], x))
    h2 = g(ref.dense(p["dense2"]["W"], p["dense2"]["b"], h1))
    return ref.dense(p["out"]["W"], p["out"]["b"], h2) + ref.dense(p["skip"]["W"], p["skip"]["b"], h1)


SKIP_CASES = [("relu", "half_sse", "single"), ("relu", "mse", "batch"), ("tanh", "sse", "batch"),
              ("sigmoid", "softmax_cross_entropy", "batch")]


def skip_case(act_name, loss_name, mode, seed=0):
    params = fnbp.examples.skip_connection_init(jax.random.key(seed), 6, 9, 7, 4, dtype=F64)
    lead = (5,) if mode == "batch" else ()
    x = jax.random.normal(jax.random.key(seed + 1), lead + (6,), F64)
    if loss_name == "softmax_cross_entropy":
        d = jax.random.randint(jax.random.key(seed + 2), lead, 0, 4)
    else:
        d = jax.random.normal(jax.random.key(seed + 2), lead + (4,), F64)
    return params, x, d, getattr(fnbp, act_name), getattr(ref, act_name), getattr(losses, loss_name), \
        getattr(ref, loss_name)


@pytest.mark.parametrize("act_name,loss_name,mode", SKIP_CASES)
def test_skip_connection_hand_backward(act_name, loss_name, mode):
    params, x, d, act, ref_act, loss, ref_loss = skip_case(act_name, loss_name, mode)
    E_hand, g_hand = fnbp.examples.skip_connection_backprop(params, x, d, activation=act, loss=loss)
    E_grad, g_grad = jax.value_and_grad(
        lambda p: loss(fnbp.examples.skip_connection(p, x, activation=act), d))(params)
    E_ref, g_ref = jax.value_and_grad(lambda p: ref_loss(skip_reference(p, x, ref_act), d))(params)
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
    g_ref = jax.grad(lambda p: ref_loss(skip_reference(p, x, ref_act), d))(params)
    monkeypatch.setattr(fnbp.examples, "accumulate", lambda grads: grads[keep])
    _, g_wrong = fnbp.examples.skip_connection_backprop(params, x, d, activation=act, loss=loss)
    assert rel_err(g_wrong["dense1"]["W"], g_ref["dense1"]["W"]) > 1e-2
    assert rel_err(g_wrong["dense1"]["b"], g_ref["dense1"]["b"]) > 1e-2
    for name in ("dense2", "out", "skip"):
        assert tree_rel_err(g_wrong[name], g_ref[name]) <= RTOL


def test_skip_connection_backprop_jits():
    params, x, d, act, _, loss, _ = skip_case("tanh", "half_sse", "batch", seed=3)
    eager = fnbp.examples.skip_connection_backprop(params, x, d, activation=act)
    jitted = jax.jit(lambda p, x, d: fnbp.examples.skip_connection_backprop(p, x, d, activation=act))(params, x, d)
    assert tree_rel_err(jitted, eager) <= 1e-12


# ------------------------------------------------------------------ the notes' chain rule on log(xy)
@pytest.mark.parametrize("x,y", [(2.0, 3.0), (0.5, 7.0), (1e-3, 40.0)])
def test_chain_rule_log_xy(x, y):
    """Notes 000: v = xy, w = log v, z = w  =>  dz/dx = dz/dw * dw/dv * dv/dx = 1 * (1/v) * y = 1/x."""
    v = x * y
    dz_dx = 1.0 * (1.0 / v) * y
    assert math.isclose(dz_dx, 1.0 / x, rel_tol=1e-15)
    assert math.isclose(float(jax.grad(lambda x, y: jnp.log(x * y))(x, y)), 1.0 / x, rel_tol=1e-15)
