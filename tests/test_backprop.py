"""Tests of fnbp.backprop (the explicit walker on the MLP).

Every gradient is compared three ways, in float64, to <= 1e-10 relative per leaf:

* ``fnbp.backprop``               -- the explicit loop calling the rules' fwd/bwd;
* ``jax.grad`` through ``fnbp.mlp.apply`` -- JAX running our custom_vjp rules;
* ``jax.grad`` of a plain-jnp reference network written here from
  ``fnbp.reference`` (JAX's own autodiff, no custom rule, no fnbp.mlp).

Also: the loop is jit-compatible and uses no autodiff (source grep), and it takes its
backward from each activation's ``.rule`` (a deliberately wrong rule changes
the loop and jax.grad identically).  fnbp.skip (fan-out): tests/test_skip.py.
"""
import ast
import functools
import inspect
import io
import math
import pathlib
import textwrap
import tokenize

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbp
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
CONTINUOUS = ["identity", "sigmoid", "tanh", "relu", "leaky_relu", "prelu"]
HIDDEN = CONTINUOUS + ["step", "sign"]          # step and sign pass no gradient (g' = 0)
LOSSES = ["half_sse", "sse", "mse", "mae", "cross_entropy", "softmax_cross_entropy"]
REDUCTIONS = ["mean", "sum"]
REGRESSION_OUTPUTS = ["identity", "sigmoid", "tanh", "relu", "leaky_relu", "softmax"]


def activation_pair(name, slope):
    if name == "leaky_relu":
        return (functools.partial(fnbp.leaky_relu, slope=slope),
                lambda a, layer: ref.leaky_relu(a, slope=slope))
    return ACTIVATIONS[name]


from vjp_oracle import max_rel as rel_err, tree_rel_err          # noqa: E402  (the one relative-error helper)


def reference_network(params, x, ref_acts):
    """Plain-jnp forward (fnbp.reference only): h_k = g_k(W_k h_{k-1} + b_k)."""
    h = x
    for layer, g in zip(params, ref_acts):
        h = g(ref.dense(layer["W"], layer["b"], h), layer)
    return h


# ------------------------------------------------------------------ random cases
# Cases 0-23 are a fractional factorial over loss x reduction x (single, batch) with the l2 penalty
# on in half of them (every loss, reduction and mode is seen with and without it); cases 24-31
# draw all of it at random.  Architectures (depth 1-5, widths 1-64, per-layer activations,
# W scale) are random from the case's seed.  Each case runs as one jit-compiled function (the
# three gradients; parameters made in numpy): eager JAX would compile every primitive for every
# new shape, and so would jax.random.
N_CASES = 32


def make_case(i):
    """The static description of case i plus its numpy data (nothing is computed with JAX here)."""
    rng = np.random.default_rng(1000 + i)
    if i < 24:
        loss_name, reduction, batch = LOSSES[i % 6], REDUCTIONS[(i // 6) % 2], (i // 12) % 2 == 1
        use_l2 = ((i // 6) + (i // 12)) % 2 == 1
    else:
        loss_name, reduction = LOSSES[rng.integers(6)], REDUCTIONS[rng.integers(2)]
        batch, use_l2 = bool(rng.integers(2)), bool(rng.integers(2))
    l2 = float(rng.uniform(0.01, 0.5)) if use_l2 else 0.0
    depth = 1 + i % 5
    widths = [int(rng.integers(1, 65)) for _ in range(depth + 1)]
    if loss_name in ("cross_entropy", "softmax_cross_entropy"):
        widths[-1] = max(widths[-1], 2)
    # hidden activations: the first hidden layer cycles through the continuous activations, the rest
    # random among them; step/sign (zero gradient: everything below them gets none) only as the
    # first hidden layer of a few cases, so the layers above them still carry gradient
    hidden = [CONTINUOUS[(i + k) % len(CONTINUOUS)] if k == 0 else CONTINUOUS[rng.integers(len(CONTINUOUS))]
              for k in range(depth - 1)]
    if hidden and i % 8 in (3, 7):
        hidden[0] = "step" if i % 8 == 3 else "sign"
    if loss_name == "cross_entropy":
        out = "softmax"                                            # probabilities
    elif loss_name == "softmax_cross_entropy":
        out = ["identity", "tanh", "leaky_relu"][i % 3]           # logits
    elif i % 10 == 9:
        out = ["step", "sign"][(i // 10) % 2]                      # a zero gradient everywhere
    else:
        out = REGRESSION_OUTPUTS[i % len(REGRESSION_OUTPUTS)]
    lead = (int(rng.integers(2, 9)),) if batch else ()
    n_out = widths[-1]
    if loss_name == "softmax_cross_entropy":
        d = rng.integers(0, n_out, size=lead)
    elif loss_name == "cross_entropy" and i % 2:
        d = np.eye(n_out)[rng.integers(0, n_out, size=lead)]                 # one-hot
    elif loss_name == "cross_entropy":
        e = np.exp(rng.normal(size=lead + (n_out,)))
        d = e / e.sum(axis=-1, keepdims=True)                               # a probability vector
    else:
        d = rng.normal(size=lead + (n_out,))
    # parameters in numpy, laid out as fnbp.mlp.init lays them out (alpha in every hidden layer for
    # PReLU nets); W uniform in [-1, 1] (the notes' init) or scaled by 1/sqrt(n_in), b and alpha random
    layout = jax.eval_shape(lambda: fnbp.mlp.init(jax.random.key(0), widths, dtype=F64,
                                                  prelu_alpha=0.25 if "prelu" in hidden else None))
    scale = 1.0 if i % 2 else None

    def fill(path, leaf):
        name = path[-1].key
        if name == "W":
            return rng.uniform(-1, 1, leaf.shape) * (scale or 1 / math.sqrt(leaf.shape[1]))
        if name == "alpha":
            return 0.25 + rng.uniform(-0.2, 0.2, leaf.shape)
        return rng.uniform(-0.5, 0.5, leaf.shape)

    params = jax.tree_util.tree_map_with_path(fill, layout)
    return dict(i=i, loss_name=loss_name, reduction=reduction, l2=l2, hidden=hidden, out=out,
                slope=float(rng.uniform(0.01, 0.5)), widths=widths, prelu="prelu" in hidden,
                params=params, x=rng.normal(size=lead + (widths[0],)), d=d)


def three_gradients(c, params, x, d):
    """(E, grads) from fnbp.backprop, jax.grad through fnbp.mlp.apply, jax.grad of the reference."""
    acts = [activation_pair(n, c["slope"]) for n in c["hidden"] + [c["out"]]]
    fn_hidden, fn_out = [a[0] for a in acts[:-1]], acts[-1][0]
    ref_acts = [a[1] for a in acts]
    loss = functools.partial(getattr(losses, c["loss_name"]), reduction=c["reduction"])
    ref_loss = functools.partial(getattr(ref, c["loss_name"]), reduction=c["reduction"])

    E_bp, g_bp = fnbp.backprop(params, x, d, activation=fn_hidden, output=fn_out, loss=loss, l2=c["l2"])

    def through_apply(params):
        y = fnbp.mlp.apply(params, x, activation=fn_hidden, output=fn_out)
        return loss(y, d) + losses.l2_penalty(params, c["l2"])

    def reference(params):
        return ref_loss(reference_network(params, x, ref_acts), d) + ref.l2_penalty(params, c["l2"])

    E_apply, g_apply = jax.value_and_grad(through_apply)(params)
    E_ref, g_ref = jax.value_and_grad(reference)(params)
    return (E_bp, g_bp), (E_apply, g_apply), (E_ref, g_ref)


def run_case(c):
    """The three (E, grads) of case c, computed in one jit-compiled function."""
    return jax.jit(lambda params, x, d: three_gradients(c, params, x, d))(c["params"], c["x"], c["d"])


def test_cases_cover_every_activation_loss_and_mode():
    cases = [make_case(i) for i in range(N_CASES)]
    assert {n for c in cases for n in c["hidden"]} == set(HIDDEN)
    assert {c["out"] for c in cases} >= {"softmax", "identity", "step", "sign"}
    assert len({(c["loss_name"], c["reduction"], c["x"].ndim) for c in cases}) == 6 * 2 * 2
    for key in ("loss_name", "reduction"):
        assert {c[key] for c in cases if c["l2"] > 0} == {c[key] for c in cases if c["l2"] == 0}
    assert {c["x"].ndim for c in cases if c["l2"] > 0} == {1, 2} == {c["x"].ndim for c in cases if c["l2"] == 0}
    assert {len(c["widths"]) - 1 for c in cases} == {1, 2, 3, 4, 5}
    widths = [w for c in cases for w in c["widths"]]
    assert min(widths) == 1 and max(widths) >= 60
    assert sum(c["prelu"] for c in cases) >= 3


@pytest.mark.parametrize("i", range(N_CASES))
def test_backprop_equals_grad_through_apply_and_reference(i):
    c = make_case(i)
    params = c["params"]
    (E_bp, g_bp), (E_apply, g_apply), (E_ref, g_ref) = run_case(c)
    assert rel_err(E_bp, E_ref) <= 1e-12 and rel_err(E_apply, E_ref) <= 1e-12
    assert tree_rel_err(g_bp, g_ref) <= RTOL
    assert tree_rel_err(g_apply, g_ref) <= RTOL
    assert tree_rel_err(g_bp, g_apply) <= RTOL
    # PReLU's alpha is learnable: init put 0.25 (+ noise) in every hidden layer, and it gets a gradient
    for k, name in enumerate(c["hidden"]):
        assert ("alpha" in g_bp[k]) == ("alpha" in params[k]) == c["prelu"]
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


def numpy_params(seed, sizes, prelu=False):
    """Random float64 parameters in fnbp.mlp's layout (W uniform in [-1, 1], b too, alpha near 0.25)."""
    rng = np.random.default_rng(seed)
    return [dict(W=rng.uniform(-1, 1, (n_out, n_in)), b=rng.uniform(-1, 1, n_out),
                 **({"alpha": 0.25 + rng.uniform(-0.2, 0.2, n_out)} if prelu and k < len(sizes) - 2 else {}))
            for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]))]


def test_fixed_alpha_prelu_gives_no_gradient_to_the_layers_alpha():
    """Regression: a layer with a learnable alpha whose activation is partial(prelu, alpha=0.1) does not
    use that alpha; backprop used to report the fixed alpha's (scalar) gradient under the layer's key."""
    params = numpy_params(4, (3, 4, 2), prelu=True)
    x, d = np.array([0.5, -1.0, 2.0]), np.array([1.0, -1.0])
    for act in ([functools.partial(fnbp.prelu, alpha=0.1)], [fnbp.prelu]):
        g_bp = fnbp.backprop(params, x, d, activation=act)[1]
        g_apply = jax.grad(lambda p: losses.half_sse(fnbp.mlp.apply(p, x, activation=act), d))(params)
        assert g_bp[0]["alpha"].shape == (4,)
        assert tree_rel_err(g_bp, g_apply) <= RTOL
    np.testing.assert_array_equal(
        fnbp.backprop(params, x, d, activation=[functools.partial(fnbp.prelu, alpha=0.1)])[1][0]["alpha"], 0.0)


def test_positional_activation_options_are_rejected():
    """Regression: partial(fnbp.leaky_relu, 0.2) binds a = 0.2 when called (apply computed garbage)
    while backprop read 0.2 as the slope: both now ask for the option by keyword."""
    params = numpy_params(4, (3, 4, 2))
    x, d = np.ones(3), np.ones(2)
    with pytest.raises(ValueError, match="by keyword"):
        fnbp.mlp.apply(params, x, activation=functools.partial(fnbp.leaky_relu, 0.2))
    with pytest.raises(ValueError, match="by keyword"):
        fnbp.backprop(params, x, d, activation=functools.partial(fnbp.leaky_relu, 0.2))


def test_l2_penalty_adds_lambda_W_to_weights_only():
    params = numpy_params(2, (4, 5, 3), prelu=True)
    rng = np.random.default_rng(3)
    x, d = rng.normal(size=(6, 4)), rng.normal(size=(6, 3))
    (E0, g0), (E1, g1) = jax.jit(lambda p, x, d: (fnbp.backprop(p, x, d, activation=fnbp.prelu),
                                                  fnbp.backprop(p, x, d, activation=fnbp.prelu, l2=0.3)))(
        params, x, d)
    omega = 0.5 * sum(float(np.sum(p["W"] ** 2)) for p in params)          # 1/2 sum_k ||W_k||^2
    assert math.isclose(float(E1 - E0), 0.3 * omega, rel_tol=1e-12)
    for p, a, b in zip(params, g0, g1):
        np.testing.assert_allclose(b["W"] - a["W"], 0.3 * p["W"], rtol=1e-12, atol=1e-14)
        np.testing.assert_array_equal(b["b"], a["b"])                       # biases: no penalty
        if "alpha" in p:
            np.testing.assert_array_equal(b["alpha"], a["alpha"])           # nor PReLU slopes


# ------------------------------------------------------------------ jit, no autodiff, rule reuse
def test_backprop_is_jit_compatible():
    params = numpy_params(11, (6, 9, 4), prelu=True)
    rng = np.random.default_rng(12)
    x, labels = rng.normal(size=(7, 6)), rng.integers(0, 4, size=7)
    kw = dict(activation=[fnbp.prelu], output=functools.partial(fnbp.leaky_relu, slope=0.1),
              loss=functools.partial(losses.softmax_cross_entropy, reduction="sum"))

    @jax.jit
    def jitted(params, x, labels, l2):          # l2 traced
        return fnbp.backprop(params, x, labels, l2=l2, **kw)

    E_e, g_e = fnbp.backprop(params, x, labels, l2=0.2, **kw)      # eager
    E_j, g_j = jitted(params, x, labels, 0.2)
    assert rel_err(E_j, E_e) <= 1e-12
    assert tree_rel_err(g_j, g_e) <= 1e-12
    # and inside jit(vmap(...)): per-example gradients, one example at a time, sum to the batch's
    single = jax.jit(lambda x, d: fnbp.backprop(params, x, d, **kw)[1])
    per_example = jax.jit(jax.vmap(single))(x, labels)
    for n in range(len(x)):
        assert tree_rel_err(jax.tree_util.tree_map(lambda v: v[n], per_example), single(x[n], labels[n])) <= 1e-12
    summed = jax.tree_util.tree_map(lambda v: v.sum(axis=0), per_example)
    assert tree_rel_err(summed, jitted(params, x, labels, 0.0)[1]) <= 1e-12       # reduction="sum"


AUTODIFF = {"grad", "value_and_grad", "vjp", "jvp", "linearize", "custom_vjp", "custom_jvp", "jacrev", "jacfwd",
            "hessian"}


def test_backprop_source_has_no_autodiff():
    """No name or attribute of JAX's autodiff in the walker's explicit code (strings and comments aside):
    fnbp/graph.py's forward/backward, fnbp/mlp.py's backprop."""
    assert pathlib.Path(inspect.getsourcefile(fnbp.backprop)).name == "mlp.py"
    for fn in (fnbp.graph.forward, fnbp.graph.backward, fnbp.backprop):
        check_no_autodiff(inspect.getsource(fn))


def check_no_autodiff(source):
    source = textwrap.dedent(source)
    tree = ast.parse(source)
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            used.add(node.attr)
        elif isinstance(node, ast.Name):
            used.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            used.update(alias.name.split(".")[-1] for alias in node.names)
            used.update(alias.asname for alias in node.names if alias.asname)
    assert not used & AUTODIFF, used & AUTODIFF
    # the grep of the issue, on the code with comments and string literals removed
    code = "".join(tok.string + " " for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                   if tok.type not in (tokenize.COMMENT, tokenize.STRING))
    for name in ("jax . grad", "jax . vjp", "value_and_grad"):
        assert name not in code, name
    # and the walker does call the rules' fwd/bwd
    if "def forward" in code:
        assert ". fwd (" in code
    if "def backward" in code:
        assert ". bwd (" in code


def wrong_tanh():
    """A copy of fnbp.tanh whose rule has a deliberately wrong backward (g' = 2 (1 - h^2) + 0.5)."""
    def my_tanh_fwd(a):
        h = jnp.tanh(a)
        return h, h

    def my_tanh_bwd(h, grad_h):
        return (grad_h * (2 * (1 - h * h) + 0.5),)

    return fnbp.rule(my_tanh_fwd, my_tanh_bwd)


def test_backprop_and_jax_grad_take_the_backward_from_rule():
    """Swap in a wrong rule: jax.grad through apply and the loop both change, identically."""
    params = numpy_params(7, (5, 7, 6, 3))
    rng = np.random.default_rng(8)
    x, d = rng.normal(size=(4, 5)), rng.normal(size=(4, 3))
    bad = wrong_tanh()

    def through_apply(params, act):
        return jax.grad(lambda p: losses.half_sse(fnbp.mlp.apply(p, x, activation=act), d))(params)

    @jax.jit
    def everything(params):
        g_ref = jax.grad(lambda p: ref.half_sse(reference_network(
            p, x, [lambda a, layer: ref.tanh(a)] * 2 + [lambda a, layer: a]), d))(params)
        return (g_ref, fnbp.backprop(params, x, d, activation=fnbp.tanh)[1], through_apply(params, fnbp.tanh),
                fnbp.backprop(params, x, d, activation=bad)[1], through_apply(params, bad))

    g_ref, good_bp, good_apply, bad_bp, bad_apply = everything(params)
    assert tree_rel_err(good_bp, g_ref) <= RTOL and tree_rel_err(good_apply, g_ref) <= RTOL
    assert tree_rel_err(bad_bp, bad_apply) <= 1e-12          # both follow the altered rule ...
    assert rel_err(bad_bp[0]["W"], g_ref[0]["W"]) > 0.1       # ... and it is wrong
    assert rel_err(bad_apply[0]["W"], g_ref[0]["W"]) > 0.1
    # the output layer (identity) is below no tanh: its gradient is unaffected in both
    assert rel_err(bad_bp[2]["W"], g_ref[2]["W"]) <= RTOL


def test_backprop_needs_a_rule():
    params = numpy_params(0, (3, 4, 2))
    x, d = np.ones(3), np.ones(2)
    with pytest.raises(ValueError, match="no hand-written rule"):
        fnbp.backprop(params, x, d, activation=jnp.tanh)
    with pytest.raises(ValueError, match="no hand-written rule"):
        fnbp.backprop(params, x, d, loss=ref.half_sse)
    with pytest.raises(ValueError, match="l2= argument"):
        fnbp.backprop(params, x, d, loss=losses.l2_penalty)
    with pytest.raises(ValueError, match="reduction"):
        fnbp.backprop(params, x, d, loss=functools.partial(losses.half_sse, reduction="avg"))
    with pytest.raises(ValueError, match=r"same shape"):
        fnbp.backprop(params, x, np.ones(3))
    with pytest.raises(ValueError, match="labels"):
        fnbp.backprop(params, np.ones((5, 3)), np.zeros(4, np.int32), loss=losses.softmax_cross_entropy)
