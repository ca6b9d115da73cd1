"""Activation functions h = g(a), each with its hand-written derivative g'(a).

Every activation is a rule (``fnbp.rule``) whose backward is the notes'

    delta = grad_h E (.) g'(a)

with g' written by hand (never autodiff).  Read top to bottom, the module is a
table: one forward, its residual, its backward.  ``fn.rule`` is the ``fnbp.Rule``
(``fwd(a, *extra) -> (h, residuals)``, ``bwd(residuals, grad_h) -> (delta, *grads)``)
that the explicit walker (``fnbp.backprop``) calls, so the walker and ``jax.grad``
cannot drift apart.

All are stable in float32 for |a| up to 1e4 (no inf), and NaN propagates: a NaN
pre-activation gives a NaN output (as ``jax.nn.relu`` does), never a silent 0.
"""
import jax.numpy as jnp
from jax import lax

from . import extensions
from .check_cases import register as register_check
from .rules import rule

__all__ = ["identity", "sigmoid", "tanh", "relu", "leaky_relu", "prelu", "step", "sign", "softmax",
           "ACTIVATIONS", "sum_to_shape"]


def _floating(name):
    """A trace-time check that the pre-activation is a floating-point array (the named error)."""
    def check(a, *_):
        dtype = jnp.result_type(a)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"fnbp.{name}: the pre-activation a must be a floating-point array, got dtype {dtype} "
                            f"(convert with jnp.asarray(a, jnp.float32))")
    return check


def _identity_fwd(a):
    """Identity g(a) = a.  Backward: delta = grad_h E (g'(a) = 1)."""
    return a, None


def _identity_bwd(_, grad_h):
    return (grad_h,)                                    # g'(a) = 1


identity = rule(_identity_fwd, _identity_bwd, check=_floating("identity"))
register_check(identity, "identity", "activation")
extensions.register_second_derivative(identity, extensions.LINEAR)


def _sigmoid_fwd(a):
    """Logistic sigmoid g(a) = 1 / (1 + e^{-a}).

    Backward: delta = grad_h E (.) g(a) (1 - g(a)); the output h = g(a) is the
    residual, so no exponential is recomputed.
    """
    h = lax.logistic(a)                                 # stable for large |a|
    return h, h


def _sigmoid_bwd(h, grad_h):
    return (grad_h * h * (1 - h),)                      # g'(a) = g(a) (1 - g(a))


sigmoid = rule(_sigmoid_fwd, _sigmoid_bwd, check=_floating("sigmoid"))
register_check(sigmoid, "sigmoid", "activation")
extensions.register_second_derivative(sigmoid, lambda a, h: h * (1 - h) * (1 - 2 * h))   # g'' = g' (1 - 2 g)


def _tanh_fwd(a):
    """Hyperbolic tangent g(a) = tanh(a).  Backward: delta = grad_h E (.) (1 - g(a)^2)."""
    h = jnp.tanh(a)
    return h, h


def _tanh_bwd(h, grad_h):
    return (grad_h * (1 - h * h),)                      # g'(a) = 1 - g(a)^2


tanh = rule(_tanh_fwd, _tanh_bwd, check=_floating("tanh"))
register_check(tanh, "tanh", "activation")
extensions.register_second_derivative(tanh, lambda a, h: -2 * h * (1 - h * h))          # g'' = -2 g g'


def _relu_fwd(a):
    """Rectified linear unit g(a) = max(0, a) (NaN stays NaN).

    Backward: delta = grad_h E (.) [a > 0], with the convention g'(0) = 0.  The
    residual is the boolean mask [a > 0] (one byte per unit instead of a).
    """
    return jnp.maximum(a, jnp.zeros((), a.dtype)), a > 0


def _relu_bwd(mask, grad_h):
    return (jnp.where(mask, grad_h, jnp.zeros((), grad_h.dtype)),)   # g'(a) = [a > 0]


relu = rule(_relu_fwd, _relu_bwd, check=_floating("relu"))
register_check(relu, "relu", "activation")
extensions.register_second_derivative(relu, extensions.LINEAR)


def _leaky_relu_fwd(a, slope=0.01):
    """Leaky ReLU g(a) = a if a > 0 else slope * a, with a fixed slope.

    Backward: delta = grad_h E (.) (1 if a > 0 else slope).  The slope is a
    hyperparameter (its cotangent is None); use ``prelu`` to learn it.
    """
    positive = a > 0
    return jnp.where(positive, a, slope * a).astype(a.dtype), (positive, slope)


def _leaky_relu_bwd(res, grad_h):
    positive, slope = res
    delta = jnp.where(positive, grad_h, slope * grad_h).astype(grad_h.dtype)   # g'(a) = 1 or slope
    return delta, None


leaky_relu = rule(_leaky_relu_fwd, _leaky_relu_bwd, check=_floating("leaky_relu"),
                  nondiff=("slope",))
register_check(leaky_relu, "leaky_relu", "activation", variants=({"slope": 0.1},))


def sum_to_shape(x, shape):
    """Sum x over the axes that broadcasting added or stretched to reach x.shape from shape
    (the fan-out rule for a broadcast parameter: its gradient sums over every use)."""
    lead = x.ndim - len(shape)
    x = jnp.sum(x, axis=tuple(range(lead))) if lead else x
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _prelu_fwd(a, alpha):
    """Parametric ReLU (He et al. 2015) g(a) = a if a > 0 else alpha * a, alpha learnable.

    alpha is a scalar or broadcasts against a (e.g. one slope per unit, shape (n,)).
    Backward:
        delta        = grad_h E (.) (1 if a > 0 else alpha)
        grad_alpha E = sum over what alpha was broadcast over of grad_h E (.) (0 if a > 0 else a)
    """
    positive = a > 0
    return jnp.where(positive, a, alpha * a), (positive, a, alpha)


def _prelu_bwd(res, grad_h):
    positive, a, alpha = res
    delta = jnp.where(positive, grad_h, alpha * grad_h)                              # dg/da = 1 or alpha
    grad_alpha = sum_to_shape(jnp.where(positive, 0, a * grad_h), jnp.shape(alpha))  # dg/dalpha = 0 or a
    return delta, grad_alpha


def _check_prelu(a, alpha):
    _floating("prelu")(a)
    try:
        shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(alpha))
    except ValueError:
        shape = None
    if shape != jnp.shape(a):
        raise ValueError(f"fnbp.prelu: alpha must broadcast to a's shape {jnp.shape(a)} (a scalar, or one slope "
                         f"per unit of shape {jnp.shape(a)[-1:]}), got alpha of shape {jnp.shape(alpha)}")


prelu = rule(_prelu_fwd, _prelu_bwd, check=_check_prelu)
register_check(prelu, "prelu", "prelu")


def _zero_bwd(_, grad_h):
    return (jnp.zeros_like(grad_h),)    # g'(a) = 0 almost everywhere (exactly 0 even if grad_h is inf/NaN)


def _step_fwd(a):
    """Heaviside threshold g(a) = 1 if a > 0 else 0 (the perceptron's activation; step(0) = 0; NaN stays NaN).

    Backward: delta = 0.  Its derivative is 0 almost everywhere (and undefined at
    0), so no gradient flows through a step unit: gradient descent cannot train
    the layers below it.  This is why the notes prefer ReLU, whose derivative is
    1 on the whole positive half-line.
    """
    return jnp.where(jnp.isnan(a), a, (a > 0).astype(a.dtype)), None


step = rule(_step_fwd, _zero_bwd, check=_floating("step"))
register_check(step, "step", "activation")


def _sign_fwd(a):
    """Sign g(a) = -1, 0 or +1 (NaN stays NaN).

    Backward: delta = 0.  Like ``step`` its derivative is 0 almost everywhere, so
    backprop passes no gradient through it: the reason the notes prefer ReLU.
    """
    return jnp.sign(a), None


sign = rule(_sign_fwd, _zero_bwd, check=_floating("sign"))
register_check(sign, "sign", "activation")


def _softmax_fwd(a):
    """Softmax over the last axis, p_i = e^{a_i} / sum_j e^{a_j}.

    Backward: the full Jacobian-vector product (dp_i/da_j = p_i ([i = j] - p_j)),

        delta = p (.) (grad_h E - <grad_h E, p>),

    computed in O(n) without forming the n x n Jacobian.
    """
    z = a - jnp.max(a, axis=-1, keepdims=True)   # shift: no overflow for |a| up to 1e4+
    e = jnp.exp(z)
    p = e / jnp.sum(e, axis=-1, keepdims=True)
    return p, p


def _softmax_bwd(p, grad_h):
    return (p * (grad_h - jnp.sum(grad_h * p, axis=-1, keepdims=True)),)   # J^T g = p (.) (g - <g, p>)


softmax = rule(_softmax_fwd, _softmax_bwd, check=_floating("softmax"))
register_check(softmax, "softmax", "activation")


ACTIVATIONS = {
    "identity": identity, "sigmoid": sigmoid, "tanh": tanh, "relu": relu, "leaky_relu": leaky_relu,
    "prelu": prelu, "step": step, "sign": sign, "softmax": softmax,
}
