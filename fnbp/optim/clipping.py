r"""Gradient clipping by global norm (Pascanu et al. 2013), the recurrent networks' guard against exploding
gradients, as an optax-compatible gradient transformation written by hand.

With g the whole gradient (every leaf of the pytree taken as one vector) and c = ``max_norm``:

    ‖g‖ = sqrt(Σ_leaves Σ_entries g²)
    g ← g                  if ‖g‖ < c
    g ← (g / ‖g‖) · c      otherwise (the direction kept, the length set to c)

Chain it before an optimizer: ``optax.chain(fnbp.optim.clip_by_global_norm(1.0), fnbp.optim.adam(2e-3))``.
Equal to ``optax.clip_by_global_norm`` (same formula, same order of operations, same empty state):
``tests/test_optim_clipping.py``.
"""
import jax
import jax.numpy as jnp
import optax

from ._base import POS, check_hyperparameter

__all__ = ["clip_by_global_norm", "global_norm"]


def global_norm(tree):
    """‖g‖ = sqrt(Σ_leaves Σ g²): the 2-norm of all the leaves of ``tree`` as one vector (a scalar array)."""
    squares = [jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree)]
    total = 0
    for s in squares:                    # leaf by leaf, in the pytree's order (as optax.tree.norm)
        total = total + s
    return jnp.sqrt(jnp.asarray(total))


def clip_by_global_norm(max_norm) -> optax.GradientTransformation:
    """g ← g if ‖g‖ < max_norm, else g · max_norm / ‖g‖ (see the module docstring); state: none.

    Raises TypeError/ValueError naming ``fnbp.optim.clip_by_global_norm`` for a max_norm that is not a
    number > 0 (a traced value is not checked).  A non-finite gradient stays non-finite (NaN is not hidden).
    """
    check_hyperparameter("clip_by_global_norm", "max_norm", max_norm, POS)

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        norm = global_norm(updates)
        keep = norm < max_norm

        def clip(g):
            return jax.lax.select(keep, g, (g / norm.astype(g.dtype)) * max_norm)
        return jax.tree_util.tree_map(clip, updates), state

    return optax.GradientTransformation(init, update)
