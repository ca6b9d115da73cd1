"""The dense (fully connected) layer and its hand-derived backward rule.

Notation of the notes: h_{k-1} is the layer's input, W_k of shape (n_out, n_in)
(W[i, j] links node j of the previous layer to node i), b_k of shape (n_out,),
a_k = W_k h_{k-1} + b_k its pre-activation and delta_k = grad_{a_k} E.

One rule covers one example (h of shape (n_in,)) and a mini-batch (h of shape
(batch, n_in), or any number of leading batch axes): the weight gradient is a
single matrix product that contracts the batch axes (delta^T H), never a
batch x n_out x n_in tensor that is then summed.  ``jax.vmap`` is for what
really is per example (per-example gradients), ensembles and sweeps; batches go
through this matrix-form rule.
"""
import jax.numpy as jnp
from jax import lax

from . import extensions
from .rules import out_sharding, rule

__all__ = ["dense", "dense_forward", "dense_backward", "weight_gradient", "check_dense_shapes", "NARROW_GRAD_W"]


def check_dense_shapes(W, b, h, name="fnbp.dense"):
    """Raise ValueError at trace time when W, b and h do not fit together."""
    if jnp.ndim(W) != 2:
        raise ValueError(f"{name}: W must be a matrix of shape (n_out, n_in), got shape {jnp.shape(W)}")
    n_out, n_in = jnp.shape(W)
    if jnp.shape(b) != (n_out,):
        raise ValueError(f"{name}: b must have shape (n_out,) = ({n_out},) to match W of shape {jnp.shape(W)}, "
                         f"got shape {jnp.shape(b)}")
    if jnp.ndim(h) < 1 or jnp.shape(h)[-1] != n_in:
        raise ValueError(f"{name}: h must have shape (n_in,) or (batch, n_in) with n_in = {n_in} "
                         f"(the width of W of shape {jnp.shape(W)}), got shape {jnp.shape(h)}")


NARROW_GRAD_W = 64
"""Widest layer (n_out) whose weight gradient is computed from a materialised delta^T.

XLA:CPU (jax 0.10) runs a dot whose left operand is contracted on its leading
axis -- delta^T H written as ``dot_general(delta, H, contract 0 with 0)`` --
as a transposed-LHS GEMM outside YNNPACK.  For a narrow delta (a 10-class
output layer) that kernel is slow: measured on the benchmark machine
(experiments/bench.py, 2-core Xeon), the (10 x B)(B x 512) product ran 1.3-3x
faster at B = 128..512 with delta^T copied to an (n_out, B) array first (the
copy is B*n_out floats, negligible), equal at B = 32, 64 and 2048.  For the
wide (512-unit) layers the copied layout was not faster (mixed, within the
noise, slower at B = 2048), so they keep the in-place contraction.
"""


def dense_forward(W, b, h_prev):
    """Dense layer a = W h_prev + b with the hand-derived backward rule.

    Args:
      W: weights of shape (n_out, n_in); W[i, j] links input node j to output node i.
      b: biases of shape (n_out,).
      h_prev: the previous layer's output h_{k-1}, shape (n_in,) or (batch, n_in).

    Returns a of shape (n_out,) or (batch, n_out) -- for a mini-batch H (rows are
    examples) A = H W^T + b -- and, from ``dense.rule.fwd``, the residuals
    (W, h_prev) that the backward needs.

    Backward (``dense_backward``): grad_W = delta h^T (delta^T H on a batch),
    grad_b = delta (summed over the batch), grad_h = W^T delta.
    Raises ValueError at trace time when the shapes do not fit.
    """
    a = lax.dot_general(h_prev, W, (((h_prev.ndim - 1,), (1,)), ((), ()))) + b
    return a, (W, h_prev)


def weight_gradient(delta2, h2, like_W=None):
    """delta^T H for delta2 (B, n_out) and h2 (B, n_in): one GEMM contracting the batch axis, laid out as
    ``NARROW_GRAD_W`` says (also the clipped sum of DP-SGD, ``fnbp.per_example``, on c (.) delta)."""
    if delta2.shape[0] > 1 and delta2.shape[1] <= NARROW_GRAD_W:
        # delta^T as its own (n_out, B) array; the barrier keeps XLA from folding the
        # transpose back into the dot's dimension numbers.
        delta_t = lax.optimization_barrier(jnp.transpose(delta2))
        return lax.dot_general(delta_t, h2, (((1,), (0,)), ((), ())), out_sharding=like_W)
    return lax.dot_general(delta2, h2, (((0,), (0,)), ((), ())), out_sharding=like_W)


def dense_backward(residuals, delta):
    """Backward of a = W h + b, given delta = grad_a E of shape (..., n_out).

        grad_W E = delta h^T              (one example)
                 = sum_n delta_n h_n^T    (mini-batch: one product delta^T H)
        grad_b E = delta                  (summed over the batch)
        grad_h E = W^T delta              (per example)

    The weight gradient is one GEMM (n_out x B)(B x n_in) that contracts the
    batch axis, so no batch x n_out x n_in temporary ever exists.  Its layout
    is chosen deliberately (see ``NARROW_GRAD_W``): for a narrow layer
    (n_out <= NARROW_GRAD_W, e.g. a 10-class output layer) delta^T is
    materialised as an (n_out, B) row-major array first, so that XLA:CPU
    runs a plain (n_out x B)(B x n_in) GEMM; otherwise the batch axis is
    contracted in place as the leading axis of both operands.  The two are
    the same product (same sums, same order of magnitude of rounding); only
    the memory layout handed to the GEMM differs.
    """
    W, h_prev = residuals
    n_out, n_in = W.shape
    delta2 = delta if delta.ndim == 2 else delta.reshape(-1, n_out)      # (B, n_out); B = 1 for one example
    h2 = h_prev if h_prev.ndim == 2 else h_prev.reshape(-1, n_in)       # (B, n_in)
    # On a mesh with Explicit axes both products contract a possibly sharded axis (the
    # batch; n_out under tensor parallelism): ask for the primal's sharding (None otherwise).
    like_W, like_h = out_sharding(W), out_sharding(h_prev)
    grad_W = weight_gradient(delta2, h2, like_W)                                        # delta^T H
    grad_b = jnp.sum(delta2, axis=0)
    grad_h = lax.dot_general(delta, W, (((delta.ndim - 1,), (0,)), ((), ())),               # W^T delta
                             out_sharding=like_h)
    return grad_W, grad_b, grad_h


dense = rule(dense_forward, dense_backward, name="dense", check=check_dense_shapes)


def _dense_rows(args, options, delta):
    """Per-example rows of a dense node: example n's input h_{k-1,n} and delta_{k,n} at each of its S
    positions (S = 1 for h of shape (B, n_in); S = T for a sequence (B, T, n_in)), so that
    grad_W E_n = delta_n^T H_n = sum_p delta_{n,p} h_{n,p}^T and grad_b E_n = sum_p delta_{n,p}."""
    W, _, h_prev = args
    B = h_prev.shape[0]
    return extensions.Rows(h_prev.reshape(B, -1, W.shape[1]), delta.reshape(B, -1, W.shape[0]))


extensions.register(dense, view=_dense_rows)
