"""Multi-layer perceptrons: a plain pytree of parameters, and the chain as a graph for the walker.

A network of L layers is a list of dicts ``{"W": (n_out, n_in), "b": (n_out,)}``
(plus ``"alpha"`` for a learnable PReLU slope, ``"gamma"``/``"beta"`` for batch norm).
``network`` lays the chain out as a ``fnbp.graph`` of nodes

    h_0 = x;  a_k = W_k h_{k-1} + b_k   (node "a{k}");  h_k = g_k(a_k)   (node "h{k}");  y = h_L

(with "bn{k}" and "dropout{k}" nodes where asked).  ``apply``/``apply_stateful`` run
it with ``fnbp.graph.apply`` (``jax.grad`` through them runs our rules), ``backprop``
with the explicit walker ``fnbp.graph.forward``/``backward`` -- one walker, two ways.
"""
import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import activations, graph, losses, norm, ops, regularization
from .graph import Const, Input, Param, State
from .layers import dense

__all__ = ["Network", "init", "init_state", "apply", "apply_stateful", "backprop", "network", "num_params",
           "layer_activations", "check_params", "INITS"]

INITS = ("uniform", "glorot", "he")


def _check_sizes(sizes, name):
    """The layer widths as a tuple of ints, or a TypeError naming the function and the bad entry."""
    try:
        sizes = tuple(sizes)
    except TypeError:
        raise TypeError(f"{name}: sizes must be a sequence of layer widths, got {type(sizes).__name__}") from None
    for n in sizes:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise TypeError(f"{name}: every width in sizes must be an int, got {n!r} ({type(n).__name__}) "
                            f"in {list(sizes)}")
    return tuple(int(n) for n in sizes)


def init(key, sizes, *, init="glorot", dtype=jnp.float32, prelu_alpha=None, batch_norm=False):
    """Random parameters for a network with layer widths ``sizes`` = (n_0, n_1, ..., n_L).

    Args:
      key: a ``jax.random`` key; same key, same parameters.
      sizes: input width followed by each layer's width, e.g. (784, 512, 512, 10).
      init: the weight initialiser:
        * ``"uniform"``: W and b uniform in [-1, 1] (the notes' "random between -1 and 1");
        * ``"glorot"``: W uniform in [-r, r], r = sqrt(6 / (n_in + n_out)) (Glorot & Bengio 2010), b = 0;
        * ``"he"``: W normal with std sqrt(2 / n_in) (He et al. 2015, for ReLU), b = 0.
      dtype: parameter dtype (float32 by default; pass jnp.float64 under x64 for checks).
      prelu_alpha: if given, every hidden layer also gets ``"alpha"``, one
        learnable PReLU slope per unit initialised to this value.
      batch_norm: if True, every hidden layer also gets batch-norm parameters
        ``"gamma"`` (ones) and ``"beta"`` (zeros); see ``apply_stateful``.

    Returns a list of L dicts ``{"W": (n_out, n_in), "b": (n_out,)}``.
    """
    sizes = _check_sizes(sizes, "fnbp.mlp.init")
    if len(sizes) < 2 or any(n < 1 for n in sizes):
        raise ValueError(f"fnbp.mlp.init: sizes must list the input width and at least one layer width, "
                         f"all >= 1, got {sizes}")
    if init not in INITS:
        raise ValueError(f"fnbp.mlp.init: init must be one of {INITS}, got {init!r}")
    params = []
    keys = jax.random.split(key, len(sizes) - 1)
    for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        k_W, k_b = jax.random.split(keys[k])
        if init == "uniform":
            W = jax.random.uniform(k_W, (n_out, n_in), dtype, -1.0, 1.0)
            b = jax.random.uniform(k_b, (n_out,), dtype, -1.0, 1.0)
        elif init == "glorot":
            r = math.sqrt(6.0 / (n_in + n_out))
            W = jax.random.uniform(k_W, (n_out, n_in), dtype, -r, r)
            b = jnp.zeros((n_out,), dtype)
        else:
            W = jax.random.normal(k_W, (n_out, n_in), dtype) * math.sqrt(2.0 / n_in)
            b = jnp.zeros((n_out,), dtype)
        layer = {"W": W, "b": b}
        if prelu_alpha is not None and k < len(sizes) - 2:
            layer["alpha"] = jnp.full((n_out,), prelu_alpha, dtype)
        if batch_norm and k < len(sizes) - 2:
            layer["gamma"] = jnp.ones((n_out,), dtype)
            layer["beta"] = jnp.zeros((n_out,), dtype)
        params.append(layer)
    return params


def num_params(sizes):
    """Number of parameters sum_k (n_{k-1} + 1) n_k of a dense network with widths ``sizes``.

    The notes' exercise: 1600-100-100-100-10 has 181,310 parameters.
    """
    sizes = _check_sizes(sizes, "fnbp.mlp.num_params")
    return sum((n_in + 1) * n_out for n_in, n_out in zip(sizes[:-1], sizes[1:]))


def check_params(params, x=None, name="fnbp.mlp.apply"):
    """Raise ValueError naming the layer index and the widths when the layers do not chain."""
    if not isinstance(params, (list, tuple)) or not params:
        raise ValueError(f"{name}: params must be a non-empty list of {{'W', 'b'}} dicts, got {type(params).__name__}")
    for k, layer in enumerate(params):
        if not isinstance(layer, dict) or "W" not in layer or "b" not in layer:
            raise ValueError(f"{name}: layer {k} must be a dict with 'W' and 'b', got {layer!r:.80}")
        W, b = layer["W"], layer["b"]
        if jnp.ndim(W) != 2:
            raise ValueError(f"{name}: layer {k}: W must have shape (n_out, n_in), got {jnp.shape(W)}")
        if jnp.shape(b) != (jnp.shape(W)[0],):
            raise ValueError(f"{name}: layer {k}: b has shape {jnp.shape(b)} but W has {jnp.shape(W)[0]} rows "
                             f"(expected b of shape ({jnp.shape(W)[0]},))")
    for k in range(1, len(params)):
        n_prev, n_in = jnp.shape(params[k - 1]["W"])[0], jnp.shape(params[k]["W"])[1]
        if n_prev != n_in:
            raise ValueError(f"{name}: layer widths do not chain: layer {k - 1} outputs {n_prev} units but "
                             f"layer {k} expects {n_in} inputs (W of layer {k} has shape {jnp.shape(params[k]['W'])})")
    if x is not None:
        n_in = jnp.shape(params[0]["W"])[1]
        if jnp.ndim(x) < 1 or jnp.shape(x)[-1] != n_in:
            raise ValueError(f"{name}: input x has shape {jnp.shape(x)} but layer 0 expects {n_in} inputs "
                             f"(x of shape ({n_in},) or (batch, {n_in}))")


def layer_activations(n_layers, activation, output):
    """The list g_1 ... g_L: ``activation`` for the hidden layers (or a list of L - 1
    per-layer activations), ``output`` for the last layer."""
    if isinstance(activation, (list, tuple)):
        if len(activation) != n_layers - 1:
            raise ValueError(f"fnbp.mlp: a per-layer activation list needs one entry per hidden layer "
                             f"({n_layers - 1} for {n_layers} layers), got {len(activation)}")
        gs = list(activation) + [output]
    else:
        gs = [activation] * (n_layers - 1) + [output]
    for g in gs:
        if not callable(g):
            hint = (f" (use fnbp.activations.ACTIVATIONS[{g!r}])" if isinstance(g, str)
                    and g in activations.ACTIVATIONS else "")
            raise TypeError(f"fnbp.mlp: an activation must be a function such as fnbp.relu, got {g!r}{hint}")
    return gs


def _is_prelu(act):
    return (act.func if isinstance(act, functools.partial) else act) is activations.prelu


def uses_layer_alpha(act):
    """True when ``act`` is PReLU taking its learnable alpha from the layer's ``"alpha"``
    (not from a ``functools.partial(fnbp.prelu, alpha=...)``)."""
    return _is_prelu(act) and "alpha" not in getattr(act, "keywords", {})


def _activation_node(name, act, pre, k, layer, who):
    """h_k = g_k(a_k) as a node; PReLU's learnable alpha is the parameter (k, "alpha")."""
    if isinstance(act, functools.partial) and act.args:
        raise ValueError(f"{who}: give an activation's options by keyword, e.g. "
                         f"functools.partial(fnbp.leaky_relu, slope=0.2); a positional argument binds the "
                         f"pre-activation a itself (got {act!r})")
    if uses_layer_alpha(act):
        if "alpha" not in layer:
            raise ValueError(f"{who}: prelu needs a learnable 'alpha' in the layer's parameters "
                             f"(fnbp.mlp.init(..., prelu_alpha=0.25) adds one)")
        return graph.node(name, act, pre, Param(k, "alpha"))
    return graph.node(name, act, pre)


def network(params, *, activation=activations.relu, output=activations.identity, train=False, dropout=0.0,
            bn_position="before", bn_momentum=0.1, bn_eps=1e-5, running=True, who="fnbp.mlp.network"):
    """The MLP as a ``fnbp.graph.Graph`` with input "x" (and "key" for dropout).

    Layer k (1-based): node "a{k}" = dense, "h{k}" = g_k; for hidden layers with
    ``"gamma"``: "bn{k}" (batch norm before or after g_k: the training rule with the
    batch's statistics when ``train``, else the running statistics from the state), plus
    the auxiliary "stats{k}" updating the running statistics (``running=True``); in
    training with ``dropout > 0``: "dropout{k}" with the key ``fold_in(key, k - 1)``.
    """
    if bn_position not in ("before", "after"):
        raise ValueError(f"{who}: bn_position must be 'before' or 'after', got {bn_position!r}")
    nodes, updates, prev = [], [], Input("x")
    for k, (layer, g) in enumerate(zip(params, layer_activations(len(params), activation, output))):
        i, hidden = k + 1, k < len(params) - 1
        bn = hidden and "gamma" in layer

        def normalise(v, k=k, i=i):
            if train:
                nodes.append(graph.node(f"bn{i}", norm.batch_norm, v, Param(k, "gamma"), Param(k, "beta"), eps=bn_eps))
                if running:
                    nodes.append(graph.node(f"stats{i}", ops.running_statistics, v, State(k), aux=True,
                                            momentum=bn_momentum))
                    updates.append(((k,), f"stats{i}"))
            else:
                nodes.append(graph.node(f"bn{i}", ops.batch_norm_eval, v, Param(k, "gamma"), Param(k, "beta"),
                                        State(k, "mean"), State(k, "var"), eps=bn_eps))
            return f"bn{i}"

        nodes.append(graph.node(f"a{i}", dense, Param(k, "W"), Param(k, "b"), prev))     # a_k = W_k h_{k-1} + b_k
        prev = normalise(f"a{i}") if bn and bn_position == "before" else f"a{i}"
        nodes.append(_activation_node(f"h{i}", g, prev, k, layer, who))                   # h_k = g_k(a_k)
        prev = normalise(f"h{i}") if bn and bn_position == "after" else f"h{i}"
        if hidden and train and dropout:
            nodes.append(graph.node(f"key{i}", jax.random.fold_in, Input("key"), Const(k), aux=True))
            nodes.append(graph.node(f"dropout{i}", regularization.dropout, prev, dropout, f"key{i}"))
            prev = f"dropout{i}"
    return graph.make(nodes, prev, updates)


@dataclasses.dataclass(frozen=True)
class Network:
    """The MLP of ``network``'s options as a model (``graph``, ``init_state``, ``check_params``), for
    ``fnbp.train`` without ``model=``: the parameters are ``init``'s list of dicts."""
    activation: Callable = activations.relu
    output: Callable = activations.identity
    dropout: float = 0.0
    bn_position: str = "before"
    bn_momentum: float = 0.1

    def graph(self, params, *, train=False, running=True):
        return network(params, activation=self.activation, output=self.output, train=train,
                       dropout=self.dropout if train else 0.0, bn_position=self.bn_position,
                       bn_momentum=self.bn_momentum, running=running, who="fnbp.train")

    def init_state(self, params):
        return init_state(params)

    def check_params(self, params, x=None, name="fnbp.mlp"):
        check_params(params, x, name=name)

    def describe(self):
        return {"mlp": {"activation": _describe_fn(self.activation), "output": _describe_fn(self.output),
                        "dropout": self.dropout, "bn_position": self.bn_position, "bn_momentum": self.bn_momentum}}


def _describe_fn(fn):
    base = fn.func if isinstance(fn, functools.partial) else fn
    return f"{getattr(base, '__module__', '?')}:{getattr(base, '__qualname__', repr(base))}"


def apply(params, x, *, activation=activations.relu, output=activations.identity):
    """Forward pass y = h_L of the network (custom_vjp layers, so ``jax.grad`` runs our rules).

    Args:
      params: list of layer dicts ``{"W", "b"}`` (``"alpha"`` for PReLU layers).
      x: one example (n_0,) or a mini-batch (batch, n_0).
      activation: g for the hidden layers, or a list of L - 1 per-layer activations:
        fnbp's activations (``functools.partial(fnbp.leaky_relu, slope=0.2)`` for options;
        ``fnbp.prelu`` takes its alpha from the layer), a rule of your own, or any function.
      output: g_L for the output layer (identity: logits for softmax_cross_entropy).

    Raises ValueError naming the layer index and the widths when the layers do not chain,
    and when a layer has batch-norm parameters (those need ``apply_stateful``).
    """
    check_params(params, x)
    bn_layers = [k for k, layer in enumerate(params) if "gamma" in layer]
    if bn_layers:
        raise ValueError(f"fnbp.mlp.apply: layers {bn_layers} have batch-norm parameters (gamma, beta); use "
                         "fnbp.mlp.apply_stateful(params, state, x, train=...) with fnbp.mlp.init_state(params)")
    net = network(params, activation=activation, output=output, who="fnbp.mlp.apply")
    return graph.apply(net, params, {"x": x})[0]


def init_state(params):
    """Running batch-norm statistics for ``apply_stateful``: one dict per layer,
    ``{"mean", "var"}`` for layers with batch norm (``"gamma"`` in the layer), ``{}`` otherwise."""
    return [norm.init_batch_norm_state(jnp.shape(layer["W"])[0], jnp.result_type(layer["W"]))
            if "gamma" in layer else {} for layer in params]


def apply_stateful(params, state, x, *, train, key=None, activation=activations.relu,
                   output=activations.identity, dropout=0.0, bn_position="before", bn_momentum=0.1, bn_eps=1e-5):
    """Forward pass with batch norm and/or dropout between layers; returns ``(y, new_state)``.

    Hidden layer k (every layer but the last):
        a_k = W_k h_{k-1} + b_k
        a_k = BN(a_k)          if the layer has "gamma"/"beta" and bn_position == "before"
        h_k = g_k(a_k)
        h_k = BN(h_k)          if bn_position == "after"
        h_k = dropout(h_k, p)  if train and dropout > 0 (key folded with k: one mask per layer)
    The output layer is a plain dense layer and ``output``.

    Args:
      params: from ``init(..., batch_norm=True)`` for batch norm (or without it).
      state: running statistics from ``init_state(params)``.
      train: True uses batch statistics (and updates the running ones) and
        drops units; False uses the running statistics and no dropout.
      key: ``jax.random`` key for the dropout masks (needed when train and dropout > 0).
      dropout: drop probability p (inverted dropout, see ``fnbp.dropout``).
      bn_position: "before" or "after" the activation.
      bn_momentum: weight of the new batch in the running averages (PyTorch's
        convention, 0.1; see ``fnbp.norm``).

    With no batch-norm parameters and dropout == 0 this equals ``apply``.
    """
    check_params(params, x)
    if train and dropout and key is None:
        raise ValueError("fnbp.mlp.apply_stateful: dropout in training mode needs an explicit jax.random key")
    if len(state) != len(params):
        raise ValueError(f"fnbp.mlp.apply_stateful: state has {len(state)} entries for {len(params)} layers "
                         "(use fnbp.mlp.init_state(params))")
    net = network(params, activation=activation, output=output, train=train, dropout=dropout,
                  bn_position=bn_position, bn_momentum=bn_momentum, bn_eps=bn_eps, who="fnbp.mlp.apply_stateful")
    return graph.apply(net, params, {"x": x, "key": key}, state)


def has_l2(l2):
    """False only for a Python number equal to 0 (a traced lambda always gets its node)."""
    return not (isinstance(l2, (int, float)) and l2 == 0)


def backprop(params, x, d, *, model=None, activation=activations.relu, output=activations.identity,
             loss=losses.half_sse, l2=0.0, dropout=0.0, key=None, bn_position="before", state=None, trace=False):
    """E and its gradient w.r.t. every parameter, by the notes' explicit algorithm (``fnbp.graph``).

    Forward (each node's rule.fwd, storing its residuals):
        h_0 = x;  a_k = W_k h_{k-1} + b_k;  h_k = g_k(a_k);  y = h_L;  E = L(y; d) + l2 * Omega
    Backward (grad_table[E] = 1, nodes in reverse order, each rule.bwd):
        grad_{h_L} E = grad_y L(y; d)
        for k = L ... 1:
            delta_k          = grad_{h_k} E (.) g'_k(a_k)     (activation rule's bwd)
            grad_{b_k} E     = delta_k                        (summed over the batch)
            grad_{W_k} E     = delta_k h_{k-1}^T              (delta^T H on a batch)
            grad_{h_{k-1}} E = W_k^T delta_k
        plus l2 * W_k for the L2 penalty, and grad_alpha for learnable PReLU slopes.

    Args:
      params: ``model.init``'s params; without ``model``, a list of ``{"W", "b"}`` dicts (``"alpha"`` for PReLU
        layers, ``"gamma"``/``"beta"`` for batch norm, normalising with the batch's statistics).
      x: a mini-batch (batch, ...) (one example (n_0,) for the MLP too).
      d: the target: same shape as y for regression losses and ``cross_entropy``,
        integer labels for ``softmax_cross_entropy``.
      model: any ``fnbp.nn`` model (``fnbp.nn.serial(...)``): its graph in training mode (batch norm with the
        batch's statistics, dropout from ``key``).  Without it, the MLP of ``activation``/``output``
        (as ``fnbp.mlp.apply``; each needs a hand-written rule) with ``dropout`` between hidden layers.
      loss: a loss with a rule (any of ``fnbp.losses`` but l2_penalty, or your own),
        optionally a ``functools.partial`` with ``reduction='sum'``.
      l2: lambda of the L2 penalty lambda * 1/2 sum_k ||W_k||^2 (weights only).
      key: the dropout masks' key (``fnbp.keys.dropout(key, k)`` for the k-th dropout layer).
      state: the model's running statistics: given, they are updated (batch norm) and returned.
      trace: also return a ``fnbp.graph.Trace``: per node its inputs, output, grad_output (delta_k for a dense
        node) and grad_inputs, and the grad_table.

    Returns ``(E, grads)`` with ``grads`` structured like ``params``; ``(E, grads, new_state)`` when ``state`` is
    given; a ``Trace`` last when ``trace``.
    """
    who = "fnbp.backprop"
    spec = losses.loss_spec(loss, name=who)
    if model is not None:
        if activation is not activations.relu or output is not activations.identity or dropout or \
                bn_position != "before":
            raise ValueError(f"{who}: activation=, output=, dropout= and bn_position= describe the MLP used without "
                             f"model=; the model carries its own layers")
        if not hasattr(model, "graph"):
            raise TypeError(f"{who}: model must be an fnbp.nn model (fnbp.nn.serial(...)), got {type(model).__name__}")
        model.check_params(params, x, name=who)
        net = model.graph(params, train=True, running=state is not None)
    else:
        check_params(params, x, name=who)
        if state is not None:
            raise ValueError(f"{who}: state= needs a model= with running statistics (fnbp.nn.BatchNorm)")
        net = network(params, activation=activation, output=output, train=True, dropout=dropout,
                      bn_position=bn_position, running=False, who=who)
    if key is None and any(n.aux and n.op is jax.random.fold_in for n in net.nodes):
        raise ValueError(f"{who}: dropout needs an explicit jax.random key (key=)")
    net = graph.objective(net, spec, l2=has_l2(l2))
    E, tape = graph.forward(net, params, {"x": x, "d": d, "key": key, "l2": l2}, state, who=who)
    grads = graph.backward(tape, who=who)
    out = (E, grads.params) + ((tape.new_state,) if state is not None else ())
    return out + (graph.trace(tape, grads),) if trace else out
