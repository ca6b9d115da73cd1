"""fnbp.optim.clip_by_global_norm against optax.clip_by_global_norm: same updates (bit for bit), same state, inside
optax.chain with an optimizer, under jit; the clipped norm is max_norm; named errors."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fnbp import optim


def _tree(rng, scale):
    return {"W": scale * rng.standard_normal((4, 3)), "b": scale * rng.standard_normal(4),
            "layers": [scale * rng.standard_normal((2, 2, 3)), np.float64(scale)]}


@pytest.mark.parametrize("scale", [1e-3, 0.3, 1.0, 50.0])
@pytest.mark.parametrize("max_norm", [0.5, 1.0, 7.0])
def test_equals_optax_clip_by_global_norm(scale, max_norm):
    grads = _tree(np.random.default_rng(0), scale)
    ours, theirs = optim.clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
    state, state_ref = ours.init(grads), theirs.init(grads)
    assert state == state_ref
    (out, _), (out_ref, _) = jax.jit(ours.update)(grads, state), jax.jit(theirs.update)(grads, state_ref)
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(out_ref)):
        np.testing.assert_array_equal(a, b)
    norm = float(optim.global_norm(grads))
    assert norm == pytest.approx(float(optax.tree.norm(grads)), rel=1e-15)
    # below the threshold: untouched; above: the direction kept, the length max_norm
    assert float(optim.global_norm(out)) == pytest.approx(min(norm, max_norm), rel=1e-12)
    if norm < max_norm:
        for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(grads)):
            np.testing.assert_array_equal(a, b)


def test_chained_with_adam_equals_the_optax_chain():
    rng = np.random.default_rng(1)
    params = _tree(rng, 1.0)
    ours = optax.chain(optim.clip_by_global_norm(1.0), optim.adam(1e-2))
    theirs = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))

    def run(opt):
        p, s = params, opt.init(params)
        for k in range(5):
            grads = jax.tree_util.tree_map(lambda x: (k + 1) * 3.0 * jnp.sin(x + k), p)
            updates, s = jax.jit(opt.update)(grads, s, p)
            p = optax.apply_updates(p, updates)
        return p
    for a, b in zip(jax.tree_util.tree_leaves(run(ours)), jax.tree_util.tree_leaves(run(theirs))):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


def test_nan_gradient_stays_nan():
    out, _ = optim.clip_by_global_norm(1.0).update({"W": np.array([1.0, np.nan])}, optax.EmptyState())
    assert np.all(np.isnan(out["W"]))


def test_named_errors():
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=r"fnbp.optim.clip_by_global_norm: max_norm must be a number > 0"):
            optim.clip_by_global_norm(bad)
    with pytest.raises(TypeError, match=r"fnbp.optim.clip_by_global_norm: max_norm must be a number > 0, got str"):
        optim.clip_by_global_norm("1")
