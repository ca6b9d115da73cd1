"""Small named example networks that are not a plain chain of layers.

``skip_connection`` is the smallest graph with *fan-out*: the hidden state h1 is
consumed by two later layers,

    h1 = g(W1 x + b1)              (layer "dense1")
    h2 = g(W2 h1 + b2)             (layer "dense2")
    y  = (W3 h2 + b3) + (W4 h1 + b4)   (layers "out" and "skip")

so in the backward pass the gradient reaching h1 arrives along two paths.  The
notes' general back-propagation algorithm (``build_grad``: for every consumer C
of V, G_i = op.bprop(...); G = sum_i G_i) says to *sum* them:

    grad_{h1} E = W2^T delta2  +  W4^T delta_y

``skip_connection_backprop`` is that backward written out by hand from the same
rule functions the custom_vjp layers use (``dense_forward``/``dense_backward``,
``rule.fwd``/``rule.bwd``), with the sum done by :func:`accumulate`, the notes'
``G <- sum_i G^(i)``.  ``jax.grad`` through ``skip_connection`` does the same sum
by itself; the tests check that the two agree, and that dropping either summand
(replacing :func:`accumulate`) gives a wrong gradient.
"""
import functools

import jax
import jax.numpy as jnp

from . import activations, losses
from .backprop import loss_rule
from .layers import dense, dense_backward, dense_forward
from .mlp import activation_rule, apply_activation

__all__ = ["skip_connection_init", "skip_connection", "skip_connection_backprop", "accumulate",
           "SKIP_LAYERS"]

SKIP_LAYERS = ("dense1", "dense2", "out", "skip")


def skip_connection_init(key, n_in, n_h1, n_h2, n_out, *, dtype=jnp.float32):
    """Parameters ``{"dense1", "dense2", "out", "skip"}``, each ``{"W": (n_out, n_in), "b": (n_out,)}``,
    W and b uniform in [-1, 1] (non-zero biases, so ReLU units sit away from their kink)."""
    shapes = {"dense1": (n_h1, n_in), "dense2": (n_h2, n_h1), "out": (n_out, n_h2), "skip": (n_out, n_h1)}
    keys = jax.random.split(key, 2 * len(SKIP_LAYERS))
    return {name: {"W": jax.random.uniform(keys[2 * i], shapes[name], dtype, -1.0, 1.0),
                   "b": jax.random.uniform(keys[2 * i + 1], shapes[name][:1], dtype, -1.0, 1.0)}
            for i, name in enumerate(SKIP_LAYERS)}


def skip_connection(params, x, *, activation=activations.relu):
    """Forward pass y = dense3(h2) + dense4(h1) of the skip-connection network (custom_vjp layers).

    x: one example (n_in,) or a mini-batch (batch, n_in).  ``activation`` is g for
    both hidden layers (one of fnbp's activations; not prelu, which needs an alpha).
    """
    p = params
    h1 = apply_activation(activation, dense(p["dense1"]["W"], p["dense1"]["b"], x), p["dense1"])
    h2 = apply_activation(activation, dense(p["dense2"]["W"], p["dense2"]["b"], h1), p["dense2"])
    return dense(p["out"]["W"], p["out"]["b"], h2) + dense(p["skip"]["W"], p["skip"]["b"], h1)


def accumulate(gradients):
    """The notes' ``G <- sum_i G^(i)``: the gradient of a node is the sum of the
    gradients arriving from each of its consumers."""
    return functools.reduce(lambda a, b: a + b, gradients)


def skip_connection_backprop(params, x, d, *, activation=activations.relu, loss=losses.half_sse):
    """E and grad_params E of ``loss(skip_connection(params, x), d)``, by a hand-written backward.

    No ``jax.grad``: the forward stores each rule's residuals, the backward calls
    the rules' bwd functions in reverse order and sums the two gradients that
    reach h1 (from "dense2" and from "skip") with :func:`accumulate`.

    Returns ``(E, grads)`` with ``grads`` structured like ``params``.
    """
    p = params
    loss_fn, rule_L, reduction = loss_rule(loss, name="fnbp.examples.skip_connection_backprop")
    rule_g, extra = activation_rule(activation, p["dense1"], name="fnbp.examples.skip_connection_backprop")

    # Forward, keeping what each backward needs.
    a1, res_d1 = dense_forward(p["dense1"]["W"], p["dense1"]["b"], x)
    h1, res_g1 = rule_g.fwd(a1, *extra)
    a2, res_d2 = dense_forward(p["dense2"]["W"], p["dense2"]["b"], h1)
    h2, res_g2 = rule_g.fwd(a2, *extra)
    y3, res_out = dense_forward(p["out"]["W"], p["out"]["b"], h2)
    y4, res_skip = dense_forward(p["skip"]["W"], p["skip"]["b"], h1)
    y = y3 + y4
    if loss_fn is losses.softmax_cross_entropy:
        loss_fn(y, d, reduction=reduction)                 # shape/label checks only (trace time)
    else:
        losses._check_same_shape(loss_fn.__name__, y, d)
    E, res_L = rule_L.fwd(y, d, reduction=reduction)

    # Backward.
    grad_y = rule_L.bwd(res_L, jnp.ones((), E.dtype), reduction=reduction)[0]
    # y = y3 + y4: the sum passes grad_y unchanged to both terms.
    gW_out, gb_out, grad_h2 = dense_backward(res_out, grad_y)
    gW_skip, gb_skip, grad_h1_from_skip = dense_backward(res_skip, grad_y)
    delta2 = rule_g.bwd(res_g2, grad_h2)[0]
    gW2, gb2, grad_h1_from_dense2 = dense_backward(res_d2, delta2)
    # h1 has two consumers ("dense2" and "skip"): sum the gradients from both paths.
    grad_h1 = accumulate([grad_h1_from_dense2, grad_h1_from_skip])
    delta1 = rule_g.bwd(res_g1, grad_h1)[0]
    gW1, gb1, _ = dense_backward(res_d1, delta1)
    grads = {"dense1": {"W": gW1, "b": gb1}, "dense2": {"W": gW2, "b": gb2},
             "out": {"W": gW_out, "b": gb_out}, "skip": {"W": gW_skip, "b": gb_skip}}
    return E, grads
