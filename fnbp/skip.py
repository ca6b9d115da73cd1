"""The skip-connection network: the smallest graph with *fan-out*, run by ``fnbp.graph``.

    h1 = g(W1 x + b1)                  (nodes "a1", "h1": layer "dense1")
    h2 = g(W2 h1 + b2)                 (nodes "a2", "h2": layer "dense2")
    y  = (W3 h2 + b3) + (W4 h1 + b4)   (nodes "out", "skip", "y" = add)

h1 is consumed by two nodes, so in the backward pass its gradient arrives along two
paths.  The notes' general back-propagation (``build_grad``: for every consumer C of V,
G_i = op.bprop(...); G = sum_i G_i) sums them in the walker's grad_table:

    grad_{h1} E = W2^T delta2  +  W4^T delta_y

``skip_connection_backprop`` is the explicit walker on this graph (no autodiff);
``jax.grad`` through ``skip_connection`` runs the same rules; the tests check that
the two agree, and that dropping either summand gives a wrong gradient.
"""
import jax
import jax.numpy as jnp

from . import activations, graph, losses, ops
from .graph import Input, Param
from .layers import dense
from .objective import objective

__all__ = ["skip_connection_init", "skip_connection_network", "skip_connection", "skip_connection_backprop",
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


def _dense(name, layer, h):
    return graph.node(name, dense, Param(layer, "W"), Param(layer, "b"), h)


def skip_connection_network(*, activation=activations.relu):
    """The graph (input "x", output "y"); ``activation`` is g of both hidden layers (not prelu)."""
    return graph.make([
        _dense("a1", "dense1", Input("x")), graph.node("h1", activation, "a1"),
        _dense("a2", "dense2", "h1"), graph.node("h2", activation, "a2"),
        _dense("out", "out", "h2"), _dense("skip", "skip", "h1"),     # h1 fans out: "a2" and "skip"
        graph.node("y", ops.add, "out", "skip"),
    ], "y")


def skip_connection(params, x, *, activation=activations.relu):
    """Forward pass y = dense3(h2) + dense4(h1) (custom_vjp layers: ``jax.grad`` runs the rules).
    x: one example (n_in,) or a mini-batch (batch, n_in)."""
    return graph.apply(skip_connection_network(activation=activation), params, {"x": x})[0]


def skip_connection_backprop(params, x, d, *, activation=activations.relu, loss=losses.half_sse, trace=False):
    """E and grad_params E of ``loss(skip_connection(params, x), d)`` by the explicit walker.

    Returns ``(E, grads)`` with ``grads`` structured like ``params`` (and the
    ``fnbp.graph.Trace`` with ``trace=True``: its grad_table holds the summed grad_{h1} E).
    """
    who = "fnbp.skip.skip_connection_backprop"
    net = objective(skip_connection_network(activation=activation), losses.loss_spec(loss, name=who))
    E, tape = graph.forward(net, params, {"x": x, "d": d}, who=who)
    grads = graph.backward(tape, who=who)
    return (E, grads.params, graph.trace(tape, grads)) if trace else (E, grads.params)
