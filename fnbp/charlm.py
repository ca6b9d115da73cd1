"""A character-level language model from fnbp's rules: embedding -> recurrent layer -> dense on every step.

    ids (B, T) --embedding--> x (B, T, d) --elman/lstm/gru--> hs (B, T, H) --dense--> logits (B, T, V)
    E = softmax_cross_entropy(logits, targets), averaged over the B T tokens (nats per character)

A plain functional model (params a dict of arrays), used by ``experiments/char_rnn.py``, the LSTM
benchmark and the tests; every gradient in it is one of fnbp's hand-written rules.  The state
(h, or (h, c) for the LSTM) is returned so that consecutive chunks of one stream can carry it
(stateful truncated BPTT, see ``fnbp.text.sequential_batches``).

Initialisation as PyTorch's: the recurrent weights and biases and the output layer uniform in
(-1/sqrt(H), 1/sqrt(H)), the embedding N(0, 1); the logits of a fresh model are then small, so its
first loss is about ln V nats per character.
"""
import jax
import jax.numpy as jnp

from . import layers, losses, rnn
from .embedding import embedding

__all__ = ["CELLS", "init", "zero_state", "apply", "loss", "detach"]

CELLS = {"elman": 1, "lstm": 4, "gru": 3}     # gate blocks k: W_x (k H, d), W_h (k H, H)


def _check_cell(cell):
    if cell not in CELLS:
        raise ValueError(f"fnbp.charlm: cell must be one of {', '.join(CELLS)}, got {cell!r}")


def init(key, vocab_size, hidden, *, embed=64, cell="lstm", dtype=jnp.float32):
    """Parameters {"E", "W_x", "W_h", "b" (and "b_h" for the GRU), "W_out", "b_out"} for ``apply``."""
    _check_cell(cell)
    k = CELLS[cell]
    keys = jax.random.split(key, 7)
    bound = 1.0 / hidden ** 0.5

    def uniform(key, shape):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    params = {"E": jax.random.normal(keys[0], (vocab_size, embed), dtype),
              "W_x": uniform(keys[1], (k * hidden, embed)), "W_h": uniform(keys[2], (k * hidden, hidden)),
              "W_out": uniform(keys[5], (vocab_size, hidden)), "b_out": uniform(keys[6], (vocab_size,))}
    if cell == "gru":
        params["b"], params["b_h"] = uniform(keys[3], (k * hidden,)), uniform(keys[4], (k * hidden,))
    else:                                                      # PyTorch's b_ih + b_hh
        params["b"] = uniform(keys[3], (k * hidden,)) + uniform(keys[4], (k * hidden,))
    return params


def zero_state(params, batch, cell="lstm"):
    """The state of a fresh stream: h0 (batch, H) zeros, and c0 for the LSTM."""
    _check_cell(cell)
    h0 = jnp.zeros((batch, params["W_h"].shape[1]), params["W_h"].dtype)
    return (h0, h0) if cell == "lstm" else h0


def apply(params, ids, state, cell="lstm"):
    """logits (B, T, V) and the final state, from integer ids (B, T) and the initial state."""
    _check_cell(cell)
    x = embedding(params["E"], ids)
    if cell == "lstm":
        h0, c0 = state
        hs, c_T = rnn.lstm(params["W_x"], params["W_h"], params["b"], x, h0, c0)
        new_state = (hs[:, -1], c_T)
    elif cell == "gru":
        hs = rnn.gru(params["W_x"], params["W_h"], params["b"], params["b_h"], x, state)
        new_state = hs[:, -1]
    else:
        hs = rnn.elman(params["W_x"], params["W_h"], params["b"], x, state)
        new_state = hs[:, -1]
    return layers.dense(params["W_out"], params["b_out"], hs), new_state


def loss(params, ids, targets, state, cell="lstm"):
    """(mean cross-entropy in nats per character, final state): the quantity to differentiate
    (``jax.value_and_grad(loss, has_aux=True)``)."""
    logits, new_state = apply(params, ids, state, cell)
    return losses.softmax_cross_entropy(logits, targets), new_state


def detach(state):
    """The state with its gradient cut (``lax.stop_gradient``): the carry between truncated-BPTT chunks."""
    return jax.tree_util.tree_map(jax.lax.stop_gradient, state)
