"""Tests of fnbp.optim: optax twins, the notes' pseudocode in numpy, deliberate differences,
Nesterov's two forms, descent, validation, schedules and docstrings."""
import functools
import math
import re
import unicodedata

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from fnbp import optim

STEPS = 500


# --------------------------------------------------------------------------- problems
def quadratic_problem(dtype=np.float64, seed=0):
    """A random nested pytree θ (23 numbers) and C(θ) = ½xᵀAx − bᵀx, x = ravel(θ), A SPD.

    Returns (params, loss, A, b) with A, b as float64 numpy arrays (for numpy references).
    """
    rng = np.random.default_rng(seed)
    params = {"w": rng.normal(size=(3, 4)),
              "layers": [{"b": rng.normal(size=5)}, (rng.normal(size=(2, 3)),)]}
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params)
    n = ravel_pytree(params)[0].size
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    a = (q * np.geomspace(0.05, 1.0, n)) @ q.T
    b = rng.normal(size=n)
    a_j, b_j = jnp.asarray(a, dtype), jnp.asarray(b, dtype)

    def loss(p):
        x = ravel_pytree(p)[0]
        return 0.5 * x @ (a_j @ x) - b_j @ x

    return params, loss, a, b


def mlp_problem(dtype=np.float64, seed=1):
    """A tiny plain-jnp 3-8-2 tanh MLP with a mean-squared-error loss on random data."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(16, 3)), dtype)
    y = jnp.asarray(rng.normal(size=(16, 2)), dtype)
    params = {"w1": rng.normal(size=(3, 8)) / math.sqrt(3), "b1": 0.1 * rng.normal(size=8),
              "w2": rng.normal(size=(8, 2)) / math.sqrt(8), "b2": 0.1 * rng.normal(size=2)}
    params = jax.tree_util.tree_map(lambda v: jnp.asarray(v, dtype), params)

    def loss(p):
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        return jnp.mean((h @ p["w2"] + p["b2"] - y) ** 2)

    return params, loss


def flat_quadratic():
    """The same quadratic on one flat array (one leaf: cheaper to compile)."""
    params, _, a, b = quadratic_problem()
    a_j, b_j = jnp.asarray(a), jnp.asarray(b)
    return ravel_pytree(params)[0], lambda x: 0.5 * x @ (a_j @ x) - b_j @ x, a, b


def rosenbrock(p):
    return (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2


ROSEN_START = jnp.asarray([-1.2, 1.0])


def trajectory(opt, loss, params, steps=STEPS):
    """θ_1 … θ_steps (raveled, one row per step) and the final state; one lax.scan.

    The gradient is taken at ``gradient_point`` (θ itself unless ``opt`` is the look-ahead
    Nesterov), so the same loop serves every optimizer.
    """
    grad = jax.grad(loss)

    def step(carry, _):
        p, s = carry
        u, s = opt.update(grad(optim.gradient_point(opt, p, s)), s, p)
        p = optax.apply_updates(p, u)
        return (p, s), ravel_pytree(p)[0]

    (_, state), traj = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    return traj, state


def rel_diff(a, b):
    """max over steps of ‖a_k − b_k‖ / ‖b_k‖ (computed in float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)))


# --------------------------------------------------------------------------- the twin table
def optax_ema_momentum(learning_rate, beta):
    return optax.chain(optax.ema(beta, debias=False), optax.scale_by_learning_rate(learning_rate))


SCHED = optim.inverse_decay(0.05, 0.01)          # a schedule that both libraries are handed
ADA_SCHED = optim.exponential_decay(0.8, 0.001)

# (id, ours, ours' kwargs, optax twin, twin's kwargs)
TWINS = [
    ("sgd", optim.sgd, dict(learning_rate=0.5), optax.sgd, dict(learning_rate=0.5)),
    ("momentum", optim.momentum, dict(learning_rate=0.05, beta=0.9),
     optax.sgd, dict(learning_rate=0.05, momentum=0.9)),
    ("ema_momentum-schedule", optim.ema_momentum, dict(learning_rate=SCHED, beta=0.8),
     optax_ema_momentum, dict(learning_rate=SCHED, beta=0.8)),
    ("simplified_nesterov", optim.simplified_nesterov, dict(learning_rate=0.05, beta=0.9),
     optax.sgd, dict(learning_rate=0.05, momentum=0.9, nesterov=True)),
    ("adagrad-optax-form", optim.adagrad,
     dict(learning_rate=0.1, eps=1e-7, initial_accumulator_value=0.1, eps_in_sqrt=True),
     optax.adagrad, dict(learning_rate=0.1, initial_accumulator_value=0.1, eps=1e-7)),
    ("rmsprop", optim.rmsprop, dict(learning_rate=0.01, decay=0.9, eps=1e-2),
     optax.rmsprop, dict(learning_rate=0.01, decay=0.9, eps=1e-2)),
    ("rmsprop-eps-outside", optim.rmsprop, dict(learning_rate=0.01, decay=0.9, eps=0.1, eps_in_sqrt=False),
     optax.rmsprop, dict(learning_rate=0.01, decay=0.9, eps=0.1, eps_in_sqrt=False)),
    ("adadelta", optim.adadelta, dict(rho=0.95, eps=1e-2),
     optax.adadelta, dict(learning_rate=1.0, rho=0.95, eps=1e-2)),
    ("adadelta-schedule", optim.adadelta, dict(learning_rate=ADA_SCHED, rho=0.95, eps=1e-2),
     optax.adadelta, dict(learning_rate=ADA_SCHED, rho=0.95, eps=1e-2)),
    ("adam", optim.adam, dict(learning_rate=0.02, b1=0.9, b2=0.999, eps=1e-8),
     optax.adam, dict(learning_rate=0.02, b1=0.9, b2=0.999, eps=1e-8)),
    ("adam-schedule", optim.adam, dict(learning_rate=SCHED, b1=0.9, b2=0.999, eps=1e-6),
     optax.adam, dict(learning_rate=SCHED, b1=0.9, b2=0.999, eps=1e-6)),
]

# Hyperparameters sit where the dynamics contract.  With a tiny ε near an optimum the adaptive
# methods take sign-like steps whose trajectories are chaotic: a 1-ulp difference (ours and
# optax round in a different order) then grows to 1e-4..1e-2 within 500 steps, equal formulas
# or not.
TOL = {np.float64: 1e-12, np.float32: 1e-5}


DTYPES = {"f64": np.float64, "f32": np.float32}


@functools.lru_cache(maxsize=None)
def twin_trajectories(name):
    """500-step trajectories of one table row, {dtype id: [(ours, twin, start) per problem]}.

    Both problems and both dtypes run in a single jit (one compilation per row)."""
    _, make_ours, kw, make_twin, twin_kw = next(t for t in TWINS if t[0] == name)
    ours, twin = make_ours(**kw), make_twin(**twin_kw)
    setups = {k: (quadratic_problem(dt)[:2], mlp_problem(dt)) for k, dt in DTYPES.items()}
    starts = {k: [p for p, _ in v] for k, v in setups.items()}

    @jax.jit
    def run(starts):
        return {k: [(trajectory(ours, loss, p)[0], trajectory(twin, loss, p)[0])
                    for p, (_, loss) in zip(starts[k], setups[k])] for k in setups}

    out = run(starts)
    return {k: [(a, b, ravel_pytree(p)[0]) for (a, b), p in zip(out[k], starts[k])] for k in out}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", [t[0] for t in TWINS])
def test_twin_trajectories_equal(name, dtype):
    """Ours and its optax twin: 500 steps on a random nested quadratic and a small MLP."""
    for problem, (ours, twin, x0) in zip(("quadratic", "MLP"), twin_trajectories(name)[dtype]):
        assert ours.dtype == twin.dtype == DTYPES[dtype]
        diff = rel_diff(ours, twin)
        assert diff <= TOL[DTYPES[dtype]], f"{problem}: {diff:.3g}"
        # not vacuous: the trajectory travels far from its start
        x0 = np.asarray(x0, np.float64)
        assert np.linalg.norm(np.asarray(ours[-1], np.float64) - x0) > 1e-2 * np.linalg.norm(x0)


# --------------------------------------------------------------------------- deliberate differences
def halving(eta0):
    return lambda k: eta0 * 0.5 ** k


def linear_runs(ours, twin, steps):
    """Cumulative displacements θ_n − θ_0 for a linear loss C(θ) = θ (gradient 1), ours and optax."""
    c = lambda p: p  # noqa: E731
    traj_a, _ = trajectory(ours, c, jnp.asarray(0.0), steps)
    traj_b, _ = trajectory(twin, c, jnp.asarray(0.0), steps)
    return np.asarray(traj_a)[:, 0], np.asarray(traj_b)[:, 0]


@pytest.mark.parametrize("simplified", [False, True], ids=["momentum", "simplified_nesterov"])
def test_momentum_vs_optax_under_halving_schedule_closed_form(simplified):
    """Notes: η inside v, so v_k = −Σ_j β^(k−j) η_j g.  optax: η outside, Δθ_k = −η_k Σ_j β^(k−j) g.

    With g = 1 and η_k = η₀ 2^(−k) both are proved against their closed forms; the difference
    is large (the notes' velocity remembers the larger early rates)."""
    beta, eta0, n = 0.9, 0.1, 30
    eta = eta0 * 0.5 ** np.arange(n)
    m = np.array([sum(beta ** (k - j) for j in range(k + 1)) for k in range(n)])           # optax trace
    v = np.array([-sum(beta ** (k - j) * eta[j] for j in range(k + 1)) for k in range(n)])  # notes velocity
    if simplified:
        v_prev = np.concatenate([[0.0], v[:-1]])
        notes_step = beta ** 2 * v_prev - eta * (1 + beta)        # Θ ← Θ + δ²v − η(1 + δ)g
        optax_step = -eta * (1 + beta * m)                        # −η_k (g + β m_k)
        ours = optim.simplified_nesterov(halving(eta0), beta)
        twin = optax.sgd(halving(eta0), momentum=beta, nesterov=True)
    else:
        notes_step, optax_step = v, -eta * m
        ours, twin = optim.momentum(halving(eta0), beta), optax.sgd(halving(eta0), momentum=beta)
    a, b = linear_runs(ours, twin, n)
    np.testing.assert_allclose(a, np.cumsum(notes_step), rtol=1e-13)
    np.testing.assert_allclose(b, np.cumsum(optax_step), rtol=1e-13)
    # The size: after 30 steps the notes' momentum has moved 1.905, optax's 0.364 (5.2x); simplified
    # Nesterov 1.914 vs 0.527 (3.6x): the notes' velocity keeps the large early rates.
    assert abs(a[-1]) > 3 * abs(b[-1])


@pytest.mark.parametrize("ours, twin", [
    (lambda s: optim.momentum(s, 0.9), lambda s: optax.sgd(s, momentum=0.9)),
    (lambda s: optim.simplified_nesterov(s, 0.9), lambda s: optax.sgd(s, momentum=0.9, nesterov=True)),
], ids=["momentum", "simplified_nesterov"])
def test_momentum_vs_optax_schedule_difference_on_problems(ours, twin):
    """Under a schedule (halving every 100 steps) the forms part: relative trajectory differences
    of about 4e-3 (quadratic) and 2.5e-2 (MLP) over 500 steps, while at constant η they agree to
    rounding (twin table)."""
    sched = lambda k: 0.05 * 0.5 ** (k // 100)  # noqa: E731
    (qp, qloss, _, _), (mp, mloss) = flat_quadratic(), mlp_problem()

    @jax.jit
    def run(qp, mp):
        return [(trajectory(ours(sched), loss, p)[0], trajectory(twin(sched), loss, p)[0])
                for p, loss in ((qp, qloss), (mp, mloss))]

    for a, b in run(qp, mp):
        assert rel_diff(a, b) > 1e-3


def test_adagrad_notes_defaults_vs_optax_defaults():
    """Notes: r₀ = 0, δ outside √ → first step −η g/(δ + |g|) ≈ −η sign(g).
    optax: r₀ = 0.1, δ inside √ → first step −η g/√(0.1 + g² + δ)."""
    g = jnp.asarray([0.01, -0.3, 2.0])
    eta, eps = 0.1, 1e-7
    u_notes, _ = optim.adagrad(eta).update(g, optim.adagrad(eta).init(g))
    u_optax, _ = optax.adagrad(eta).update(g, optax.adagrad(eta).init(g))
    gn = np.asarray(g)
    np.testing.assert_allclose(u_notes, -eta * gn / (eps + np.abs(gn)), rtol=1e-14)
    np.testing.assert_allclose(u_optax, -eta * gn / np.sqrt(0.1 + gn ** 2 + eps), rtol=1e-14)
    assert abs(float(u_notes[0]) / float(u_optax[0])) > 30   # tiny gradients: notes step ~η, optax ~η·g/√0.1
    qp, qloss, _, _ = flat_quadratic()
    a, b = jax.jit(lambda p: (trajectory(optim.adagrad(0.3), qloss, p)[0],
                              trajectory(optax.adagrad(0.3), qloss, p)[0]))(qp)
    assert rel_diff(a, b) > 1e-3


def test_optax_adadelta_default_learning_rate_ascends():
    """optax.adadelta(learning_rate=None) returns +√(δ+s)/√(δ+r)⊙g (the sign of the gradient):
    exactly the negative of ours."""
    p, loss, _, _ = flat_quadratic()
    g = jax.grad(loss)(p)
    ours, twin = optim.adadelta(), optax.adadelta()
    s_a, s_b = ours.init(p), twin.init(p)
    update_a, update_b = jax.jit(ours.update), jax.jit(twin.update)
    for _ in range(3):
        u_a, s_a = update_a(g, s_a)
        u_b, s_b = update_b(g, s_b, p)
        np.testing.assert_allclose(ravel_pytree(u_a)[0], -ravel_pytree(u_b)[0], rtol=1e-14)
    assert float(ravel_pytree(u_b)[0] @ ravel_pytree(g)[0]) > 0


# --------------------------------------------------------------------------- numpy pseudocode
def np_sgd(grad, x, steps, eta):
    out = []
    for i in range(1, steps + 1):
        g = grad(x)
        x = x - eta(i - 1) * g
        out.append(x)
    return out


def np_momentum(grad, x, steps, eta, delta):
    v, out = np.zeros_like(x), []
    for i in range(1, steps + 1):
        g = grad(x)
        v = delta * v - eta(i - 1) * g
        x = x + v
        out.append(x)
    return out


def np_ema_momentum(grad, x, steps, gamma, beta):
    avg, out = np.zeros_like(x), []
    for i in range(1, steps + 1):
        avg = beta * avg + (1 - beta) * grad(x)
        x = x - gamma(i - 1) * avg
        out.append(x)
    return out


def np_nesterov(grad, x, steps, eta, delta):
    v, out = np.zeros_like(x), []
    for i in range(1, steps + 1):
        x_tilde = x + delta * v
        g = grad(x_tilde)
        v = delta * v - eta(i - 1) * g
        x = x + v
        out.append(x)
    return out


def np_simplified_nesterov(grad, x, steps, eta, delta):
    v, big, out = np.zeros_like(x), x.copy(), []
    for i in range(1, steps + 1):
        g = grad(big)
        big = big + delta ** 2 * v - eta(i - 1) * (1 + delta) * g
        v = delta * v - eta(i - 1) * g
        out.append(big)
    return out


def np_adagrad(grad, x, steps, eta, delta):
    r, out = np.zeros_like(x), []
    for i in range(1, steps + 1):
        g = grad(x)
        r = r + g * g
        v = -eta(i - 1) / (delta + np.sqrt(r)) * g
        x = x + v
        out.append(x)
    return out


def np_rmsprop(grad, x, steps, eta, delta, rho):
    r, out = np.zeros_like(x), []
    for i in range(1, steps + 1):
        g = grad(x)
        r = rho * r + (1 - rho) * (g * g)
        v = -eta(i - 1) / np.sqrt(delta + r) * g
        x = x + v
        out.append(x)
    return out


def np_adadelta(grad, x, steps, delta, rho):
    r, s, out = np.zeros_like(x), np.zeros_like(x), []
    for i in range(1, steps + 1):
        g = grad(x)
        r = rho * r + (1 - rho) * (g * g)
        v = -np.sqrt(delta + s) / np.sqrt(delta + r) * g
        s = rho * s + (1 - rho) * (v * v)
        x = x + v
        out.append(x)
    return out


def np_adam(grad, x, steps, eta, delta, rho1, rho2):
    s, r, out = np.zeros_like(x), np.zeros_like(x), []
    for i in range(1, steps + 1):
        g = grad(x)
        s = rho1 * s + (1 - rho1) * g
        r = rho2 * r + (1 - rho2) * (g * g)
        s_hat = s / (1 - rho1 ** i)
        r_hat = r / (1 - rho2 ** i)
        v = -eta(i - 1) * s_hat / (delta + np.sqrt(r_hat))
        x = x + v
        out.append(x)
    return out


def np_delta_bar_delta(grad, x, steps, eps0, kappa, phi, theta):
    """Jacobs (1988) in his own variables: per-weight rates ε, increment κ, decrease φ, average θ."""
    eps, bar, out = np.full_like(x, eps0), np.zeros_like(x), []
    for _ in range(steps):
        d = grad(x)
        eps = np.where(bar * d > 0, eps + kappa, np.where(bar * d < 0, eps - phi * eps, eps))
        x = x - eps * d
        bar = (1 - theta) * d + theta * bar
        out.append(x)
    return out


CONST = lambda eta: (lambda k: eta)  # noqa: E731
INV = lambda eta0, d: (lambda k: eta0 / (1 + k * d))  # noqa: E731

# (id, ours, numpy reference with its arguments)
NOTES_FORMS = [
    ("sgd", optim.sgd(0.5), lambda gr, x, n: np_sgd(gr, x, n, CONST(0.5))),
    ("momentum", optim.momentum(0.05, 0.9), lambda gr, x, n: np_momentum(gr, x, n, CONST(0.05), 0.9)),
    ("momentum-inverse-decay", optim.momentum(optim.inverse_decay(0.1, 0.02), 0.8),
     lambda gr, x, n: np_momentum(gr, x, n, INV(0.1, 0.02), 0.8)),
    ("ema_momentum", optim.ema_momentum(0.3, 0.8), lambda gr, x, n: np_ema_momentum(gr, x, n, CONST(0.3), 0.8)),
    ("nesterov", optim.nesterov(0.05, 0.9), lambda gr, x, n: np_nesterov(gr, x, n, CONST(0.05), 0.9)),
    ("nesterov-inverse-decay", optim.nesterov(optim.inverse_decay(0.1, 0.02), 0.8),
     lambda gr, x, n: np_nesterov(gr, x, n, INV(0.1, 0.02), 0.8)),
    ("simplified_nesterov", optim.simplified_nesterov(0.05, 0.9),
     lambda gr, x, n: np_simplified_nesterov(gr, x, n, CONST(0.05), 0.9)),
    ("adagrad", optim.adagrad(0.3), lambda gr, x, n: np_adagrad(gr, x, n, CONST(0.3), 1e-7)),
    ("rmsprop", optim.rmsprop(0.01, 0.9, 1e-2), lambda gr, x, n: np_rmsprop(gr, x, n, CONST(0.01), 1e-2, 0.9)),
    ("adadelta", optim.adadelta(rho=0.9, eps=1e-6), lambda gr, x, n: np_adadelta(gr, x, n, 1e-6, 0.9)),
    ("adam", optim.adam(0.02), lambda gr, x, n: np_adam(gr, x, n, CONST(0.02), 1e-8, 0.9, 0.999)),
    ("adam-inverse-decay", optim.adam(optim.inverse_decay(0.05, 0.01), 0.8, 0.99, 1e-6),
     lambda gr, x, n: np_adam(gr, x, n, INV(0.05, 0.01), 1e-6, 0.8, 0.99)),
    ("delta_bar_delta", optim.delta_bar_delta(0.05, kappa=0.05, phi=0.3, theta=0.7),
     lambda gr, x, n: np_delta_bar_delta(gr, x, n, 0.05, 0.05 * 0.05, 0.3, 0.7)),
]


@pytest.mark.parametrize("name, ours, reference", NOTES_FORMS, ids=[t[0] for t in NOTES_FORMS])
def test_notes_form_matches_numpy_pseudocode(name, ours, reference):
    params, loss, a, b = flat_quadratic()
    steps = 200
    traj, _ = jax.jit(lambda p: trajectory(ours, loss, p, steps))(params)
    x0 = np.asarray(ravel_pytree(params)[0])
    ref = np.stack(reference(lambda x: a @ x - b, x0, steps))
    assert rel_diff(traj, ref) <= 1e-12
    assert np.linalg.norm(ref[-1] - x0) > 1e-2 * np.linalg.norm(x0)


def test_delta_bar_delta_rates_grow_and_shrink():
    """Gains grow by κ while the sign holds and shrink by (1 − φ) when it flips."""
    opt = optim.delta_bar_delta(1.0, kappa=0.1, phi=0.5, theta=0.0)
    state = opt.init(jnp.zeros(2))
    for g in ([1.0, 1.0], [1.0, -1.0], [1.0, 1.0], [1.0, 0.0]):
        updates, state = opt.update(jnp.asarray(g), state)
    np.testing.assert_allclose(state.gain, [1.3, 0.25])   # [+κ, +κ, +κ] and [·½, ·½, unchanged]
    np.testing.assert_allclose(updates, [-1.3, 0.0])


# --------------------------------------------------------------------------- Nesterov's two forms
@pytest.mark.parametrize("problem, lr", [("quadratic", 0.05), ("mlp", 0.05), ("flat", optim.inverse_decay(0.08, 0.01))],
                         ids=["quadratic", "mlp", "flat-quadratic-inverse-decay"])
def test_simplified_nesterov_is_lookahead_point(problem, lr):
    """Θ_n = θ_n + δ·v_n along a whole trajectory (Bengio et al. 2012)."""
    params, loss = {"quadratic": lambda: quadratic_problem()[:2], "mlp": mlp_problem,
                    "flat": lambda: flat_quadratic()[:2]}[problem]()
    beta = 0.9
    look, simple = optim.nesterov(lr, beta), optim.simplified_nesterov(lr, beta)
    grad = jax.grad(loss)

    def step(carry, _):
        (p, s), (q, t) = carry
        u, s = look.update(grad(look.lookahead(p, s)), s, p)
        p = optim.apply_updates(p, u)
        w, t = simple.update(grad(q), t, q)
        q = optim.apply_updates(q, w)
        return ((p, s), (q, t)), (ravel_pytree(look.lookahead(p, s))[0], ravel_pytree(q)[0])

    @jax.jit
    def run(params):
        return jax.lax.scan(step, ((params, look.init(params)), (params, simple.init(params))), None,
                            length=STEPS)[1]

    theta_plus_dv, big_theta = run(params)
    assert rel_diff(big_theta, theta_plus_dv) <= 1e-12


def test_simplified_nesterov_equals_theta_once_v_vanishes():
    """Θ = θ once v = 0: at the start, and at convergence on a strongly convex quadratic."""
    params, loss, a, b = flat_quadratic()
    look, simple = optim.nesterov(0.3, 0.5), optim.simplified_nesterov(0.3, 0.5)
    state = look.init(params)
    assert look.lookahead(params, state) is not params
    np.testing.assert_array_equal(ravel_pytree(look.lookahead(params, state))[0],
                                  ravel_pytree(params)[0])
    (theta, s_look), (big, _) = jax.jit(lambda p: (trajectory(look, loss, p, 3000),
                                                   trajectory(simple, loss, p, 3000)))(params)
    v = ravel_pytree(s_look.v)[0]
    assert float(jnp.max(jnp.abs(v))) < 1e-13
    np.testing.assert_allclose(big[-1], theta[-1], rtol=0, atol=1e-12)
    np.testing.assert_allclose(theta[-1], np.linalg.solve(a, b), atol=1e-10)


def test_deprecated_lookahead_params_inside_chain_and_errors():
    """The deprecated state-reading alias still finds the NesterovState inside an optax.chain."""
    params, loss, _, _ = quadratic_problem()
    opt = optax.chain(optax.clip_by_global_norm(1.0), optim.nesterov(0.1, 0.9))
    state = opt.init(params)
    g = jax.grad(loss)(params)
    _, state = jax.jit(opt.update)(g, state, params)
    v = state[1].v
    expected = jax.tree_util.tree_map(lambda p, v: p + 0.9 * v, params, v)
    got = optim.lookahead_params(params, state)
    np.testing.assert_allclose(ravel_pytree(got)[0], ravel_pytree(expected)[0], rtol=1e-15)
    assert optim.lookahead_params(params, optim.adam(0.1).init(params)) is params
    with pytest.raises(ValueError, match="NesterovState"):
        optim.lookahead_params(params, (state[1], state[1]))


# --------------------------------------------------------------------------- descent and composition
ALL = {
    "sgd": lambda: optim.sgd(1e-3),
    "momentum": lambda: optim.momentum(2e-4, 0.9),
    "ema_momentum": lambda: optim.ema_momentum(1e-3, 0.9),
    "nesterov": lambda: optim.nesterov(2e-4, 0.9),
    "simplified_nesterov": lambda: optim.simplified_nesterov(2e-4, 0.9),
    "adagrad": lambda: optim.adagrad(0.05),
    "rmsprop": lambda: optim.rmsprop(0.01),
    "adadelta": lambda: optim.adadelta(),
    "adam": lambda: optim.adam(0.01),
    "delta_bar_delta": lambda: optim.delta_bar_delta(5e-4),
}


@pytest.mark.parametrize("name", list(ALL))
def test_decreases_rosenbrock_and_quadratic_bare_and_in_chain(name):
    """From a fixed start, Rosenbrock and the quadratic both decrease, for the optimizer alone and
    inside optax.chain(optax.clip_by_global_norm(1.0), ours), under jit.

    The two problems ride in one pytree with C = rosenbrock + quadratic: every optimizer here is
    leafwise, so alone it runs them independently; the chain's global-norm clip couples them."""
    qp, qloss, _, _ = flat_quadratic()
    start = {"rosenbrock": ROSEN_START, "quadratic": qp}
    parts = {"rosenbrock": rosenbrock, "quadratic": qloss}
    loss = lambda p: sum(parts[k](p[k]) for k in parts)  # noqa: E731
    bare, chained = ALL[name](), optax.chain(optax.clip_by_global_norm(1.0), ALL[name]())

    @jax.jit
    def final_losses(start):
        ends = [ravel_pytree(start)[1](trajectory(opt, loss, start, 300)[0][-1]) for opt in (bare, chained)]
        return [{k: parts[k](end[k]) for k in parts} for end in ends]

    for how, end in zip(("bare", "chained"), final_losses(start)):
        for k in parts:
            c0, c = float(parts[k](start[k])), float(end[k])
            assert np.isfinite(c) and c < c0, (how, k, c0, c)


def test_masked_and_vmapped_learning_rate():
    """optax.masked composes with ours; learning_rate may be a traced scalar (vmap over rates)."""
    params, loss, _, _ = quadratic_problem()
    labels = {"w": "train", "layers": [{"b": "frozen"}, ("train",)]}
    opt = optax.multi_transform({"train": optim.adam(0.05), "frozen": optax.set_to_zero()}, labels)
    traj, _ = jax.jit(lambda p: trajectory(opt, loss, p, 10))(params)
    end = ravel_pytree(params)[1](traj[-1])
    np.testing.assert_array_equal(end["layers"][0]["b"], params["layers"][0]["b"])
    assert not np.allclose(end["w"], params["w"])
    # optax.masked: masked-in leaves get our update, masked-out leaves pass the gradient through
    mask = jax.tree_util.tree_map(lambda l: l == "train", labels)
    g = jax.grad(loss)(params)
    u, _ = optax.masked(optim.adam(0.05), mask).update(g, optax.masked(optim.adam(0.05), mask).init(params))
    np.testing.assert_array_equal(u["layers"][0]["b"], g["layers"][0]["b"])
    np.testing.assert_allclose(u["w"], -0.05 * np.sign(g["w"]), rtol=1e-6)

    params, loss, _, _ = flat_quadratic()
    rates = jnp.asarray([0.01, 0.05, 0.1])
    for make in (optim.adam, optim.nesterov):
        final = jax.jit(lambda lr: trajectory(make(lr), loss, params, 50)[0][-1])  # lr is traced
        batched = jax.vmap(final)(rates)
        for lr, row in zip(rates, batched):
            np.testing.assert_allclose(row, final(lr), rtol=1e-12)


def test_float32_dtypes_preserved_with_float64_rate():
    """A float64 (e.g. vmapped) learning rate does not promote float32 updates or state: after each
    update every tree of the state (every field but the count and nesterov's β) is float32."""
    p = {"a": jnp.ones(3, jnp.float32)}
    for make in (optim.sgd, optim.momentum, optim.adam, optim.adagrad, optim.rmsprop,
                 optim.adadelta, optim.delta_bar_delta, optim.nesterov, optim.simplified_nesterov,
                 optim.ema_momentum):
        opt = make(jnp.asarray(0.1, jnp.float64))
        s = opt.init(p)
        for step in (1, 2):
            u, s = opt.update(p, s)
            assert u["a"].dtype == jnp.float32, make.__name__
            trees = {f: getattr(s, f) for f in s._fields if f not in ("count", "beta")}
            assert len(trees) == len(s._fields) - 1 - ("beta" in s._fields), make.__name__
            for field, tree in trees.items():
                assert tree["a"].dtype == jnp.float32, (make.__name__, field, tree["a"].dtype)
            assert s.count.dtype == jnp.int32 and s.count.shape == () and int(s.count) == step


# --------------------------------------------------------------------------- validation and errors
BAD = [
    (optim.sgd, dict(learning_rate=-0.1), "learning_rate"),
    (optim.sgd, dict(learning_rate=float("nan")), "learning_rate"),
    (optim.momentum, dict(learning_rate=0.1, beta=1.0), "beta"),
    (optim.momentum, dict(learning_rate=-1.0), "learning_rate"),
    (optim.ema_momentum, dict(learning_rate=0.1, beta=-0.1), "beta"),
    (optim.nesterov, dict(learning_rate=0.1, beta=1.5), "beta"),
    (optim.simplified_nesterov, dict(learning_rate=0.1, beta=1.0), "beta"),
    (optim.adagrad, dict(learning_rate=0.1, eps=0.0), "eps"),
    (optim.adagrad, dict(learning_rate=0.1, eps=-1e-7), "eps"),
    (optim.adagrad, dict(learning_rate=0.1, initial_accumulator_value=-0.1), "initial_accumulator_value"),
    (optim.adagrad, dict(learning_rate=-0.1), "learning_rate"),
    (optim.rmsprop, dict(learning_rate=0.1, decay=1.0), "decay"),
    (optim.rmsprop, dict(learning_rate=0.1, eps=0.0), "eps"),
    (optim.rmsprop, dict(learning_rate=-0.1), "learning_rate"),
    (optim.adadelta, dict(rho=1.0), "rho"),
    (optim.adadelta, dict(eps=0.0), "eps"),
    (optim.adadelta, dict(learning_rate=-1.0), "learning_rate"),
    (optim.adam, dict(learning_rate=-1e-3), "learning_rate"),
    (optim.adam, dict(learning_rate=1e-3, b1=1.0), "b1"),
    (optim.adam, dict(learning_rate=1e-3, b2=-0.5), "b2"),
    (optim.adam, dict(learning_rate=1e-3, eps=0.0), "eps"),
    (optim.delta_bar_delta, dict(learning_rate=0.1, kappa=-0.1), "kappa"),
    (optim.delta_bar_delta, dict(learning_rate=0.1, phi=1.0), "phi"),
    (optim.delta_bar_delta, dict(learning_rate=0.1, theta=1.0), "theta"),
    (optim.delta_bar_delta, dict(learning_rate=-0.1), "learning_rate"),
    (optim.inverse_decay, dict(init_value=0.1, decay=-0.1), "decay"),
    (optim.inverse_decay, dict(init_value=-0.1, decay=0.1), "init_value"),
    (optim.exponential_decay, dict(init_value=0.1, decay=-0.1), "decay"),
    (optim.exponential_decay, dict(init_value=-0.1, decay=0.1), "init_value"),
    (optim.constant, dict(value=-0.1), "value"),
]


@pytest.mark.parametrize("make, kwargs, arg", BAD, ids=[f"{m.__name__}-{a}-{i}" for i, (m, _, a) in enumerate(BAD)])
def test_bad_hyperparameters_raise_naming_argument(make, kwargs, arg):
    with pytest.raises(ValueError, match=rf"^fnbp\.optim\.{make.__name__}: {arg} must be .*, got "):
        make(**kwargs)


def test_traced_hyperparameters_are_not_validated():
    """Under jit the values are tracers: construction must not try to check them."""
    p = jnp.ones(3)

    @jax.jit
    def step(lr, b):
        opt = optim.adam(lr, b1=b)
        return opt.update(p, opt.init(p))[0]

    np.testing.assert_allclose(step(0.1, 0.9), -0.1 * np.ones(3), rtol=1e-6)


STATEFUL = [optim.momentum, optim.ema_momentum, optim.nesterov, optim.simplified_nesterov,
            optim.adagrad, optim.rmsprop, optim.adadelta, optim.adam, optim.delta_bar_delta]


@pytest.mark.parametrize("make", STATEFUL, ids=[m.__name__ for m in STATEFUL])
def test_structure_mismatch_shows_both_structures(make):
    params = {"a": jnp.ones(2), "b": [jnp.ones(3)]}
    grads = {"a": jnp.ones(2), "c": jnp.ones(3)}
    opt = make(0.1)
    state = opt.init(params)
    with pytest.raises(ValueError) as err:
        opt.update(grads, state)
    msg = str(err.value)
    assert str(jax.tree_util.tree_structure(grads)) in msg
    assert str(jax.tree_util.tree_structure(params)) in msg


WRONG_TYPES = [
    (optim.sgd, ("0.1",), {}, "learning_rate", "str"),
    (optim.adam, (True,), {}, "learning_rate", "bool"),
    (optim.momentum, (0.1,), dict(beta=None), "beta", "NoneType"),
    (optim.adam, (1e-3,), dict(b1=np.float32(0.9) + 0j), "b1", "complex"),
    (optim.rmsprop, (jnp.ones(3),), {}, "learning_rate", "shape (3,)"),
    (optim.adagrad, (0.1,), dict(eps="1e-7"), "eps", "str"),
    (optim.constant, (False,), {}, "value", "bool"),
]


@pytest.mark.parametrize("make, args, kwargs, arg, came", WRONG_TYPES,
                         ids=[f"{m.__name__}-{a}" for m, _, _, a, _ in WRONG_TYPES])
def test_wrong_hyperparameter_type_is_a_named_type_error(make, args, kwargs, arg, came):
    with pytest.raises(TypeError, match=rf"^fnbp\.optim\.{make.__name__}: {arg} must be a number") as err:
        make(*args, **kwargs)
    assert came in str(err.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1e-3])
def test_nan_inf_negative_rates_refused_numpy_scalars_accepted(value):
    for make in (optim.adam, optim.sgd, optim.nesterov):
        with pytest.raises(ValueError, match=rf"fnbp\.optim\.{make.__name__}: learning_rate must be .* got "):
            make(value)
    for make in (optim.adam, optim.nesterov, optim.rmsprop):      # β₁, β, ρ outside [0, 1) or NaN
        with pytest.raises(ValueError, match=rf"fnbp\.optim\.{make.__name__}: (b1|beta|decay) must be a number in"):
            make(0.1, value if value != -1e-3 else 1.0)
    for ok in (np.float32(0.1), jnp.asarray(0.1), 1, optim.constant(0.1)):   # numbers, arrays, schedules
        optim.adam(ok)


def test_leaf_shape_dtype_and_integer_mismatches_are_named_errors():
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    bad_shape = {"w": jnp.ones((3, 2, 2)), "b": jnp.ones(2)}
    sgd = optim.sgd(0.1)
    for opt in (sgd, optim.adam(0.1), optim.nesterov(0.1)):
        state = opt.init(params)
        with pytest.raises(ValueError, match=r"gradients leaf \['w'\] must match .* shape \(2, 2\).*got shape \(3, 2, 2\)"):
            opt.update(bad_shape, state, params)
        if opt is not sgd:    # float32 gradients into a float64 state would promote it (sgd holds none)
            with pytest.raises(ValueError, match=r"\['b'\] must match the state\.\w+'s shape \(2,\) and dtype float64"):
                opt.update(jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params), state, params)
    # apply_updates used to broadcast a (3, 2, 2) update onto a (2, 2) parameter
    with pytest.raises(ValueError, match=r"^fnbp\.optim\.apply_updates: updates leaf \['w'\]"):
        optim.apply_updates(params, bad_shape)
    with pytest.raises(ValueError, match=r"^fnbp\.optim\.apply_updates: updates pytree structure"):
        optim.apply_updates(params, {"w": jnp.ones((2, 2))})
    # integer parameters (adaptive rules returned NaN) and integer gradients are refused
    for make in (optim.adam, optim.adagrad, optim.rmsprop, optim.adadelta, optim.sgd):
        with pytest.raises(TypeError, match=rf"^fnbp\.optim\.{make.__name__}: parameters must be floating-point"
                                            r".*\['n'\] of dtype int"):
            make(0.1).init({"n": jnp.arange(3)})
        with pytest.raises(TypeError, match="gradients must be floating-point"):
            make(0.1).update({"n": jnp.arange(3)}, make(0.1).init({"n": jnp.ones(3)}))


def test_tree_checks_run_at_trace_time_only():
    """Under jit a mismatch fails while tracing; the compiled update holds no check or callback."""
    params = {"w": jnp.ones((2, 2))}
    opt = optim.adam(0.1)
    state = opt.init(params)
    with pytest.raises(ValueError, match="shape"):
        jax.jit(opt.update)({"w": jnp.ones((3, 2, 2))}, state, params)
    text = str(jax.make_jaxpr(opt.update)(params, state, params))
    assert not any(word in text for word in ("callback", "assert", "check", "cond["))


# --------------------------------------------------------------------------- look-ahead API
def test_lookahead_method_gradient_point_and_chain():
    params, loss, _, _ = quadratic_problem()
    g = jax.grad(loss)(params)
    expected = lambda p, v: jax.tree_util.tree_map(lambda a, b: a + 0.9 * b, p, v)  # noqa: E731
    nest = optim.nesterov(0.1, 0.9)
    assert isinstance(nest, optax.GradientTransformation) and len(nest) == 2
    _, state = nest.update(g, nest.init(params))
    want = ravel_pytree(expected(params, state.v))[0]
    np.testing.assert_allclose(ravel_pytree(nest.lookahead(params, state))[0], want, rtol=1e-15)
    np.testing.assert_allclose(ravel_pytree(optim.gradient_point(nest, params, state))[0], want, rtol=1e-15)
    # every other optimizer of ours, and any plain optax one, looks at θ itself
    for opt in (optim.adam(0.1), optim.momentum(0.1), optax.adam(0.1), optax.sgd(0.1, momentum=0.9)):
        assert optim.gradient_point(opt, params, opt.init(params)) is params
    # optax.chain drops the method: gradient_point then reads θ̃ from the NesterovState in the chain's state
    chained = optax.chain(optax.clip_by_global_norm(1e3), optim.nesterov(0.1, 0.9))
    assert not hasattr(chained, "lookahead")
    _, cstate = jax.jit(chained.update)(g, chained.init(params), params)
    np.testing.assert_allclose(ravel_pytree(optim.gradient_point(chained, params, cstate))[0],
                               ravel_pytree(expected(params, cstate[1].v))[0], rtol=1e-15)
    assert float(jnp.max(jnp.abs(ravel_pytree(cstate[1].v)[0]))) > 0
    with pytest.raises(ValueError, match="fnbp.optim.nesterov: parameters leaf"):
        nest.lookahead({"w": params["w"][:1], "layers": params["layers"]}, state)


# --------------------------------------------------------------------------- schedules
def test_schedules_closed_forms():
    k = jnp.arange(50)
    np.testing.assert_allclose(optim.inverse_decay(0.3, 0.1)(k), 0.3 / (1 + 0.1 * np.arange(50)), rtol=1e-15)
    np.testing.assert_allclose(optim.exponential_decay(0.3, 0.1)(k), 0.3 * np.exp(-0.1 * np.arange(50)),
                               rtol=1e-15)
    np.testing.assert_allclose(optim.constant(0.3)(k), np.full(50, 0.3), rtol=0)
    assert float(optim.inverse_decay(0.3, 0.1)(0)) == 0.3
    assert float(optim.exponential_decay(0.3, 0.1)(0)) == 0.3
    # ours equals optax's exponential_decay with transition_steps=1, decay_rate=exp(−δ)
    np.testing.assert_allclose(optim.exponential_decay(0.3, 0.1)(k),
                               optax.exponential_decay(0.3, 1, math.exp(-0.1))(k), rtol=1e-13)


def test_schedule_first_update_uses_step_zero():
    """sgd on C(θ) = θ: the n-th update (n = 1, 2, …) is −η_(n−1) — the first uses k = 0."""
    for sched, closed in ((optim.inverse_decay(0.3, 0.5), lambda k: 0.3 / (1 + 0.5 * k)),
                          (optim.exponential_decay(0.3, 0.5), lambda k: 0.3 * np.exp(-0.5 * k))):
        traj, state = trajectory(optim.sgd(sched), lambda p: p, jnp.asarray(0.0), 5)
        np.testing.assert_allclose(np.diff(np.concatenate([[0.0], traj[:, 0]])),
                                   [-closed(k) for k in range(5)], rtol=1e-14)
        assert int(state.count) == 5


@pytest.mark.parametrize("make", [optim.sgd] + STATEFUL, ids=[m.__name__ for m in [optim.sgd] + STATEFUL])
def test_every_optimizer_first_update_uses_schedule_at_zero(make):
    """With η_0 = 0.3 and η_k = 100 afterwards, the first update equals the constant-0.3 one."""
    p, loss, _, _ = flat_quadratic()
    g = jax.grad(loss)(p)
    sched = lambda k: jnp.where(k == 0, 0.3, 100.0)  # noqa: E731
    a = make(sched).update(g, make(sched).init(p))[0]
    b = make(0.3).update(g, make(0.3).init(p))[0]
    np.testing.assert_array_equal(ravel_pytree(a)[0], ravel_pytree(b)[0])


# --------------------------------------------------------------------------- docstrings
def docstring_equations(fn):
    """The equation lines of ``fn``'s docstring: its first literal block (the lines after '::')."""
    lines = fn.__doc__.splitlines()
    start = next(n for n, line in enumerate(lines) if line.rstrip().endswith("::")) + 1
    block = []
    for line in lines[start:]:
        if not line.strip() and block:
            break
        if line.strip():
            block.append(line.strip())
    return block


_SYMBOLS = [("←", "="), ("·", "*"), ("⊙", "*"), ("−", "-"), ("²", "**2"), ("^", "**"),
            ("₀", "0"), ("₁", "1"), ("₂", "2")]


def equation_to_python(line):
    """'s ← ρ₁·s + (1 − ρ₁)·g' → 's = ρ1*s + (1 - ρ1)*g'; 'x ← e  where c' → 'x = where(c, e, x)';
    a trailing '   (comment)' is dropped."""
    line = re.split(r"\s{2,}\(", line)[0].strip()
    for a, b in _SYMBOLS:
        line = line.replace(a, b)
    line = line.replace("√(", "sqrt(")
    line = re.sub(r"√([^\s()]+)", r"sqrt(\1)", line)
    if " where " in line:
        assignment, condition = re.split(r"\s+where\s+", line)
        lhs, rhs = assignment.split(" = ")
        line = f"{lhs} = where({condition}, {rhs}, {lhs})"
    return line


def _ns(**values):
    """A namespace for exec whose keys are spelled as Python reads identifiers (NFKC)."""
    return {unicodedata.normalize("NFKC", k): v for k, v in values.items()}


# (id, factory, its arguments after the learning rate, {docstring symbol: value},
#  initial state {symbol: value}, lines of the docstring to skip (by a substring))
EQ_SCHED = optim.inverse_decay(0.3, 0.1)
DOC_RUNS = [
    ("sgd", optim.sgd, {}, {}, {}, ()),
    ("momentum", optim.momentum, dict(beta=0.8), {"β": 0.8}, {"v": 0.0}, ()),
    ("ema_momentum", optim.ema_momentum, dict(beta=0.8), {"β": 0.8}, {"ḡ": 0.0}, ()),
    ("nesterov", optim.nesterov, dict(beta=0.8), {"β": 0.8}, {"v": 0.0}, ("θ̃", "∇")),
    ("simplified_nesterov", optim.simplified_nesterov, dict(beta=0.8), {"β": 0.8}, {"v": 0.0}, ("∇",)),
    ("adagrad", optim.adagrad, dict(eps=1e-3), {"δ": 1e-3}, {"r": 0.0}, ("eps_in_sqrt=True",)),
    ("adagrad-optax-form", optim.adagrad, dict(eps=1e-3, initial_accumulator_value=0.1, eps_in_sqrt=True),
     {"δ": 1e-3}, {"r": 0.1}, ("eps_in_sqrt=False",)),
    ("rmsprop", optim.rmsprop, dict(decay=0.9, eps=1e-3), {"ρ": 0.9, "δ": 1e-3}, {"r": 0.0}, ("eps_in_sqrt=False",)),
    ("rmsprop-eps-outside", optim.rmsprop, dict(decay=0.9, eps=1e-3, eps_in_sqrt=False), {"ρ": 0.9, "δ": 1e-3},
     {"r": 0.0}, ("eps_in_sqrt=True",)),
    ("adadelta", optim.adadelta, dict(rho=0.9, eps=1e-3), {"ρ": 0.9, "δ": 1e-3}, {"r": 0.0, "s": 0.0}, ()),
    ("adam", optim.adam, dict(b1=0.8, b2=0.99, eps=1e-3), {"ρ₁": 0.8, "ρ₂": 0.99, "δ": 1e-3},
     {"s": 0.0, "r": 0.0}, ()),
    ("delta_bar_delta", optim.delta_bar_delta, dict(kappa=0.05, phi=0.3, theta=0.7), {"κ": 0.05, "φ": 0.3, "θ": 0.7},
     {"α": 1.0, "δ̄": 0.0}, ()),
]


@pytest.mark.parametrize("make, kwargs, symbols, initial, skip", [r[1:] for r in DOC_RUNS], ids=[r[0] for r in DOC_RUNS])
def test_docstring_equations_are_the_code(make, kwargs, symbols, initial, skip):
    """Run the docstring's equations (translated to numpy, float64) as the reference: 25 steps on a
    random gradient sequence with sign flips, under a schedule; Δθ equal to rounding.  A wrong
    equation in the docstring or in the code fails here."""
    lines = [equation_to_python(line) for line in docstring_equations(make) if not any(t in line for t in skip)]
    assert any(line.startswith("Δθ =") for line in lines), lines
    rng = np.random.default_rng(0)
    grads = rng.normal(size=(25, 6)) + 0.5 * np.sin(np.arange(25))[:, None]
    ns = _ns(sqrt=np.sqrt, where=np.where, **symbols, **{k: np.full(6, v) for k, v in initial.items()})
    ours = make(EQ_SCHED, **kwargs)
    state, update = ours.init(jnp.zeros(6)), jax.jit(ours.update)
    for k, g in enumerate(grads):
        ns.update(_ns(g=g, k=k, i=k + 1, η_k=float(EQ_SCHED(k))))
        for line in lines:
            exec(line, {}, ns)
        delta_theta, state = update(jnp.asarray(g), state)
        np.testing.assert_allclose(delta_theta, ns[unicodedata.normalize("NFKC", "Δθ")], rtol=1e-12,
                                   err_msg=f"step {k}: {lines}")


@pytest.mark.parametrize("make", [optim.inverse_decay, optim.exponential_decay], ids=lambda f: f.__name__)
def test_schedule_docstring_formula_is_the_code(make):
    """The schedule's docstring formula 'η_k = …,' evaluated in numpy equals the schedule."""
    formula = re.search(r"η_k = (.+?), k = 0", make.__doc__).group(1)
    expr = equation_to_python(formula).replace("exp(", "np.exp(")
    k = np.arange(30)
    ref = eval(expr, {"np": np}, _ns(η0=0.3, δ=0.1, k=k))
    np.testing.assert_allclose(make(0.3, 0.1)(jnp.asarray(k)), ref, rtol=1e-14)


# prose the docstrings must keep (papers, conventions, references to the API): not equations, which
# the two tests above run
DOCS = {
    optim.momentum: ["optax", "η outside the velocity"],
    optim.ema_momentum: ["optax.ema"],
    optim.nesterov: ["lookahead(params, state)", "gradient_point"],
    optim.simplified_nesterov: ["Bengio et al. 2012", "nesterov=True"],
    optim.adagrad: ["Duchi", "2011", "initial_accumulator_value=0.1"],
    optim.rmsprop: ["Hinton 2012", "eps_in_sqrt"],
    optim.adadelta: ["Zeiler 2012", "None"],
    optim.adam: ["Kingma & Ba 2014", "i = k + 1"],
    optim.delta_bar_delta: ["Jacobs 1988", "full-batch"],
    optim.inverse_decay: ["k = 0 for the first update"],
    optim.exponential_decay: ["k = 0 for the first update"],
}


@pytest.mark.parametrize("fn", list(DOCS), ids=[f.__name__ for f in DOCS])
def test_docstrings_name_papers_and_conventions(fn):
    for fragment in DOCS[fn]:
        assert fragment in fn.__doc__, fragment
    assert "first ``update`` uses k = 0" in optim.__doc__
