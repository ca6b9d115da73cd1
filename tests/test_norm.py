"""Tests of fnbp.norm (batch norm) and its use in fnbp.mlp.apply_stateful (dropout: test_regularization.py).

Oracles: autodiff of the plain-jnp references and central finite differences (a jitted
3 x 3 grid of batch sizes x feature counts, plus fnbp.check on one shape),
numpy reimplementations of the forward formulas and of the running-average update,
a plain-jnp reference network, and binomial statistics for dropout.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbp
from fnbp import crosscheck, mlp, norm, pool, reference, regularization

EPS = 1e-5


def np_batch_norm(x, gamma, beta, eps=EPS):
    """Training-mode batch norm in numpy: batch mean, biased variance."""
    x = np.asarray(x)
    mu = x.mean(axis=0)
    var = ((x - mu) ** 2).mean(axis=0)
    return gamma * (x - mu) / np.sqrt(var + eps) + beta


def np_batch_norm_eval(x, gamma, beta, mean, var, eps=EPS):
    return gamma * (np.asarray(x) - mean) / np.sqrt(var + eps) + beta


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


def test_network_eval_mode_is_per_example_and_keeps_state():
    params = random_bn_params(3, (3, 6, 4, 2))
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(10, 3)))
    x_other = x.at[1:].set(jnp.asarray(rng.normal(size=(9, 3)) * 5))     # every other example changed
    apply = jax.jit(mlp.apply_stateful, static_argnames=("train", "bn_position"))
    for pos in ("before", "after"):
        state = mlp.init_state(params)
        for t in range(3):        # some non-trivial running statistics
            _, state = apply(params, state, x * 2 + t, train=True, bn_position=pos)
        y, new_state = apply(params, state, x, train=False, bn_position=pos)
        jax.tree_util.tree_map(np.testing.assert_array_equal, new_state, state)      # eval: state untouched
        y_other, _ = apply(params, state, x_other, train=False, bn_position=pos)
        np.testing.assert_allclose(y_other[0], y[0], rtol=1e-14, atol=1e-14)
        y_single, _ = apply(params, state, x[:1], train=False, bn_position=pos)
        np.testing.assert_allclose(y_single[0], y[0], rtol=1e-14, atol=1e-14)
        y_train, _ = apply(params, state, x_other, train=True, bn_position=pos)    # training mode: batch-dependent
        assert np.max(np.abs(y_train[0] - apply(params, state, x, train=True, bn_position=pos)[0][0])) > 1e-3


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


# ============================================================================ network: before / after
def np_relu(a):
    return np.maximum(a, 0.0)


def np_network(params, x, position, train, state=None, momentum=0.1):
    """numpy reference network: returns (y, new running stats)."""
    h, new_state = np.asarray(x), []
    for k, layer in enumerate(params):
        W, b = np.asarray(layer["W"]), np.asarray(layer["b"])
        a = h @ W.T + b
        if k == len(params) - 1:
            new_state.append({})
            return a, new_state
        gamma, beta = np.asarray(layer["gamma"]), np.asarray(layer["beta"])
        st = state[k]

        def bn(v):
            if train:
                return np_batch_norm(v, gamma, beta), {
                    "mean": (1 - momentum) * st["mean"] + momentum * v.mean(0),
                    "var": (1 - momentum) * st["var"] + momentum * v.var(0, ddof=1)}   # PyTorch: unbiased
            return np_batch_norm_eval(v, gamma, beta, st["mean"], st["var"]), st

        if position == "before":
            a, st = bn(a)
        h = np_relu(a)
        if position == "after":
            h, st = bn(h)
        new_state.append(st)


def random_bn_params(seed, sizes):
    params = mlp.init(jax.random.PRNGKey(seed), sizes, dtype=jnp.float64, batch_norm=True)
    rng = np.random.default_rng(seed)
    for layer in params[:-1]:
        n = layer["gamma"].shape[0]
        layer["gamma"] = jnp.asarray(1 + 0.5 * rng.normal(size=n))
        layer["beta"] = jnp.asarray(0.5 * rng.normal(size=n))
        layer["b"] = jnp.asarray(0.3 * rng.normal(size=n))
    return params


def test_bn_position_before_and_after_each_match_numpy_reference():
    sizes = (3, 6, 5, 2)
    params = random_bn_params(7, sizes)
    x = np.random.default_rng(8).normal(size=(12, 3)) * 2
    outs = {}
    for pos in ("before", "after"):
        state = mlp.init_state(params)
        np_state = [{"mean": np.zeros(n), "var": np.ones(n)} for n in sizes[1:-1]] + [{}]
        for step in range(3):       # train: outputs and running stats
            xb = x + step
            y, state = mlp.apply_stateful(params, state, jnp.asarray(xb), train=True, bn_position=pos)
            y_np, np_state = np_network(params, xb, pos, True, np_state)
            np.testing.assert_allclose(y, y_np, rtol=1e-11, atol=1e-12)
            for s, s_np in zip(state[:-1], np_state[:-1]):
                np.testing.assert_allclose(s["mean"], s_np["mean"], rtol=1e-12, atol=1e-13)
                np.testing.assert_allclose(s["var"], s_np["var"], rtol=1e-12, atol=1e-13)
        y, _ = mlp.apply_stateful(params, state, jnp.asarray(x), train=False, bn_position=pos)
        y_np, _ = np_network(params, x, pos, False, np_state)
        np.testing.assert_allclose(y, y_np, rtol=1e-11, atol=1e-12)
        outs[pos] = np.asarray(y)
    assert np.max(np.abs(outs["before"] - outs["after"])) > 1e-2


def reference_network(params, x, *, position, key=None, p=0.0):
    """Plain-jnp training-mode network (reference.* only), for autodiff."""
    h = x
    for k, layer in enumerate(params):
        a = reference.dense(layer["W"], layer["b"], h)
        if k == len(params) - 1:
            return a
        if position == "before":
            a = reference.batch_norm(a, layer["gamma"], layer["beta"])
        h = reference.tanh(a)
        if position == "after":
            h = reference.batch_norm(h, layer["gamma"], layer["beta"])
        if p:
            h = reference.dropout(h, p, jax.random.fold_in(key, k))


@pytest.mark.parametrize("position", ["before", "after"])
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_network_gradients_vs_reference_autodiff(position, p):
    """grad of a loss through apply_stateful (our rules) vs autodiff of the plain-jnp network,
    with batch norm before/after tanh and dropout (same keys: layer k uses fold_in(key, k))."""
    params = random_bn_params(9, (4, 7, 5, 3))
    x = jax.random.normal(jax.random.PRNGKey(10), (11, 4), jnp.float64)
    d = jax.random.normal(jax.random.PRNGKey(11), (11, 3), jnp.float64)
    key = jax.random.PRNGKey(12)
    state = mlp.init_state(params)

    def ours(pr):
        y, _ = mlp.apply_stateful(pr, state, x, train=True, key=key, activation=fnbp.tanh, bn_position=position,
                                  dropout=p)
        return fnbp.losses.half_sse(y, d)

    def ref(pr):
        return reference.half_sse(reference_network(pr, x, position=position, key=key, p=p), d)

    (e, g), (e_ref, g_ref) = jax.jit(lambda pr: (jax.value_and_grad(ours)(pr), jax.value_and_grad(ref)(pr)))(params)
    np.testing.assert_allclose(e, e_ref, rtol=1e-12)
    # relative to the largest gradient component: with BN before the activation the hidden
    # biases' gradients are exactly 0 mathematically (BN removes the mean), ~1e-17 numerically
    scale = max(np.max(np.abs(b)) for b in jax.tree_util.tree_leaves(g_ref))
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10 * scale)
    if position == "before":     # dE/db_k = 0 for the hidden layers (b_k is cancelled by the batch mean)
        for layer in g[:-1]:
            assert np.max(np.abs(layer["b"])) <= 1e-12 * scale


def test_apply_stateful_without_bn_or_dropout_equals_apply():
    params = mlp.init(jax.random.PRNGKey(13), (3, 5, 2), dtype=jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(14), (6, 3), jnp.float64)
    for train in (True, False):
        y, _ = mlp.apply_stateful(params, mlp.init_state(params), x, train=train)
        np.testing.assert_array_equal(y, mlp.apply(params, x))
    # inference mode with dropout set is still deterministic and equals apply
    y, _ = mlp.apply_stateful(params, mlp.init_state(params), x, train=False, dropout=0.5)
    np.testing.assert_array_equal(y, mlp.apply(params, x))


def test_apply_stateful_validation():
    params = mlp.init(jax.random.PRNGKey(0), (3, 4, 2), dtype=jnp.float64, batch_norm=True)
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="bn_position"):
        mlp.apply_stateful(params, mlp.init_state(params), x, train=True, bn_position="middle")
    with pytest.raises(ValueError, match="key"):
        mlp.apply_stateful(params, mlp.init_state(params), x, train=True, dropout=0.5)


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
