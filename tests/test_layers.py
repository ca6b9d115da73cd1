"""Tests of the dense layer's hand-derived rule (fnbp.layers).

Oracles, all independent of the rule under test: plain numpy (forward and the
notes' formulas grad_W = delta^T H, grad_b = sum delta, grad_h = delta W),
``jax.vjp`` of the plain-jnp reference ``fnbp.reference.dense``, and central
finite differences of our forward.  Also: the mini-batch backward never builds
a batch x n_out x n_in tensor (read off the lowered and compiled program),
shape errors at trace time, jit/vmap agreement, and per-example gradients of a
small net built from our rules.
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fnbp
from fnbp import layers, losses, reference

AD_RTOL = 1e-10     # our VJP vs autodiff of the reference (relative, float64)
FD_RTOL = 1e-6      # our VJP vs central finite differences (relative, float64)


def max_rel(x, ref):
    """max |x - ref| / max |ref|; the absolute error when ref is all zeros."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert x.shape == ref.shape, (x.shape, ref.shape)
    if not ref.size:
        return 0.0
    diff, scale = np.max(np.abs(x - ref)), np.max(np.abs(ref))
    return float(diff / scale) if scale > 0 else float(diff)


def _flat(x):
    """The leaves of the pytree x, flattened into one float64 numpy vector (no jax op: nothing to compile)."""
    return np.concatenate([np.ravel(np.asarray(leaf, np.float64)) for leaf in jax.tree_util.tree_leaves(x)])


def _unravel_like(x):
    """Inverse of _flat for pytrees shaped like x, traceable inside jit."""
    leaves, treedef = jax.tree_util.tree_flatten(x)
    shapes = [np.shape(leaf) for leaf in leaves]
    offsets = np.cumsum([0] + [int(np.prod(s)) for s in shapes])

    def unravel(v):
        return treedef.unflatten([v[offsets[k]:offsets[k + 1]].reshape(shapes[k]) for k in range(len(shapes))])
    return unravel


def compile_fast(fn, *args):
    """fn(*args) through jax.jit, compiled without XLA's backend optimisations.

    The oracles below compile many small one-off programs; the optimisations buy
    nothing at these sizes and cost ~40% of the compile time.  (Plain ``jax.jit``
    is what the jit-vs-plain-call tests use.)
    """
    compiled = jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})
    return compiled(*args)


def vjp_check(checks, seed=0, eps=1e-6):
    """Our VJPs against jax.vjp of the references and against finite differences.

    ``checks`` is a list of (rule, ref, args, argnums).  For each, with a random
    output cotangent c: our VJP c^T J and the reference's (autodiff), and the
    central differences of the scalar <c, rule(...)> along every coordinate of
    every argument in argnums (x +- eps e_k; all 2n evaluations of our forward
    in one vmapped call).  Everything runs in one compiled program (one
    compilation for all checks; jit vs plain calls is tested separately).

    Returns one dict per check: ``out`` (our forward), ``c``, ``grads`` (our
    VJP, per argnum), ``ad``/``fd`` (per argnum: relative error vs autodiff of
    the reference / vs finite differences).
    """
    rng = np.random.default_rng(seed)
    cs, stacks, unravels = [], [], []
    for rule, _, args, argnums in checks:
        cs.append(rng.standard_normal(jax.eval_shape(rule, *args).shape))
        flat = _flat([args[i] for i in argnums])
        steps = eps * np.eye(flat.size)
        stacks.append(np.concatenate([flat + steps, flat - steps]))
        unravels.append(_unravel_like([args[i] for i in argnums]))

    def run(all_args, cs, stacks):
        results = []
        for (rule, ref, _, argnums), args, c, stack, unravel in zip(checks, all_args, cs, stacks, unravels):
            out, vjp_rule = jax.vjp(rule, *args)
            out_ref, vjp_ref = jax.vjp(ref, *args)
            ours, theirs = vjp_rule(c), vjp_ref(c)

            def along(v, rule=rule, args=args, argnums=argnums, c=c, unravel=unravel):
                new = list(args)
                for i, x in zip(argnums, unravel(v)):
                    new[i] = x
                return jnp.vdot(c, rule(*new))
            vals = jax.vmap(along)(stack)
            n = stack.shape[0] // 2
            results.append((out, out_ref, [ours[i] for i in argnums], [theirs[i] for i in argnums],
                            (vals[:n] - vals[n:]) / (2 * eps)))
        return results

    checked = []
    outputs = compile_fast(run, [tuple(check[2]) for check in checks], cs, stacks)
    for (_, _, _, argnums), c, (out, out_ref, ours, theirs, fd) in zip(checks, cs, outputs):
        np.testing.assert_allclose(out, out_ref, rtol=1e-12, atol=1e-12)      # same forward as the reference
        res, start = {"out": np.asarray(out), "c": c, "grads": {}, "ad": {}, "fd": {}}, 0
        for i, g_tree, g_ref in zip(argnums, ours, theirs):
            g = _flat(g_tree)
            fd_i = np.asarray(fd)[start:start + g.size]
            start += g.size
            # relative to the gradient's size; absolute where our gradient vanishes (step, sign), since
            # the differences of a piecewise-constant forward are then rounding noise (~1e-16 |f| / eps)
            scale = max(np.max(np.abs(fd_i)), np.max(np.abs(g))) if np.any(g) else 1.0
            res["grads"][i] = g_tree
            res["ad"][i] = max_rel(g, _flat(g_ref))
            res["fd"][i] = float(np.max(np.abs(fd_i - g)) / scale)
        checked.append(res)
    return checked


def assert_within_tolerances(results):
    for k, res in enumerate(results):
        for i in res["ad"]:
            assert res["ad"][i] <= AD_RTOL, (k, i, "vs autodiff of the reference", res["ad"][i])
            assert res["fd"][i] <= FD_RTOL, (k, i, "vs finite differences", res["fd"][i])


def dense_args(rng, lead, n_out, n_in):
    return rng.standard_normal((n_out, n_in)), rng.standard_normal(n_out), rng.standard_normal(lead + (n_in,))


LEADS = [(), (1,), (7,), (2, 3)]   # one example, batch of one, a batch, two leading batch axes


# --- forward -----------------------------------------------------------------------
@pytest.mark.parametrize("lead", LEADS)
def test_dense_forward_matches_numpy(lead):
    rng = np.random.default_rng(1)
    W, b, h = dense_args(rng, lead, 4, 5)
    Wn, bn, hn = map(np.asarray, (W, b, h))
    # a_i = sum_j W[i, j] h_j + b_i, written out per example
    expected = np.empty(lead + (4,))
    for idx in np.ndindex(*lead):
        for i in range(4):
            expected[idx + (i,)] = sum(Wn[i, j] * hn[idx + (j,)] for j in range(5)) + bn[i]
    a = fnbp.dense(W, b, h)
    assert a.shape == lead + (4,)
    np.testing.assert_allclose(a, expected, rtol=1e-13, atol=1e-13)


# --- backward: the notes' formulas in numpy ----------------------------------------
def test_dense_backward_is_the_notes_formulas():
    """grad_W = sum_n delta_n h_n^T, grad_b = sum_n delta_n, grad_h = W^T delta per example, in numpy."""
    rng = np.random.default_rng(2)
    cases = [(dense_args(rng, lead, n_out, 6), rng.standard_normal(lead + (n_out,)))
             for lead in LEADS for n_out in (3, layers.NARROW_GRAD_W + 2)]     # both branches of dense_backward

    def vjps(cases):
        return [(jax.vjp(fnbp.dense, *args)[1](delta), layers.dense_backward(layers.dense_forward(*args)[1], delta))
                for args, delta in cases]

    for ((W, b, h), delta), (ours, explicit) in zip(cases, compile_fast(vjps, cases)):
        n_out = W.shape[0]
        H, D = h.reshape(-1, 6), delta.reshape(-1, n_out)
        gW, gb, gh = ours
        np.testing.assert_allclose(gW, sum(np.outer(D[n], H[n]) for n in range(len(H))), rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(gb, D.sum(axis=0), rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(gh, (D @ W).reshape(h.shape), rtol=1e-12, atol=1e-13)
        # dense_forward / dense_backward (what the explicit backprop loop calls) give the same numbers
        for got, want in zip(explicit, ours):
            np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-14)


# --- backward: autodiff of the reference and finite differences --------------------
def test_dense_vjp_vs_reference_autodiff_and_finite_differences():
    rng = np.random.default_rng(3)
    # n_out = 4 (a batch takes the narrow, materialised-delta^T branch of dense_backward) and
    # n_out = NARROW_GRAD_W + 6 (the in-place contraction)
    wide = layers.NARROW_GRAD_W + 6
    args = [dense_args(rng, lead, 4, 5) for lead in LEADS] + [dense_args(rng, lead, wide, 3) for lead in LEADS]
    results = vjp_check([(fnbp.dense, reference.dense, a, (0, 1, 2)) for a in args])
    assert [sorted(r["ad"]) for r in results] == [[0, 1, 2]] * len(args)      # W, b and h all checked
    assert_within_tolerances(results)


@settings(max_examples=15, deadline=None)
@given(batch=st.one_of(st.none(), st.integers(1, 16)), n_out=st.integers(1, 32), n_in=st.integers(1, 32),
       seed=st.integers(0, 2**31 - 1))
def test_dense_vjp_hypothesis_shapes(batch, n_out, n_in, seed):
    rng = np.random.default_rng(seed)
    args = dense_args(rng, () if batch is None else (batch,), n_out, n_in)
    assert_within_tolerances(vjp_check([(fnbp.dense, reference.dense, args, (0, 1, 2))], seed=seed))


# --- no batch x n_out x n_in intermediate ------------------------------------------
_SHAPE_RE = [re.compile(r"tensor<((?:\d+x)+)[a-z]+\d*>"),        # StableHLO: tensor<64x48x40xf32>
             re.compile(r"\b[a-z]+\d*\[([\d,]+)\]")]              # HLO: f32[64,48,40]{2,1,0}
# (batch, n_out, n_in): n_out = 48 <= layers.NARROW_GRAD_W takes the materialised-delta^T branch of
# dense_backward, n_out = 80 the in-place contraction
DIMS = [(64, 48, 40), (64, 80, 40)]


def _shapes(text):
    shapes = set()
    for rx in _SHAPE_RE:
        for m in rx.finditer(text):
            shapes.add(tuple(int(s) for s in m.group(1).replace("x", ",").split(",") if s))
    return shapes


def _has_outer_product_tensor(text, dims):
    """A tensor whose dims include all of batch, n_out and n_in (in any order)."""
    need = sorted(dims)
    return any(len(s) >= 3 and all(s.count(k) >= need.count(k) for k in need) for s in _shapes(text))


def _programs(loss, dims):
    batch, n_out, n_in = dims
    rng = np.random.default_rng(5)
    W = rng.standard_normal((n_out, n_in)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    h = rng.standard_normal((batch, n_in)).astype(np.float32)
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(W, b, h)
    return lowered.as_text(), lowered.compile().as_text()


def test_shape_scanner_sees_shapes():
    assert _shapes("%0 = stablehlo.add %a : tensor<64x48x40xf32>") == {(64, 48, 40)}
    assert _shapes("%x = f32[40,64,48]{2,1,0} fusion(...)") == {(40, 64, 48)}
    assert _has_outer_product_tensor("tensor<48x40x64xf64>", (64, 48, 40))
    assert not _has_outer_product_tensor("tensor<64x48xf32> tensor<48x40xf32> f32[64,40]", (64, 48, 40))


@pytest.mark.parametrize("dims", DIMS, ids=str)
def test_minibatch_dense_backward_has_no_batch_x_out_x_in_tensor(dims):
    batch, n_out, n_in = dims
    assert (n_out <= layers.NARROW_GRAD_W) == (dims == DIMS[0])     # both branches of dense_backward

    def loss(W, b, h):
        return jnp.sum(jnp.tanh(fnbp.dense(W, b, h)))

    lowered, compiled = _programs(loss, dims)
    assert f"{batch}x{n_out}" in lowered and f"{n_out}x{n_in}" in lowered      # the program is the one we think
    assert (n_out, n_in) in _shapes(lowered) and (n_out, n_in) in _shapes(compiled)   # grad_W is there
    assert not _has_outer_product_tensor(lowered, dims), sorted(_shapes(lowered))
    assert not _has_outer_product_tensor(compiled, dims), sorted(_shapes(compiled))


@pytest.mark.parametrize("dims", DIMS, ids=str)
def test_per_example_outer_product_rule_does_show_up(dims):
    """Positive control: a per-example rule grad_W = outer(delta, h) under vmap builds B x n_out x n_in."""
    @jax.custom_vjp
    def dense_one(W, b, h):
        return W @ h + b

    def fwd(W, b, h):
        return W @ h + b, (W, h)

    def bwd(res, delta):
        W, h = res
        return jnp.outer(delta, h), delta, W.T @ delta

    dense_one.defvjp(fwd, bwd)

    def loss(W, b, h):
        return jnp.sum(jnp.tanh(jax.vmap(dense_one, in_axes=(None, None, 0))(W, b, h)))

    lowered, _ = _programs(loss, dims)
    assert _has_outer_product_tensor(lowered, dims)


# --- shape errors at trace time --------------------------------------------------------
def _call(fn, jit, *args):
    return (jax.jit(fn) if jit else fn)(*args)


@pytest.mark.parametrize("jit", [False, True])
def test_dense_shape_errors(jit):
    W, b = jnp.ones((3, 4)), jnp.ones(3)
    with pytest.raises(ValueError, match=r"fnbp\.dense.*n_in = 4.*\(3, 4\).*got shape \(2, 5\)"):
        _call(fnbp.dense, jit, W, b, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"fnbp\.dense.*n_in = 4.*\(3, 4\).*got shape \(5,\)"):
        _call(fnbp.dense, jit, W, b, jnp.ones(5))
    with pytest.raises(ValueError, match=r"fnbp\.dense.*b must have shape.*\(3,\).*\(3, 4\).*got shape \(4,\)"):
        _call(fnbp.dense, jit, W, jnp.ones(4), jnp.ones(4))
    with pytest.raises(ValueError, match=r"fnbp\.dense.*W must be a matrix.*got shape \(3,\)"):
        _call(fnbp.dense, jit, jnp.ones(3), b, jnp.ones(4))
    with pytest.raises(ValueError, match=r"fnbp\.dense.*h must have shape"):
        _call(fnbp.dense, jit, W, b, jnp.ones(()))


def test_dense_shape_error_inside_grad():
    W, b = jnp.ones((3, 4)), jnp.ones(3)
    with pytest.raises(ValueError, match=r"fnbp\.dense"):
        jax.jit(jax.grad(lambda W: jnp.sum(fnbp.dense(W, b, jnp.ones((2, 5))))))(W)


# --- jit and vmap equal the plain call ---------------------------------------------------
@pytest.mark.parametrize("lead", [(), (6,)])
def test_dense_jit_and_vmap_match_plain_call(lead):
    rng = np.random.default_rng(6)
    args = dense_args(rng, lead, 3, 4)
    c = rng.standard_normal(lead + (3,))

    def value_and_vjp(W, b, h):
        out, f = jax.vjp(fnbp.dense, W, b, h)
        return out, f(c)

    plain = value_and_vjp(*args)
    jitted = jax.jit(value_and_vjp)(*args)
    for x, y in zip(jax.tree_util.tree_leaves(jitted), jax.tree_util.tree_leaves(plain)):
        assert max_rel(x, y) <= 1e-12
    # vmap over a stack of 3 parameter/input sets equals 3 separate calls
    stacks = [dense_args(rng, lead, 3, 4) for _ in range(3)]
    stacked = [np.stack(xs) for xs in zip(*stacks)]
    batched = jax.vmap(value_and_vjp)(*stacked)
    for k, one in enumerate(stacks):
        want = value_and_vjp(*one)
        for x, y in zip(jax.tree_util.tree_leaves(batched), jax.tree_util.tree_leaves(want)):
            assert max_rel(x[k], y) <= 1e-12


# --- per-example gradients of a small net through our rules ------------------------------
def _net_loss(mods, params, x, label, reduction="mean"):
    dense, relu, sce = mods
    h = relu(dense(params[0]["W"], params[0]["b"], x))
    return sce(dense(params[1]["W"], params[1]["b"], h), label, reduction=reduction)


OURS = (fnbp.dense, fnbp.relu, losses.softmax_cross_entropy)
REFS = (reference.dense, reference.relu, reference.softmax_cross_entropy)


def test_per_example_gradients_match_reference_and_sum_to_batch_gradient():
    rng = np.random.default_rng(7)
    n_in, n_hid, n_cls, batch = 5, 8, 4, 11
    params = [{"W": rng.standard_normal((n_hid, n_in)), "b": rng.standard_normal(n_hid)},
              {"W": rng.standard_normal((n_cls, n_hid)), "b": rng.standard_normal(n_cls)}]
    x = rng.standard_normal((batch, n_in))
    labels = rng.integers(0, n_cls, batch)

    def everything(params, x, labels):
        grad_ours = jax.grad(functools.partial(_net_loss, OURS))
        per_ex = jax.vmap(grad_ours, in_axes=(None, 0, 0))(params, x, labels)
        per_ex_ref = jax.vmap(jax.grad(functools.partial(_net_loss, REFS)), in_axes=(None, 0, 0))(params, x, labels)
        one = grad_ours(params, x[3], labels[3])           # example 3 alone, no vmap
        batch_sum = jax.grad(lambda p: _net_loss(OURS, p, x, labels, reduction="sum"))(params)
        batch_mean = jax.grad(lambda p: _net_loss(OURS, p, x, labels, reduction="mean"))(params)
        return per_ex, per_ex_ref, one, batch_sum, batch_mean

    outputs = compile_fast(everything, params, x, labels)
    per_ex, per_ex_ref, one, batch_sum, batch_mean = map(jax.tree_util.tree_leaves, outputs)
    assert [g.shape for g in per_ex] == [(batch,) + p.shape for p in jax.tree_util.tree_leaves(params)]
    for got, want, alone, g_sum, g_mean in zip(per_ex, per_ex_ref, one, batch_sum, batch_mean):
        assert max_rel(got, want) <= AD_RTOL                 # per-example autodiff of the reference
        assert max_rel(got[3], alone) <= 1e-12
        assert max_rel(g_sum, np.sum(got, axis=0)) <= 1e-12      # sum of per-example = reduction='sum'
        assert max_rel(g_mean, np.sum(got, axis=0) / batch) <= 1e-12
