"""Tests of fnbp.ops: add, mul, log, batch_norm_eval and running_statistics, against the notes' formulas in numpy.

(``fnbp check`` compares each rule with autodiff of its reference and finite differences:
tests/test_checklist.py, tests/test_crosscheck.py.)  Here the backward is compared with the hand formulas
written out in numpy, including the sums over broadcast axes.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnbp import ops

rng = np.random.default_rng(3)


def _vjp(fn, *args):
    out, vjp = jax.vjp(fn, *args)
    g = rng.standard_normal(np.shape(out))
    return np.asarray(out), g, [np.asarray(c) for c in vjp(g)]


def test_add_copies_the_cotangent_and_sums_it_over_broadcast_axes():
    u, v = rng.standard_normal((5, 3)), rng.standard_normal(3)
    out, g, (gu, gv) = _vjp(ops.add, u, v)
    np.testing.assert_allclose(out, u + v, rtol=1e-15)
    np.testing.assert_array_equal(gu, g)
    np.testing.assert_allclose(gv, g.sum(axis=0), rtol=1e-13)       # v was broadcast along the batch


def test_mul_sends_each_factor_the_other():
    u, v = rng.standard_normal((4, 3)), rng.standard_normal((1, 3))
    out, g, (gu, gv) = _vjp(ops.mul, u, v)
    np.testing.assert_allclose(out, u * v, rtol=1e-15)
    np.testing.assert_allclose(gu, g * v, rtol=1e-13)                # dz/du = v
    np.testing.assert_allclose(gv, (g * u).sum(axis=0, keepdims=True), rtol=1e-13)   # dz/dv = u, summed


def test_log_of_xy_is_the_notes_opening_example():
    """w = log(xy): dw/dx = 1/x, dw/dy = 1/y through mul and log's rules."""
    x, y = jnp.asarray(2.0), jnp.asarray(3.0)
    gx, gy = jax.grad(lambda x, y: ops.log(ops.mul(x, y)), argnums=(0, 1))(x, y)
    assert float(gx) == pytest.approx(0.5, rel=1e-15) and float(gy) == pytest.approx(1 / 3, rel=1e-15)
    out, g, (gv,) = _vjp(ops.log, np.array([0.5, 4.0]))
    np.testing.assert_allclose(gv, g / np.array([0.5, 4.0]), rtol=1e-15)


def test_batch_norm_eval_backward_is_the_formulas():
    x = rng.standard_normal((6, 4))
    gamma, beta, mean, var = rng.standard_normal(4), rng.standard_normal(4), rng.standard_normal(4), 1 + rng.random(4)
    eps = 1e-5
    out, g, (gx, ggamma, gbeta, gmean, gvar) = _vjp(ops.batch_norm_eval, x, gamma, beta, mean, var)
    s = 1 / np.sqrt(var + eps)
    x_hat = (x - mean) * s
    np.testing.assert_allclose(out, gamma * x_hat + beta, rtol=1e-13)
    np.testing.assert_allclose(gx, gamma * s * g, rtol=1e-13)
    np.testing.assert_allclose(ggamma, (g * x_hat).sum(0), rtol=1e-12)
    np.testing.assert_allclose(gbeta, g.sum(0), rtol=1e-13)
    np.testing.assert_allclose(gmean, -(gamma * s * g).sum(0), rtol=1e-12)
    np.testing.assert_allclose(gvar, (-0.5 * gamma * g * (x - mean) * s ** 3).sum(0), rtol=1e-12)


@pytest.mark.parametrize("unbiased", [True, False])
def test_running_statistics_is_the_momentum_update(unbiased):
    x = rng.standard_normal((8, 3)) * 2 + 1
    running = {"mean": rng.standard_normal(3), "var": 1 + rng.random(3)}
    new = ops.running_statistics(x, running, momentum=0.25, unbiased_running_var=unbiased)
    np.testing.assert_allclose(new["mean"], 0.75 * running["mean"] + 0.25 * x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(new["var"], 0.75 * running["var"] + 0.25 * x.var(0, ddof=int(unbiased)), rtol=1e-13)
