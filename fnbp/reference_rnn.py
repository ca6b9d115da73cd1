"""Plain-``jnp`` references for the recurrent rules and the embedding: the same forward, no custom rule.

What the tests and ``fnbp.check`` differentiate with JAX's autodiff to cross-check
``fnbp.rnn`` and ``fnbp.embedding``: the most literal transcription of the equations, one
``lax.scan`` over the time axis with the cell written in plain ``jnp`` (PyTorch's
``nn.RNN``/``nn.LSTM``/``nn.GRU`` equations; x batch first (B, T, n_in), W (k H, n_in)).
"""
import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["elman", "lstm", "gru", "embedding", "elman_cell", "lstm_cell", "gru_cell"]


def elman_cell(W_x, W_h, b, h_prev, x_t):
    """h_t = tanh(W_x x_t + W_h h_{t-1} + b)."""
    return jnp.tanh(x_t @ W_x.T + h_prev @ W_h.T + b)


def lstm_cell(W_x, W_h, b, h_prev, c_prev, x_t):
    """PyTorch's LSTM cell, gates (i, f, g, o): returns (h_t, c_t)."""
    i, f, g, o = jnp.split(x_t @ W_x.T + h_prev @ W_h.T + b, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c_prev + jax.nn.sigmoid(i) * jnp.tanh(g)
    return jax.nn.sigmoid(o) * jnp.tanh(c), c


def gru_cell(W_x, W_h, b_x, b_h, h_prev, x_t):
    """PyTorch's GRU cell: r, z, n = ...; h_t = (1 - z) n + z h_{t-1}."""
    u_r, u_z, u_n = jnp.split(x_t @ W_x.T + b_x, 3, axis=-1)
    v_r, v_z, v_n = jnp.split(h_prev @ W_h.T + b_h, 3, axis=-1)
    r, z = jax.nn.sigmoid(u_r + v_r), jax.nn.sigmoid(u_z + v_z)
    n = jnp.tanh(u_n + r * v_n)
    return (1 - z) * n + z * h_prev


def _time_major(x):
    return jnp.swapaxes(x, 0, 1)


def elman(W_x, W_h, b, x, h0):
    """hs (B, T, H) of the tanh RNN.  Reference for :func:`fnbp.rnn.elman`."""
    def step(h, x_t):
        h = elman_cell(W_x, W_h, b, h, x_t)
        return h, h
    return _time_major(lax.scan(step, h0, _time_major(x))[1])


def lstm(W_x, W_h, b, x, h0, c0):
    """(hs (B, T, H), c_T (B, H)) of the LSTM.  Reference for :func:`fnbp.rnn.lstm`."""
    def step(carry, x_t):
        h, c = lstm_cell(W_x, W_h, b, *carry, x_t)
        return (h, c), h
    (_, c_T), hs = lax.scan(step, (h0, c0), _time_major(x))
    return _time_major(hs), c_T


def gru(W_x, W_h, b_x, b_h, x, h0):
    """hs (B, T, H) of the GRU.  Reference for :func:`fnbp.rnn.gru`."""
    def step(h, x_t):
        h = gru_cell(W_x, W_h, b_x, b_h, h, x_t)
        return h, h
    return _time_major(lax.scan(step, h0, _time_major(x))[1])


def embedding(E, ids):
    """E[ids]: the rows of E (V, d) picked by integer ids of any shape.  Reference for :func:`fnbp.embedding`."""
    return E[ids]
