r"""Optimizers of the notes as optax-compatible gradient transformations.

Every factory returns a :class:`LookaheadTransformation`, an
``optax.GradientTransformation(init, update)`` of pure functions that also says where the
gradient is taken (``opt.lookahead(params, state)``, θ itself except for Nesterov)::

    opt = fnbp.optim.adam(1e-3)
    state = opt.init(params)                       # step count k = 0
    grads = jax.grad(loss)(fnbp.optim.gradient_point(opt, params, state))   # at θ̃
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
Hyperparameters are validated at construction when they are concrete (traced values are not
checked): a wrong type (a string, a bool, an array) raises ``TypeError``, a value out of range
(negative or NaN rate, β outside [0, 1), ε ≤ 0) ``ValueError``, each naming the function, the
argument, what was expected and what came.  ``init`` refuses non-floating parameters and
``update`` refuses gradients whose structure, leaf shapes or dtypes differ from the state's or
the parameters' (``apply_updates`` likewise refuses updates that would broadcast): all at trace
time, nothing is checked per step on the device.

Layout: :mod:`._base` holds the one helper every optimizer is built on
(:func:`leafwise_optimizer`: checks, state init, schedule, per-leaf rule, step count),
:mod:`.momentum` sgd and the momentum family, :mod:`.adaptive` the adaptive-rate methods and
:mod:`.schedules` the schedules.

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
  :func:`gradient_point` (``opt.lookahead(params, state)``).
* ``adagrad``: notes r₀ = 0 and δ outside the root; optax r₀ = 0.1 and δ inside.
  ``adagrad(η, eps, initial_accumulator_value=0.1, eps_in_sqrt=True)`` = ``optax.adagrad``.
* ``rmsprop``: δ inside the root as in the notes and optax's default; ``eps_in_sqrt`` as optax.
* ``adadelta``: η = 1 (the notes have none) = ``optax.adadelta(learning_rate=1.0)``; optax's
  default ``learning_rate=None`` returns +√(δ+s)/√(δ+r)⊙g, the ascent direction.
* ``adam`` = ``optax.adam`` (δ outside the root, bias correction with i = k + 1).
* ``delta_bar_delta`` has no optax twin.
"""
from ._base import (LookaheadTransformation, Schedule, ScalarOrSchedule, apply_updates, bias_correction,
                    leafwise_optimizer, update_moment)
from .adaptive import (AdaDeltaState, AdaGradState, AdamState, DeltaBarDeltaState, RMSPropState, adadelta, adagrad,
                       adam, delta_bar_delta, rmsprop)
from .gradient_descent import (CountState, EmaMomentumState, MomentumState, NesterovState, ema_momentum, gradient_point,
                               lookahead_params, momentum, nesterov, sgd, simplified_nesterov)
from .schedules import constant, exponential_decay, inverse_decay
from .clipping import clip_by_global_norm, global_norm
from .kronecker import KFACState, kfac

__all__ = [
    "sgd", "kfac", "KFACState", "momentum", "ema_momentum", "nesterov", "lookahead_params", "simplified_nesterov",
    "adagrad", "rmsprop", "adadelta", "adam", "delta_bar_delta",
    "constant", "inverse_decay", "exponential_decay", "apply_updates",
    "Schedule", "ScalarOrSchedule",
    "CountState", "MomentumState", "EmaMomentumState", "NesterovState", "AdaGradState",
    "RMSPropState", "AdaDeltaState", "AdamState", "DeltaBarDeltaState",
    "LookaheadTransformation", "gradient_point", "leafwise_optimizer", "update_moment",
    "bias_correction",
    "clip_by_global_norm", "global_norm",
]
