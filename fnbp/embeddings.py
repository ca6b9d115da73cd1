"""The embedding layer ``fnbp.embedding`` (a lookup table) and its hand-derived backward, a scatter-add.

    E    (V, d)        one row per symbol of a vocabulary of V symbols
    ids  (...)         integer symbol indices in [0, V), any shape ((B, T) for a batch of sequences)
    out  (..., d)      out[n] = E[ids[n]]

The lookup is a dense layer on one-hot inputs: out_n = E^T onehot(ids_n), so the notes' rule
grad_W = delta h^T becomes grad_E = sum_n onehot(ids_n) delta_n^T: row v of grad_E is the sum of
delta_n over every position n whose symbol is v (a symbol used k times collects k gradients, the
fan-out rule) and the rows of unused symbols are zero.  That sum is one scatter-add; no one-hot
matrix is ever built.  CS231n: ``word_embedding_backward``.
"""
import jax
import jax.numpy as jnp
import numpy as np

from . import extensions, reference_rnn
from .check_cases import register as register_check
from .rules import rule

__all__ = ["embedding", "check_embedding_inputs"]


def _embedding_fwd(E, ids):
    """Embedding lookup out = E[ids] with the hand-written backward.

    Forward:  out[n] = E[ids[n]]  for every position n; E (V, d), ids integer (...) -> out (..., d).
    Backward: grad_E[v] = sum_{n : ids[n] = v} delta_n   (a scatter-add of delta = grad_out E, (..., d));
              ids are integers and get no cotangent.

    An id outside [0, V) raises ValueError when ids are concrete (outside ``jit``); inside ``jit``
    its row of the output is NaN (and it adds nothing to grad_E), so the loss turns NaN and
    training stops instead of silently reading a clamped row.
    """
    V = E.shape[0]
    valid = (ids >= 0) & (ids < V)
    safe = jnp.where(valid, ids, 0)
    out = jnp.where(valid[..., None], jnp.take(E, safe, axis=0), jnp.nan)
    return out, (safe, valid, V)


def _embedding_bwd(res, delta):
    safe, valid, V = res
    delta = jnp.where(valid[..., None], delta, 0)
    grad_E = jnp.zeros((V, delta.shape[-1]), delta.dtype).at[safe.reshape(-1)].add(delta.reshape(-1, delta.shape[-1]))
    return grad_E, None


def check_embedding_inputs(E, ids):
    """Shapes, the ids' dtype and (outside jit) their range; raises ValueError naming fnbp.embedding."""
    if jnp.ndim(E) != 2:
        raise ValueError(f"fnbp.embedding: E must have shape (V, d), got shape {jnp.shape(E)}")
    if not jnp.issubdtype(jnp.result_type(E), jnp.floating):
        raise ValueError(f"fnbp.embedding: E must be a floating array, got dtype {jnp.result_type(E)}")
    if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
        raise ValueError(f"fnbp.embedding: ids must be integer symbol indices, got dtype {jnp.result_type(ids)}")
    try:
        concrete = np.asarray(ids)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return                                          # a tracer inside jit: not inspected
    V = jnp.shape(E)[0]
    if concrete.size and (concrete.min() < 0 or concrete.max() >= V):
        raise ValueError(f"fnbp.embedding: ids must be in [0, {V}) for E of shape {jnp.shape(E)}, got values in "
                         f"[{concrete.min()}, {concrete.max()}]")


embedding = rule(_embedding_fwd, _embedding_bwd, name="embedding", check=check_embedding_inputs)


def _embedding_rows(args, options, delta):
    """Per-example rows of an embedding node (``fnbp.extensions``): the lookup is a dense layer with W = E^T on
    one-hot inputs, so P (B, S, V) is onehot(ids_n) at each of example n's S positions and grad_E E_n =
    (delta_n^T P_n)^T: rows of E summed per symbol, as the scatter-add does."""
    E, ids = args
    B = ids.shape[0]
    onehot = jax.nn.one_hot(ids.reshape(B, -1), E.shape[0], dtype=delta.dtype)
    return extensions.Rows(onehot, delta.reshape(B, -1, E.shape[1]))


def _embedding_W(mat, shape):
    """(..., d, V) -> E's shape (..., V, d)."""
    return jnp.swapaxes(mat, -1, -2)


extensions.register(embedding, view=_embedding_rows, to_W=_embedding_W, weight=0, bias=None)
register_check(embedding, reference_rnn.embedding, "embedding", argnums=(0,), batch_only=True)   # ids fixed
