"""Gradient descent and the momentum family: sgd, momentum, ema_momentum, nesterov, simplified_nesterov."""
from typing import Any, NamedTuple

import jax

from ._base import (UNIT, LookaheadTransformation, ScalarOrSchedule, check_trees, in_dtype, leafwise_optimizer,
                    update_moment)


class CountState(NamedTuple):
    """State of :func:`sgd`: the step count k."""
    count: jax.Array


def sgd(learning_rate: ScalarOrSchedule) -> LookaheadTransformation:
    """Plain (mini-batch) gradient descent::

        Δθ = −η_k · g

    State: :class:`CountState` (count); it holds no tree, so sgd checks the gradients against
    the ``params`` passed to ``update`` (when given).  Twin: ``optax.sgd(learning_rate)``.
    """
    def leaf(g, *, eta):
        return (-eta * g,)

    return leafwise_optimizer("sgd", CountState, leaf, learning_rate)


def _velocity_leaf(g, v, *, eta, beta):
    """v ← β·v − η_k·g and Δθ = v, for one leaf (momentum and nesterov)."""
    v = beta * v - eta * g
    return v, v


class MomentumState(NamedTuple):
    """State of :func:`momentum` and :func:`simplified_nesterov`: k and the velocity v."""
    count: jax.Array
    v: Any


def momentum(learning_rate: ScalarOrSchedule, beta=0.9) -> LookaheadTransformation:
    """Momentum in the notes' form (learning rate inside the velocity), v₀ = 0::

        v ← β·v − η_k·g
        Δθ = v

    (the notes' δ is ``beta``).  Reference: Polyak 1964; Sutskever et al. 2013.
    State: :class:`MomentumState` (count, v).

    Convention: optax's ``sgd(learning_rate, momentum=beta)`` is m ← g + β·m, Δθ = −η_k·m,
    with η outside the velocity.  The two are equal (v = −η·m) while η is constant; under a
    schedule ours weights each past gradient by the rate of its own step, optax's by the
    current rate.
    """
    return leafwise_optimizer("momentum", MomentumState, _velocity_leaf, learning_rate, {"beta": ("beta", beta, UNIT)})


class EmaMomentumState(NamedTuple):
    """State of :func:`ema_momentum`: k and the averaged gradient ḡ."""
    count: jax.Array
    g_avg: Any


def ema_momentum(learning_rate: ScalarOrSchedule, beta=0.9) -> LookaheadTransformation:
    """Momentum as an exponential average of gradients (first lecture), ḡ₀ = 0::

        ḡ ← β·ḡ + (1 − β)·g
        Δθ = −η_k·ḡ

    (the first lecture writes g ← βg + (1 − β)∇ and W ← W − γg).  No bias correction.
    State: :class:`EmaMomentumState` (count, g_avg).
    Twin: ``optax.chain(optax.ema(beta, debias=False), optax.scale_by_learning_rate(lr))``,
    equal under schedules too.
    """
    def leaf(g, g_avg, *, eta, beta):
        g_avg = update_moment(g_avg, g, beta)
        return -eta * g_avg, g_avg

    return leafwise_optimizer("ema_momentum", EmaMomentumState, leaf, learning_rate,
                              {"beta": ("beta", beta, UNIT)})


class NesterovState(NamedTuple):
    """State of :func:`nesterov`: k, the velocity v and β (read by :func:`lookahead_params`)."""
    count: jax.Array
    v: Any
    beta: jax.Array


def _theta_tilde(params, velocity, beta, fn_name):
    """θ̃ = θ + β·v leaf by leaf (β in each leaf's dtype)."""
    treedef, (params_leaves, v_leaves) = check_trees(fn_name, "parameters", params, {"state.v": velocity})
    return treedef.unflatten([p + in_dtype(v.dtype, beta) * v for p, v in zip(params_leaves, v_leaves)])


def nesterov(learning_rate: ScalarOrSchedule, beta=0.9) -> LookaheadTransformation:
    """Nesterov momentum, look-ahead form (notes; Nesterov 1983, Sutskever et al. 2013), v₀ = 0::

        θ̃ = θ + β·v
        g = ∇_θ C(θ̃)
        v ← β·v − η_k·g
        Δθ = v

    The gradient must be evaluated at the look-ahead point θ̃, which the returned
    transformation's ``lookahead(params, state)`` computes (:func:`gradient_point` calls it and
    returns θ for every other optimizer, so one training loop serves all)::

        def train_step(params, state, batch):
            grads = jax.grad(loss)(fnbp.optim.gradient_point(opt, params, state), batch)
            updates, state = opt.update(grads, state, params)
            return fnbp.optim.apply_updates(params, updates), state

    Wrapped in ``optax.chain`` (which drops the method), :func:`gradient_point` still finds θ̃
    through the :class:`NesterovState` in the chain's state.
    State: :class:`NesterovState` (count, v, beta).
    :func:`simplified_nesterov` (Bengio et al. 2012) is the same trajectory seen at θ̃.
    """
    def lookahead(params, state):
        return _theta_tilde(params, state.v, beta, "nesterov")

    return leafwise_optimizer("nesterov", NesterovState, _velocity_leaf, learning_rate, {"beta": ("beta", beta, UNIT)},
                              constants={"beta": beta}, lookahead=lookahead)


def lookahead_params(params, state):
    """Deprecated: use :func:`gradient_point` ``(opt, params, state)`` or ``opt.lookahead(params, state)``.

    θ̃ = θ + β·v read from the one :class:`NesterovState` inside ``state`` (e.g. an
    ``optax.chain`` state); ``params`` unchanged when there is none.
    """
    found = [s for s in jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, NesterovState))
             if isinstance(s, NesterovState)]
    if not found:
        return params
    if len(found) > 1:
        raise ValueError(f"fnbp.optim.lookahead_params: state holds {len(found)} NesterovState entries; "
                         "it needs one")
    return _theta_tilde(params, found[0].v, found[0].beta, "lookahead_params")


def simplified_nesterov(learning_rate: ScalarOrSchedule, beta=0.9) -> LookaheadTransformation:
    """Simplified Nesterov momentum (Bengio et al. 2012, *Advances in optimizing recurrent
    networks*), on the look-ahead variable Θ = θ + β·v, with Θ₀ = θ₀ and v₀ = 0::

        g = ∇_θ C(Θ)
        Δθ = β²·v − η_k·(1 + β)·g
        v ← β·v − η_k·g

    that is Θ ← Θ + β²·v − η_k·(1 + β)·g.  An ordinary gradient transformation: the parameters
    it updates are Θ, and Θ_n = θ_n + β·v_n where θ_n, v_n follow :func:`nesterov`, so
    Θ_n = θ_n once v_n = 0.  State: :class:`MomentumState` (count, v).
    Twin: ``optax.sgd(learning_rate, momentum=beta, nesterov=True)`` while η is constant
    (optax keeps η outside the velocity, as for :func:`momentum`).
    """
    def leaf(g, v, *, eta, beta):
        delta_theta = beta * beta * v - eta * (1 + beta) * g
        v = beta * v - eta * g
        return delta_theta, v

    return leafwise_optimizer("simplified_nesterov", MomentumState, leaf, learning_rate,
                              {"beta": ("beta", beta, UNIT)})


def gradient_point(opt, params, state):
    """θ̃, the point where optimizer ``opt`` needs the gradient: ``opt.lookahead(params, state)``
    for a :class:`LookaheadTransformation` (θ + β·v for :func:`nesterov`, θ for the others).

    A transformation without ``lookahead`` (any optax one, or ``optax.chain`` / ``optax.masked``
    wrapped around ours) gets θ, unless its state holds a :class:`NesterovState`: then the
    look-ahead θ + β·v is read from that state, so a chained nesterov is not silently
    evaluated at θ.
    """
    look = getattr(opt, "lookahead", None)
    if look is not None:
        return look(params, state)
    return lookahead_params(params, state)          # the state-reading form, for wrappers that hide the method
