"""Loss functions E = L(y; d), each with its gradient grad_y E written by hand.

Shapes: ``y`` is the network output, (n,) for one example or (batch, n) for a
mini-batch (any number of leading batch axes).  Per example the loss sums (or
averages, for ``mse``/``mae``) over the n output components; over the batch it
is reduced with ``reduction``:

* ``'mean'`` (default): E = (1/M) sum_n E_n, the notes' mini-batch average;
* ``'sum'``: E = sum_n E_n, the notes' sum over the training set.

For one example (``y`` of shape (n,)) both reductions give E_1.

Each public loss is a rule (``fnbp.rule``): ``fn.rule`` is the ``fnbp.Rule`` with
``fn.rule.fwd(y, d, reduction=...) -> (E, residuals)`` and
``fn.rule.bwd(residuals, g, reduction=...) -> (grad_y, grad_d)``; the explicit
backprop loop starts from exactly that ``grad_y``.
"""
import functools
import inspect
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .check_cases import register as register_check
from .rules import rule

_REDUCTIONS = ({"reduction": "mean"}, {"reduction": "sum"})   # fnbp check: one row each

__all__ = ["half_sse", "sse", "mse", "mae", "cross_entropy", "softmax_cross_entropy", "l2_penalty",
           "LOSSES", "LossSpec", "loss_spec", "reduce"]

REDUCTIONS = ("mean", "sum")


def _check_reduction(name, reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"fnbp.losses.{name}: reduction must be 'mean' or 'sum', got {reduction!r}")


def _check_same_shape(name, y, d):
    if jnp.shape(y) != jnp.shape(d):
        raise ValueError(f"fnbp.losses.{name}: y and d must have the same shape, "
                         f"got y {jnp.shape(y)} and d {jnp.shape(d)}")


def _batch_scale(shape, reduction, has_components=True):
    """1/M for 'mean' (M = number of examples), 1 for 'sum'."""
    batch_shape = shape[:-1] if has_components else shape
    return 1.0 / max(math.prod(batch_shape), 1) if reduction == "mean" else 1.0


def _reduce(per_example, reduction):
    return jnp.mean(per_example) if reduction == "mean" else jnp.sum(per_example)


def _components(x):
    """Sum over the output components (the last axis); a scalar is one component."""
    return jnp.sum(x, axis=-1) if x.ndim else x


def _n_components(shape):
    return shape[-1] if len(shape) else 1


def _check_not_empty(name, y, reduction):
    if reduction == "mean" and jnp.ndim(y) > 1 and math.prod(jnp.shape(y)[:-1]) == 0:
        raise ValueError(f"fnbp.losses.{name}: the batch is empty (y of shape {jnp.shape(y)}); the mean over no "
                         f"examples is undefined")


def _check_regression(y, d, *, reduction="mean", name):
    _check_reduction(name, reduction)
    _check_same_shape(name, y, d)
    _check_not_empty(name, y, reduction)


def _checker(name):
    return lambda y, d, *, reduction: _check_regression(y, d, reduction=reduction, name=name)


# --- 1/2 ||y - d||^2 ---------------------------------------------------------
def _half_sse_fwd(y, d, *, reduction="mean"):
    """Half squared error E = 1/2 ||y - d||^2 per example.  grad_y E = y - d."""
    r = y - d
    return _reduce(0.5 * _components(r * r), reduction), r


def _half_sse_bwd(r, g, *, reduction):
    grad_y = g * _batch_scale(r.shape, reduction) * r          # grad_y E = y - d
    return grad_y, -grad_y


half_sse = rule(_half_sse_fwd, _half_sse_bwd, check=_checker("half_sse"))
register_check(half_sse, "half_sse", "regression", variants=_REDUCTIONS)


# --- (y - d)^2 ---------------------------------------------------------------
def _sse_fwd(y, d, *, reduction="mean"):
    """Squared error E = ||y - d||^2 = sum_i (y_i - d_i)^2 per example (the notes' single-neuron
    chain (a - y)^2).  grad_y E = 2 (y - d)."""
    r = y - d
    return _reduce(_components(r * r), reduction), r


def _sse_bwd(r, g, *, reduction):
    grad_y = g * _batch_scale(r.shape, reduction) * 2 * r      # grad_y E = 2 (y - d)
    return grad_y, -grad_y


sse = rule(_sse_fwd, _sse_bwd, check=_checker("sse"))
register_check(sse, "sse", "regression", variants=_REDUCTIONS)


# --- mean squared error --------------------------------------------------------
def _mse_fwd(y, d, *, reduction="mean"):
    """Mean squared error E = (1/n) sum_i (y_i - d_i)^2 per example (n outputs).  grad_y E = 2 (y - d) / n.

    With reduction='mean' this is the mean over every element.  (The notes' MSE example,
    u = (1, 0), y = (0.8, 0.5) -> 0.145, is this mean over its 2 outputs; the notes'
    general definition 1/(2N) sum sum (y - d)^2 is ``half_sse`` with reduction='mean'.)
    """
    r = y - d
    return _reduce(_components(r * r) / _n_components(r.shape), reduction), r


def _mse_bwd(r, g, *, reduction):
    grad_y = g * _batch_scale(r.shape, reduction) * 2 * r / _n_components(r.shape)   # grad_y E = 2 (y - d) / n
    return grad_y, -grad_y


mse = rule(_mse_fwd, _mse_bwd, check=_checker("mse"))
register_check(mse, "mse", "regression", variants=_REDUCTIONS)


# --- mean absolute error -------------------------------------------------------
def _mae_fwd(y, d, *, reduction="mean"):
    """Mean absolute error E = (1/n) sum_i |y_i - d_i| per example.  grad_y E = sign(y - d) / n
    (0 where y = d, the subgradient JAX also picks)."""
    r = y - d
    return _reduce(_components(jnp.abs(r)) / _n_components(r.shape), reduction), r


def _mae_bwd(r, g, *, reduction):
    grad_y = g * _batch_scale(r.shape, reduction) * jnp.sign(r) / _n_components(r.shape)  # sign(y - d) / n
    return grad_y, -grad_y


mae = rule(_mae_fwd, _mae_bwd, check=_checker("mae"))
register_check(mae, "mae", "regression", variants=_REDUCTIONS)


# --- cross-entropy on probabilities ------------------------------------------
def _cross_entropy_fwd(p, d, *, reduction="mean"):
    """Cross-entropy on probabilities (after a softmax layer): E = -sum_i d_i log p_i.

    ``d`` is one-hot or a probability vector, same shape as ``p``.
    Backward: grad_p E = -d / p (and grad_d E = -log p).  Composed with
    ``fnbp.softmax`` this gives delta = p - d at the logits, as the notes show;
    ``softmax_cross_entropy`` computes that fused and stably.
    """
    log_p = jnp.log(p)
    d_log_p = jnp.where(d == 0, 0, d * log_p)            # 0 log 0 = 0
    return _reduce(-_components(d_log_p), reduction), (p, d, log_p)


def _cross_entropy_bwd(res, g, *, reduction):
    p, d, log_p = res
    scale = g * _batch_scale(p.shape, reduction)
    grad_p = scale * jnp.where(d == 0, 0, -d / p)        # grad_p E = -d / p
    grad_d = scale * -log_p                              # grad_d E = -log p
    return grad_p, grad_d


cross_entropy = rule(_cross_entropy_fwd, _cross_entropy_bwd, check=_checker("cross_entropy"))
register_check(cross_entropy, "cross_entropy", "probabilities", variants=_REDUCTIONS)


# --- softmax cross-entropy on logits -----------------------------------------
def _softmax_cross_entropy_fwd(logits, labels, *, reduction="mean"):
    """Softmax cross-entropy on logits with integer labels (PyTorch's ``cross_entropy`` convention).

    E_n = -log softmax(y_n)[d_n] = logsumexp(y_n) - y_n[d_n], computed through
    log-sum-exp with the max subtracted (stable for |y| up to 1e4 and beyond).
    Backward (fused): grad_y E = softmax(y) - onehot(d).

    Args:
      logits: (n_classes,) or (batch, n_classes), or (batch, T, n_classes) for sequences.
      labels: integer class indices, shape () or (batch,) or (batch, T): logits.shape[:-1].
        An ordinary argument whose cotangent is None.

    Every leading axis counts as examples: on (batch, T, V) logits of a language model
    'mean' averages over the batch * T tokens (nats per token), 'sum' adds them.

    Labels out of range [0, n_classes) raise ValueError when the function is
    called outside ``jit`` on concrete arrays.  Inside ``jit`` (or ``vmap``)
    labels are not inspected (no host round-trip); an out-of-range label makes
    that example's loss NaN *and* its gradient row NaN, so the loss and its
    gradient agree and training stops at the first non-finite loss.
    """
    labels = jnp.asarray(labels).astype(jnp.int32)
    n_classes = logits.shape[-1]
    z = logits - jnp.max(logits, axis=-1, keepdims=True)
    log_sum_exp = jnp.log(jnp.sum(jnp.exp(z), axis=-1))
    z_label = jnp.take_along_axis(z, jnp.clip(labels, 0, n_classes - 1)[..., None], axis=-1)[..., 0]
    valid = (labels >= 0) & (labels < n_classes)
    E_n = jnp.where(valid, log_sum_exp - z_label, jnp.nan)
    p = jnp.exp(z - log_sum_exp[..., None])               # softmax(logits), kept for the backward
    return _reduce(E_n, reduction), (p, labels, valid)


def _softmax_cross_entropy_bwd(res, g, *, reduction):
    p, labels, valid = res
    onehot = jax.nn.one_hot(labels, p.shape[-1], dtype=p.dtype)
    delta = jnp.where(valid[..., None], p - onehot, jnp.nan)            # softmax(y) - onehot(d)
    return g * _batch_scale(p.shape, reduction) * delta, None          # integer labels: no cotangent


def _check_softmax_cross_entropy_inputs(logits, labels, *, reduction="mean"):
    """Shapes, label dtype and (outside jit) label range; raises ValueError."""
    _check_reduction("softmax_cross_entropy", reduction)
    logits_shape, labels_shape = jnp.shape(logits), jnp.shape(labels)
    if len(logits_shape) < 1 or logits_shape[:-1] != labels_shape:
        raise ValueError("fnbp.losses.softmax_cross_entropy: logits must have shape labels.shape + (n_classes,); "
                         f"got logits {logits_shape} and labels {labels_shape} (batch sizes must match)")
    _check_not_empty("softmax_cross_entropy", logits, reduction)
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError("fnbp.losses.softmax_cross_entropy: labels must be integer class indices, "
                         f"got dtype {jnp.result_type(labels)} (use cross_entropy for one-hot/probability targets)")
    lab = _concrete(labels)
    if lab is not None:
        if lab.size and (lab.min() < 0 or lab.max() >= logits_shape[-1]):
            raise ValueError(f"fnbp.losses.softmax_cross_entropy: labels must be in [0, {logits_shape[-1]}) "
                             f"for {logits_shape[-1]} classes, got values in [{lab.min()}, {lab.max()}]")


softmax_cross_entropy = rule(_softmax_cross_entropy_fwd, _softmax_cross_entropy_bwd,
                             check=_check_softmax_cross_entropy_inputs)
register_check(softmax_cross_entropy, "softmax_cross_entropy", "labels", variants=_REDUCTIONS)


def _concrete(x):
    """x as a numpy array when it is concrete (outside jit), else None."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


# --- L2 penalty lambda * Omega -------------------------------------------------
def _is_weight(path):
    last = path[-1] if path else None
    return isinstance(last, jax.tree_util.DictKey) and last.key == "W"


def _omega(params):
    leaves = [x for p, x in jax.tree_util.tree_flatten_with_path(params)[0] if _is_weight(p)]
    return 0.5 * sum(jnp.sum(W * W) for W in leaves) if leaves else jnp.zeros(())


def _l2_penalty_fwd(params, lam):
    """L2 penalty lambda Omega(theta), Omega = 1/2 sum_k ||W_k||^2 over the weights only.

    "Weights" are the leaves stored under the key ``"W"`` (biases ``"b"`` and
    anything else are not penalised).  Backward: grad_W = lambda W, grad_b = 0,
    grad_lambda = Omega.  Add it to a data loss: J = L + lambda Omega.
    """
    omega = _omega(params)
    return lam * omega, (params, lam, omega)


def _l2_penalty_bwd(res, g):
    params, lam, omega = res
    grads = jax.tree_util.tree_map_with_path(                     # grad_W (lambda Omega) = lambda W
        lambda p, x: g * lam * x if _is_weight(p) else jnp.zeros_like(x), params)
    return grads, g * omega


l2_penalty = rule(_l2_penalty_fwd, _l2_penalty_bwd)
register_check(l2_penalty, "l2_penalty", "params", batch_only=True)


LOSSES = {"half_sse": half_sse, "sse": sse, "mse": mse, "mae": mae, "cross_entropy": cross_entropy,
          "softmax_cross_entropy": softmax_cross_entropy}


# --- a loss spec, parsed once ------------------------------------------------------------
class LossSpec(NamedTuple):
    """A parsed loss: the function and its batch reduction ('mean' or 'sum').

    ``takes_reduction`` is False for a plain function without a ``reduction`` keyword
    (e.g. an optax loss followed by ``.mean()``), which is taken to average over the batch.
    """
    fn: Callable
    reduction: str
    takes_reduction: bool

    def __call__(self, y, d, reduction=None):
        """E = L(y; d), with this spec's reduction unless another is given."""
        if self.takes_reduction:
            return self.fn(y, d, reduction=reduction or self.reduction)
        return self.fn(y, d)


def loss_spec(loss, *, name="fnbp"):
    """Parse a loss spec -- one of ``fnbp.losses``, ``functools.partial(loss, reduction='sum')``,
    a student's ``fnbp.rule`` loss or any plain function ``L(y, d) -> scalar`` -- into a ``LossSpec``.
    Raises ValueError (naming ``name``) for the L2 penalty and for an unknown reduction.  A ``LossSpec`` is
    returned as it is (a spec is parsed once, where a step is built, and passed down)."""
    if isinstance(loss, LossSpec):
        return loss
    fn, keywords = (loss.func, dict(loss.keywords)) if isinstance(loss, functools.partial) else (loss, {})
    if fn is l2_penalty:
        raise ValueError(f"{name}: the loss is the L2 penalty; the L2 penalty goes in the l2= argument")
    if not callable(fn):
        raise ValueError(f"{name}: loss must be a function L(y, d), got {loss!r}")
    try:
        takes = "reduction" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        takes = False
    reduction = keywords.pop("reduction", "mean")
    _check_reduction(getattr(fn, "__name__", "loss"), reduction)
    if keywords or (isinstance(loss, functools.partial) and loss.args):
        fn = functools.partial(fn, *loss.args, **keywords)
    return LossSpec(fn, reduction, takes)


def reduce(values, reduction):
    """Combine per-example values (or per-micro-batch values) as the loss does: mean or sum."""
    return _reduce(values, reduction)
