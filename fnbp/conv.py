"""The 2-D convolution layer and its hand-derived backward rule.

Shapes (channels last for the data, like dense's (batch, n_in); PyTorch's layout
for the weights, like dense's (n_out, n_in)):

    h_prev  (B, H, W, C_in)         the layer's input h_{k-1}
    W       (C_out, C_in, kh, kw)   W[o, c, i, j] links input channel c at offset (i, j) to output channel o
    b       (C_out,)
    a       (B, H_out, W_out, C_out)   the pre-activation a_k

A convolution is a dense layer applied at every output position p = (y, x) to the
input patch under the kernel there: with P_{n,p} the patch of example n (the kh x kw
x C_in numbers h_prev[n, s y + i - pad, s x + j - pad, c], zero outside the image),

    a_{n,p} = W P_{n,p} + b          (W flattened to (C_out, kh kw C_in)).

So the notes' rules hold position by position, and the shared weights collect the
gradient of every position where they were used (the fan-out rule: sum over consumers):

    grad_W E = sum_{n,p} delta_{n,p} P_{n,p}^T        delta = grad_a E, (B, H_out, W_out, C_out)
    grad_b E = sum_{n,p} delta_{n,p}
    grad_h E = col2im(W^T delta): the patch gradient W^T delta_{n,p} added back at the
               pixels the patch came from, overlapping patches summed (a pixel feeds
               every patch that covers it: fan-out again).

``conv2d`` computes this with im2col: the kh kw shifted (strided) slices of the
padded input concatenated into the column matrix P of shape (B H_out W_out, kh kw C_in),
then ONE GEMM each for the forward (P W^T), grad_W (delta^T P) and the patch gradient
(delta W).  ``conv2d_naive`` is the same layer written as loops over offsets with
einsum, for reading; the tests check the two against each other and against
``jax.lax.conv_general_dilated``.  ``conv2d_xla`` is the same layer again with XLA's own convolution as the
forward and input-gradient primitives inside the hand-written rule (grad_h as the transposed convolution
with the flipped kernel, derived in its docstring); faster on XLA:CPU, it is the convolution of
``fnbp.cnn``'s LeNet and ``fnbp.nn.Conv2D``, and a test keeps it equal to ``conv2d``.

Padding: ``"VALID"`` (none), ``"SAME"`` (as ``lax.conv_general_dilated``: H_out =
ceil(H / stride), the total padding max((H_out - 1) stride + kh - H, 0) split with
the extra pixel at the bottom/right) or an int p (p zeros on every side).
"""
import math
import operator

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from . import extensions
from .check_cases import register as register_check
from .rules import out_sharding, rule

_CONV_CHECKS = ({"stride": 1, "padding": "SAME"}, {"stride": 2, "padding": 1})   # fnbp check's rows

__all__ = ["conv2d", "conv2d_xla", "conv2d_naive", "conv_output_size", "pad_amounts", "im2col", "col2im",
           "check_conv_shapes",
           "conv_fan_in", "as_count"]


def as_count(value, what, name, lo):
    """``value`` as a Python int >= ``lo`` if ``operator.index`` accepts it (int, numpy or concrete JAX integer
    scalars), else a ValueError naming ``name`` and ``what`` (floats, bools, strings, arrays, too small)."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}: {what} must be an integer >= {lo}, got the bool {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        shown = f"{type(value).__name__} {value!r}" if not hasattr(value, "shape") else (
            f"{type(value).__name__} of dtype {value.dtype} and shape {tuple(value.shape)}")
        raise ValueError(f"{name}: {what} must be an integer >= {lo} (a Python, numpy or JAX integer scalar), "
                        f"got {shown}") from None
    if n < lo:
        raise ValueError(f"{name}: {what} must be an integer >= {lo}, got {n}")
    return n


def _check_stride(stride, name):
    as_count(stride, "stride", name, 1)


def pad_amounts(size, k, stride, padding, name="fnbp.conv2d"):
    """(low, high) zero padding of one spatial axis of length ``size`` for a kernel of length ``k``."""
    if isinstance(padding, str) and padding.upper() == "VALID":
        return 0, 0
    if isinstance(padding, str) and padding.upper() == "SAME":
        total = max((-(-size // stride) - 1) * stride + k - size, 0)
        return total // 2, total - total // 2
    if isinstance(padding, str):
        raise ValueError(f"{name}: padding must be 'SAME', 'VALID' or an integer >= 0, got {padding!r}")
    try:
        p = as_count(padding, "padding", name, 0)
    except ValueError:
        raise ValueError(f"{name}: padding must be 'SAME', 'VALID' or an integer >= 0 (a Python, numpy or JAX "
                        f"integer scalar), got {type(padding).__name__} {padding!r}") from None
    return p, p


def conv_output_size(size, k, stride, padding, name="fnbp.conv2d"):
    """Output length of one spatial axis: floor((size + pads - k) / stride) + 1."""
    lo, hi = pad_amounts(size, k, stride, padding, name)
    if size + lo + hi < k:
        raise ValueError(f"{name}: kernel of size {k} is larger than the padded input ({size} + {lo} + {hi} = "
                         f"{size + lo + hi}) with padding={padding!r}")
    return (size + lo + hi - k) // stride + 1


def check_conv_shapes(W, b, h_prev, *, stride=1, padding="SAME", name="fnbp.conv2d"):
    """Raise a ValueError naming ``name`` at trace time when W, b, h_prev and the options do not fit."""
    _check_stride(stride, name)
    if jnp.ndim(W) != 4:
        raise ValueError(f"{name}: W must have shape (C_out, C_in, kh, kw), got shape {jnp.shape(W)}")
    C_out, C_in, kh, kw = jnp.shape(W)
    if jnp.shape(b) != (C_out,):
        raise ValueError(f"{name}: b must have shape (C_out,) = ({C_out},) to match W of shape {jnp.shape(W)}, "
                         f"got shape {jnp.shape(b)}")
    if jnp.ndim(h_prev) != 4:
        raise ValueError(f"{name}: x must have shape (batch, H, W, C_in) (channels last), got shape "
                         f"{jnp.shape(h_prev)}")
    if jnp.shape(h_prev)[3] != C_in:
        raise ValueError(f"{name}: x has {jnp.shape(h_prev)[3]} channels (last axis of shape {jnp.shape(h_prev)}) "
                         f"but W of shape {jnp.shape(W)} expects C_in = {C_in}")
    for size, k in zip(jnp.shape(h_prev)[1:3], (kh, kw)):
        conv_output_size(size, k, stride, padding, name)


def _geometry(x_shape, kh, kw, stride, padding):
    _, H, W_, _ = x_shape
    (top, bottom), (left, right) = pad_amounts(H, kh, stride, padding), pad_amounts(W_, kw, stride, padding)
    H_out = (H + top + bottom - kh) // stride + 1
    W_out = (W_ + left + right - kw) // stride + 1
    return (top, bottom, left, right), H_out, W_out


def im2col(h_prev, kh, kw, *, stride=1, padding="SAME"):
    """The patches of h_prev (B, H, W, C) as columns: (B, H_out, W_out, kh kw C), ordered (i, j, c).

    Entry [n, y, x, (i kw + j) C + c] = padded h_prev[n, stride y + i, stride x + j, c]:
    the kh kw shifted, strided slices of the padded input, concatenated on the channel axis.
    """
    (top, bottom, left, right), H_out, W_out = _geometry(h_prev.shape, kh, kw, stride, padding)
    x = jnp.pad(h_prev, ((0, 0), (top, bottom), (left, right), (0, 0))) if top + bottom + left + right else h_prev
    B, _, _, C = x.shape
    slices = [lax.slice(x, (0, i, j, 0), (B, i + (H_out - 1) * stride + 1, j + (W_out - 1) * stride + 1, C),
                        (1, stride, stride, 1))
              for i in range(kh) for j in range(kw)]
    return slices[0] if len(slices) == 1 else jnp.concatenate(slices, axis=-1)


def col2im(cols, x_shape, kh, kw, *, stride=1, padding="SAME"):
    """Adjoint of ``im2col``: add each patch entry back at the pixel it was read from.

    cols (B, H_out, W_out, kh kw C) -> (B, H, W, C).  Pixels covered by several patches
    receive the sum of their entries (overlapping patches summed); padding pixels are dropped.
    Each offset (i, j) is placed with one ``lax.pad`` (interior padding stride - 1
    spreads a strided slice back out); XLA fuses the kh kw placements and their sum.
    """
    (top, bottom, left, right), H_out, W_out = _geometry(x_shape, kh, kw, stride, padding)
    B, H, W_, C = x_shape
    Hp, Wp = H + top + bottom, W_ + left + right
    zero = jnp.zeros((), cols.dtype)
    grad = None
    for i in range(kh):
        for j in range(kw):
            k = i * kw + j
            piece = lax.slice_in_dim(cols, k * C, (k + 1) * C, axis=3)
            placed = lax.pad(piece, zero, ((0, 0, 0),
                                           (i, Hp - i - (H_out - 1) * stride - 1, stride - 1),
                                           (j, Wp - j - (W_out - 1) * stride - 1, stride - 1),
                                           (0, 0, 0)))
            grad = placed if grad is None else grad + placed
    return lax.slice(grad, (0, top, left, 0), (B, top + H, left + W_, C))


def _conv2d_fwd(W, b, h_prev, *, stride=1, padding="SAME"):
    """2-D convolution a = W * h_prev + b (cross-correlation, as every deep-learning library).

    Args:
      W: (C_out, C_in, kh, kw);  b: (C_out,);  h_prev: (B, H, W, C_in), channels last.
      stride: int >= 1;  padding: "SAME", "VALID" or an int (see the module docstring).

    Forward, per example n and output position p, with P_{n,p} the input patch there:
        a_{n,p} = W P_{n,p} + b,    a of shape (B, H_out, W_out, C_out),
    computed as one GEMM  P W^T  on the im2col matrix P (B H_out W_out, kh kw C_in).

    Backward, delta = grad_a E of shape (B, H_out, W_out, C_out):
        grad_W E = sum_{n,p} delta_{n,p} P_{n,p}^T   one GEMM delta^T P, reshaped to W's shape
        grad_b E = sum_{n,p} delta_{n,p}
        grad_h E = col2im(delta W)                   patch gradients, overlapping patches summed
    Residuals: W and the columns P (the patches, which grad_W needs), plus the input's shape.
    """
    C_out, C_in, kh, kw = W.shape
    cols = im2col(h_prev, kh, kw, stride=stride, padding=padding)           # (B, Ho, Wo, kh kw C_in)
    W_mat = jnp.transpose(W, (0, 2, 3, 1)).reshape(C_out, kh * kw * C_in)   # columns ordered (i, j, c)
    a = lax.dot_general(cols, W_mat, (((3,), (1,)), ((), ()))) + b          # P W^T + b
    return a, (W, cols, h_prev.shape)


def _conv2d_bwd(residuals, delta, *, stride, padding):
    W, cols, x_shape = residuals
    C_out, C_in, kh, kw = W.shape
    K = kh * kw * C_in
    P = cols.reshape(-1, K)                                                 # (N, K), N = B Ho Wo
    D = delta.reshape(-1, C_out)                                            # (N, C_out)
    W_mat = jnp.transpose(W, (0, 2, 3, 1)).reshape(C_out, K)
    # On a mesh with Explicit axes both products contract a possibly sharded axis (the batch
    # in delta^T P; C_out under tensor parallelism in delta W): ask for the layout of what
    # the result stands for -- W's C_out split, the columns' (B, Ho, Wo) split (None otherwise).
    grad_W_mat = lax.dot_general(D, P, (((0,), (0,)), ((), ())),            # delta^T P: (C_out, K)
                                 out_sharding=_rows_like(out_sharding(W)))
    grad_W = jnp.transpose(grad_W_mat.reshape(C_out, kh, kw, C_in), (0, 3, 1, 2))
    grad_b = jnp.sum(D, axis=0)                                             # sum of delta over n, p
    grad_cols = lax.dot_general(delta, W_mat, (((3,), (0,)), ((), ())),     # W^T delta per patch: (B, Ho, Wo, K)
                                out_sharding=out_sharding(cols))
    grad_h = col2im(grad_cols, x_shape, kh, kw, stride=stride, padding=padding)
    return grad_W, grad_b, grad_h


def _rows_like(like_W):
    """W's Explicit sharding (C_out, C_in, kh, kw) as that of the (C_out, kh kw C_in) matrix: the C_out
    split kept, the flattened patch axis whole (None when W has no Explicit sharding)."""
    if like_W is None:
        return None
    return NamedSharding(like_W.mesh, PartitionSpec((tuple(like_W.spec) + (None,))[0], None))


conv2d = rule(_conv2d_fwd, _conv2d_bwd, name="conv2d", check=check_conv_shapes)
register_check(conv2d, "conv2d", "conv", variants=_CONV_CHECKS, batch_only=True)


def _conv2d_rows(args, options, delta):
    """Per-example rows of a conv node: example n's patches P_n (S, kh kw C_in) over its S = H_out W_out
    positions (``im2col``, ordered (i, j, c)) and its delta_n (S, C_out), so grad_W E_n = delta_n^T P_n."""
    W, _, h_prev = args
    C_out, _, kh, kw = W.shape
    B = h_prev.shape[0]
    cols = im2col(h_prev, kh, kw, stride=options["stride"], padding=options["padding"])
    return extensions.Rows(cols.reshape(B, -1, cols.shape[-1]), delta.reshape(B, -1, C_out))


def conv_W(mat, W_shape):
    """(..., C_out, kh kw C_in) with columns ordered (i, j, c), as ``im2col`` -> (..., C_out, C_in, kh, kw)."""
    C_out, C_in, kh, kw = W_shape
    return jnp.moveaxis(mat.reshape(mat.shape[:-1] + (kh, kw, C_in)), -1, -3)


extensions.register(conv2d, view=_conv2d_rows, to_W=conv_W)


def _conv2d_xla_fwd(W, b, h_prev, *, stride=1, padding="SAME"):
    """The same layer as ``conv2d``, with XLA's own NHWC/HWIO convolution as the forward and
    input-gradient *primitives inside the hand-written rule* (no autodiff: JAX never sees the conv's
    transpose rules; this backward is the one derived here).

    Forward, on x_pad = h_prev zero-padded (top, bottom, left, right) by ``pad_amounts``:
        a[n, y, x, o] = b[o] + sum_{i, j, c} W[o, c, i, j] x_pad[n, s y + i, s x + j, c]
    one ``lax.conv_general_dilated`` (window strides s, "VALID" on x_pad, kernel HWIO (kh, kw, C_in, C_out)).

    Backward, delta = grad_a E of shape (B, H_out, W_out, C_out):
      grad_b E = sum_{n, y, x} delta[n, y, x]
      grad_W E = sum_{n, p} delta_{n,p} P_{n,p}^T: the im2col GEMM delta^T P of ``conv2d``, with P
               recomputed from h_prev here (the forward never materialises the patches).
      grad_x E, the flipped-kernel identity.  Per axis (rows; columns alike), the input row u of x_pad
               receives delta from every output row y and kernel row i with s y + i = u:
                   g[u] = sum_{y, i: s y + i = u} delta[y] W[i]                 (C_out -> C_in per pixel)
               Spread delta out to the stride: d~[s y] = delta[y], zeros between (length L = (H_out - 1) s + 1).
               Then g[u] = sum_i d~[u - i] W[i], a *true* convolution of d~ with W; with d~ padded by
               kh - 1 zeros on the low side, d^[m] = d~[m - (kh - 1)], and i' = kh - 1 - i:
                   g[u] = sum_{i'} d^[u + i'] W[kh - 1 - i'],
               a cross-correlation (what ``conv_general_dilated`` computes) of the padded, dilated delta
               with the spatially flipped kernel whose in/out channels are swapped (HWIO = (kh, kw, C_out,
               C_in)): a transposed convolution.  Only the rows of x that are not padding are wanted
               (u = top .. top + H - 1), so the low padding is kh - 1 - top and the high padding
               kh - 1 - bottom + (H_pad - kh + 1 - L) (the rows a stride skips get zero), either possibly
               negative (``lax.pad`` crops): one ``lax.pad`` (interior s - 1 spreads delta out) and one
               stride-1 "VALID" convolution give grad_x (B, H, W, C_in) directly.
    Residuals: W and h_prev.

    For stride 1 (and no cropping) the padding is the convolution's own window padding: XLA:CPU then takes its
    padded-convolution path, also under ``vmap`` (a separate pad in front of a "VALID" convolution there took a
    path 6x slower).  Otherwise XLA's convolution is called "VALID" on an explicitly padded operand, and for
    stride > 1 the dilated delta passes through ``lax.optimization_barrier``: XLA:CPU (jaxlib 0.10.2) folds an
    interior-padded operand into the convolution as lhs dilation and then aborts the whole process
    ("Window dimensions do not match RHS shape") for some shapes, e.g. h (1, 4, 4, 1), W (1, 1, 2, 4),
    stride 2, padding 1 -- the same shapes on which it aborts for lax's own transposes
    (``fnbp.reference.conv2d``).  The barrier costs one copy of the dilated delta, strided layers only.
    """
    C_out, C_in, kh, kw = W.shape
    (top, bottom, left, right), _, _ = _geometry(h_prev.shape, kh, kw, stride, padding)
    dtype = jnp.result_type(W, h_prev)           # XLA's convolution takes one dtype (conv2d's GEMM promotes alike)
    x = h_prev.astype(dtype)
    x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0))) if top + bottom + left + right else x
    kernel = jnp.transpose(W, (2, 3, 1, 0)).astype(dtype)                   # HWIO: (kh, kw, C_in, C_out)
    a = lax.conv_general_dilated(x, kernel, (stride, stride), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 out_sharding=_output_sharding(W, h_prev))
    return a + b, (W, h_prev)


def _output_sharding(W, h_prev):
    """On a mesh with Explicit axes: a's sharding (B, H_out, W_out, C_out) -- h_prev's batch split, W's C_out
    split (tensor parallelism) -- which ``conv_general_dilated`` does not infer; None otherwise."""
    like_W, like_h = out_sharding(W), out_sharding(h_prev)
    if like_W is None and like_h is None:
        return None
    batch = (tuple(like_h.spec) + (None,))[0] if like_h is not None else None
    c_out = (tuple(like_W.spec) + (None,))[0] if like_W is not None else None
    return NamedSharding((like_h or like_W).mesh, PartitionSpec(batch, None, None, c_out))


def _conv2d_xla_bwd(residuals, delta, *, stride, padding):
    W, h_prev = residuals
    C_out, C_in, kh, kw = W.shape
    (top, bottom, left, right), H_out, W_out = _geometry(h_prev.shape, kh, kw, stride, padding)
    _, H, W_, _ = h_prev.shape
    grad_b = jnp.sum(delta, axis=(0, 1, 2))
    cols = im2col(h_prev, kh, kw, stride=stride, padding=padding)                # P, recomputed: (B, Ho, Wo, K)
    # out_sharding as in conv2d's backward: on an Explicit mesh both products contract a possibly sharded axis
    grad_W_mat = lax.dot_general(delta, cols, (((0, 1, 2), (0, 1, 2)), ((), ())),   # delta^T P: (C_out, K)
                                 out_sharding=_rows_like(out_sharding(W)))
    grad_W = conv_W(grad_W_mat, W.shape)
    L_h, L_w = (H_out - 1) * stride + 1, (W_out - 1) * stride + 1
    dtype = jnp.result_type(delta, W)
    rows = (kh - 1 - top, kh - 1 - bottom + (H + top + bottom - kh + 1 - L_h))
    columns = (kw - 1 - left, kw - 1 - right + (W_ + left + right - kw + 1 - L_w))
    flipped = jnp.transpose(W[:, :, ::-1, ::-1], (2, 3, 0, 1)).astype(dtype)  # HWIO: (kh, kw, C_out, C_in)
    if stride == 1 and min(rows + columns) >= 0:
        # the zero padding as the convolution's own (XLA:CPU's padded convolution; a separate pad in front of a
        # VALID one is a second, slower path: 6x slower under vmap, e.g. curvature's columns, see below)
        spread, window_padding = delta.astype(dtype), (rows, columns)
    else:
        spread = lax.pad(delta.astype(dtype), jnp.zeros((), dtype),
                         ((0, 0, 0), rows + (stride - 1,), columns + (stride - 1,), (0, 0, 0)))
        window_padding = "VALID"
        if stride > 1:      # XLA:CPU must not fold this dilating pad into the convolution (see below)
            spread = lax.optimization_barrier(spread)
    grad_h = lax.conv_general_dilated(spread, flipped, (1, 1), window_padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"), out_sharding=out_sharding(h_prev))
    return grad_W, grad_b, grad_h


conv2d_xla = rule(_conv2d_xla_fwd, _conv2d_xla_bwd, name="conv2d_xla",
                  check=lambda W, b, x, **o: check_conv_shapes(W, b, x, name="fnbp.conv2d_xla", **o))
register_check(conv2d_xla, "conv2d", "conv", variants=_CONV_CHECKS, batch_only=True)
extensions.register(conv2d_xla, view=_conv2d_rows, to_W=conv_W)   # P by im2col only when asked


def _conv2d_naive_fwd(W, b, h_prev, *, stride=1, padding="SAME"):
    """The same layer as ``conv2d``, written for reading: a loop over kernel offsets (i, j).

        a[n, y, x, o] = b[o] + sum_{i, j, c} W[o, c, i, j] x_pad[n, s y + i, s x + j, c]

    Backward, the same loop transposed (delta = grad_a E):
        grad_W[o, c, i, j] = sum_{n, y, x} delta[n, y, x, o] x_pad[n, s y + i, s x + j, c]
        grad_b[o]          = sum_{n, y, x} delta[n, y, x, o]
        grad_x_pad[n, s y + i, s x + j, c] += sum_o delta[n, y, x, o] W[o, c, i, j]   (overlaps summed)
    """
    C_out, C_in, kh, kw = W.shape
    (top, bottom, left, right), H_out, W_out = _geometry(h_prev.shape, kh, kw, stride, padding)
    x_pad = jnp.pad(h_prev, ((0, 0), (top, bottom), (left, right), (0, 0)))
    a = jnp.zeros(h_prev.shape[:1] + (H_out, W_out, C_out), jnp.result_type(W, h_prev)) + b
    for i in range(kh):
        for j in range(kw):
            patch = x_pad[:, i: i + (H_out - 1) * stride + 1: stride, j: j + (W_out - 1) * stride + 1: stride, :]
            a = a + jnp.einsum("nyxc,oc->nyxo", patch, W[:, :, i, j])
    return a, (W, h_prev)


def _conv2d_naive_bwd(residuals, delta, *, stride, padding):
    W, h_prev = residuals
    C_out, C_in, kh, kw = W.shape
    (top, bottom, left, right), H_out, W_out = _geometry(h_prev.shape, kh, kw, stride, padding)
    x_pad = jnp.pad(h_prev, ((0, 0), (top, bottom), (left, right), (0, 0)))
    grad_W = jnp.zeros_like(W)
    grad_x_pad = jnp.zeros_like(x_pad)
    for i in range(kh):
        for j in range(kw):
            rows = slice(i, i + (H_out - 1) * stride + 1, stride)
            cols = slice(j, j + (W_out - 1) * stride + 1, stride)
            grad_W = grad_W.at[:, :, i, j].set(jnp.einsum("nyxo,nyxc->oc", delta, x_pad[:, rows, cols, :]))
            grad_x_pad = grad_x_pad.at[:, rows, cols, :].add(jnp.einsum("nyxo,oc->nyxc", delta, W[:, :, i, j]))
    grad_x = grad_x_pad[:, top: top + h_prev.shape[1], left: left + h_prev.shape[2], :]
    return grad_W, jnp.sum(delta, axis=(0, 1, 2)), grad_x


conv2d_naive = rule(_conv2d_naive_fwd, _conv2d_naive_bwd, name="conv2d_naive",
                    check=lambda W, b, x, **o: check_conv_shapes(W, b, x, name="fnbp.conv2d_naive", **o))
register_check(conv2d_naive, "conv2d", "conv", variants=_CONV_CHECKS, batch_only=True)


def conv_fan_in(W_shape):
    """fan-in of a conv unit: C_in kh kw (the length of the patch each output reads)."""
    return math.prod(W_shape[1:])
