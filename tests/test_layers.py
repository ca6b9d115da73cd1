"""Tests of the dense layer's hand-derived rule (fnbp.layers).

Oracles, all independent of the rule under test: plain numpy (forward and the
notes' formulas grad_W = delta^T H, grad_b = sum delta, grad_h = delta W),
``jax.vjp`` of the plain-jnp reference ``fnbp.reference.dense``, and central
finite differences of our forward.  Also: the mini-batch backward never builds
a batch x n_out x n_in tensor (read off the lowered and compiled program),
shape errors at trace time, and jit/vmap agreement (per-example gradients: tests/test_per_example.py).
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fnbp
from fnbp import layers, reference

from vjp_oracle import assert_within_tolerances, compile_fast, max_rel, vjp_check


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


@pytest.mark.slow          # hypothesis: 15 drawn shapes, ~40 s under load
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
