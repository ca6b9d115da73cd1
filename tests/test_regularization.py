"""Tests of fnbp.regularization (dropout): the inverted-dropout expectation, the drop fraction, the
backward rule's mask, inference mode, keys, and per-example masks under vmap."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbp
from fnbp import regularization


def test_public_name_is_the_rule():
    assert fnbp.dropout is regularization.dropout
    assert not hasattr(fnbp.norm, "dropout")      # dropout is not a normalisation


N_KEYS = 4000


def _many(x, p, n_keys=N_KEYS, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), n_keys)
    return np.asarray(jax.vmap(lambda k: regularization.dropout(x, p, k))(keys))


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.8])
def test_dropout_expectation_and_drop_fraction(p):
    """Each output is x/(1-p) * Bernoulli(1-p): its mean over K keys has std |x| sqrt(p / ((1-p) K)).
    Tolerance: 5 of those stds per unit.  Fraction dropped over K*n draws: p within 5 binomial
    stds sqrt(p (1-p) / (K n))."""
    n = 16
    x = jnp.linspace(0.5, 3.0, n) * jnp.where(jnp.arange(n) % 2 == 0, 1.0, -1.0)   # no zeros
    ys = _many(x, p)
    xs = np.asarray(x)
    sigma_mean = np.abs(xs) * np.sqrt(p / ((1 - p) * N_KEYS))
    dev = np.abs(ys.mean(axis=0) - xs)
    assert np.all(dev <= 5 * sigma_mean), (dev / sigma_mean).max()
    frac = np.mean(ys == 0)
    assert abs(frac - p) <= 5 * np.sqrt(p * (1 - p) / ys.size), frac
    # survivors are exactly x / (1 - p)
    kept = ys != 0
    np.testing.assert_allclose(ys[kept], np.broadcast_to(xs / (1 - p), ys.shape)[kept], rtol=1e-15)


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_dropout_gradient_uses_the_same_mask(p):
    x = jnp.linspace(1.0, 2.0, 50)
    g = jax.random.normal(jax.random.PRNGKey(1), (50,), jnp.float64)
    key = jax.random.PRNGKey(2)
    y, vjp = jax.vjp(lambda v: regularization.dropout(v, p, key), x)
    (gx,) = vjp(g)
    dropped = np.asarray(y) == 0
    assert dropped.any() and (~dropped).any()
    assert np.all(np.asarray(gx)[dropped] == 0)                    # exactly zero where dropped
    np.testing.assert_allclose(np.asarray(gx)[~dropped], np.asarray(g)[~dropped] / (1 - p), rtol=1e-15)
    # jax.grad of sum(y): 1/(1-p) on the kept units, 0 on the dropped ones
    ones = np.asarray(jax.grad(lambda v: jnp.sum(regularization.dropout(v, p, key)))(x))
    np.testing.assert_allclose(ones, np.where(dropped, 0.0, 1 / (1 - p)), rtol=1e-15)


def test_dropout_inference_is_identity():
    x = jax.random.normal(jax.random.PRNGKey(5), (4, 6), jnp.float64)
    np.testing.assert_array_equal(regularization.dropout(x, 0.5, jax.random.PRNGKey(0), train=False), x)
    np.testing.assert_array_equal(regularization.dropout(x, 0.5, None, train=False), x)
    np.testing.assert_array_equal(regularization.dropout(x, 0.0, jax.random.PRNGKey(0)), x)
    with pytest.raises(ValueError, match="drop probability"):
        regularization.dropout(x, 1.0, jax.random.PRNGKey(0))


def test_dropout_keys():
    x = jnp.ones(200)
    a = regularization.dropout(x, 0.5, jax.random.PRNGKey(7))
    np.testing.assert_array_equal(a, regularization.dropout(x, 0.5, jax.random.PRNGKey(7)))   # same key, same mask
    b = regularization.dropout(x, 0.5, jax.random.PRNGKey(8))
    assert np.any(np.asarray(a) != np.asarray(b))                                   # different keys differ
    # jit gives the same mask as the eager call
    np.testing.assert_array_equal(jax.jit(functools.partial(regularization.dropout, p=0.5))(x, key=jax.random.PRNGKey(7)), a)


def test_dropout_vmap_per_example_keys():
    batch, n = 8, 64
    x = jnp.ones((batch, n))
    keys = jax.random.split(jax.random.PRNGKey(9), batch)
    y = np.asarray(jax.vmap(lambda v, k: regularization.dropout(v, 0.5, k))(x, keys))
    masks = y != 0
    for i in range(batch):
        for j in range(i + 1, batch):
            assert np.any(masks[i] != masks[j]), (i, j)
        np.testing.assert_array_equal(y[i], regularization.dropout(x[i], 0.5, keys[i]))   # example i's own key
    # gradients under vmap follow each example's mask
    g = np.asarray(jax.vmap(jax.grad(lambda v, k: jnp.sum(regularization.dropout(v, 0.5, k))))(x, keys))
    np.testing.assert_array_equal(g, np.where(masks, 2.0, 0.0))


def test_dropout_mask_is_jax_random_bernoulli_bit_for_bit():
    """The mask comes from the unrolled threefry (``fnbp._threefry``, 3.5x faster on the CPU) and is exactly
    ``jax.random.bernoulli(key, 1 - p, x.shape)``'s: typed and raw keys, odd and multi-axis shapes, float32 and
    float64 uniforms; an rbg key falls back to ``jax.random.bernoulli`` itself."""
    from fnbp import _threefry
    shapes = ((1,), (7,), (3, 5), (2, 3, 4), (64, 33))
    for key in (jax.random.key(0), jax.random.key(2 ** 31 + 17), jax.random.PRNGKey(3), jax.random.key(1, impl="rbg")):
        for shape in shapes:
            x = jnp.ones(shape)
            y = jax.jit(lambda x, k: fnbp.dropout(x, 0.3, k))(x, key)
            np.testing.assert_array_equal(np.asarray(y != 0), np.asarray(jax.random.bernoulli(key, 0.7, shape)))
            words = _threefry.key_words(key, shape, jnp.float32)
            if words is None:                                   # only the rbg key
                assert "rbg" in str(jax.random.key_impl(key))
                continue
            for dtype in (jnp.float32, jnp.float64):
                np.testing.assert_array_equal(
                    np.asarray(jax.jit(lambda w: _threefry.uniform01(w, shape, dtype))(words)),
                    np.asarray(jax.random.uniform(key, shape, dtype)))
