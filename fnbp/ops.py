"""Small elementwise rules for graphs (``fnbp.graph``): add, mul, log, and batch norm at inference.

Each is an ``fnbp.rule``: forward, residuals, backward in a few lines.  ``add`` is the
skip connection's merge (it copies the cotangent to both branches); ``mul`` and ``log``
build the notes' opening example f(x, y) = log(xy).  ``running_statistics`` is not a
rule: it is the auxiliary update of batch norm's running averages (no gradient).
"""
import jax.numpy as jnp

from . import norm
from .activations import sum_to_shape
from .rules import rule

__all__ = ["add", "mul", "log", "batch_norm_eval", "running_statistics"]


def _add_fwd(u, v):
    """z = u + v (broadcasting).  Backward: grad_u = grad_z, grad_v = grad_z (summed over broadcast axes)."""
    return u + v, (jnp.shape(u), jnp.shape(v))


def _add_bwd(shapes, grad_z):
    return sum_to_shape(grad_z, shapes[0]), sum_to_shape(grad_z, shapes[1])


add = rule(_add_fwd, _add_bwd)


def _mul_fwd(u, v):
    """z = u v (elementwise, broadcasting).  Backward: grad_u = grad_z v, grad_v = grad_z u."""
    return u * v, (u, v)


def _mul_bwd(res, grad_z):
    u, v = res
    return sum_to_shape(grad_z * v, jnp.shape(u)), sum_to_shape(grad_z * u, jnp.shape(v))   # dz/du = v, dz/dv = u


mul = rule(_mul_fwd, _mul_bwd)


def _log_fwd(v):
    """w = log v (natural logarithm).  Backward: grad_v = grad_w / v."""
    return jnp.log(v), v


def _log_bwd(v, grad_w):
    return (grad_w / v,)                                  # d log v / dv = 1 / v


log = rule(_log_fwd, _log_bwd)


def _batch_norm_eval_fwd(x, gamma, beta, mean, var, *, eps=1e-5):
    """Inference-mode batch norm y = gamma (x - mean) / sqrt(var + eps) + beta with running statistics.

    Backward (s = 1 / sqrt(var + eps), x_hat = (x - mean) s, g = grad_y E; sums over the batch):
        grad_x = gamma s g;  grad_gamma = sum g x_hat;  grad_beta = sum g;
        grad_mean = -sum gamma s g;  grad_var = -1/2 sum gamma g (x - mean) s^3
    """
    centred = x - mean
    root = jnp.sqrt(var + eps)
    return gamma * centred / root + beta, (centred, root, gamma, jnp.shape(mean), jnp.shape(var))


def _batch_norm_eval_bwd(res, grad_y, *, eps):
    centred, root, gamma, mean_shape, var_shape = res
    grad_x = gamma * grad_y / root
    grad_var = -0.5 * grad_x * centred / (root * root)
    return (grad_x, sum_to_shape(grad_y * centred / root, jnp.shape(gamma)), sum_to_shape(grad_y, jnp.shape(gamma)),
            sum_to_shape(-grad_x, mean_shape), sum_to_shape(grad_var, var_shape))


batch_norm_eval = rule(_batch_norm_eval_fwd, _batch_norm_eval_bwd)


def running_statistics(x, running, *, momentum=0.1, unbiased_running_var=True):
    """``fnbp.norm.running_statistics`` (kept here for graphs built with the earlier name)."""
    return norm.running_statistics(x, running, momentum=momentum, unbiased_running_var=unbiased_running_var)
