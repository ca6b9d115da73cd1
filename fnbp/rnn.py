"""Recurrent layers (Elman, LSTM, GRU) with back-propagation through time derived by hand.

Unrolled in time, a recurrent layer is the notes' general graph: the same W_h (and W_x,
b) is consumed at every step t = 1..T, so its gradient is the sum over the T consumers
(the fan-out rule), and h_{t-1} feeds both the output at t-1 and step t, so its
gradient is the sum of the two paths.

Shapes (batch first, weights as ``dense``'s (n_out, n_in), k gates stacked on n_out):

    x    (B, T, n_in)      the input sequence x_1..x_T
    h0   (B, H)            the initial state h_0 (zeros for a fresh sequence)
    W_x  (k H, n_in)       input weights, gate blocks stacked in PyTorch's order
    W_h  (k H, H)          recurrent weights, same blocks
    hs   (B, T, H)         every h_t, t = 1..T (the layer's output)

k = 1 (Elman), 4 (LSTM: i, f, g, o), 3 (GRU: r, z, n).

Every layer is ONE rule (``fnbp.rule``).  Its forward is a ``lax.scan`` over t that keeps
what the backward needs; its backward is the reverse scan of BPTT that computes the
pre-activation gradients delta_t = grad_{a_t} E, carrying grad_{h_t} E (and grad_{c_t} E)
from step t+1 to step t.  The three big products are not done step by step but as ONE
GEMM over all T B rows each (cuDNN's arrangement):

    before the forward scan:  A_x = X W_x^T                      (T B, n_in)(n_in, k H)
    after the backward scan:  grad W_x = sum_t delta_t^T x_t      one (k H, T B)(T B, n_in) GEMM
                              grad W_h = sum_t delta_t^T h_{t-1}  one (k H, T B)(T B, H) GEMM
                              grad x   = delta W_x                (T B, k H)(k H, n_in)

so only the truly sequential products h_{t-1} W_h^T (forward) and delta_t W_h
(backward) stay inside the loops.  Inside the rules the time axis leads ((T, B, .) arrays):
``lax.scan`` walks the leading axis.  The bias is added inside the forward loop, fused with the
gates (no extra pass over A_x).  The LSTM and the GRU also keep their loops lean (``_lstm_fwd``,
``_gru_fwd``): the forward stores the backward's local derivatives rather than the gates, and one
(T, B, kH) buffer holds A_x, then those derivatives, then delta (the GRU's delta^u), each loop
overwriting row t in place.

``fnbp.rnn_steps`` has the same equations one step at a time with Python loops (CS231n's
``rnn_layers.py``), for reading; the tests check them against the fast rules.  ``fnbp.reference_rnn`` has the plain-jnp
scans that autodiff differentiates as the oracle.

Per-example extensions (``fnbp.extensions``; ``fnbp.per_example``, ``fnbp.dp``): each rule registers one view per
weight over the S = T steps, W_x against x_t and W_h against h_{t-1}, with the delta_t of the rule's own reverse
scan (``_recurrent_rows`` derives it), so per-example gradients, their norms and DP-SGD's clipped sum work for
recurrent models.
"""
import jax.numpy as jnp
from jax import lax

from . import extensions, reference_rnn
from .check_cases import register as register_check
from .rules import rule

__all__ = ["elman", "lstm", "lstm_sequence", "gru", "check_rnn_shapes"]


# ------------------------------------------------------------------------------------------------
# shapes
# ------------------------------------------------------------------------------------------------
def check_rnn_shapes(name, k, W_x, W_h, biases, x, states):
    """Raise a ValueError naming ``name`` when the arguments of a k-gate recurrent layer do not fit.

    biases: list of (arg name, array) each of shape (k H,); states: list of (arg name, array) each (B, H).
    """
    gates = {1: "H", 3: "3 H (r, z, n)", 4: "4 H (i, f, g, o)"}[k]
    if jnp.ndim(W_h) != 2 or jnp.shape(W_h)[0] != k * jnp.shape(W_h)[1]:
        raise ValueError(f"{name}: W_h must have shape ({gates}, H), got shape {jnp.shape(W_h)}")
    kH, H = jnp.shape(W_h)
    if jnp.ndim(W_x) != 2 or jnp.shape(W_x)[0] != kH:
        raise ValueError(f"{name}: W_x must have shape ({kH}, n_in) to match W_h of shape {jnp.shape(W_h)}, "
                         f"got shape {jnp.shape(W_x)}")
    for arg, b in biases:
        if jnp.shape(b) != (kH,):
            raise ValueError(f"{name}: {arg} must have shape ({kH},) to match W_h of shape {jnp.shape(W_h)}, "
                             f"got shape {jnp.shape(b)}")
    n_in = jnp.shape(W_x)[1]
    if jnp.ndim(x) != 3 or jnp.shape(x)[2] != n_in:
        raise ValueError(f"{name}: x must have shape (batch, T, n_in) with n_in = {n_in} (the width of W_x of "
                         f"shape {jnp.shape(W_x)}), got shape {jnp.shape(x)}")
    B, T, _ = jnp.shape(x)
    if T < 1:
        raise ValueError(f"{name}: x must have at least one time step, got shape {jnp.shape(x)}")
    for arg, s in states:
        if jnp.shape(s) != (B, H):
            raise ValueError(f"{name}: {arg} must have shape (batch, H) = ({B}, {H}), got shape {jnp.shape(s)}")
    for arg, a in [("W_x", W_x), ("W_h", W_h), ("x", x)] + list(biases) + list(states):
        if not jnp.issubdtype(jnp.result_type(a), jnp.floating):
            raise ValueError(f"{name}: {arg} must be a floating array, got dtype {jnp.result_type(a)}")


def _input_projection(W_x, x):
    """A_x = X W_x^T for all T B rows at once, time-major: x (B, T, n_in) -> (T, B, k H), and x_tm.  (The bias
    is added in the loop, where XLA fuses it with the gates: no extra pass over the (T, B, k H) array.)"""
    x_tm = jnp.swapaxes(x, 0, 1)                                                   # (T, B, n_in)
    return lax.dot_general(x_tm, W_x, (((2,), (1,)), ((), ()))), x_tm


def _weight_grads(delta_x, delta_h, W_x, x_tm, h_prev):
    """The three products after the backward scan, each ONE GEMM over the T B rows.

    delta_x, delta_h (T, B, k H): the gradients of W_x x_t (+ b) and of W_h h_{t-1} (the same delta_t
    except in the GRU); x_tm (T, B, n_in); h_prev (T, B, H) = h_0..h_{T-1}.
    grad W_x = sum_t delta_t^T x_t, grad W_h = sum_t delta_t^T h_{t-1}, grad x_t = delta_t W_x.
    """
    both = (((0, 1), (0, 1)), ((), ()))
    grad_W_x = lax.dot_general(delta_x, x_tm, both)                                # (k H, n_in)
    grad_W_h = lax.dot_general(delta_h, h_prev, both)                              # (k H, H)
    grad_x = jnp.swapaxes(lax.dot_general(delta_x, W_x, (((2,), (0,)), ((), ()))), 0, 1)   # (B, T, n_in)
    return grad_W_x, grad_W_h, grad_x


def _shifted(h0, hs_tm):
    """h_prev = (h_0, h_1, ..., h_{T-1}) time-major, from h_0 (B, H) and hs (T, B, H) = h_1..h_T."""
    return jnp.concatenate([h0[None], hs_tm[:-1]], axis=0)


def _matmul_T(h, W):
    """h W^T for h (B, n) and W (m, n): (B, m)."""
    return lax.dot_general(h, W, (((1,), (1,)), ((), ())))


def _matmul(delta, W):
    """delta W for delta (B, m) and W (m, n): (B, n), i.e. W^T delta per row."""
    return lax.dot_general(delta, W, (((1,), (0,)), ((), ())))


# ------------------------------------------------------------------------------------------------
# Elman (tanh) RNN
# ------------------------------------------------------------------------------------------------
def _elman_fwd(W_x, W_h, b, x, h0):
    """Elman (tanh) recurrent layer over a whole sequence; PyTorch's ``nn.RNN`` with b = b_ih + b_hh.

    Forward, t = 1..T:
        a_t = W_x x_t + W_h h_{t-1} + b,     h_t = tanh(a_t)
    Backward (BPTT), t = T..1, with grad_{h_T} coming only from the output:
        grad_{h_t} E = e_t + W_h^T delta_{t+1}          (e_t = the gradient of E at the output h_t; delta_{T+1} = 0)
        delta_t      = grad_{h_t} E (.) (1 - h_t^2)
        grad W_x = sum_t delta_t x_t^T,  grad W_h = sum_t delta_t h_{t-1}^T,  grad b = sum_t delta_t
        grad x_t = W_x^T delta_t,        grad h_0 = W_h^T delta_1

    Args: W_x (H, n_in), W_h (H, H), b (H,), x (B, T, n_in), h0 (B, H).
    Returns hs (B, T, H), every h_t.  Residuals: W_x, W_h, x_tm, h0 and hs (time-major).
    """
    A_x, x_tm = _input_projection(W_x, x)                          # (T, B, H): one GEMM for all steps

    def step(h_prev, a_x):                                         # b added here, fused with the tanh
        h = jnp.tanh(a_x + b + _matmul_T(h_prev, W_h))             # h_t = tanh(W_x x_t + W_h h_{t-1} + b)
        return h, h
    _, hs_tm = lax.scan(step, h0, A_x)
    return jnp.swapaxes(hs_tm, 0, 1), (W_x, W_h, x_tm, h0, hs_tm)


def _elman_deltas(res, g):
    """BPTT's reverse scan: (delta (T, B, H) time-major, grad h_0)."""
    W_x, W_h, x_tm, h0, hs_tm = res

    def step(grad_h_next, inputs):                                 # grad_h_next = W_h^T delta_{t+1}
        grad_out, h_t = inputs
        delta = (grad_out + grad_h_next) * (1 - h_t * h_t)              # delta_t = grad_{h_t} E (.) tanh'(a_t)
        return _matmul(delta, W_h), delta                          # W_h^T delta_t, for step t-1
    grad_h0, delta = lax.scan(step, jnp.zeros_like(h0), (jnp.swapaxes(g, 0, 1), hs_tm), reverse=True)
    return delta, grad_h0


def _elman_bwd(res, g):
    W_x, W_h, x_tm, h0, hs_tm = res
    delta, grad_h0 = _elman_deltas(res, g)
    grad_W_x, grad_W_h, grad_x = _weight_grads(delta, delta, W_x, x_tm, _shifted(h0, hs_tm))
    return grad_W_x, grad_W_h, jnp.sum(delta, axis=(0, 1)), grad_x, grad_h0


def _check_elman(W_x, W_h, b, x, h0):
    check_rnn_shapes("fnbp.rnn.elman", 1, W_x, W_h, [("b", b)], x, [("h0", h0)])


elman = rule(_elman_fwd, _elman_bwd, name="elman", check=_check_elman)


# ------------------------------------------------------------------------------------------------
# LSTM
# ------------------------------------------------------------------------------------------------
def _sigmoid(a):
    return 0.5 * jnp.tanh(0.5 * a) + 0.5                          # = 1 / (1 + e^-a), no overflow


def _gate_constants(H, dtype):
    """(alpha, beta), each (4H,): the four gates computed with ONE tanh over all 4H columns,
    gate = alpha tanh(alpha a) + beta, which is sigma(a) = (1 + tanh(a / 2)) / 2 on the i, f, o blocks
    (alpha = beta = 1/2) and tanh(a) on the g block (alpha = 1, beta = 0); then gate'(a) = alpha^2 - (gate - beta)^2,
    i.e. sigma (1 - sigma) and 1 - tanh^2.  (No slicing and concatenating of the pre-activations in the loop.)"""
    half, one, zero = jnp.full((H,), 0.5, dtype), jnp.ones((H,), dtype), jnp.zeros((H,), dtype)
    return jnp.concatenate([half, half, one, half]), jnp.concatenate([half, half, zero, half])


def _lstm_fwd(W_x, W_h, b, x, h0, c0):
    """LSTM layer over a whole sequence; PyTorch's ``nn.LSTM`` (gate order i, f, g, o; b = b_ih + b_hh).

    Forward, t = 1..T, with a_t = W_x x_t + W_h h_{t-1} + b split into four H-blocks (a^i, a^f, a^g, a^o):
        i_t = sigma(a^i),  f_t = sigma(a^f),  g_t = tanh(a^g),  o_t = sigma(a^o)
        c_t = f_t (.) c_{t-1} + i_t (.) g_t,     h_t = o_t (.) tanh(c_t)
    Backward (BPTT), t = T..1, carrying grad_{h_t} E and grad_{c_t} E (grad_{c_T} E = the cotangent of c_T):
        grad_{h_t} E = e_t + W_h^T delta_{t+1}          (e_t = the gradient of E at the output h_t)
        grad_{c_t} E = f_{t+1} (.) grad_{c_{t+1}} E + grad_{h_t} E (.) o_t (.) (1 - tanh^2 c_t)
        delta^o = grad_{h_t} E (.) tanh(c_t) (.) o (1 - o)      delta^i = grad_{c_t} E (.) g_t (.) i (1 - i)
        delta^f = grad_{c_t} E (.) c_{t-1} (.) f (1 - f)        delta^g = grad_{c_t} E (.) i_t (.) (1 - g^2)
        delta_t = (delta^i, delta^f, delta^g, delta^o);  grad_{c_{t-1}} E = grad_{c_t} E (.) f_t
        grad W_x = sum_t delta_t x_t^T,  grad W_h = sum_t delta_t h_{t-1}^T,  grad b = sum_t delta_t
        grad x_t = W_x^T delta_t,  grad h_0 = W_h^T delta_1,  grad c_0 = grad_{c_1} E (.) f_1

    The forward keeps, per step, the backward's local derivatives, so that the backward step is a few products:
        D_t = (g_t (.) i (1 - i),  c_{t-1} (.) f (1 - f),  i_t (.) (1 - g^2),  tanh(c_t) (.) o (1 - o))   (B, 4H)
        dh_dc_t = o_t (.) (1 - tanh^2 c_t)  (= d h_t / d c_t)  and  f_t                             (B, H) each
    and then delta_t = (grad_{c_t} E, grad_{c_t} E, grad_{c_t} E, grad_{h_t} E) (.) D_t, with
    grad_{c_t} E = f_{t+1} (.) grad_{c_{t+1}} E + grad_{h_t} E (.) dh_dc_t.

    Args: W_x (4H, n_in), W_h (4H, H), b (4H,), x (B, T, n_in), h0 (B, H), c0 (B, H).
    Returns (hs, c_T): hs (B, T, H) every h_t, c_T (B, H) the last cell state.
    Residuals: W_x, W_h, x_tm, h0, c0, D (T, B, 4H), (dh_dc, f) (T, B, 2H), hs (T, B, H).

    The gates are one tanh over the 4H columns (``_gate_constants``), with alpha folded into W_x, W_h^T and b
    once, outside the loop; b is added inside the loop, fused with the gates.  ONE (T, B, 4H) buffer carries
    A_x = X (alpha W_x)^T into the forward loop, which overwrites row t with D_t once it has read it; the backward
    loop reads D_t and overwrites it with delta_t (``_lstm_deltas``).  XLA updates that buffer in place, so no
    zero-filled (T, B, 4H) stack is allocated for D or for delta.
    """
    H, T = W_h.shape[1], x.shape[1]
    alpha, beta = _gate_constants(H, W_h.dtype)
    A_x, x_tm = _input_projection(W_x * alpha[:, None], x)        # alpha W_x x_t for all t: one GEMM, (T, B, 4H)
    W_h_T = jnp.transpose(W_h * alpha[:, None])                   # (H, 4H), once: h_{t-1} W_h^T in the loop
    alpha_b = alpha * b

    def step(carry, t):
        h_prev, c_prev, buf = carry                                # buf row t: alpha W_x x_t; rows < t: D
        alpha_a = lax.dynamic_index_in_dim(buf, t, keepdims=False) + alpha_b + _matmul(h_prev, W_h_T)
        gate = alpha * jnp.tanh(alpha_a) + beta                    # (i, f, g, o) at once
        i, f, g, o = gate[:, :H], gate[:, H:2 * H], gate[:, 2 * H:3 * H], gate[:, 3 * H:]
        c = f * c_prev + i * g
        tanh_c = jnp.tanh(c)
        h = o * tanh_c
        # gate'(a) column by column: i (1 - i), f (1 - f), 1 - g^2, o (1 - o) = alpha^2 - (gate - beta)^2
        D = jnp.concatenate([g, c_prev, i, tanh_c], axis=1) * (alpha * alpha - (gate - beta) ** 2)
        buf = lax.dynamic_update_index_in_dim(buf, D, t, 0)
        return (h, c, buf), (jnp.concatenate([o * (1 - tanh_c * tanh_c), f], axis=1), h)
    (_, c_T, D), (dh_dc_f, hs_tm) = lax.scan(step, (h0, c0, A_x), jnp.arange(T))
    return (jnp.swapaxes(hs_tm, 0, 1), c_T), (W_x, W_h, x_tm, h0, c0, D, dh_dc_f, hs_tm)


def _lstm_deltas(res, cts):
    """BPTT's reverse scan: (delta (T, B, 4H) time-major, grad h_0, grad c_0); delta_t overwrites D_t in D's
    buffer (see ``_lstm_fwd``)."""
    W_x, W_h, x_tm, h0, c0, D, dh_dc_f, hs_tm = res
    g_hs, g_cT = cts
    H, T = W_h.shape[1], D.shape[0]

    def step(carry, inputs):
        grad_h_next, grad_c, buf = carry                           # W_h^T delta_{t+1}, f_{t+1} grad_{c_{t+1}} E
        grad_out, dh_dc_f_t, t = inputs
        grad_h = grad_out + grad_h_next
        grad_c = grad_c + grad_h * dh_dc_f_t[:, :H]
        D_t = lax.dynamic_index_in_dim(buf, t, keepdims=False)
        delta = jnp.concatenate([grad_c, grad_c, grad_c, grad_h], axis=1) * D_t   # (delta^i, delta^f, delta^g, delta^o)
        buf = lax.dynamic_update_index_in_dim(buf, delta, t, 0)
        return (_matmul(delta, W_h), grad_c * dh_dc_f_t[:, H:], buf), None
    (grad_h0, grad_c0, delta), _ = lax.scan(step, (jnp.zeros_like(h0), g_cT, D),
                                            (jnp.swapaxes(g_hs, 0, 1), dh_dc_f, jnp.arange(T)), reverse=True)
    return delta, grad_h0, grad_c0


def _lstm_bwd(res, cts):
    W_x, x_tm, h0, hs_tm = res[0], res[2], res[3], res[7]
    delta, grad_h0, grad_c0 = _lstm_deltas(res, cts)
    grad_W_x, grad_W_h, grad_x = _weight_grads(delta, delta, W_x, x_tm, _shifted(h0, hs_tm))
    return grad_W_x, grad_W_h, jnp.sum(delta, axis=(0, 1)), grad_x, grad_h0, grad_c0


def _check_lstm(W_x, W_h, b, x, h0, c0):
    check_rnn_shapes("fnbp.rnn.lstm", 4, W_x, W_h, [("b", b)], x, [("h0", h0), ("c0", c0)])


lstm = rule(_lstm_fwd, _lstm_bwd, name="lstm", check=_check_lstm)


def _lstm_sequence_fwd(W_x, W_h, b, x, h0, c0):
    """The LSTM layer's output alone: hs (B, T, H) of ``lstm`` (c_T dropped), for graphs whose nodes have one
    output (``fnbp.nn.LSTM``).  Backward: ``lstm``'s with a zero cotangent for c_T."""
    (hs, _), res = _lstm_fwd(W_x, W_h, b, x, h0, c0)
    return hs, res


def _lstm_sequence_bwd(res, g):
    c0 = res[4]
    return _lstm_bwd(res, (g, jnp.zeros_like(c0)))


lstm_sequence = rule(_lstm_sequence_fwd, _lstm_sequence_bwd, name="lstm_sequence", check=_check_lstm)


# ------------------------------------------------------------------------------------------------
# GRU
# ------------------------------------------------------------------------------------------------
def _gru_fwd(W_x, W_h, b_x, b_h, x, h0):
    """GRU layer over a whole sequence; PyTorch's ``nn.GRU`` (blocks r, z, n; b_x = b_ih, b_h = b_hh).

    Forward, t = 1..T, with u_t = W_x x_t + b_x and v_t = W_h h_{t-1} + b_h split into (r, z, n) blocks:
        r_t = sigma(u^r + v^r),  z_t = sigma(u^z + v^z),  n_t = tanh(u^n + r_t (.) v^n)
        h_t = (1 - z_t) (.) n_t + z_t (.) h_{t-1}
    Backward (BPTT), t = T..1:
        grad_{h_t} E = e_t + W_h^T delta^v_{t+1} + z_{t+1} (.) grad_{h_{t+1}} E    (e_t: the gradient at output h_t)
        delta^n = grad_{h_t} E (.) (1 - z_t) (.) (1 - n_t^2)             (grad of u^n)
        delta^z = grad_{h_t} E (.) (h_{t-1} - n_t) (.) z (1 - z)
        delta^r = delta^n (.) v^n_t (.) r (1 - r)
        delta^u_t = (delta^r, delta^z, delta^n)               the gradient of u_t = W_x x_t + b_x
        delta^v_t = (delta^r, delta^z, r_t (.) delta^n)       the gradient of v_t = W_h h_{t-1} + b_h
        grad W_x = sum_t delta^u_t x_t^T,  grad b_x = sum_t delta^u_t,  grad x_t = W_x^T delta^u_t
        grad W_h = sum_t delta^v_t h_{t-1}^T,  grad b_h = sum_t delta^v_t
        grad h_0 = W_h^T delta^v_1 + z_1 (.) grad_{h_1} E

    The forward keeps, per step, the backward's local derivatives, so that the backward step is a few products:
        D_t = (v^n_t (.) r (1 - r),  (h_{t-1} - n_t) (.) z (1 - z),  (1 - z_t) (.) (1 - n_t^2))    (B, 3H)
    and (r_t, z_t) (B, 2H); then delta^n = grad_{h_t} E (.) D^n, delta^z = grad_{h_t} E (.) D^z and
    delta^r = delta^n (.) D^r.  As in ``_lstm_fwd``, ONE (T, B, 3H) buffer carries U = X W_x^T into the forward
    loop, which overwrites row t with D_t once it has read it, and the backward loop overwrites D_t with delta^u_t,
    in place.

    Args: W_x (3H, n_in), W_h (3H, H), b_x (3H,), b_h (3H,), x (B, T, n_in), h0 (B, H).
    Returns hs (B, T, H).  Residuals: W_x, W_h, x_tm, h0, D (T, B, 3H), (r, z) (T, B, 2H), hs (T, B, H).
    """
    H, T = W_h.shape[1], x.shape[1]
    U, x_tm = _input_projection(W_x, x)                            # (T, B, 3H): one GEMM for all steps
    W_h_T = jnp.transpose(W_h)                                     # (H, 3H), once: h_{t-1} W_h^T in the loop

    def step(carry, t):
        h_prev, buf = carry                                        # buf row t: W_x x_t; rows < t: D
        u = lax.dynamic_index_in_dim(buf, t, keepdims=False) + b_x   # b_x added here, fused with the gates
        v = _matmul(h_prev, W_h_T) + b_h
        rz = _sigmoid(u[:, :2 * H] + v[:, :2 * H])
        r, z = rz[:, :H], rz[:, H:]
        v_n = v[:, 2 * H:]
        n = jnp.tanh(u[:, 2 * H:] + r * v_n)
        h = n + z * (h_prev - n)                                   # (1 - z) n + z h_{t-1}
        D = jnp.concatenate([v_n * r * (1 - r), (h_prev - n) * z * (1 - z), (1 - z) * (1 - n * n)], axis=1)
        buf = lax.dynamic_update_index_in_dim(buf, D, t, 0)
        return (h, buf), (rz, h)
    (_, D), (rz, hs_tm) = lax.scan(step, (h0, U), jnp.arange(T))
    return jnp.swapaxes(hs_tm, 0, 1), (W_x, W_h, x_tm, h0, D, rz, hs_tm)


def _gru_deltas(res, g):
    """BPTT's reverse scan: (delta^u, delta^v (T, B, 3H) time-major, grad h_0); delta^u_t overwrites D_t in D's
    buffer (see ``_gru_fwd``)."""
    W_x, W_h, x_tm, h0, D, rz, hs_tm = res
    H, T = W_h.shape[1], D.shape[0]

    def step(carry, inputs):                                       # W_h^T delta^v_{t+1} + z_{t+1} grad_{h_{t+1}} E
        grad_h_next, buf = carry
        grad_out, rz_t, t = inputs
        r, z = rz_t[:, :H], rz_t[:, H:]
        grad_h = grad_out + grad_h_next
        D_t = lax.dynamic_index_in_dim(buf, t, keepdims=False)
        delta_n = grad_h * D_t[:, 2 * H:]
        delta_z = grad_h * D_t[:, H:2 * H]
        delta_r = delta_n * D_t[:, :H]
        buf = lax.dynamic_update_index_in_dim(buf, jnp.concatenate([delta_r, delta_z, delta_n], axis=1), t, 0)
        delta_v = jnp.concatenate([delta_r, delta_z, r * delta_n], axis=1)
        return (_matmul(delta_v, W_h) + z * grad_h, buf), delta_v
    (grad_h0, delta_u), delta_v = lax.scan(step, (jnp.zeros_like(h0), D), (jnp.swapaxes(g, 0, 1), rz, jnp.arange(T)),
                                           reverse=True)
    return delta_u, delta_v, grad_h0


def _gru_bwd(res, g):
    W_x, _, x_tm, h0, _, _, hs_tm = res
    delta_u, delta_v, grad_h0 = _gru_deltas(res, g)
    grad_W_x, grad_W_h, grad_x = _weight_grads(delta_u, delta_v, W_x, x_tm, _shifted(h0, hs_tm))
    return (grad_W_x, grad_W_h, jnp.sum(delta_u, axis=(0, 1)), jnp.sum(delta_v, axis=(0, 1)), grad_x, grad_h0)


def _check_gru(W_x, W_h, b_x, b_h, x, h0):
    check_rnn_shapes("fnbp.rnn.gru", 3, W_x, W_h, [("b_x", b_x), ("b_h", b_h)], x, [("h0", h0)])


gru = rule(_gru_fwd, _gru_bwd, name="gru", check=_check_gru)


# ------------------------------------------------------------------------------------------------
# per-example extensions (fnbp.extensions): one view per weight, from the rule's own reverse scan
# ------------------------------------------------------------------------------------------------
def _batch_major(a):
    return jnp.swapaxes(a, 0, 1)                                  # (T, B, .) -> (B, T, .): S = T positions


def _recurrent_rows(x_tm, h_prev_tm, delta_x, delta_h):
    """(Rows of W_x (and its bias), Rows of W_h (and its bias)), each over the S = T steps of every example.

    Example n's loss E_n reaches W_x, W_h and b only through its own pre-activations
    a_{n,t} = W_x x_{n,t} + W_h h_{n,t-1} + b, t = 1..T (the rule acts on each row of the batch alone), so under
    reduction='sum' grad_{a_{n,t}} E = grad_{a_{n,t}} E_n = delta_{n,t}, row n of the delta_t that BPTT's reverse
    scan computes.  The fan-out rule over the T consumers of each weight then gives, per example,

        grad_{W_x} E_n = sum_t delta_{n,t} x_{n,t}^T     = delta_n^T P_n,  P_n = (x_{n,1}; ...; x_{n,T})     (T, n_in)
        grad_{W_h} E_n = sum_t delta_{n,t} h_{n,t-1}^T   = delta_n^T P_n,  P_n = (h_{n,0}; ...; h_{n,T-1})   (T, H)
        grad_b E_n     = sum_t delta_{n,t}

    i.e. the weight-gradient GEMMs of ``_weight_grads`` with the sum over n left open.  The GRU's W_x and W_h see
    different deltas (delta^u, delta^v: see ``_gru_fwd``).
    """
    return (extensions.Rows(_batch_major(x_tm), _batch_major(delta_x)),
            extensions.Rows(_batch_major(h_prev_tm), _batch_major(delta_h)))


def _elman_rows(args, options, g, res):
    """Elman: W_x with rows x_t and b, W_h with rows h_{t-1}; both with delta_t = grad_{h_t} E (.) (1 - h_t^2)."""
    _, _, x_tm, h0, hs_tm = res
    delta, _ = _elman_deltas(res, g)
    return _recurrent_rows(x_tm, _shifted(h0, hs_tm), delta, delta)


def _lstm_rows(args, options, cts, res):
    """LSTM (``lstm``: cts = (grad hs, grad c_T)): as Elman's, delta_t = (delta^i, delta^f, delta^g, delta^o)."""
    delta, _, _ = _lstm_deltas(res, cts)
    return _recurrent_rows(res[2], _shifted(res[3], res[7]), delta, delta)


def _lstm_sequence_rows(args, options, g, res):
    """``lstm_sequence``: ``lstm``'s rows with a zero cotangent for c_T (the node outputs hs alone)."""
    return _lstm_rows(args, options, (g, jnp.zeros_like(res[4])), res)


def _gru_rows(args, options, g, res):
    """GRU: W_x and b_x with rows x_t and delta^u_t = (delta^r, delta^z, delta^n) (the gradient of
    u_t = W_x x_t + b_x); W_h and b_h with rows h_{t-1} and delta^v_t = (delta^r, delta^z, r_t (.) delta^n) (the
    gradient of v_t = W_h h_{t-1} + b_h: v^n enters n_t = tanh(u^n + r_t (.) v^n) through r_t, so the n-block of
    grad_{W_h} E_n is sum_t (r_{n,t} (.) delta^n_{n,t}) h_{n,t-1}^T and that of grad_{b_h} E_n sum_t r (.) delta^n)."""
    _, _, x_tm, h0, _, _, hs_tm = res
    delta_u, delta_v, _ = _gru_deltas(res, g)
    return _recurrent_rows(x_tm, _shifted(h0, hs_tm), delta_u, delta_v)


# args: elman/lstm (W_x, W_h, b, x, h0[, c0]): W_x pairs with b, W_h has no bias of its own;
# gru (W_x, W_h, b_x, b_h, x, h0): W_x with b_x, W_h with b_h
extensions.register(elman, view=_elman_rows, weight=(0, 1), bias=(2, None), residuals=True)
extensions.register(lstm, view=_lstm_rows, weight=(0, 1), bias=(2, None), residuals=True)
extensions.register(lstm_sequence, view=_lstm_sequence_rows, weight=(0, 1), bias=(2, None), residuals=True)
extensions.register(gru, view=_gru_rows, weight=(0, 1), bias=(2, 3), residuals=True)


# ------------------------------------------------------------------------------------------------
# fnbp check rows (the plain-jnp scans of fnbp.reference_rnn as the references)
# ------------------------------------------------------------------------------------------------
def _both_outputs(hs, c_T):
    return jnp.concatenate([hs.reshape(-1), c_T.reshape(-1)])     # one array: every output's cotangent checked


register_check(elman, reference_rnn.elman, "elman", batch_only=True)
register_check(lambda *a: _both_outputs(*lstm(*a)), lambda *a: _both_outputs(*reference_rnn.lstm(*a)), "lstm",
               covers=lstm, name="lstm", batch_only=True)
register_check(lstm_sequence, lambda *a: reference_rnn.lstm(*a)[0], "lstm", batch_only=True)
register_check(gru, reference_rnn.gru, "gru", batch_only=True)
