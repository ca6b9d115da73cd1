"""Batch normalisation and dropout, with hand-derived backward rules.

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

Dropout (Srivastava et al. 2014): in training mode each unit is zeroed with
probability ``p`` (the *drop* probability) and the survivors are scaled by
1 / (1 - p) ("inverted dropout"), so the expected activation -- the notes' "same
energy" -- is unchanged and inference is the identity.
"""
import jax
import jax.numpy as jnp

from .rules import rule

__all__ = ["batch_norm", "batch_norm_train", "batch_norm_eval", "init_batch_norm_state", "dropout"]


# --- batch norm --------------------------------------------------------------
def _batch_norm_fwd(x, gamma, beta, *, eps=1e-5):
    """Training-mode batch norm y = gamma x_hat + beta over the batch axis of x (B, n).

    Backward (hand-derived; g = grad_y E, g^ = gamma g, sums/means over the batch):
        grad_gamma E = sum_n g_n x_hat_n
        grad_beta  E = sum_n g_n
        grad_x     E = 1/sqrt(sigma^2 + eps) (g^ - mean(g^) - x_hat mean(g^ x_hat))
    """
    mu = jnp.mean(x, axis=0)
    var = jnp.mean(jnp.square(x - mu), axis=0)              # biased variance
    inv_std = 1.0 / jnp.sqrt(var + eps)
    x_hat = (x - mu) * inv_std
    y = gamma * x_hat + beta
    return y, (x_hat, inv_std, gamma)


def _batch_norm_bwd(res, grad_y, *, eps):
    x_hat, inv_std, gamma = res
    grad_gamma = jnp.sum(grad_y * x_hat, axis=0)             # dE/dgamma = sum_n g_n x_hat_n
    grad_beta = jnp.sum(grad_y, axis=0)                      # dE/dbeta  = sum_n g_n
    grad_x_hat = grad_y * gamma
    grad_x = inv_std * (grad_x_hat                           # dE/dx = (1/sigma) (g^ - mean(g^) - x_hat mean(g^ x_hat))
                        - jnp.mean(grad_x_hat, axis=0)
                        - x_hat * jnp.mean(grad_x_hat * x_hat, axis=0))
    return grad_x, grad_gamma, grad_beta


def _check_batch_norm(x, gamma, beta, *, eps):
    if jnp.ndim(x) != 2:
        raise ValueError(f"fnbp.norm.batch_norm: x must be a mini-batch of shape (batch, n), got {jnp.shape(x)}")
    n = jnp.shape(x)[1]
    for name, v in (("gamma", gamma), ("beta", beta)):
        if jnp.shape(v) != (n,):
            raise ValueError(f"fnbp.norm.batch_norm: {name} must have shape ({n},) to match x of shape "
                             f"{jnp.shape(x)}, got {jnp.shape(v)}")


batch_norm = rule(_batch_norm_fwd, _batch_norm_bwd, name="batch_norm", check=_check_batch_norm)


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


def _concrete_scalar(p):
    """p as a float when it is known outside jit (a Python, numpy or concrete jnp scalar), else None."""
    try:
        return float(p)
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


# --- dropout -----------------------------------------------------------------
def _dropout_fwd(x, p, key):
    """Inverted dropout with the mask drawn from ``key`` (see ``dropout``).  Backward: grad_x = grad_y m / (1 - p)."""
    keep = jax.random.bernoulli(key, 1.0 - p, jnp.shape(x))
    scale = 1.0 / (1.0 - p)                                  # inverted dropout: E[y] = x
    return jnp.where(keep, x * scale, 0).astype(x.dtype), (keep, scale)


def _dropout_bwd(res, grad_y):
    keep, scale = res
    grad_x = jnp.where(keep, grad_y * scale, 0).astype(grad_y.dtype)   # the same mask, the same scale
    return grad_x, None, None


_dropout = rule(_dropout_fwd, _dropout_bwd, name="dropout")


def dropout(x, p, key, *, train=True):
    """Inverted dropout: y = x m / (1 - p), m_i ~ Bernoulli(1 - p), p the drop probability.

    Scaling by 1 / (1 - p) keeps the expected activation ("the same energy"):
    E[y] = x, so inference mode (``train=False``) is the identity.
    Backward: grad_x = grad_y m / (1 - p) -- zero exactly where the unit was dropped.
    The mask comes from the explicit ``key``: same key, same mask; under
    ``jax.vmap`` with one key per example, each example gets its own mask.
    """
    if not train:
        return x
    p_value = _concrete_scalar(p)
    if p_value is not None and not 0 <= p_value < 1:
        raise ValueError(f"fnbp.norm.dropout: the drop probability p must be in [0, 1), got {p_value}")
    if isinstance(p, (int, float)) and p == 0:
        return x
    if key is None:
        raise ValueError("fnbp.norm.dropout: training-mode dropout needs an explicit jax.random key, got None")
    return _dropout(x, p, key)


dropout.rule = _dropout.rule
