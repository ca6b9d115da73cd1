r"""Optimizers of the notes as optax-compatible gradient transformations.

Every factory returns ``optax.GradientTransformation(init, update)`` of pure
functions::

    opt = fnbp.optim.adam(1e-3)
    state = opt.init(params)                       # step count k = 0
    updates, state = opt.update(grads, state)      # Δθ, with the minus sign and η
    params = fnbp.optim.apply_updates(params, updates)   # θ ← θ + Δθ

so ``optax.apply_updates`` applies them too, and ``optax.chain`` composes them
with optax's own transforms (``optax.chain(optax.clip_by_global_norm(1.0),
fnbp.optim.adam(1e-3))``).  The update equations are written by hand, one line
of code per line of the docstring's equations.

Symbols (the notes'): θ parameters, g = ∇_θ C(θ) the gradient, η the
learning rate, δ the stabiliser ε (``eps``) or the momentum parameter β
(``beta``), ρ a decay rate, ⊙ and all vector operations componentwise.

Step indexing.  The state holds the step count k as an int32 scalar array.
``init`` sets k = 0; the first ``update`` uses k = 0 (so a schedule's
``η_0`` is the first learning rate, as in optax) and leaves k = 1.  Adam's bias
correction uses the notes' 1-based loop index i = k + 1.

Learning rates.  Every ``learning_rate`` is a number (possibly a traced scalar
array, so a training step can be ``vmap``-ed over learning rates) or a
schedule, a function ``k ↦ η_k`` of the step count such as
:func:`constant`, :func:`inverse_decay` or :func:`exponential_decay`.
Hyperparameters are validated at construction (``ValueError`` naming the
argument) when they are concrete; traced values are not checked.

Conventions, ours vs optax's (each proved in ``tests/test_optim.py``; "=" means equal
trajectories up to rounding).  Our defaults follow the notes; where a knob makes us equal to
optax it carries optax's name.

* ``sgd`` = ``optax.sgd``.
* ``momentum``: the notes' v ← β·v − η_k·g, Δθ = v (η inside the velocity).  optax's
  ``sgd(momentum=β)`` is m ← g + β·m, Δθ = −η_k·m (η outside); equal while η is constant,
  different under a schedule.
* ``ema_momentum`` = ``chain(optax.ema(β, debias=False), optax.scale_by_learning_rate(η))``,
  schedules included.
* ``simplified_nesterov`` (Bengio et al. 2012) = ``optax.sgd(momentum=β, nesterov=True)`` while η
  is constant (same η placement difference as ``momentum``).
* ``nesterov`` (look-ahead form) has no optax twin: it needs ∇C(θ + β·v), see
  :func:`lookahead_params`.
* ``adagrad``: notes r₀ = 0 and δ outside the root; optax r₀ = 0.1 and δ inside.
  ``adagrad(η, eps, initial_accumulator_value=0.1, eps_in_sqrt=True)`` = ``optax.adagrad``.
* ``rmsprop``: δ inside the root as in the notes and optax's default; ``eps_in_sqrt`` as optax.
* ``adadelta``: η = 1 (the notes have none) = ``optax.adadelta(learning_rate=1.0)``; optax's
  default ``learning_rate=None`` returns +√(δ+s)/√(δ+r)⊙g, the ascent direction.
* ``adam`` = ``optax.adam`` (δ outside the root, bias correction with i = k + 1).
* ``delta_bar_delta`` has no optax twin.
"""
import math
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "sgd", "momentum", "ema_momentum", "nesterov", "lookahead_params", "simplified_nesterov",
    "adagrad", "rmsprop", "adadelta", "adam", "delta_bar_delta",
    "constant", "inverse_decay", "exponential_decay", "apply_updates",
    "Schedule", "ScalarOrSchedule",
    "CountState", "MomentumState", "EmaMomentumState", "NesterovState", "AdaGradState",
    "RMSPropState", "AdaDeltaState", "AdamState", "DeltaBarDeltaState",
]

Schedule = Callable[[jax.Array], jax.Array]
ScalarOrSchedule = Union[float, jax.Array, Schedule]

_INT32_MAX = np.iinfo(np.int32).max


# --------------------------------------------------------------------------- states
class CountState(NamedTuple):
    """State of :func:`sgd`: the step count k."""
    count: jax.Array


class MomentumState(NamedTuple):
    """State of :func:`momentum` and :func:`simplified_nesterov`: k and the velocity v."""
    count: jax.Array
    v: Any


class EmaMomentumState(NamedTuple):
    """State of :func:`ema_momentum`: k and the averaged gradient ḡ."""
    count: jax.Array
    g_avg: Any


class NesterovState(NamedTuple):
    """State of :func:`nesterov`: k, the velocity v and β (read by :func:`lookahead_params`)."""
    count: jax.Array
    v: Any
    beta: jax.Array


class AdaGradState(NamedTuple):
    """State of :func:`adagrad`: k and the accumulated squared gradients r."""
    count: jax.Array
    r: Any


class RMSPropState(NamedTuple):
    """State of :func:`rmsprop`: k and the moving average of squared gradients r."""
    count: jax.Array
    r: Any


class AdaDeltaState(NamedTuple):
    """State of :func:`adadelta`: k, the average r of g⊙g and the average s of Δθ⊙Δθ."""
    count: jax.Array
    r: Any
    s: Any


class AdamState(NamedTuple):
    """State of :func:`adam`: k, the first moment s and the second moment r (not bias-corrected)."""
    count: jax.Array
    s: Any
    r: Any


class DeltaBarDeltaState(NamedTuple):
    """State of :func:`delta_bar_delta`: k, the per-parameter gains α and the averaged gradient δ̄."""
    count: jax.Array
    gain: Any
    g_bar: Any


# --------------------------------------------------------------------------- helpers
_RANGES = {
    "nonneg": (0.0, math.inf, True, "≥ 0"),
    "pos": (0.0, math.inf, False, "> 0"),
    "unit": (0.0, 1.0, True, "in [0, 1)"),
}


def _check(name, value, kind):
    """Raise ValueError naming ``name`` when a concrete ``value`` is outside ``kind``'s range.

    Schedules (callables) and traced values are not checked.
    """
    if callable(value):
        return
    try:
        x = np.asarray(value, dtype=float)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    lo, hi, lo_closed, text = _RANGES[kind]
    ok = np.all(np.isfinite(x)) and np.all(x >= lo if lo_closed else x > lo) and np.all(x < hi)
    if not ok:
        raise ValueError(f"{name} must be {text}, got {value!r}")


def _lr(learning_rate, count):
    """η_k: the schedule evaluated at the step count, or the constant."""
    return learning_rate(count) if callable(learning_rate) else learning_rate


def _cast(dtype, *xs):
    """Hyperparameters in a leaf's dtype; Python numbers stay weakly typed (as in optax)."""
    out = tuple(x if isinstance(x, (int, float)) else jnp.asarray(x, dtype) for x in xs)
    return out if len(out) > 1 else out[0]


def _increment(count):
    """k + 1, saturating at the int32 maximum."""
    return jnp.where(count < _INT32_MAX, count + 1, count)


def _zero_count():
    return jnp.zeros([], jnp.int32)


def _zeros(params):
    return jax.tree_util.tree_map(jnp.zeros_like, params)


def _leafwise(fn, n_out, grads, *trees):
    """Apply ``fn(g, *state_leaves) -> n_out arrays`` to every leaf in one pass; unzip to n_out trees.

    Raises ValueError showing both structures when a state tree's structure differs from the
    gradients' (a trace-time check: free under jit).
    """
    treedef = jax.tree_util.tree_structure(grads)
    for tree in trees:
        other = jax.tree_util.tree_structure(tree)
        if other != treedef:
            raise ValueError("gradient pytree structure differs from the optimizer state's:\n"
                             f"  gradients: {treedef}\n  state:     {other}")
    columns = [treedef.flatten_up_to(t) for t in (grads, *trees)]
    rows = [fn(*leaves) for leaves in zip(*columns)]
    outs = list(zip(*rows)) if rows else [()] * n_out
    return tuple(treedef.unflatten(list(o)) for o in outs)


def apply_updates(params, updates):
    """θ ← θ + Δθ leaf by leaf, keeping each parameter's dtype (same as ``optax.apply_updates``)."""
    return jax.tree_util.tree_map(lambda p, u: jnp.asarray(p + u).astype(jnp.asarray(p).dtype),
                                  params, updates)


# --------------------------------------------------------------------------- schedules
def constant(value) -> Schedule:
    """η_k = η  for every step k (k = 0 for the first update)."""
    _check("value", value, "nonneg")
    return lambda count: jnp.full(jnp.shape(count), value, dtype=jnp.result_type(value, float))


def inverse_decay(init_value, decay) -> Schedule:
    """Inverse decay (notes): η_k = η₀ / (1 + k·δ), k = 0 for the first update (η = η₀).

    ``decay`` is the notes' decrease factor δ ≥ 0.
    """
    _check("init_value", init_value, "nonneg")
    _check("decay", decay, "nonneg")
    return lambda count: init_value / (1 + count * decay)


def exponential_decay(init_value, decay) -> Schedule:
    """Exponential decay (notes): η_k = η₀ · exp(−k·δ), k = 0 for the first update (η = η₀).

    ``decay`` is the notes' decrease factor δ ≥ 0 (a rate per step, not optax's
    ``decay_rate``: ``optax.exponential_decay(η₀, 1, exp(−δ))`` is the same schedule).
    """
    _check("init_value", init_value, "nonneg")
    _check("decay", decay, "nonneg")
    return lambda count: init_value * jnp.exp(-count * decay)


# --------------------------------------------------------------------------- optimizers
def sgd(learning_rate: ScalarOrSchedule) -> optax.GradientTransformation:
    """Plain (mini-batch) gradient descent.

    Δθ = −η_k · g

    State: :class:`CountState` (count); it holds no tree, so unlike the other optimizers sgd
    cannot check the gradients' structure.  Twin: ``optax.sgd(learning_rate)``.
    """
    _check("learning_rate", learning_rate, "nonneg")

    def init(params):
        return CountState(count=_zero_count())

    def update(grads, state, params=None):
        eta = _lr(learning_rate, state.count)

        def leaf(g):
            lr = _cast(g.dtype, eta)
            return (-lr * g,)

        (updates,) = _leafwise(leaf, 1, grads)
        return updates, CountState(count=_increment(state.count))

    return optax.GradientTransformation(init, update)


def momentum(learning_rate: ScalarOrSchedule, beta=0.9) -> optax.GradientTransformation:
    """Momentum in the notes' form (learning rate inside the velocity), v₀ = 0:

    v ← β·v − η_k·g
    Δθ = v

    (the notes' δ is ``beta``).  Reference: Polyak 1964; Sutskever et al. 2013.
    State: :class:`MomentumState` (count, v).

    Convention: optax's ``sgd(learning_rate, momentum=beta)`` is m ← g + β·m, Δθ = −η_k·m,
    with η outside the velocity.  The two are equal (v = −η·m) while η is constant; under a
    schedule ours weights each past gradient by the rate of its own step, optax's by the
    current rate.
    """
    _check("learning_rate", learning_rate, "nonneg")
    _check("beta", beta, "unit")

    def init(params):
        return MomentumState(count=_zero_count(), v=_zeros(params))

    def update(grads, state, params=None):
        eta = _lr(learning_rate, state.count)

        def leaf(g, v):
            lr, b = _cast(g.dtype, eta, beta)
            v = b * v - lr * g
            return v, v

        updates, v = _leafwise(leaf, 2, grads, state.v)
        return updates, MomentumState(count=_increment(state.count), v=v)

    return optax.GradientTransformation(init, update)


def ema_momentum(learning_rate: ScalarOrSchedule, beta=0.9) -> optax.GradientTransformation:
    """Momentum as an exponential average of gradients (first lecture), ḡ₀ = 0:

    ḡ ← β·ḡ + (1 − β)·g
    Δθ = −η_k·ḡ

    (the first lecture writes g ← βg + (1 − β)∇ and W ← W − γg).  No bias correction.
    State: :class:`EmaMomentumState` (count, g_avg).
    Twin: ``optax.chain(optax.ema(beta, debias=False), optax.scale_by_learning_rate(lr))``,
    equal under schedules too.
    """
    _check("learning_rate", learning_rate, "nonneg")
    _check("beta", beta, "unit")

    def init(params):
        return EmaMomentumState(count=_zero_count(), g_avg=_zeros(params))

    def update(grads, state, params=None):
        eta = _lr(learning_rate, state.count)

        def leaf(g, a):
            lr, b = _cast(g.dtype, eta, beta)
            a = b * a + (1 - b) * g
            return -lr * a, a

        updates, g_avg = _leafwise(leaf, 2, grads, state.g_avg)
        return updates, EmaMomentumState(count=_increment(state.count), g_avg=g_avg)

    return optax.GradientTransformation(init, update)


def nesterov(learning_rate: ScalarOrSchedule, beta=0.9) -> optax.GradientTransformation:
    """Nesterov momentum, look-ahead form (notes; Nesterov 1983, Sutskever et al. 2013), v₀ = 0:

    θ̃ = θ + β·v                (:func:`lookahead_params`)
    g = ∇_θ C(θ̃)
    v ← β·v − η_k·g
    Δθ = v

    The gradient must be evaluated at the look-ahead point, so the training loop asks for it::

        def train_step(params, state, batch):
            grads = jax.grad(loss)(fnbp.optim.lookahead_params(params, state), batch)
            updates, state = opt.update(grads, state, params)
            return fnbp.optim.apply_updates(params, updates), state

    ``lookahead_params`` also finds the state inside an ``optax.chain`` state, and returns
    ``params`` unchanged for optimizers without a look-ahead, so that loop works for all of
    them (and under ``jit``).  State: :class:`NesterovState` (count, v, beta).
    :func:`simplified_nesterov` (Bengio et al. 2012) is the same trajectory seen at θ̃.
    """
    _check("learning_rate", learning_rate, "nonneg")
    _check("beta", beta, "unit")

    def init(params):
        return NesterovState(count=_zero_count(), v=_zeros(params), beta=jnp.asarray(beta))

    def update(grads, state, params=None):
        eta = _lr(learning_rate, state.count)

        def leaf(g, v):
            lr, b = _cast(g.dtype, eta, beta)
            v = b * v - lr * g
            return v, v

        updates, v = _leafwise(leaf, 2, grads, state.v)
        return updates, NesterovState(count=_increment(state.count), v=v, beta=state.beta)

    return optax.GradientTransformation(init, update)


def lookahead_params(params, state):
    """θ̃ = θ + β·v, the point where :func:`nesterov` needs the gradient.

    ``state`` is a :class:`NesterovState` or any optimizer state containing exactly one (e.g. an
    ``optax.chain`` state).  With no :class:`NesterovState` inside, returns ``params`` unchanged.
    """
    found = [s for s in jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, NesterovState))
             if isinstance(s, NesterovState)]
    if not found:
        return params
    if len(found) > 1:
        raise ValueError(f"state holds {len(found)} NesterovState entries; lookahead_params needs one")
    (s,) = found

    def leaf(p, v):
        return (p + _cast(v.dtype, s.beta) * v,)

    (theta,) = _leafwise(leaf, 1, params, s.v)
    return theta


def simplified_nesterov(learning_rate: ScalarOrSchedule, beta=0.9) -> optax.GradientTransformation:
    """Simplified Nesterov momentum (Bengio et al. 2012, *Advances in optimizing recurrent
    networks*), on the look-ahead variable Θ = θ + β·v, with Θ₀ = θ₀ and v₀ = 0:

    g = ∇_θ C(Θ)
    Θ ← Θ + β²·v − η_k·(1 + β)·g      (Δθ = β²·v − η_k·(1 + β)·g)
    v ← β·v − η_k·g

    An ordinary gradient transformation: the parameters it updates are Θ, and Θ_n = θ_n + β·v_n
    where θ_n, v_n follow :func:`nesterov`, so Θ_n = θ_n once v_n = 0.
    State: :class:`MomentumState` (count, v).
    Twin: ``optax.sgd(learning_rate, momentum=beta, nesterov=True)`` while η is constant
    (optax keeps η outside the velocity, as for :func:`momentum`).
    """
    _check("learning_rate", learning_rate, "nonneg")
    _check("beta", beta, "unit")

    def init(params):
        return MomentumState(count=_zero_count(), v=_zeros(params))

    def update(grads, state, params=None):
        eta = _lr(learning_rate, state.count)

        def leaf(g, v):
            lr, b = _cast(g.dtype, eta, beta)
            u = b * b * v - lr * (1 + b) * g
            v = b * v - lr * g
            return u, v

        updates, v = _leafwise(leaf, 2, grads, state.v)
        return updates, MomentumState(count=_increment(state.count), v=v)

    return optax.GradientTransformation(init, update)


def adagrad(learning_rate: ScalarOrSchedule, eps=1e-7, initial_accumulator_value=0.0,
            eps_in_sqrt=False) -> optax.GradientTransformation:
    """AdaGrad (Duchi, Hazan & Singer 2011), r₀ = ``initial_accumulator_value`` (notes: 0):

    r ← r + g⊙g
    Δθ = −η_k / (δ + √r) ⊙ g          (eps_in_sqrt=False, the notes)
    Δθ = −η_k / √(δ + r) ⊙ g          (eps_in_sqrt=True, optax)

    with δ = ``eps``.  State: :class:`AdaGradState` (count, r).
    Convention: the notes start r at 0 with δ outside the root; optax starts at 0.1 with δ
    inside.  ``adagrad(lr, eps, initial_accumulator_value=0.1, eps_in_sqrt=True)`` equals
    ``optax.adagrad(lr, 0.1, eps)``.
    """
    _check("learning_rate", learning_rate, "nonneg")
    _check("eps", eps, "pos")
    _check("initial_accumulator_value", initial_accumulator_value, "nonneg")

    def init(params):
        return AdaGradState(count=_zero_count(),
                            r=jax.tree_util.tree_map(
                                lambda p: jnp.full_like(p, initial_accumulator_value), params))

    def update(grads, state, params=None):
        eta = _lr(learning_rate, state.count)

        def leaf(g, r):
            lr, d = _cast(g.dtype, eta, eps)
            r = r + g * g
            u = -lr / jnp.sqrt(d + r) * g if eps_in_sqrt else -lr / (d + jnp.sqrt(r)) * g
            return u, r

        updates, r = _leafwise(leaf, 2, grads, state.r)
        return updates, AdaGradState(count=_increment(state.count), r=r)

    return optax.GradientTransformation(init, update)


def rmsprop(learning_rate: ScalarOrSchedule, decay=0.9, eps=1e-8,
            eps_in_sqrt=True) -> optax.GradientTransformation:
    """RMSProp (Hinton 2012, Coursera lecture 6e), r₀ = 0:

    r ← ρ·r + (1 − ρ)·g⊙g
    Δθ = −η_k / √(δ + r) ⊙ g          (eps_in_sqrt=True, the notes and optax's default)
    Δθ = −η_k / (δ + √r) ⊙ g          (eps_in_sqrt=False, PyTorch)

    with ρ = ``decay`` and δ = ``eps``.  State: :class:`RMSPropState` (count, r).
    Twin: ``optax.rmsprop(learning_rate, decay, eps, eps_in_sqrt=...)``.
    """
    _check("learning_rate", learning_rate, "nonneg")
    _check("decay", decay, "unit")
    _check("eps", eps, "pos")

    def init(params):
        return RMSPropState(count=_zero_count(), r=_zeros(params))

    def update(grads, state, params=None):
        eta = _lr(learning_rate, state.count)

        def leaf(g, r):
            lr, rho, d = _cast(g.dtype, eta, decay, eps)
            r = rho * r + (1 - rho) * (g * g)
            u = -lr / jnp.sqrt(d + r) * g if eps_in_sqrt else -lr / (d + jnp.sqrt(r)) * g
            return u, r

        updates, r = _leafwise(leaf, 2, grads, state.r)
        return updates, RMSPropState(count=_increment(state.count), r=r)

    return optax.GradientTransformation(init, update)


def adadelta(learning_rate: ScalarOrSchedule = 1.0, rho=0.9, eps=1e-6) -> optax.GradientTransformation:
    """AdaDelta (Zeiler 2012), r₀ = s₀ = 0:

    r ← ρ·r + (1 − ρ)·g⊙g
    Δ = −√(δ + s) / √(δ + r) ⊙ g
    s ← ρ·s + (1 − ρ)·Δ⊙Δ
    Δθ = η_k·Δ

    with δ = ``eps``.  The notes' AdaDelta has no learning rate: that is η = 1, the default.
    With η ≠ 1 the average s tracks the unit-rate step Δ (as optax and PyTorch do).
    State: :class:`AdaDeltaState` (count, r, s).
    Twin: ``optax.adadelta(learning_rate=η, rho, eps)``.  Always pass optax a learning rate:
    its default ``None`` returns +√(δ+s)/√(δ+r)⊙g, the ascent direction.
    """
    _check("learning_rate", learning_rate, "nonneg")
    _check("rho", rho, "unit")
    _check("eps", eps, "pos")

    def init(params):
        return AdaDeltaState(count=_zero_count(), r=_zeros(params), s=_zeros(params))

    def update(grads, state, params=None):
        eta = _lr(learning_rate, state.count)

        def leaf(g, r, s):
            lr, p, d = _cast(g.dtype, eta, rho, eps)
            r = p * r + (1 - p) * (g * g)
            step = -jnp.sqrt(d + s) / jnp.sqrt(d + r) * g
            s = p * s + (1 - p) * (step * step)
            return lr * step, r, s

        updates, r, s = _leafwise(leaf, 3, grads, state.r, state.s)
        return updates, AdaDeltaState(count=_increment(state.count), r=r, s=s)

    return optax.GradientTransformation(init, update)


def adam(learning_rate: ScalarOrSchedule, b1=0.9, b2=0.999, eps=1e-8) -> optax.GradientTransformation:
    """Adam (Kingma & Ba 2014), s₀ = r₀ = 0, i = k + 1 the notes' 1-based step:

    s ← ρ₁·s + (1 − ρ₁)·g
    r ← ρ₂·r + (1 − ρ₂)·g⊙g
    ŝ = s / (1 − ρ₁^i)
    r̂ = r / (1 − ρ₂^i)
    Δθ = −η_k · ŝ / (δ + √r̂)

    with ρ₁ = ``b1``, ρ₂ = ``b2``, δ = ``eps`` (outside the root, as the notes and optax).
    State: :class:`AdamState` (count, s, r).  Twin: ``optax.adam(learning_rate, b1, b2, eps)``.
    """
    _check("learning_rate", learning_rate, "nonneg")
    _check("b1", b1, "unit")
    _check("b2", b2, "unit")
    _check("eps", eps, "pos")

    def init(params):
        return AdamState(count=_zero_count(), s=_zeros(params), r=_zeros(params))

    def update(grads, state, params=None):
        eta = _lr(learning_rate, state.count)
        i = _increment(state.count)
        c1 = 1 - b1 ** i
        c2 = 1 - b2 ** i

        def leaf(g, s, r):
            lr, p1, p2, d, k1, k2 = _cast(g.dtype, eta, b1, b2, eps, c1, c2)
            s = p1 * s + (1 - p1) * g
            r = p2 * r + (1 - p2) * (g * g)
            # ŝ = s / k1 and r̂ = r / k2 enter only through Δθ = −η·ŝ/(δ + √r̂), which is
            # (−η/k1)·s / (δ + √r·(1/√k2)): the bias corrections become two per-leaf scalars,
            # so each element costs one division and one square root instead of three
            # divisions and a root (same formula, rounding differs by an ulp; the update
            # is compute-bound enough on CPU for this to show: see experiments/bench.py).
            s_hat_scale = -lr / k1                      # −η / (1 − ρ₁^i)
            r_hat_root_scale = 1 / jnp.sqrt(k2)         # 1 / √(1 − ρ₂^i)
            return s_hat_scale * s / (d + jnp.sqrt(r) * r_hat_root_scale), s, r

        updates, s, r = _leafwise(leaf, 3, grads, state.s, state.r)
        return updates, AdamState(count=i, s=s, r=r)

    return optax.GradientTransformation(init, update)


def delta_bar_delta(learning_rate: ScalarOrSchedule, kappa=0.05, phi=0.3,
                    theta=0.7) -> optax.GradientTransformation:
    """Delta-bar-delta (Jacobs 1988, *Increased rates of convergence through learning rate
    adaptation*): per-parameter rates η_k·α that grow while the gradient's sign holds and shrink
    when it flips.  Gains α₀ = 1, averaged gradient δ̄₀ = 0:

    α ← α + κ           where δ̄ ⊙ g > 0   (sign held: additive increase)
    α ← (1 − φ)·α       where δ̄ ⊙ g < 0   (sign flipped: multiplicative decrease)
    Δθ = −η_k·α ⊙ g
    δ̄ ← (1 − θ)·g + θ·δ̄

    (θ here is Jacobs' averaging weight ``theta``, not the parameters.)  The new rate applies to
    the current gradient; at the first step δ̄ = 0 so the rates do not move.
    Jacobs writes the per-parameter rate ε = η·α; at constant η this is his rule with ε₀ = η,
    increment κ_Jacobs = η·κ, and the same φ and θ (``kappa`` is relative to η so that η can be
    a schedule or be vmapped over).

    Meant for full-batch gradient descent (notes): mini-batch noise flips gradient signs and
    drives the rates down.  State: :class:`DeltaBarDeltaState` (count, gain, g_bar).
    No optax twin.
    """
    _check("learning_rate", learning_rate, "nonneg")
    _check("kappa", kappa, "nonneg")
    _check("phi", phi, "unit")
    _check("theta", theta, "unit")

    def init(params):
        return DeltaBarDeltaState(count=_zero_count(),
                                  gain=jax.tree_util.tree_map(jnp.ones_like, params),
                                  g_bar=_zeros(params))

    def update(grads, state, params=None):
        eta = _lr(learning_rate, state.count)

        def leaf(g, a, g_bar):
            lr, k, f, t = _cast(g.dtype, eta, kappa, phi, theta)
            agree = g_bar * g
            a = jnp.where(agree > 0, a + k, jnp.where(agree < 0, (1 - f) * a, a))
            u = -lr * a * g
            g_bar = (1 - t) * g + t * g_bar
            return u, a, g_bar

        updates, gain, g_bar = _leafwise(leaf, 3, grads, state.gain, state.g_bar)
        return updates, DeltaBarDeltaState(count=_increment(state.count), gain=gain, g_bar=g_bar)

    return optax.GradientTransformation(init, update)
