"""Alternative feedback: each a one-line change to a backward rule.

Feedback alignment (Lillicrap et al., Nature Communications 2016).  The backward of a dense
layer sends the error down through the transposed forward weights, grad_{h_{k-1}} = W_k^T delta_k.
Feedback alignment sends it through a FIXED random matrix B_k of the same shape instead:

    forward   a_k = W_k h_{k-1} + b_k                     (unchanged)
    backward  grad_{W_k} = delta_k h_{k-1}^T,  grad_{b_k} = delta_k   (unchanged, local)
              "grad"_{h_{k-1}} = B_k^T delta_k            (B_k instead of W_k)

The output layer's update is the true gradient's; the hidden layers' are not, yet W_k comes to
"align" with B_k during training, so that the updates point within 90 degrees of the gradient.

Straight-through estimators (Bengio et al. 2013; Hubara et al. 2016).  ``sign`` and ``step`` have
g'(a) = 0 almost everywhere, so backprop passes no gradient through them.  The STE keeps the
forward and replaces g' in the backward by the derivative of a surrogate:

    sign_ste   h = sign(a);  delta = grad_h E (.) [|a| <= window]    window 1: surrogate hardtanh clip(a, -1, 1)
    step_ste   h = step(a);  delta = grad_h E (.) [|a| <= window]    window 1/2: surrogate clip(a + 1/2, 0, 1)
    window = math.inf: the identity STE, delta = grad_h E (Bengio et al.'s plain straight-through).

All are ``fnbp.rule`` rules: usable in ``jax.grad`` (through ``apply`` or ``fnbp.mlp.apply``), in the
explicit walker (``backprop`` here, ``fnbp.backprop`` for the activations).
"""
import math

import jax
import jax.numpy as jnp

from . import activations, graph, losses, mlp
from .check_cases import register as register_check
from .graph import Input
from .layers import check_dense_shapes, dense, dense_backward, dense_forward
from .mlp import check_params
from .objective import objective
from .rules import rule

__all__ = ["dense_fa", "sign_ste", "step_ste", "init_feedback", "network", "apply", "backprop", "angle"]


# --- feedback alignment ---------------------------------------------------------------
def _dense_fa_fwd(W, b, h_prev, B):
    """Dense layer a = W h_prev + b whose backward uses a fixed feedback matrix B (feedback alignment).

    Shapes: W and B (n_out, n_in), b (n_out,), h_prev (n_in,) or (batch, n_in).
    Backward: grad_W = delta^T H, grad_b = sum_n delta_n (as ``dense``), grad_h = B^T delta per example
    (where ``dense`` has W^T delta); B is fixed: no cotangent.
    """
    a, _ = dense_forward(W, b, h_prev)
    return a, (B, h_prev)


def _dense_fa_bwd(res, delta):
    grad_W, grad_b, grad_h = dense_backward(res, delta)      # res = (B, h_prev): grad_h = B^T delta
    return grad_W, grad_b, grad_h, None


def _check_dense_fa(W, b, h_prev, B):
    check_dense_shapes(W, b, h_prev, name="fnbp.feedback.dense_fa")
    if jnp.shape(B) != jnp.shape(W):
        raise ValueError(f"fnbp.feedback.dense_fa: the feedback matrix B must have W's shape {jnp.shape(W)}, "
                         f"got {jnp.shape(B)}")


dense_fa = rule(_dense_fa_fwd, _dense_fa_bwd, name="dense_fa", check=_check_dense_fa,
                nondiff=("B",))
register_check(dense_fa, "dense_fa", "dense_fa", argnums=(0, 1))  # grad_W, grad_b: the true ones
register_check(dense_fa, "dense_fa_feedback", "dense_fa", argnums=(2,), surrogate=True,  # grad_h = B^T delta
               name="dense_fa[grad_h]")


# --- straight-through estimators ------------------------------------------------------
def _check_window(name):
    def check(a, window):
        if isinstance(window, (int, float)) and not window > 0:
            raise ValueError(f"fnbp.feedback.{name}: window must be > 0 (math.inf for the identity STE), "
                             f"got {window!r}")
    return check


def _window_bwd(res, grad_h):
    a, window = res
    return jnp.where(jnp.abs(a) <= window, grad_h, jnp.zeros((), grad_h.dtype)), None   # g' := [|a| <= window]


def _sign_ste_fwd(a, window=1.0):
    """Sign h = sign(a) with the straight-through estimator (NaN stays NaN).

    Backward: delta = grad_h E (.) [|a| <= window], the derivative of the surrogate hardtanh
    clip(a, -1, 1) for the default window 1 (Hubara et al. 2016; slope 1 on [-window, window] otherwise);
    window = math.inf: delta = grad_h E (identity STE).  ``fnbp.sign`` has delta = 0.
    window is a hyperparameter (cotangent None).
    """
    return jnp.sign(a), (a, window)


sign_ste = rule(_sign_ste_fwd, _window_bwd, name="sign_ste", check=_check_window("sign_ste"),
                nondiff=("window",))
register_check(sign_ste, "hardtanh", "activation", surrogate=True)  # backward = clip's derivative


def _step_ste_fwd(a, window=0.5):
    """Step h = [a > 0] with the straight-through estimator (step(0) = 0; NaN stays NaN).

    Backward: delta = grad_h E (.) [|a| <= window]: the derivative of the surrogate hard sigmoid
    clip(a + 1/2, 0, 1) for the default window 1/2 (slope 1 on [-window, window] otherwise);
    window = math.inf: delta = grad_h E (identity STE).  ``fnbp.step`` has delta = 0.
    """
    return jnp.where(jnp.isnan(a), a, (a > 0).astype(a.dtype)), (a, window)


step_ste = rule(_step_ste_fwd, _window_bwd, name="step_ste", check=_check_window("step_ste"),
                nondiff=("window",))
register_check(step_ste, "hard_sigmoid", "activation", surrogate=True)


# --- networks with feedback alignment -------------------------------------------------
def init_feedback(key, params, *, scale=None):
    """Fixed random feedback matrices B_k, one per layer, each of W_k's shape (n_out, n_in) and dtype:
    uniform in [-r, r] with r = sqrt(6 / (n_in + n_out)) (Glorot's range) times ``scale`` (default 1).
    Same key, same matrices.  (B_1 never matters: nothing is sent below the input.)"""
    check_params(params, name="fnbp.feedback.init_feedback")
    keys = jax.random.split(key, len(params))
    out = []
    for k_B, layer in zip(keys, params):
        n_out, n_in = jnp.shape(layer["W"])
        r = math.sqrt(6.0 / (n_in + n_out)) * (1.0 if scale is None else scale)
        out.append(jax.random.uniform(k_B, (n_out, n_in), jnp.result_type(layer["W"]), -r, r))
    return out


def _check_feedback(params, feedback, name):
    if not isinstance(feedback, (list, tuple)) or len(feedback) != len(params):
        raise ValueError(f"{name}: feedback must be a list of {len(params)} matrices (one per layer, from "
                         f"fnbp.feedback.init_feedback), got {type(feedback).__name__} of length "
                         f"{len(feedback) if isinstance(feedback, (list, tuple)) else '-'}")
    for k, (layer, B) in enumerate(zip(params, feedback)):
        if jnp.shape(B) != jnp.shape(layer["W"]):
            raise ValueError(f"{name}: feedback matrix {k} must have W's shape {jnp.shape(layer['W'])}, "
                             f"got {jnp.shape(B)}")


def network(params, *, activation=activations.relu, output=activations.identity, who="fnbp.feedback.network"):
    """``fnbp.mlp.network`` with every dense node "a{k}" a ``dense_fa`` taking B_k from the network input
    "B{k}" (k = 1 ... L): a_k = W_k h_{k-1} + b_k forward, B_k^T delta_k sent down."""
    net = mlp.network(params, activation=activation, output=output, who=who)
    nodes = [graph.node(n.name, dense_fa, *n.args, Input("B" + n.name[1:])) if n.op is dense else n
             for n in net.nodes]
    return graph.make(nodes, net.output, net.state_updates)


def _inputs(feedback, **inputs):
    return {**inputs, **{f"B{k + 1}": jax.lax.stop_gradient(B) for k, B in enumerate(feedback)}}


def apply(params, feedback, x, *, activation=activations.relu, output=activations.identity):
    """Forward pass y = h_L with every dense layer a ``dense_fa`` (same y as ``fnbp.mlp.apply``);
    ``jax.grad`` of a loss of it gives the feedback-alignment updates.  feedback: from ``init_feedback``."""
    who = "fnbp.feedback.apply"
    check_params(params, x, name=who)
    _check_feedback(params, feedback, who)
    net = network(params, activation=activation, output=output, who=who)
    return graph.apply(net, params, _inputs(feedback, x=x))[0]


def backprop(params, feedback, x, d, *, activation=activations.relu, output=activations.identity,
             loss=losses.half_sse):
    """(E, updates): the explicit walker (``fnbp.graph.forward``/``backward``) on ``network``, so
    grad_{h_{k-1}} = B_k^T delta_k.  updates has params' structure."""
    who = "fnbp.feedback.backprop"
    check_params(params, x, name=who)
    _check_feedback(params, feedback, who)
    net = objective(network(params, activation=activation, output=output, who=who),
                          losses.loss_spec(loss, name=who))
    E, tape = graph.forward(net, params, _inputs(feedback, x=x, d=d), who=who)
    return E, graph.backward(tape, who=who).params


def angle(u, v):
    """Angle in degrees between two pytrees of the same structure, flattened to vectors:
    arccos(<u, v> / (||u|| ||v||)).  NaN if either is zero."""
    lu, lv = jax.tree_util.tree_leaves(u), jax.tree_util.tree_leaves(v)
    dot = sum(jnp.vdot(a, b) for a, b in zip(lu, lv))
    nu = jnp.sqrt(sum(jnp.vdot(a, a) for a in lu))
    nv = jnp.sqrt(sum(jnp.vdot(b, b) for b in lv))
    cos = dot / (nu * nv)
    return jnp.degrees(jnp.arccos(jnp.clip(cos, -1.0, 1.0)))
