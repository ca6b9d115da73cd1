"""The explicit backpropagation algorithm of the notes, as one jit-compatible function.

No ``jax.grad`` or ``jax.vjp`` inside: the loop calls the very same forward and
backward functions that the custom_vjp layers use (``rule.fwd``/``rule.bwd`` of
each activation and loss, ``dense_forward``/``dense_backward``), so the loop and
``jax.grad`` through ``fnbp.mlp.apply`` cannot drift apart.
"""
import functools
from typing import Any, NamedTuple

import jax.numpy as jnp

from . import activations, losses
from .layers import dense_backward, dense_forward
from .mlp import activation_rule, check_params, layer_activations, uses_layer_alpha

__all__ = ["backprop", "loss_rule", "forward_backward", "LayerPass"]


def loss_rule(loss, name="fnbp.backprop"):
    """(rule, reduction) of a loss spec such as ``functools.partial(fnbp.losses.half_sse, reduction='sum')``."""
    fn, kwargs = (loss.func, loss.keywords) if isinstance(loss, functools.partial) else (loss, {})
    rule = getattr(fn, "rule", None)
    if rule is None or fn is losses.l2_penalty:
        raise ValueError(f"{name}: loss {loss!r} has no hand-written rule (use one of fnbp.losses; "
                         f"the L2 penalty goes in the l2= argument)")
    reduction = kwargs.get("reduction", "mean")
    losses._check_reduction(fn.__name__, reduction)
    return fn, rule, reduction


class LayerPass(NamedTuple):
    """What dense layer k saw in one run of the loop (arrays with the batch axes of x)."""
    h_prev: Any        # h_{k-1}, the layer's input
    delta: Any         # delta_k = grad_{a_k} E, each example's own row when reduction='sum'
    grad_W: Any        # delta_k^T H_{k-1}
    grad_b: Any        # sum over the batch of delta_k
    extra_grads: tuple  # the activation's further cotangents (PReLU's grad_alpha)


def forward_backward(params, x, d, *, activation=activations.relu, output=activations.identity,
                     loss=losses.half_sse, reduction=None, after_hidden=None, dense_rule=None,
                     dense_extra=None, name="fnbp.backprop"):
    """The notes' loop (forward, then backward k = L ... 1); returns ``(E, [LayerPass per layer])``.

    The shared engine of ``backprop`` and of ``fnbp.per_example``/``fnbp.dp`` (which read delta_k and
    h_{k-1} per layer).  Options beyond ``backprop``'s:
      reduction: overrides the loss spec's reduction ('sum' gives every example its own delta_n).
      after_hidden: per hidden layer k (L - 1 entries, or None), a pair ``(fwd, bwd)`` applied to h_k
        after its activation, ``fwd(h) -> (h, res)``, ``bwd(res, grad_h) -> grad_h`` (e.g. dropout).
      dense_rule, dense_extra: a Rule replacing the dense layer's (``dense_forward``/``dense_backward``)
        and, per layer, its extra positional inputs after (W, b, h) -- e.g. ``fnbp.feedback.dense_fa.rule``
        with the feedback matrices B_k.
    """
    check_params(params, x, name=name)
    if any("gamma" in layer for layer in params):
        raise ValueError(f"{name}: the explicit loop covers dense layers and activations; for batch norm "
                         "use jax.grad through fnbp.mlp.apply_stateful (it runs the batch-norm rule)")
    loss_fn, rule_L, spec_reduction = loss_rule(loss, name)
    reduction = spec_reduction if reduction is None else reduction
    gs = layer_activations(len(params), activation, output)
    extras = dense_extra if dense_extra is not None else [()] * len(params)
    hooks = list(after_hidden) + [None] if after_hidden is not None else [None] * len(params)

    # Forward pass: store what each backward rule needs (a_k's mask/output, h_{k-1}, W_k).
    h, stored = x, []
    for layer, g, extra_d, hook in zip(params, gs, extras, hooks):
        rule_g, extra = activation_rule(g, layer)
        h_prev = h
        a, dense_res = (dense_forward(layer["W"], layer["b"], h) if dense_rule is None      # a_k = W_k h_{k-1} + b_k
                        else dense_rule.fwd(layer["W"], layer["b"], h, *extra_d))
        h, act_res = rule_g.fwd(a, *extra)                                   # h_k = g_k(a_k)
        hook_res = None
        if hook is not None:
            h, hook_res = hook[0](h)
        stored.append((rule_g, h_prev, dense_res, act_res, hook, hook_res))
    y = h
    if loss_fn is losses.softmax_cross_entropy:
        losses._check_softmax_cross_entropy_inputs(y, d, reduction=reduction)     # shape/label checks (trace time)
    else:
        losses._check_same_shape(loss_fn.__name__, y, d)
    E, loss_res = rule_L.fwd(y, d, reduction=reduction)

    # Backward pass: k = L ... 1.
    grad_h = rule_L.bwd(loss_res, jnp.ones((), E.dtype), reduction=reduction)[0]   # grad_{h_L} E = grad_y L
    passes = [None] * len(params)
    for k in reversed(range(len(params))):
        rule_g, h_prev, dense_res, act_res, hook, hook_res = stored[k]
        if hook is not None:
            grad_h = hook[1](hook_res, grad_h)
        delta, *extra_grads = rule_g.bwd(act_res, grad_h)                 # delta_k = grad_{h_k} E (.) g'(a_k)
        grad_W, grad_b, grad_h = (dense_backward(dense_res, delta) if dense_rule is None   # delta h^T, delta, W^T delta
                                  else dense_rule.bwd(dense_res, delta)[:3])
        passes[k] = LayerPass(h_prev, delta, grad_W, grad_b, tuple(extra_grads))
    return E, passes


def backprop(params, x, d, *, activation=activations.relu, output=activations.identity,
             loss=losses.half_sse, l2=0.0):
    """E and its gradient w.r.t. every parameter, by the notes' explicit algorithm.

    Forward (store a_k and h_k):
        h_0 = x;  a_k = W_k h_{k-1} + b_k;  h_k = g_k(a_k);  y = h_L;  E = L(y; d) + l2 * Omega
    Backward:
        grad_{h_L} E = grad_y L(y; d)
        for k = L ... 1:
            delta_k          = grad_{h_k} E (.) g'_k(a_k)     (activation rule's bwd)
            grad_{b_k} E     = delta_k                        (summed over the batch)
            grad_{W_k} E     = delta_k h_{k-1}^T              (delta^T H on a batch)
            grad_{h_{k-1}} E = W_k^T delta_k
        plus l2 * W_k for the L2 penalty, and grad_alpha for learnable PReLU slopes.

    Args:
      params: list of ``{"W", "b"}`` dicts (``"alpha"`` for PReLU layers).
      x: one example (n_0,) or a mini-batch (batch, n_0).
      d: the target: same shape as y for regression losses and ``cross_entropy``,
        integer labels for ``softmax_cross_entropy``.
      activation, output: as in ``fnbp.mlp.apply``.
      loss: any of ``fnbp.losses`` (except l2_penalty), optionally a
        ``functools.partial`` with ``reduction='sum'``.
      l2: lambda of the L2 penalty lambda * 1/2 sum_k ||W_k||^2 (weights only).

    Returns ``(E, grads)`` with ``grads`` structured like ``params``.
    """
    E, passes = forward_backward(params, x, d, activation=activation, output=output, loss=loss)
    gs = layer_activations(len(params), activation, output)
    grads = []
    for k, p in enumerate(passes):
        grads.append({"W": p.grad_W, "b": p.grad_b})
        if "alpha" in params[k]:     # PReLU's gradient w.r.t. alpha, if this layer's alpha is the one it used
            grads[k]["alpha"] = (p.extra_grads[0] if uses_layer_alpha(gs[k]) and p.extra_grads[0] is not None
                                 else jnp.zeros_like(params[k]["alpha"]))
    if not (isinstance(l2, (int, float)) and l2 == 0):
        penalty, penalty_res = losses.l2_penalty.rule.fwd(params, l2)
        grad_penalty, _ = losses.l2_penalty.rule.bwd(penalty_res, jnp.ones((), E.dtype))
        E = E + penalty
        grads = [{n: g + grad_penalty[k][n] for n, g in layer.items()} for k, layer in enumerate(grads)]
    return E, grads
