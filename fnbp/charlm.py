"""A character-level language model from fnbp's rules: embedding -> recurrent layer -> dense on every step.

    ids (B, T) --embedding--> x (B, T, d) --elman/lstm/gru--> hs (B, T, H) [--dropout-->] --dense--> logits (B, T, V)
    E = softmax_cross_entropy(logits, targets), averaged over the B T tokens (nats per character)

Dropout (training only, ``dropout=p`` with a ``key``): inverted dropout (``fnbp.dropout``) on hs, the recurrent
layer's outputs on their way to the dense layer -- the non-recurrent connection, as Zaremba et al. (2014) regularise
an LSTM; the state carried to the next step and the next chunk is the undropped h_t.

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

from . import layers, losses, regularization, rnn
from .embeddings import embedding

__all__ = ["CELLS", "init", "zero_state", "apply", "loss", "detach", "make_train_step", "evaluate", "sample"]

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


def apply(params, ids, state, cell="lstm", *, dropout=0.0, key=None):
    """logits (B, T, V) and the final state, from integer ids (B, T) and the initial state.  ``dropout`` > 0:
    inverted dropout with that drop probability on hs before the dense layer, its mask from ``key``."""
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
    if dropout:
        hs = regularization.dropout(hs, dropout, key)
    return layers.dense(params["W_out"], params["b_out"], hs), new_state


def loss(params, ids, targets, state, cell="lstm", *, dropout=0.0, key=None):
    """(mean cross-entropy in nats per character, final state): the quantity to differentiate
    (``jax.value_and_grad(loss, has_aux=True)``); ``dropout``, ``key``: as ``apply``'s."""
    logits, new_state = apply(params, ids, state, cell, dropout=dropout, key=key)
    return losses.softmax_cross_entropy(logits, targets), new_state


def detach(state):
    """The state with its gradient cut (``lax.stop_gradient``): the carry between truncated-BPTT chunks."""
    return jax.tree_util.tree_map(jax.lax.stop_gradient, state)


def make_train_step(opt, cell="lstm", dropout=0.0):
    """A jit-compiled truncated-BPTT step ``step(params, opt_state, state, x, y, key=None) -> (params, opt_state,
    state, loss, grad_norm)`` for an optax-style ``opt`` (e.g. ``optax.chain(fnbp.optim.clip_by_global_norm(1),
    fnbp.optim.adam(2e-3))``): the gradient of the chunk's mean loss, starting from ``state`` (already
    detached), and the chunk's final state detached for the next chunk.  ``grad_norm`` is before clipping.
    ``dropout`` > 0: ``apply``'s dropout, its mask from the step's ``key`` (required then)."""
    from .optim import apply_updates, global_norm

    def step(params, opt_state, state, x, y, key=None):
        (E, new_state), grads = jax.value_and_grad(loss, has_aux=True)(params, x, y, state, cell, dropout=dropout,
                                                                         key=key)
        updates, opt_state = opt.update(grads, opt_state, params)
        return apply_updates(params, updates), opt_state, detach(new_state), E, global_norm(grads)
    return jax.jit(step)


_loss_jit = jax.jit(loss, static_argnums=4)         # one compiled program per shapes and cell, kept across calls


def evaluate(params, ids, batch_size, seq_len, cell="lstm"):
    """Mean loss in nats per character over a stream of ids, read as ``fnbp.text.sequential_batches``
    chunks with the state carried from chunk to chunk (every prediction sees the whole past of its row)."""
    from .text import sequential_batches
    state, total, n = zero_state(params, batch_size, cell), 0.0, 0
    for x, y in sequential_batches(ids, batch_size, seq_len):
        E, state = _loss_jit(params, x, y, state, cell)
        total, n = total + float(E), n + 1
    return total / n


def sample(params, key, prompt_ids, length, *, temperature=1.0, cell="lstm"):
    """``length`` symbol ids drawn after the prompt (a non-empty sequence of ids), one at a time from
    softmax(logits / temperature), the state carried; every draw from the ``jax.random`` key ``key``."""
    if not temperature > 0:
        raise ValueError(f"fnbp.charlm.sample: temperature must be > 0, got {temperature!r}")
    prompt = jnp.asarray(prompt_ids, jnp.int32).reshape(1, -1)
    if prompt.shape[1] < 1:
        raise ValueError("fnbp.charlm.sample: the prompt must have at least one symbol")
    logits, state = apply(params, prompt, zero_state(params, 1, cell), cell)

    def draw(carry, key):
        last_logits, state = carry
        nxt = jax.random.categorical(key, last_logits / temperature).astype(jnp.int32)
        logits, state = apply(params, nxt.reshape(1, 1), state, cell)
        return (logits[0, -1], state), nxt
    _, out = jax.lax.scan(draw, (logits[0, -1], state), jax.random.split(key, length))
    return out
