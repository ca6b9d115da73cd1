"""Tests of fnbp.norm (batch norm; its use in fnbp.mlp.apply_stateful: test_mlp.py).

Oracles: autodiff of the plain-jnp references and central finite differences (a jitted
3 x 3 grid of batch sizes x feature counts, plus fnbp.check on one shape),
and numpy reimplementations of the forward formulas and of the running-average update.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbp
from fnbp import crosscheck, norm, pool, reference
from np_batch_norm import EPS, np_batch_norm, np_batch_norm_eval


# ============================================================================ batch norm: backward
BATCHES, FEATURES = (2, 7, 32), (1, 5, 64)
FD_EPS = 1e-6


def _bn_inputs(batch, n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, n)) + 1.0
    gamma = 1.0 + 0.3 * rng.normal(size=n)
    beta = rng.normal(size=n)
    ct = rng.normal(size=(batch, n))                                        # output cotangent
    dirs = tuple(rng.normal(size=a.shape) for a in (x, gamma, beta))        # finite-difference directions
    return (x, gamma, beta), ct, dirs


@jax.jit
def _bn_grid(cases):
    """For every (batch, n): our VJP, jax.vjp of reference.batch_norm, and per argument the central
    finite difference of <ct, batch_norm(...)> along a random unit direction vs <our grad, direction>.
    One jit for the whole grid (one compilation instead of nine)."""
    out = []
    for args, ct, dirs in cases:
        ours = jax.vjp(norm.batch_norm, *args)[1](ct)
        ref = jax.vjp(reference.batch_norm, *args)[1](ct)
        fd = []
        for i, v in enumerate(dirs):
            v = v / jnp.linalg.norm(v)

            def f(t, i=i, v=v):
                moved = list(args)
                moved[i] = moved[i] + t * v
                return jnp.vdot(ct, norm.batch_norm(*moved))
            fd.append(((f(FD_EPS) - f(-FD_EPS)) / (2 * FD_EPS), jnp.vdot(ours[i], v)))
        out.append((ours, ref, fd, args, ct))
    return out


@pytest.fixture(scope="module")
def bn_grid():
    shapes = [(b, n) for b in BATCHES for n in FEATURES]
    cases = jax.tree_util.tree_map(jnp.asarray, [_bn_inputs(b, n, seed) for seed, (b, n) in enumerate(shapes)])
    return dict(zip(shapes, jax.tree_util.tree_map(np.asarray, _bn_grid(cases))))


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("n", FEATURES)
def test_batch_norm_backward_vs_autodiff_and_finite_differences(bn_grid, batch, n):
    """Hand-derived grads for x, gamma, beta vs jax.vjp of the plain reference: <= 1e-10 relative
    (max abs error / max abs reference gradient, as fnbp.check); vs central finite differences
    <= fnbp.crosscheck.FD_TOL relative.

    Batch 2 is the ill-conditioned case: two normalised values are +-sigma/sqrt(sigma^2 + eps), nearly
    independent of x, so grad_x is O(eps / sigma^2) times its natural scale |gamma g| / sigma and is
    the difference of O(1) terms.  Both our formula and autodiff of the reference then lose about
    log10(sigma^2 / eps) digits (checked against 50-digit mpmath while writing this test: they are
    equally far from the exact value), so for batch 2 we also bound the error against the natural scale.
    """
    ours, ref, fd, (x, gamma, beta), ct = bn_grid[(batch, n)]
    for name, a, b in zip(("x", "gamma", "beta"), ours, ref):
        rel = np.max(np.abs(a - b)) / np.max(np.abs(b))
        assert rel <= 1e-10, (name, rel)
    if batch == 2:
        natural = np.max(np.abs(gamma)) * np.max(np.abs(ct)) / np.sqrt(np.min(x.var(axis=0)) + EPS)
        assert np.max(np.abs(ours[0] - ref[0])) <= 1e-13 * natural
    for name, (numeric, analytic) in zip(("x", "gamma", "beta"), fd):
        assert abs(numeric - analytic) / max(abs(numeric), abs(analytic), 1.0) <= crosscheck.FD_TOL, name


def test_batch_norm_fnbp_check():
    """The project's cross-check on one shape (also checks jit and vmap of the rule)."""
    (x, gamma, beta), _, _ = _bn_inputs(7, 5, seed=99)
    r = fnbp.check(norm.batch_norm, reference.batch_norm, jnp.asarray(x), jnp.asarray(gamma), jnp.asarray(beta))
    assert r.argnums == (0, 1, 2)
    assert max(r.autodiff_rel) <= 1e-10 and max(r.fd_rel) <= crosscheck.FD_TOL, r
    assert r.ok, r


def test_batch_norm_forward_matches_numpy():
    rng = np.random.default_rng(0)
    x, gamma, beta = rng.normal(size=(9, 4)) * 3 + 2, rng.normal(size=4), rng.normal(size=4)
    y = norm.batch_norm(jnp.asarray(x), jnp.asarray(gamma), jnp.asarray(beta))
    np.testing.assert_allclose(y, np_batch_norm(x, gamma, beta), rtol=1e-12, atol=1e-12)
    # normalised columns: mean beta, (biased) std |gamma| * sqrt(var / (var + eps))
    np.testing.assert_allclose(np.asarray(y).mean(axis=0), beta, atol=1e-12)


def test_batch_norm_gradients_vs_numpy_formula():
    """The three gradients against the textbook formulas written out in numpy."""
    rng = np.random.default_rng(1)
    x, gamma, beta, g = rng.normal(size=(6, 3)), rng.normal(size=3), rng.normal(size=3), rng.normal(size=(6, 3))
    _, vjp = jax.vjp(norm.batch_norm, jnp.asarray(x), jnp.asarray(gamma), jnp.asarray(beta))
    gx, ggamma, gbeta = vjp(jnp.asarray(g))
    m = x.shape[0]
    mu, var = x.mean(0), x.var(0)
    xhat = (x - mu) / np.sqrt(var + EPS)
    dxhat = g * gamma
    dvar = np.sum(dxhat * (x - mu), 0) * -0.5 * (var + EPS) ** -1.5
    dmu = np.sum(-dxhat / np.sqrt(var + EPS), 0) + dvar * np.mean(-2 * (x - mu), 0)
    dx = dxhat / np.sqrt(var + EPS) + dvar * 2 * (x - mu) / m + dmu / m   # Ioffe & Szegedy 2015, Alg. backward
    np.testing.assert_allclose(gx, dx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ggamma, np.sum(g * xhat, 0), rtol=1e-12)
    np.testing.assert_allclose(gbeta, np.sum(g, 0), rtol=1e-12)


def test_batch_norm_rejects_bad_shapes():
    with pytest.raises(ValueError, match="gamma"):
        norm.batch_norm(jnp.ones((4, 3)), jnp.ones(2), jnp.zeros(3))
    with pytest.raises(ValueError, match="mini-batch"):
        norm.batch_norm(jnp.ones(3), jnp.ones(3), jnp.zeros(3))


# ============================================================================ batch norm: inference
def test_batch_norm_eval_uses_running_statistics_only():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8, 5)) * 2 + 1
    gamma, beta = rng.normal(size=5), rng.normal(size=5)
    running = {"mean": rng.normal(size=5), "var": rng.uniform(0.5, 2.0, size=5)}
    run_j = jax.tree_util.tree_map(jnp.asarray, running)
    y = np.asarray(norm.batch_norm_eval(jnp.asarray(x), jnp.asarray(gamma), jnp.asarray(beta), run_j))
    np.testing.assert_allclose(y, np_batch_norm_eval(x, gamma, beta, running["mean"], running["var"]),
                               rtol=1e-12, atol=1e-12)
    # change every other example: example 0's output is unchanged (bit for bit)
    x2 = x.copy()
    x2[1:] = rng.normal(size=(7, 5)) * 10 - 3
    y2 = np.asarray(norm.batch_norm_eval(jnp.asarray(x2), jnp.asarray(gamma), jnp.asarray(beta), run_j))
    np.testing.assert_array_equal(y2[0], y[0])
    # and differs from training mode, which uses the batch statistics
    assert not np.allclose(y, np_batch_norm(x, gamma, beta), atol=1e-3)


# ============================================================================ batch norm: running stats
@pytest.mark.parametrize("momentum", [0.1, 0.3])
def test_running_statistics_match_numpy_momentum_update(momentum):
    """PyTorch's convention: running <- (1 - m) running + m batch_stat, where the running variance
    averages the UNBIASED batch variance (numpy ddof=1) while y uses the biased one."""
    rng = np.random.default_rng(6)
    n = 4
    gamma, beta = rng.normal(size=n), rng.normal(size=n)
    running = norm.init_batch_norm_state(n, jnp.float64)
    mean_np, var_np = np.zeros(n), np.ones(n)
    for t, batch in enumerate((8, 3, 8, 5, 2)):          # several steps, several batch sizes
        x = rng.normal(size=(batch, n)) * (t + 1) + t
        y, running = norm.batch_norm_train(jnp.asarray(x), jnp.asarray(gamma), jnp.asarray(beta), running,
                                           momentum=momentum)
        mean_np = (1 - momentum) * mean_np + momentum * x.mean(axis=0)
        var_np = (1 - momentum) * var_np + momentum * x.var(axis=0, ddof=1)
        np.testing.assert_allclose(y, np_batch_norm(x, gamma, beta), rtol=1e-12, atol=1e-12)   # biased in y
        assert np.max(np.abs(np.asarray(running["mean"]) - mean_np)) <= 1e-12
        assert np.max(np.abs(np.asarray(running["var"]) - var_np)) <= 1e-12
    # the two conventions really differ (by the factor B/(B-1) on the last batch's contribution)
    assert np.max(np.abs(var_np - _biased_running_var(momentum))) > 1e-3


def _biased_running_var(momentum):
    rng = np.random.default_rng(6)
    n = 4
    rng.normal(size=n), rng.normal(size=n)
    var_np = np.ones(n)
    for t, batch in enumerate((8, 3, 8, 5, 2)):
        x = rng.normal(size=(batch, n)) * (t + 1) + t
        var_np = (1 - momentum) * var_np + momentum * x.var(axis=0, ddof=0)
    return var_np


def test_running_variance_biased_option_and_batch_of_one():
    """unbiased_running_var=False keeps the biased (Keras/Flax) running variance; B = 1 with the
    default unbiased form is refused with a message naming the function and the option."""
    rng = np.random.default_rng(16)
    x = rng.normal(size=(6, 3))
    ones, zeros = jnp.ones(3), jnp.zeros(3)
    running = norm.init_batch_norm_state(3, jnp.float64)
    _, biased = norm.batch_norm_train(jnp.asarray(x), ones, zeros, running, momentum=0.5, unbiased_running_var=False)
    _, unbiased = norm.batch_norm_train(jnp.asarray(x), ones, zeros, running, momentum=0.5)
    np.testing.assert_allclose(biased["var"], 0.5 + 0.5 * x.var(0, ddof=0), rtol=1e-13)
    np.testing.assert_allclose(unbiased["var"], 0.5 + 0.5 * x.var(0, ddof=1), rtol=1e-13)
    with pytest.raises(ValueError, match="batch_norm_train.*unbiased_running_var=False"):
        norm.batch_norm_train(jnp.asarray(x[:1]), ones, zeros, running)
    _, one = norm.batch_norm_train(jnp.asarray(x[:1]), ones, zeros, running, momentum=0.5,
                                   unbiased_running_var=False)
    np.testing.assert_allclose(one["var"], 0.5 * np.ones(3), rtol=1e-13)      # variance of one example is 0


# --- per-channel batch norm (fnbp.pool.batch_norm_channels*, moved from tests/test_pool.py) ---------------
def test_batch_norm_channels_running_statistics_per_channel():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 3, 2)) * np.array([1.0, 3.0]) + np.array([0.0, 5.0])
    state = {"mean": np.zeros(2), "var": np.ones(2)}
    y, new = pool.batch_norm_channels_train(x, np.ones(2), np.zeros(2), state, momentum=0.5)
    flat = x.reshape(-1, 2)
    np.testing.assert_allclose(new["mean"], 0.5 * flat.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(new["var"], 0.5 + 0.5 * flat.var(axis=0, ddof=1), rtol=1e-12)   # PyTorch's
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 2).mean(axis=0), 0.0, atol=1e-12)
    y_eval = pool.batch_norm_channels_eval(x, np.ones(2), np.zeros(2), new)
    np.testing.assert_allclose(y_eval, (x - new["mean"]) / np.sqrt(new["var"] + 1e-5), rtol=1e-12)


def test_batch_norm_channels_named_errors():
    with pytest.raises(ValueError, match=r"fnbp.batch_norm_channels: gamma must have shape \(3,\)"):
        pool.batch_norm_channels(np.zeros((2, 2, 2, 3)), np.ones(2), np.zeros(3))
