"""Batch normalisation, with its hand-derived backward rule.

(Dropout, a regulariser rather than a normalisation, is in ``fnbp.regularization``.)

Batch norm (Ioffe & Szegedy 2015), training mode, over the batch axis of x (B, n):

    mu = 1/B sum_n x_n;   sigma^2 = 1/B sum_n (x_n - mu)^2      (biased variance)
    x_hat = (x - mu) / sqrt(sigma^2 + eps);   y = gamma x_hat + beta

Inference mode uses running averages of mu and sigma^2 instead of the batch's.
The running statistics are updated functionally -- the layer returns them -- with
PyTorch's convention: ``momentum`` is the weight of the *new* batch,

    running <- (1 - momentum) running + momentum batch_statistic     (default 0.1),

which is Keras's ``momentum=0.9`` style with 0.9 = 1 - 0.1.  This momentum is the
layer's own hyperparameter, unrelated to the optimizer's.  As in PyTorch, the
running variance stores the *unbiased* batch variance, sigma^2 B / (B - 1), while
the normalisation itself uses the biased sigma^2 (``unbiased_running_var=False``
stores the biased one, as Keras/Flax do).
"""
import jax
import jax.numpy as jnp

from . import extensions
from .rules import rule

__all__ = ["batch_norm", "batch_norm_train", "batch_norm_eval", "init_batch_norm_state", "running_statistics"]


# --- batch norm --------------------------------------------------------------
def _batch_norm_fwd(x, gamma, beta, *, eps=1e-5):
    """Training-mode batch norm y = gamma x_hat + beta over every axis of x but the last: x (B, n), or feature
    maps (B, H, W, C) per channel (every pixel of every example one sample of its channel: the same equations
    with B H W samples).  Statistics over the m samples of each of the n (or C) units:

        mu = 1/m sum_n x_n;  sigma^2 = 1/m sum_n (x_n - mu)^2;  x_hat = (x - mu) / sqrt(sigma^2 + eps)

    Backward (hand-derived; g = grad_y E, g^ = gamma g, sums/means over the m samples):
        grad_gamma E = sum_n g_n x_hat_n
        grad_beta  E = sum_n g_n
        grad_x     E = 1/sqrt(sigma^2 + eps) (g^ - mean(g^) - x_hat mean(g^ x_hat))
    """
    axes = tuple(range(x.ndim - 1))                         # every axis but the units'
    mu = jnp.mean(x, axis=axes)
    var = jnp.mean(jnp.square(x - mu), axis=axes)           # biased variance
    inv_std = 1.0 / jnp.sqrt(var + eps)
    x_hat = (x - mu) * inv_std
    y = gamma * x_hat + beta
    return y, (x_hat, inv_std, gamma)


def _batch_norm_bwd(res, grad_y, *, eps):
    x_hat, inv_std, gamma = res
    axes = tuple(range(x_hat.ndim - 1))
    grad_gamma = jnp.sum(grad_y * x_hat, axis=axes)          # dE/dgamma = sum_n g_n x_hat_n
    grad_beta = jnp.sum(grad_y, axis=axes)                   # dE/dbeta  = sum_n g_n
    grad_x_hat = grad_y * gamma
    grad_x = inv_std * (grad_x_hat                           # dE/dx = (1/sigma) (g^ - mean(g^) - x_hat mean(g^ x_hat))
                        - jnp.mean(grad_x_hat, axis=axes)
                        - x_hat * jnp.mean(grad_x_hat * x_hat, axis=axes))
    return grad_x, grad_gamma, grad_beta


def _check_batch_norm(x, gamma, beta, *, eps):
    if jnp.ndim(x) < 2:
        raise ValueError(f"fnbp.norm.batch_norm: x must be a mini-batch of shape (batch, n) or (batch, ..., C), "
                         f"got {jnp.shape(x)}")
    n = jnp.shape(x)[-1]
    for name, v in (("gamma", gamma), ("beta", beta)):
        if jnp.shape(v) != (n,):
            raise ValueError(f"fnbp.norm.batch_norm: {name} must have shape ({n},) to match x of shape "
                             f"{jnp.shape(x)}, got {jnp.shape(v)}")


batch_norm = rule(_batch_norm_fwd, _batch_norm_bwd, name="batch_norm", check=_check_batch_norm)
COUPLES = ("batch norm couples the examples of a batch (each example's normalised value depends on the batch "
           "mean and variance), so an example has no gradient of its own; use a network without batch norm")
extensions.register_coupling(batch_norm, COUPLES)


def init_batch_norm_state(n, dtype=jnp.float32):
    """Running statistics before any batch: mean 0, variance 1."""
    return {"mean": jnp.zeros((n,), dtype), "var": jnp.ones((n,), dtype)}


def batch_norm_train(x, gamma, beta, running, *, momentum=0.1, eps=1e-5, unbiased_running_var=True):
    """Training mode: normalise with the batch statistics; return (y, new running statistics).

    x (B, n); gamma, beta (n,); running = {"mean": (n,), "var": (n,)}.  PyTorch's convention:

        running_mean <- (1 - momentum) running_mean + momentum mu
        running_var  <- (1 - momentum) running_var  + momentum sigma^2 B / (B - 1)

    i.e. the running variance averages the *unbiased* batch variance (as
    ``torch.nn.BatchNorm1d`` does), while y itself is normalised with the biased
    sigma^2 = 1/B sum_n (x_n - mu)^2.  ``unbiased_running_var=False`` stores the biased
    sigma^2 instead (Keras's and Flax's convention).  B = 1 needs the biased form
    (the unbiased variance of one example is undefined).  The running statistics
    carry no gradient.
    """
    batch = jnp.shape(x)[0] if jnp.ndim(x) == 2 else 0
    if unbiased_running_var and batch == 1:
        raise ValueError(f"fnbp.norm.batch_norm_train: training-mode batch norm needs a (micro-)batch of at least 2 "
                         f"examples for the unbiased running variance (PyTorch refuses B = 1 too), got x of shape "
                         f"{jnp.shape(x)}; use a larger batch, or unbiased_running_var=False")
    y = batch_norm(x, gamma, beta, eps=eps)
    x = jax.lax.stop_gradient(x)
    mu = jnp.mean(x, axis=0)
    var = jnp.mean(jnp.square(x - mu), axis=0)                # biased: what y was normalised with
    if unbiased_running_var:
        var = var * (batch / (batch - 1))                     # Bessel's correction, as PyTorch stores
    new = {"mean": (1 - momentum) * running["mean"] + momentum * mu,
           "var": (1 - momentum) * running["var"] + momentum * var}
    return y, new


def batch_norm_eval(x, gamma, beta, running, *, eps=1e-5):
    """Inference mode: y = gamma (x - running_mean) / sqrt(running_var + eps) + beta.

    Uses the running statistics only (nothing from the batch), so one example
    and a batch give the same per-example outputs.
    """
    return gamma * (x - running["mean"]) / jnp.sqrt(running["var"] + eps) + beta


def running_statistics(x, running, *, momentum=0.1, unbiased_running_var=True):
    """Batch norm's new running statistics from a batch x (B, n) or feature maps (B, ..., C): the update of
    ``batch_norm_train`` on the m samples of each unit (every axis but the last), with no gradient --
    fnbp's one formula for running statistics (the aux node of ``fnbp.nn.BatchNorm`` and of the presets).
    (With m = 1 sample the unbiased variance is undefined: refused, as ``batch_norm_train`` does.)"""
    C = jnp.shape(x)[-1]
    ones = jnp.ones((C,), jnp.result_type(x))
    return batch_norm_train(jnp.reshape(x, (-1, C)), ones, jnp.zeros_like(ones), running, momentum=momentum,
                            unbiased_running_var=unbiased_running_var)[1]
