"""Learning-rate schedules of the notes: functions k ↦ η_k of the step count k (k = 0 first)."""
import jax.numpy as jnp

from ._base import NONNEG, Schedule, check_hyperparameter


def constant(value) -> Schedule:
    """η_k = η  for every step k (k = 0 for the first update)."""
    check_hyperparameter("constant", "value", value, NONNEG)
    return lambda count: jnp.full(jnp.shape(count), value, dtype=jnp.result_type(value, float))


def inverse_decay(init_value, decay) -> Schedule:
    """Inverse decay (notes): η_k = η₀ / (1 + k·δ), k = 0 for the first update (η = η₀).

    ``decay`` is the notes' decrease factor δ ≥ 0.
    """
    check_hyperparameter("inverse_decay", "init_value", init_value, NONNEG)
    check_hyperparameter("inverse_decay", "decay", decay, NONNEG)
    return lambda count: init_value / (1 + count * decay)


def exponential_decay(init_value, decay) -> Schedule:
    """Exponential decay (notes): η_k = η₀ · exp(−k·δ), k = 0 for the first update (η = η₀).

    ``decay`` is the notes' decrease factor δ ≥ 0 (a rate per step, not optax's
    ``decay_rate``: ``optax.exponential_decay(η₀, 1, exp(−δ))`` is the same schedule).
    """
    check_hyperparameter("exponential_decay", "init_value", init_value, NONNEG)
    check_hyperparameter("exponential_decay", "decay", decay, NONNEG)
    return lambda count: init_value * jnp.exp(-count * decay)
