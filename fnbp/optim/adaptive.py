"""Adaptive per-parameter learning rates: adagrad, rmsprop, adadelta, adam, delta_bar_delta."""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ._base import (NONNEG, POS, UNIT, LookaheadTransformation, ScalarOrSchedule, bias_correction,
                    check_hyperparameter, increment, leafwise_optimizer, update_moment)


def _scaled_step(g, r, *, eta, delta, eps_in_sqrt):
    """−η_k / √(δ + r) ⊙ g (eps_in_sqrt) or −η_k / (δ + √r) ⊙ g."""
    if eps_in_sqrt:
        return -eta / jnp.sqrt(delta + r) * g
    return -eta / (delta + jnp.sqrt(r)) * g


class AdaGradState(NamedTuple):
    """State of :func:`adagrad`: k and the accumulated squared gradients r."""
    count: jax.Array
    r: Any


def adagrad(learning_rate: ScalarOrSchedule, eps=1e-7, initial_accumulator_value=0.0,
            eps_in_sqrt=False) -> LookaheadTransformation:
    """AdaGrad (Duchi, Hazan & Singer 2011), r₀ = ``initial_accumulator_value`` (notes: 0)::

        r ← r + g⊙g
        Δθ = −η_k / (δ + √r) ⊙ g          (eps_in_sqrt=False, the notes)
        Δθ = −η_k / √(δ + r) ⊙ g          (eps_in_sqrt=True, optax)

    with δ = ``eps``.  State: :class:`AdaGradState` (count, r).
    Convention: the notes start r at 0 with δ outside the root; optax starts at 0.1 with δ
    inside.  ``adagrad(lr, eps, initial_accumulator_value=0.1, eps_in_sqrt=True)`` equals
    ``optax.adagrad(lr, 0.1, eps)``.
    """
    check_hyperparameter("adagrad", "initial_accumulator_value", initial_accumulator_value, NONNEG)

    def leaf(g, r, *, eta, delta):
        r = r + g * g
        return _scaled_step(g, r, eta=eta, delta=delta, eps_in_sqrt=eps_in_sqrt), r

    return leafwise_optimizer("adagrad", AdaGradState, leaf, learning_rate, {"delta": ("eps", eps, POS)},
                              fill={"r": initial_accumulator_value})


class RMSPropState(NamedTuple):
    """State of :func:`rmsprop`: k and the moving average of squared gradients r."""
    count: jax.Array
    r: Any


def rmsprop(learning_rate: ScalarOrSchedule, decay=0.9, eps=1e-8,
            eps_in_sqrt=True) -> LookaheadTransformation:
    """RMSProp (Hinton 2012, Coursera lecture 6e), r₀ = 0::

        r ← ρ·r + (1 − ρ)·g⊙g
        Δθ = −η_k / √(δ + r) ⊙ g          (eps_in_sqrt=True, the notes and optax's default)
        Δθ = −η_k / (δ + √r) ⊙ g          (eps_in_sqrt=False, PyTorch)

    with ρ = ``decay`` and δ = ``eps``.  State: :class:`RMSPropState` (count, r).
    Twin: ``optax.rmsprop(learning_rate, decay, eps, eps_in_sqrt=...)``.
    """
    def leaf(g, r, *, eta, rho, delta):
        r = update_moment(r, g * g, rho)
        return _scaled_step(g, r, eta=eta, delta=delta, eps_in_sqrt=eps_in_sqrt), r

    return leafwise_optimizer("rmsprop", RMSPropState, leaf, learning_rate,
                              {"rho": ("decay", decay, UNIT), "delta": ("eps", eps, POS)})


class AdaDeltaState(NamedTuple):
    """State of :func:`adadelta`: k, the average r of g⊙g and the average s of Δθ⊙Δθ."""
    count: jax.Array
    r: Any
    s: Any


def adadelta(learning_rate: ScalarOrSchedule = 1.0, rho=0.9, eps=1e-6) -> LookaheadTransformation:
    """AdaDelta (Zeiler 2012), r₀ = s₀ = 0::

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
    def leaf(g, r, s, *, eta, rho, delta):
        r = update_moment(r, g * g, rho)
        unit_step = -jnp.sqrt(delta + s) / jnp.sqrt(delta + r) * g          # Δ
        s = update_moment(s, unit_step * unit_step, rho)
        return eta * unit_step, r, s

    hyper = {"rho": ("rho", rho, UNIT), "delta": ("eps", eps, POS)}
    return leafwise_optimizer("adadelta", AdaDeltaState, leaf, learning_rate, hyper)


class AdamState(NamedTuple):
    """State of :func:`adam`: k, the first moment s and the second moment r (not bias-corrected)."""
    count: jax.Array
    s: Any
    r: Any


def adam(learning_rate: ScalarOrSchedule, b1=0.9, b2=0.999, eps=1e-8) -> LookaheadTransformation:
    """Adam (Kingma & Ba 2014), s₀ = r₀ = 0, i = k + 1 the notes' 1-based step::

        s ← ρ₁·s + (1 − ρ₁)·g
        r ← ρ₂·r + (1 − ρ₂)·g⊙g
        ŝ = s / (1 − ρ₁^i)
        r̂ = r / (1 − ρ₂^i)
        Δθ = −η_k · ŝ / (δ + √r̂)

    with ρ₁ = ``b1``, ρ₂ = ``b2``, δ = ``eps`` (outside the root, as the notes and optax).
    State: :class:`AdamState` (count, s, r).  Twin: ``optax.adam(learning_rate, b1, b2, eps)``.
    """
    def per_step(count):
        i = increment(count)                                 # the notes' 1-based step
        # 1 / (1 − ρ^i) once a step, a scalar: each element of ŝ and r̂ then costs a multiply instead of
        # a division (two divisions per element made the update alone ~8 % slower, measured)
        return {"unbias1": 1 / bias_correction(b1, i), "unbias2": 1 / bias_correction(b2, i)}

    def leaf(g, s, r, *, eta, rho1, rho2, delta, unbias1, unbias2):
        s = update_moment(s, g, rho1)
        r = update_moment(r, g * g, rho2)
        s_hat = s * unbias1                                  # s / (1 − ρ₁^i)
        r_hat = r * unbias2                                  # r / (1 − ρ₂^i)
        return -eta * s_hat / (delta + jnp.sqrt(r_hat)), s, r

    return leafwise_optimizer("adam", AdamState, leaf, learning_rate,
                              {"rho1": ("b1", b1, UNIT), "rho2": ("b2", b2, UNIT), "delta": ("eps", eps, POS)},
                              per_step=per_step)


class DeltaBarDeltaState(NamedTuple):
    """State of :func:`delta_bar_delta`: k, the per-parameter gains α and the averaged gradient δ̄."""
    count: jax.Array
    gain: Any
    g_bar: Any


def delta_bar_delta(learning_rate: ScalarOrSchedule, kappa=0.05, phi=0.3,
                    theta=0.7) -> LookaheadTransformation:
    """Delta-bar-delta (Jacobs 1988, *Increased rates of convergence through learning rate
    adaptation*): per-parameter rates η_k·α that grow while the gradient's sign holds and shrink
    when it flips.  Gains α₀ = 1, averaged gradient δ̄₀ = 0::

        α ← α + κ           where δ̄⊙g > 0   (sign held: additive increase)
        α ← (1 − φ)·α       where δ̄⊙g < 0   (sign flipped: multiplicative decrease)
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
    def leaf(g, alpha, g_bar, *, eta, kappa, phi, theta):
        agree = g_bar * g
        alpha = jnp.where(agree > 0, alpha + kappa, alpha)
        alpha = jnp.where(agree < 0, (1 - phi) * alpha, alpha)
        delta_theta = -eta * alpha * g
        g_bar = (1 - theta) * g + theta * g_bar
        return delta_theta, alpha, g_bar

    return leafwise_optimizer("delta_bar_delta", DeltaBarDeltaState, leaf, learning_rate,
                              {"kappa": ("kappa", kappa, NONNEG), "phi": ("phi", phi, UNIT),
                               "theta": ("theta", theta, UNIT)},
                              fill={"gain": 1.0})
