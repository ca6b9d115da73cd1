"""Pooling, flattening and per-channel batch norm for convolutional networks, with hand-derived rules.

All take channels-last feature maps x of shape (B, H, W, C).  Pooling windows are
``window x window`` with step ``stride`` (default: the window, non-overlapping) and
no padding, so H_out = floor((H - window) / stride) + 1 (likewise for W).

Every output is a function of the pixels of one window, so the backward sends each
output's gradient back to the window's pixels; a pixel in several (overlapping)
windows receives the sum (the notes' fan-out rule) -- ``fnbp.conv.col2im`` does that
placement for both pools.
"""
import jax.numpy as jnp
from jax import lax

from . import extensions, norm
from .check_cases import register as register_check
from .conv import as_count, col2im
from .rules import rule

__all__ = ["max_pool", "avg_pool", "flatten", "global_avg_pool", "batch_norm_channels",
           "batch_norm_channels_train", "batch_norm_channels_eval", "pool_output_size"]


def pool_output_size(size, window, stride, name="fnbp.max_pool"):
    """Output length floor((size - window) / stride) + 1 of one axis; a ValueError naming ``name``
    when the window is larger than the input."""
    if size < window:
        raise ValueError(f"{name}: the pooling window ({window}) is larger than the input ({size} pixels)")
    return (size - window) // stride + 1


def _check_pool(x, *, window=2, stride=None, name="fnbp.max_pool"):
    window = as_count(window, "window", name, 1)
    stride = None if stride is None else as_count(stride, "stride", name, 1)
    if jnp.ndim(x) != 4:
        raise ValueError(f"{name}: x must have shape (batch, H, W, C) (channels last), got shape {jnp.shape(x)}")
    for size in jnp.shape(x)[1:3]:
        pool_output_size(size, window, stride or window, name)


def _windows(x, window, stride):
    """The window x window strided slices of x, offset (i, j) in row-major order: each (B, H_out, W_out, C)."""
    B, H, W, C = x.shape
    H_out, W_out = (H - window) // stride + 1, (W - window) // stride + 1
    return [lax.slice(x, (0, i, j, 0), (B, i + (H_out - 1) * stride + 1, j + (W_out - 1) * stride + 1, C),
                      (1, stride, stride, 1))
            for i in range(window) for j in range(window)]


def _max_pool_fwd(x, *, window=2, stride=None):
    """Max pooling h[n, y, x, c] = max over the window at (s y, s x) of x[n, ., ., c].

    Residual: the argmax index t = i window + j of each window (int8 when it fits),
    the mask of the one pixel that produced each output.  Ties: the FIRST maximum in
    row-major order (top row first, left to right) wins, as in PyTorch and in
    ``lax.reduce_window``'s autodiff; a NaN in the window is the maximum (NaN propagates),
    the first NaN getting the gradient.

    Backward: grad_x = sum over windows of grad_h placed at the window's argmax pixel,
        grad_x[n, s y + i, s x + j, c] += grad_h[n, y, x, c]  if t[n, y, x, c] = i window + j,
    so a pixel that is the maximum of several overlapping windows receives their sum.
    """
    stride = stride or window
    slices = _windows(x, window, stride)
    best, index = slices[0], jnp.zeros(slices[0].shape, jnp.int8 if window * window < 128 else jnp.int32)
    for t, s in enumerate(slices[1:], 1):
        better = (s > best) | (jnp.isnan(s) & ~jnp.isnan(best))   # strict: ties keep the first maximum
        best = jnp.where(better, s, best)
        index = jnp.where(better, jnp.asarray(t, index.dtype), index)
    return best, (index, x.shape)


def _max_pool_bwd(res, grad_h, *, window, stride):
    index, x_shape = res
    zero = jnp.zeros((), grad_h.dtype)
    pieces = [jnp.where(index == t, grad_h, zero) for t in range(window * window)]   # grad_h on the argmax mask
    return (col2im(jnp.concatenate(pieces, axis=-1), x_shape, window, window, stride=stride or window,
                   padding="VALID"),)


max_pool = rule(_max_pool_fwd, _max_pool_bwd, name="max_pool", check=_check_pool)
register_check(max_pool, "max_pool", "maps", variants=({"window": 2},), batch_only=True)


def _avg_pool_fwd(x, *, window=2, stride=None):
    """Average pooling h[n, y, x, c] = 1/window^2 sum over the window at (s y, s x) of x[n, ., ., c].

    Backward: every pixel of a window receives grad_h / window^2 (summed over the windows
    that contain it):  grad_x[n, s y + i, s x + j, c] += grad_h[n, y, x, c] / window^2.
    """
    stride = stride or window
    slices = _windows(x, window, stride)
    total = slices[0]
    for s in slices[1:]:
        total = total + s
    return total / (window * window), x.shape


def _avg_pool_bwd(x_shape, grad_h, *, window, stride):
    share = grad_h / (window * window)
    return (col2im(jnp.concatenate([share] * (window * window), axis=-1), x_shape, window, window,
                   stride=stride or window, padding="VALID"),)


avg_pool = rule(_avg_pool_fwd, _avg_pool_bwd, name="avg_pool",
                check=lambda x, **o: _check_pool(x, name="fnbp.avg_pool", **o))
register_check(avg_pool, "avg_pool", "maps", variants=({"window": 3, "stride": 2},), batch_only=True)


def _flatten_fwd(x):
    """Flatten each example: (B, H, W, C) -> (B, H W C), row-major (the order of x.reshape).

    Backward: grad_x = grad_h reshaped back to (B, H, W, C) (a reshape moves no number).
    """
    return x.reshape(x.shape[0], -1), x.shape


def _flatten_bwd(x_shape, grad_h):
    return (grad_h.reshape(x_shape),)


def _check_batched(name):
    def check(x, **_):
        if jnp.ndim(x) < 2:
            raise ValueError(f"{name}: x must have a batch axis and at least one more, got shape {jnp.shape(x)}")
    return check


flatten = rule(_flatten_fwd, _flatten_bwd, name="flatten", check=_check_batched("fnbp.flatten"))
register_check(flatten, "flatten", "maps", batch_only=True)
for _linear in (max_pool, avg_pool, flatten):          # piecewise linear: no second-derivative term
    extensions.register_second_derivative(_linear, extensions.LINEAR)


def _global_avg_pool_fwd(x):
    """Global average pooling h[n, c] = 1/(H W) sum_{y, x} x[n, y, x, c]: (B, H, W, C) -> (B, C).

    Backward: grad_x[n, y, x, c] = grad_h[n, c] / (H W) at every position.
    """
    return jnp.mean(x, axis=(1, 2)), x.shape


def _global_avg_pool_bwd(x_shape, grad_h):
    _, H, W, _ = x_shape
    return (jnp.broadcast_to((grad_h / (H * W))[:, None, None, :], x_shape),)


def _check_maps(x):
    if jnp.ndim(x) != 4:
        raise ValueError(f"fnbp.global_avg_pool: x must have shape (batch, H, W, C), got shape {jnp.shape(x)}")
    if 0 in jnp.shape(x)[1:3]:
        raise ValueError(f"fnbp.global_avg_pool: x has no pixels to average (H = {jnp.shape(x)[1]}, W = "
                         f"{jnp.shape(x)[2]} in shape {jnp.shape(x)}); H and W must be >= 1")


global_avg_pool = rule(_global_avg_pool_fwd, _global_avg_pool_bwd, name="global_avg_pool", check=_check_maps)
register_check(global_avg_pool, "global_avg_pool", "maps", batch_only=True)


# --- batch norm per channel ----------------------------------------------------
def _batch_norm_channels_fwd(x, gamma, beta, *, eps=1e-5):
    """Batch norm of feature maps, one (gamma, beta) and one mean/variance per channel over (B, H, W).

    The existing rule (``fnbp.norm.batch_norm``) on x reshaped to (B H W, C): every pixel of
    every example is one sample of its channel, so the equations are those of the dense
    case with the batch axis of length B H W:
        y = gamma x_hat + beta,  x_hat = (x - mu_c) / sqrt(sigma_c^2 + eps)
        grad_gamma = sum g x_hat;  grad_beta = sum g;
        grad_x = 1/sqrt(sigma^2 + eps) (g^ - mean(g^) - x_hat mean(g^ x_hat)),  g^ = gamma g.
    """
    C = x.shape[-1]
    y, res = norm.batch_norm.rule.fwd(x.reshape(-1, C), gamma, beta, eps=eps)
    return y.reshape(x.shape), (res, x.shape)


def _batch_norm_channels_bwd(res, grad_y, *, eps):
    res_2d, x_shape = res
    grad_x, grad_gamma, grad_beta = norm.batch_norm.rule.bwd(res_2d, grad_y.reshape(-1, x_shape[-1]), eps=eps)
    return grad_x.reshape(x_shape), grad_gamma, grad_beta


def _check_bn_channels(x, gamma, beta, *, eps):
    if jnp.ndim(x) != 4:
        raise ValueError(f"fnbp.batch_norm_channels: x must have shape (batch, H, W, C), got {jnp.shape(x)}")
    for what, v in (("gamma", gamma), ("beta", beta)):
        if jnp.shape(v) != jnp.shape(x)[-1:]:
            raise ValueError(f"fnbp.batch_norm_channels: {what} must have shape ({jnp.shape(x)[-1]},) (one per "
                             f"channel of x of shape {jnp.shape(x)}), got {jnp.shape(v)}")


batch_norm_channels = rule(_batch_norm_channels_fwd, _batch_norm_channels_bwd, name="batch_norm_channels",
                           check=_check_bn_channels)
register_check(batch_norm_channels, "batch_norm_channels", "maps_bn", batch_only=True)
extensions.register_coupling(batch_norm_channels, norm.COUPLES)


def batch_norm_channels_train(x, gamma, beta, running, *, momentum=0.1, eps=1e-5, unbiased_running_var=True):
    """Training mode per channel: (y, new running statistics), with ``fnbp.norm.batch_norm_train``'s
    conventions (PyTorch's: the running variance averages the unbiased variance of the
    m = B H W samples of each channel, m / (m - 1) times the biased one that y used)."""
    y = batch_norm_channels(x, gamma, beta, eps=eps)
    return y, norm.running_statistics(lax.stop_gradient(x), running, momentum=momentum,
                                      unbiased_running_var=unbiased_running_var)


def batch_norm_channels_eval(x, gamma, beta, running, *, eps=1e-5):
    """Inference mode per channel: gamma (x - running_mean) / sqrt(running_var + eps) + beta."""
    return norm.batch_norm_eval(x, gamma, beta, running, eps=eps)
