"""Sequence layers: ``Embedding(V, d)`` and the recurrent ``Elman(H)``, ``LSTM(H)``, ``GRU(H)``.

Shapes exclude the batch axis B (as every ``fnbp.nn`` layer's); sequences are batch first (B, T, ...):

| layer | input -> output | params | rule |
|---|---|---|---|
| ``Embedding(V, d)`` | ids (T,) integer -> (T, d) | E (V, d), N(0, 1) | ``fnbp.embedding``: E[ids] |
| ``Elman(H)`` | (T, n_in) -> (T, H), every h_t | W_x (H, n_in), W_h (H, H), b (H,) | ``fnbp.rnn.elman`` |
| ``LSTM(H)`` | (T, n_in) -> (T, H) | W_x (4H, n_in), W_h (4H, H), b (4H,) | ``fnbp.rnn.lstm_sequence`` |
| ``GRU(H)`` | (T, n_in) -> (T, H) | W_x (3H, n_in), W_h (3H, H), b_x, b_h (3H,) | ``fnbp.rnn.gru`` |

A ``Dense`` after them acts on the last axis, at every step: ``serial(Embedding(V, 64), LSTM(256), Dense(V))``
maps ids (B, T) to logits (B, T, V) for ``fnbp.losses.softmax_cross_entropy`` with (B, T) targets.

The recurrent layers start every sequence from h_0 = 0 (and c_0 = 0): an auxiliary node makes the zeros,
so the explicit walker (``fnbp.backprop``) runs the same hand-written BPTT as ``jax.grad``.  Carrying the
state from one chunk of a stream into the next (stateful truncated BPTT) is ``fnbp.charlm``'s.
Initialisation as PyTorch's: every recurrent weight and bias uniform in (-1/sqrt(H), 1/sqrt(H)) (b the sum of
PyTorch's two biases).
"""
import dataclasses
import math

import jax
import jax.numpy as jnp

from .. import rnn
from ..embeddings import embedding
from .layers import _size
from .model import Layer, who

__all__ = ["Embedding", "Elman", "LSTM", "GRU", "zero_state"]


def zero_state(x, *, hidden):
    """h_0 = 0 of shape (B, hidden) for a batch of sequences x (B, T, n_in), in x's dtype."""
    return jnp.zeros((x.shape[0], hidden), x.dtype)


@dataclasses.dataclass(frozen=True)
class Embedding(Layer):
    """out = E[ids]: integer ids (T,) (any shape) -> (T, d); E (V, d) drawn N(0, 1) as PyTorch's."""
    vocab_size: int
    dim: int
    has_params = True

    def __post_init__(self):
        object.__setattr__(self, "vocab_size", _size(self, "vocab_size", self.vocab_size))
        object.__setattr__(self, "dim", _size(self, "dim", self.dim))

    def init(self, key, input_shape, dtype):
        return ({"E": jax.random.normal(key, (self.vocab_size, self.dim), dtype)}, None,
                tuple(input_shape) + (self.dim,))

    def build(self, g, x):
        return g.node("", embedding, g.param("E"), x)


@dataclasses.dataclass(frozen=True)
class _Recurrent(Layer):
    hidden: int
    has_params = True
    gates = 1
    biases = ("b",)

    def __post_init__(self):
        object.__setattr__(self, "hidden", _size(self, "hidden", self.hidden))

    def init(self, key, input_shape, dtype):
        if len(input_shape) != 2:
            raise ValueError(f"{who(self)}: the input must be a sequence (T, n_in) per example, got shape "
                             f"{tuple(input_shape)}")
        T, n_in = input_shape
        kH, bound = self.gates * self.hidden, 1.0 / math.sqrt(self.hidden)
        keys = jax.random.split(key, 4)

        def uniform(k, shape):
            return jax.random.uniform(k, shape, dtype, -bound, bound)
        params = {"W_x": uniform(keys[0], (kH, n_in)), "W_h": uniform(keys[1], (kH, self.hidden))}
        if len(self.biases) == 2:
            params["b_x"], params["b_h"] = uniform(keys[2], (kH,)), uniform(keys[3], (kH,))
        else:                                                     # PyTorch's b_ih + b_hh
            params["b"] = uniform(keys[2], (kH,)) + uniform(keys[3], (kH,))
        return params, None, (T, self.hidden)

    def _zeros(self, g, x, name="h0"):
        return g.node(name, zero_state, x, aux=True, hidden=self.hidden)

    @property
    def kind(self):
        return type(self).__name__.lower()


@dataclasses.dataclass(frozen=True)
class Elman(_Recurrent):
    """h_t = tanh(W_x x_t + W_h h_{t-1} + b), h_0 = 0: (T, n_in) -> (T, H), every h_t (``fnbp.rnn.elman``)."""

    def build(self, g, x):
        return g.node("", rnn.elman, g.param("W_x"), g.param("W_h"), g.param("b"), x, self._zeros(g, x))


@dataclasses.dataclass(frozen=True)
class LSTM(_Recurrent):
    """PyTorch's LSTM (gates i, f, g, o), h_0 = c_0 = 0: (T, n_in) -> (T, H) (``fnbp.rnn.lstm_sequence``)."""
    gates = 4

    def build(self, g, x):
        return g.node("", rnn.lstm_sequence, g.param("W_x"), g.param("W_h"), g.param("b"), x,
                      self._zeros(g, x), self._zeros(g, x, "c0"))


@dataclasses.dataclass(frozen=True)
class GRU(_Recurrent):
    """PyTorch's GRU (r, z, n; biases b_x, b_h), h_0 = 0: (T, n_in) -> (T, H) (``fnbp.rnn.gru``)."""
    gates = 3
    biases = ("b_x", "b_h")

    def build(self, g, x):
        return g.node("", rnn.gru, g.param("W_x"), g.param("W_h"), g.param("b_x"), g.param("b_h"), x,
                      self._zeros(g, x))
