"""The recurrent layers one step at a time, for reading: CS231n's ``rnn_layers.py`` with the notes' shapes.

``rnn_step_forward``/``rnn_step_backward`` and ``lstm_step_forward``/``lstm_step_backward`` are one time step
and its hand-derived backward; ``rnn_forward``/``rnn_backward`` and ``lstm_forward``/``lstm_backward`` loop over
t in Python (forward t = 1..T, BPTT t = T..1, the weight gradients summed over the steps).  They compute what
``fnbp.rnn.elman`` and ``fnbp.rnn.lstm`` compute (the tests check it to 1e-12), without the fast rules'
arrangement (one ``lax.scan`` each way, the big products as GEMMs over all T B rows).  Shapes: x (B, T, n_in),
h (B, H), W_x (k H, n_in), W_h (k H, H); LSTM gates i, f, g, o stacked in 4H.
"""
import jax
import jax.numpy as jnp

__all__ = ["rnn_step_forward", "rnn_step_backward", "rnn_forward", "rnn_backward",
           "lstm_step_forward", "lstm_step_backward", "lstm_forward", "lstm_backward"]


# ------------------------------------------------------------------------------------------------
def rnn_step_forward(x, h_prev, W_x, W_h, b):
    """One Elman step: h = tanh(W_x x + W_h h_prev + b); x (B, n_in), h_prev (B, H). Returns (h, cache)."""
    h = jnp.tanh(x @ W_x.T + h_prev @ W_h.T + b)
    return h, (x, h_prev, W_x, W_h, h)


def rnn_step_backward(grad_h, cache):
    """Backward of one step given grad_h = grad_{h_t} E (B, H): delta = grad_h (.) (1 - h^2), then
    grad x = W_x^T delta, grad h_prev = W_h^T delta, grad W_x = delta x^T, grad W_h = delta h_prev^T, grad b = delta.
    Returns (grad_x, grad_h_prev, grad_W_x, grad_W_h, grad_b)."""
    x, h_prev, W_x, W_h, h = cache
    delta = grad_h * (1 - h * h)
    return delta @ W_x, delta @ W_h, delta.T @ x, delta.T @ h_prev, delta.sum(axis=0)


def rnn_forward(x, h0, W_x, W_h, b):
    """The Elman layer as a Python loop over t of ``rnn_step_forward``; x (B, T, n_in). Returns (hs, caches)."""
    h, hs, caches = h0, [], []
    for t in range(x.shape[1]):
        h, cache = rnn_step_forward(x[:, t], h, W_x, W_h, b)
        hs.append(h)
        caches.append(cache)
    return jnp.stack(hs, axis=1), caches


def rnn_backward(grad_hs, caches):
    """BPTT as a Python loop from t = T down to 1: grad_{h_t} E = grad_hs[:, t] + (grad h_prev of step t+1);
    the weight gradients are summed over the steps.  Returns (grad_x, grad_h0, grad_W_x, grad_W_h, grad_b)."""
    grad_h_prev, grads_x, total = jnp.zeros_like(grad_hs[:, 0]), [], None
    for t in reversed(range(grad_hs.shape[1])):
        grad_x, grad_h_prev, *weights = rnn_step_backward(grad_hs[:, t] + grad_h_prev, caches[t])
        grads_x.append(grad_x)
        total = weights if total is None else [s + w for s, w in zip(total, weights)]
    return (jnp.stack(grads_x[::-1], axis=1), grad_h_prev, *total)


def lstm_step_forward(x, h_prev, c_prev, W_x, W_h, b):
    """One LSTM step (gates i, f, g, o stacked in 4H). Returns (h, c, cache)."""
    H = h_prev.shape[1]
    a = x @ W_x.T + h_prev @ W_h.T + b
    i, f, o = (jax.nn.sigmoid(a[:, k * H:(k + 1) * H]) for k in (0, 1, 3))
    g = jnp.tanh(a[:, 2 * H:3 * H])
    c = f * c_prev + i * g
    h = o * jnp.tanh(c)
    return h, c, (x, h_prev, c_prev, W_x, W_h, i, f, g, o, c)


def lstm_step_backward(grad_h, grad_c, cache):
    """Backward of one LSTM step given grad_{h_t} E and the gradient of c_t arriving from step t+1.
    Returns (grad_x, grad_h_prev, grad_c_prev, grad_W_x, grad_W_h, grad_b)."""
    x, h_prev, c_prev, W_x, W_h, i, f, g, o, c = cache
    tanh_c = jnp.tanh(c)
    grad_c = grad_c + grad_h * o * (1 - tanh_c ** 2)
    delta = jnp.concatenate([grad_c * g * i * (1 - i), grad_c * c_prev * f * (1 - f),
                             grad_c * i * (1 - g ** 2), grad_h * tanh_c * o * (1 - o)], axis=1)
    return delta @ W_x, delta @ W_h, grad_c * f, delta.T @ x, delta.T @ h_prev, delta.sum(axis=0)


def lstm_forward(x, h0, c0, W_x, W_h, b):
    """The LSTM layer as a Python loop of ``lstm_step_forward``. Returns (hs, c_T, caches)."""
    h, c, hs, caches = h0, c0, [], []
    for t in range(x.shape[1]):
        h, c, cache = lstm_step_forward(x[:, t], h, c, W_x, W_h, b)
        hs.append(h)
        caches.append(cache)
    return jnp.stack(hs, axis=1), c, caches


def lstm_backward(grad_hs, grad_cT, caches):
    """BPTT for the LSTM as a Python loop. Returns (grad_x, grad_h0, grad_c0, grad_W_x, grad_W_h, grad_b)."""
    grad_h_prev, grad_c, grads_x, total = jnp.zeros_like(grad_hs[:, 0]), grad_cT, [], None
    for t in reversed(range(grad_hs.shape[1])):
        grad_x, grad_h_prev, grad_c, *weights = lstm_step_backward(grad_hs[:, t] + grad_h_prev, grad_c, caches[t])
        grads_x.append(grad_x)
        total = weights if total is None else [s + w for s, w in zip(total, weights)]
    return (jnp.stack(grads_x[::-1], axis=1), grad_h_prev, grad_c, *total)
