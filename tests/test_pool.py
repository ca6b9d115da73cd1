"""fnbp.pool: max/avg pooling, flatten, global average pooling and per-channel batch norm against
autodiff of lax/jnp references and finite differences; max-pool's tie and NaN conventions; errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnbp import pool, reference
from vjp_oracle import assert_within_tolerances, compile_fast, vjp_check

rng = np.random.default_rng(1)

# (shape, window, stride): non-overlapping, overlapping (stride < window), stride > window,
# odd sizes that leave a remainder, one channel
POOL_CASES = [((2, 4, 6, 2), 2, None), ((1, 5, 7, 1), 3, 1), ((2, 7, 5, 2), 3, 2), ((1, 7, 8, 1), 2, 3)]


def test_pools_match_autodiff_of_reduce_window_and_finite_differences():
    checks = []
    for shape, window, stride in POOL_CASES:
        x = rng.standard_normal(shape)
        for ours, ref in ((pool.max_pool, reference.max_pool), (pool.avg_pool, reference.avg_pool)):
            checks.append((functools.partial(ours, window=window, stride=stride),
                           functools.partial(ref, window=window, stride=stride), (x,), (0,)))
    x = rng.standard_normal((2, 3, 4, 3))
    checks += [(pool.flatten, reference.flatten, (x,), (0,)),
               (pool.global_avg_pool, reference.global_avg_pool, (x,), (0,)),
               (pool.batch_norm_channels, reference.batch_norm_channels,
                (x, 1 + 0.1 * rng.standard_normal(3), rng.standard_normal(3)), (0, 1, 2))]
    assert_within_tolerances(vjp_check(checks))


def _max_pool_grad(x, **options):
    return compile_fast(lambda x: jax.vjp(functools.partial(pool.max_pool, **options), x)[1](
        jnp.ones(jax.eval_shape(functools.partial(pool.max_pool, **options), x).shape))[0], x)


def test_ties_send_the_gradient_to_the_first_maximum_in_row_major_order():
    x = np.array([[3.0, 3.0, 1.0, 5.0],
                  [3.0, 0.0, 5.0, 5.0],
                  [2.0, 4.0, 7.0, 7.0],
                  [4.0, 1.0, 7.0, 7.0]]).reshape(1, 4, 4, 1)
    out = np.asarray(pool.max_pool(x))[0, ..., 0]
    np.testing.assert_array_equal(out, [[3, 5], [4, 7]])
    g = np.asarray(_max_pool_grad(x))[0, ..., 0]
    np.testing.assert_array_equal(g, [[1, 0, 0, 1],      # top-left window: three 3s, the first wins;
                                      [0, 0, 0, 0],      # top-right: 5 at (0, 3) comes before (1, 2), (1, 3)
                                      [0, 1, 1, 0],      # bottom-left: 4 at (2, 1) before (3, 0)
                                      [0, 0, 0, 0]])     # bottom-right: all 7, (2, 2) wins
    # lax's autodiff (select_and_scatter) follows the same convention
    ref = jax.grad(lambda x: jnp.sum(reference.max_pool(x)))(x)
    np.testing.assert_array_equal(np.asarray(ref)[0, ..., 0], g)


def test_overlapping_windows_sum_their_gradients_at_a_shared_maximum():
    x = np.zeros((1, 3, 3, 1))
    x[0, 1, 1, 0] = 9.0                                     # the centre is the maximum of all four 2x2 windows
    g = np.asarray(_max_pool_grad(x, window=2, stride=1))[0, ..., 0]
    expected = np.zeros((3, 3))
    expected[1, 1] = 4.0
    np.testing.assert_array_equal(g, expected)


def test_nan_is_the_maximum_and_takes_the_gradient():
    x = np.arange(16.0).reshape(1, 4, 4, 1)
    x[0, 0, 1, 0] = np.nan
    out = np.asarray(pool.max_pool(x))[0, ..., 0]
    assert np.isnan(out[0, 0]) and np.isfinite(out[0, 1]) and np.isfinite(out[1]).all()
    g = np.asarray(_max_pool_grad(x))[0, ..., 0]
    assert g[0, 1] == 1.0 and g[:2, :2].sum() == 1.0


def test_residual_is_a_small_integer_mask():
    x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    out, (index, x_shape) = pool.max_pool.rule.fwd(x, window=2, stride=None)
    assert index.dtype == jnp.int8 and index.shape == out.shape and x_shape == x.shape
    # the index points at the window's maximum
    windows = x.reshape(2, 2, 2, 2, 2, 3).transpose(0, 1, 3, 5, 2, 4).reshape(2, 2, 2, 3, 4)
    np.testing.assert_array_equal(np.asarray(index), windows.argmax(axis=-1))


def test_avg_pool_gradient_is_shared_equally():
    g = jax.grad(lambda x: jnp.sum(pool.avg_pool(x, window=2)))(np.zeros((1, 4, 5, 1)))
    expected = np.full((4, 5), 0.25)
    expected[:, 4] = 0.0                                     # the last column is in no window (5 = 2 * 2 + 1)
    np.testing.assert_array_equal(np.asarray(g)[0, ..., 0], expected)


@pytest.mark.parametrize("fn", [pool.max_pool, pool.avg_pool])
def test_pool_named_errors(fn):
    name = "fnbp." + fn.__name__
    with pytest.raises(ValueError, match=rf"{name}: the pooling window \(3\) is larger than the input \(2 pixels\)"):
        fn(np.zeros((1, 2, 5, 1)), window=3)
    for stride, shown in ((0, "0"), (-2, "-2"), (1.5, "float 1.5"), (2.0, "float 2.0"), (False, "the bool False")):
        with pytest.raises(ValueError, match=rf"{name}: stride must be an integer >= 1.*, got {shown}$"):
            fn(np.zeros((1, 4, 4, 1)), stride=stride)
    with pytest.raises(ValueError, match=rf"{name}: window must be an integer >= 1, got 0"):
        fn(np.zeros((1, 4, 4, 1)), window=0)
    with pytest.raises(ValueError, match=rf"{name}: window must be an integer >= 1.*, got ndarray of dtype int64"):
        fn(np.zeros((1, 4, 4, 1)), window=np.array([2, 2]))
    with pytest.raises(ValueError, match=rf"{name}: x must have shape \(batch, H, W, C\)"):
        fn(np.zeros((4, 4, 1)))


@pytest.mark.parametrize("fn", [pool.max_pool, pool.avg_pool])
def test_pool_integer_like_scalars_are_ints(fn):
    x = rng.standard_normal((2, 6, 6, 3))
    want = np.asarray(fn(x, window=3, stride=2))
    for like in (np.int64, np.int8, jnp.int32):
        three, two = like(3), like(2)             # made outside the trace (inside it a jnp scalar is traced)
        np.testing.assert_array_equal(np.asarray(fn(x, window=three, stride=two)), want)
        g = jax.grad(lambda x: jnp.sum(fn(x, window=three, stride=two) ** 2))(x)
        np.testing.assert_array_equal(np.asarray(g), np.asarray(jax.grad(
            lambda x: jnp.sum(fn(x, window=3, stride=2) ** 2))(x)))


def test_other_named_errors():
    with pytest.raises(ValueError, match="fnbp.global_avg_pool: x must have shape"):
        pool.global_avg_pool(np.zeros((2, 3)))
    for shape in ((2, 0, 3, 4), (2, 3, 0, 4), (1, 0, 0, 1)):          # no pixels: the mean would be NaN
        with pytest.raises(ValueError, match=r"fnbp.global_avg_pool: x has no pixels to average .* H and W must be"):
            pool.global_avg_pool(np.zeros(shape))
    with pytest.raises(ValueError, match="fnbp.flatten: x must have a batch axis"):
        pool.flatten(np.zeros(3))
