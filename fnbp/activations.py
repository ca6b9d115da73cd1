"""Activation functions h = g(a), each with its hand-written derivative g'(a).

Every activation is a ``jax.custom_vjp`` rule whose backward is the notes'

    delta = grad_h E (.) g'(a)

with g' written by hand (never autodiff).  Each public function carries its
rule as ``fn.rule``: ``fn.rule.fwd(a, *extra) -> (h, residuals)`` and
``fn.rule.bwd(residuals, grad_h) -> (delta, *grads_of_extra)``.  The explicit
backprop loop (``fnbp.backprop``) calls exactly these two functions, so the loop
and ``jax.grad`` cannot drift apart.

All are stable in float32 for |a| up to 1e4 (no inf, no NaN).
"""
import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["identity", "sigmoid", "tanh", "relu", "leaky_relu", "prelu", "step", "sign", "softmax",
           "ACTIVATIONS"]


# --- identity ----------------------------------------------------------------
def _identity_fwd(a):
    return a, None


def _identity_bwd(_, grad_h):
    delta = grad_h                      # g'(a) = 1
    return (delta,)


@jax.custom_vjp
def _identity(a):
    return a


_identity.defvjp(_identity_fwd, _identity_bwd)


def identity(a):
    """Identity g(a) = a.  Backward: delta = grad_h E (g'(a) = 1)."""
    return _identity(a)


identity.rule = _identity


# --- sigmoid -----------------------------------------------------------------
def _sigmoid_fwd(a):
    h = lax.logistic(a)                 # 1 / (1 + e^{-a}), stable for large |a|
    return h, h                         # keep the output as residual


def _sigmoid_bwd(h, grad_h):
    delta = grad_h * h * (1 - h)        # g'(a) = g(a) (1 - g(a))
    return (delta,)


@jax.custom_vjp
def _sigmoid(a):
    return lax.logistic(a)


_sigmoid.defvjp(_sigmoid_fwd, _sigmoid_bwd)


def sigmoid(a):
    """Logistic sigmoid g(a) = 1 / (1 + e^{-a}).

    Backward: delta = grad_h E (.) g(a) (1 - g(a)); the output h = g(a) is the
    residual, so no exponential is recomputed.
    """
    return _sigmoid(a)


sigmoid.rule = _sigmoid


# --- tanh --------------------------------------------------------------------
def _tanh_fwd(a):
    h = jnp.tanh(a)
    return h, h


def _tanh_bwd(h, grad_h):
    delta = grad_h * (1 - h * h)        # g'(a) = 1 - g(a)^2
    return (delta,)


@jax.custom_vjp
def _tanh(a):
    return jnp.tanh(a)


_tanh.defvjp(_tanh_fwd, _tanh_bwd)


def tanh(a):
    """Hyperbolic tangent g(a) = tanh(a).  Backward: delta = grad_h E (.) (1 - g(a)^2)."""
    return _tanh(a)


tanh.rule = _tanh


# --- ReLU --------------------------------------------------------------------
def _relu_fwd(a):
    mask = a > 0
    return jnp.where(mask, a, 0).astype(a.dtype), mask     # keep a boolean mask, not a


def _relu_bwd(mask, grad_h):
    delta = jnp.where(mask, grad_h, 0).astype(grad_h.dtype)  # g'(a) = 1 if a > 0 else 0 (g'(0) = 0)
    return (delta,)


@jax.custom_vjp
def _relu(a):
    return _relu_fwd(a)[0]


_relu.defvjp(_relu_fwd, _relu_bwd)


def relu(a):
    """Rectified linear unit g(a) = max(0, a).

    Backward: delta = grad_h E (.) [a > 0], with the convention g'(0) = 0.  The
    residual is the boolean mask [a > 0] (one byte per unit instead of a).
    """
    return _relu(a)


relu.rule = _relu


# --- leaky ReLU (fixed slope) ------------------------------------------------
def _leaky_relu_fwd(a, slope):
    pos = a > 0
    return jnp.where(pos, a, slope * a).astype(a.dtype), (pos, slope)


def _leaky_relu_bwd(res, grad_h):
    pos, slope = res
    delta = jnp.where(pos, grad_h, slope * grad_h).astype(grad_h.dtype)   # g'(a) = 1 if a > 0 else slope
    return delta, None                  # the slope is a hyperparameter: no gradient


@jax.custom_vjp
def _leaky_relu(a, slope):
    return _leaky_relu_fwd(a, slope)[0]


_leaky_relu.defvjp(_leaky_relu_fwd, _leaky_relu_bwd)


def leaky_relu(a, slope=0.01):
    """Leaky ReLU g(a) = a if a > 0 else slope * a, with a fixed slope.

    Backward: delta = grad_h E (.) (1 if a > 0 else slope).  The slope is a
    hyperparameter (its cotangent is None); use ``prelu`` to learn it.
    """
    return _leaky_relu(a, slope)


leaky_relu.rule = _leaky_relu


# --- PReLU (learnable slope) -------------------------------------------------
def _sum_to_shape(x, shape):
    """Sum x over the axes that broadcasting added or stretched to reach x.shape from shape."""
    lead = x.ndim - len(shape)
    x = jnp.sum(x, axis=tuple(range(lead))) if lead else x
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _prelu_fwd(a, alpha):
    pos = a > 0
    return jnp.where(pos, a, alpha * a), (pos, a, alpha)


def _prelu_bwd(res, grad_h):
    pos, a, alpha = res
    delta = jnp.where(pos, grad_h, alpha * grad_h)                      # dg/da = 1 if a > 0 else alpha
    grad_alpha = _sum_to_shape(jnp.where(pos, 0, a * grad_h), jnp.shape(alpha))  # dg/dalpha = 0 if a > 0 else a
    return delta, grad_alpha.astype(jnp.result_type(alpha))


@jax.custom_vjp
def _prelu(a, alpha):
    return _prelu_fwd(a, alpha)[0]


_prelu.defvjp(_prelu_fwd, _prelu_bwd)


def prelu(a, alpha):
    """Parametric ReLU (He et al. 2015) g(a) = a if a > 0 else alpha * a, alpha learnable.

    alpha is a scalar or broadcasts against a (e.g. one slope per unit, shape (n,)).
    Backward:
        delta       = grad_h E (.) (1 if a > 0 else alpha)
        grad_alpha E = sum over what alpha was broadcast over of grad_h E (.) (0 if a > 0 else a)
    """
    return _prelu(a, alpha)


prelu.rule = _prelu


# --- step (Heaviside) and sign -----------------------------------------------
def _zero_grad_fwd(fn):
    def fwd(a):
        return fn(a), None              # nothing to keep: g' does not depend on a
    return fwd


def _zero_grad_bwd(_, grad_h):
    delta = jnp.zeros_like(grad_h)      # g'(a) = 0 almost everywhere (exactly 0 even if grad_h is inf/NaN)
    return (delta,)


def _heaviside(a):
    return (a > 0).astype(a.dtype)


@jax.custom_vjp
def _step(a):
    return _heaviside(a)


_step.defvjp(_zero_grad_fwd(_heaviside), _zero_grad_bwd)


def step(a):
    """Heaviside threshold g(a) = 1 if a > 0 else 0 (the perceptron's activation; step(0) = 0).

    Backward: delta = 0.  Its derivative is 0 almost everywhere (and undefined at
    0), so no gradient flows through a step unit: gradient descent cannot train
    the layers below it.  This is why the notes prefer ReLU, whose derivative is
    1 on the whole positive half-line.
    """
    return _step(a)


step.rule = _step


@jax.custom_vjp
def _sign(a):
    return jnp.sign(a)


_sign.defvjp(_zero_grad_fwd(jnp.sign), _zero_grad_bwd)


def sign(a):
    """Sign g(a) = -1, 0 or +1.

    Backward: delta = 0.  Like ``step`` its derivative is 0 almost everywhere, so
    backprop passes no gradient through it: the reason the notes prefer ReLU.
    """
    return _sign(a)


sign.rule = _sign


# --- softmax -----------------------------------------------------------------
def _softmax_fwd(a):
    z = a - jnp.max(a, axis=-1, keepdims=True)   # shift: no overflow for |a| up to 1e4+
    e = jnp.exp(z)
    p = e / jnp.sum(e, axis=-1, keepdims=True)
    return p, p


def _softmax_bwd(p, grad_h):
    delta = p * (grad_h - jnp.sum(grad_h * p, axis=-1, keepdims=True))   # J^T g = p (.) (g - <g, p>)
    return (delta,)


@jax.custom_vjp
def _softmax(a):
    return _softmax_fwd(a)[0]


_softmax.defvjp(_softmax_fwd, _softmax_bwd)


def softmax(a):
    """Softmax over the last axis, p_i = e^{a_i} / sum_j e^{a_j}.

    Backward: the full Jacobian-vector product (dp_i/da_j = p_i ([i = j] - p_j)),

        delta = p (.) (grad_h E - <grad_h E, p>),

    computed in O(n) without forming the n x n Jacobian.
    """
    return _softmax(a)


softmax.rule = _softmax


ACTIVATIONS = {
    "identity": identity, "sigmoid": sigmoid, "tanh": tanh, "relu": relu, "leaky_relu": leaky_relu,
    "prelu": prelu, "step": step, "sign": sign, "softmax": softmax,
}
