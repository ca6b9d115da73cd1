"""Dropout, a regulariser with a hand-derived backward rule (notes 001).

Dropout (Srivastava et al. 2014): in training mode each unit is zeroed with
probability ``p`` (the *drop* probability) and the survivors are scaled by
1 / (1 - p) ("inverted dropout"), so the expected activation -- the notes' "same
energy" -- is unchanged and inference is the identity:

    forward   y = x m / (1 - p),        m_i ~ Bernoulli(1 - p), drawn from an explicit key
    backward  grad_x E = grad_y E m / (1 - p)      (the same mask: zero where the unit was dropped)

Shapes: x any shape (a mini-batch (B, n) in an MLP, feature maps (B, H, W, C) in a CNN);
the mask has x's shape.  The other regulariser of the notes, the L2 penalty lambda Omega of
J = L + lambda Omega (notes 003), is ``fnbp.losses.l2_penalty``.
"""
import jax
import jax.numpy as jnp

from . import _threefry
from .check_cases import register as register_check
from .rules import rule

__all__ = ["dropout", "dropout_per_example"]


def _concrete_scalar(p):
    """p as a float when it is known outside jit (a Python, numpy or concrete jnp scalar), else None."""
    try:
        return float(p)
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def _dropout_fwd(x, p, key):
    """Inverted dropout with the mask drawn from ``key`` (see ``dropout``).  Backward: grad_x = grad_y m / (1 - p)."""
    keep = _threefry.bernoulli(key, 1.0 - p, jnp.shape(x))    # jax.random.bernoulli's mask, bit for bit
    scale = 1.0 / (1.0 - p)                                  # inverted dropout: E[y] = x
    return jnp.where(keep, x * scale, 0).astype(x.dtype), (keep, scale)


def _dropout_bwd(res, grad_y):
    keep, scale = res
    grad_x = jnp.where(keep, grad_y * scale, 0).astype(grad_y.dtype)   # the same mask, the same scale
    return grad_x, None, None


_dropout = rule(_dropout_fwd, _dropout_bwd, name="dropout", nondiff=("p", "key"))
register_check(_dropout, "dropout", "dropout", argnums=(0,))  # p and key fixed


def dropout(x, p, key, *, train=True):
    """Inverted dropout: y = x m / (1 - p), m_i ~ Bernoulli(1 - p), p the drop probability.

    Scaling by 1 / (1 - p) keeps the expected activation ("the same energy"):
    E[y] = x, so inference mode (``train=False``) is the identity.
    Backward: grad_x = grad_y m / (1 - p) -- zero exactly where the unit was dropped.
    The mask comes from the explicit ``key``: same key, same mask; under
    ``jax.vmap`` with one key per example, each example gets its own mask.
    """
    if not train:
        return x
    p_value = _concrete_scalar(p)
    if p_value is not None and not 0 <= p_value < 1:
        raise ValueError(f"fnbp.dropout: the drop probability p must be in [0, 1), got {p_value}")
    if isinstance(p, (int, float)) and p == 0:
        return x
    if key is None:
        raise ValueError("fnbp.dropout: training-mode dropout needs an explicit jax.random key, got None")
    return _dropout(x, p, key)


dropout.rule = _dropout.rule


def _dropout_per_example_fwd(h, p, keys):
    """Inverted dropout with one mask per example: row n of h (B, ...) uses ``dropout``'s mask from keys[n]
    (keys: B keys), the mask ``dropout(h[n], p, keys[n])`` draws.  Backward: grad_h_n = grad_y_n m_n / (1 - p).
    (What per-example quantities and DP-SGD put in place of ``dropout``: ``fnbp.per_example``.)"""
    return jax.vmap(lambda h_n, key_n: _dropout_fwd(h_n, p, key_n))(h, keys)


def _dropout_per_example_bwd(res, grad_y):
    return jax.vmap(lambda r, g_n: _dropout_bwd(r, g_n)[0])(res, grad_y), None, None


dropout_per_example = rule(_dropout_per_example_fwd, _dropout_per_example_bwd, name="dropout_per_example",
                           nondiff=("p", "keys"))
register_check(dropout_per_example, "dropout_per_example", "dropout_rows", argnums=(0,), batch_only=True)
