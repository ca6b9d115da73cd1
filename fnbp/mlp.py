"""Multi-layer perceptrons as a plain pytree of parameters and a forward function.

A network of L layers is a list of dicts ``{"W": (n_out, n_in), "b": (n_out,)}``
(plus ``"alpha"`` for a learnable PReLU slope).  The forward pass composes the
custom_vjp layers of ``fnbp.layers`` and ``fnbp.activations``:

    h_0 = x;  a_k = W_k h_{k-1} + b_k;  h_k = g_k(a_k);  y = h_L

so ``jax.grad`` through ``apply`` runs our hand-written rules layer by layer.
``fnbp.backprop`` runs the same rules as the explicit loop of the notes.
"""
import functools
import inspect
import math

import jax
import jax.numpy as jnp

from . import activations, norm
from .layers import dense

__all__ = ["init", "init_state", "apply", "apply_stateful", "num_params", "layer_activations", "check_params",
           "INITS"]

INITS = ("uniform", "glorot", "he")


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
    sizes = tuple(int(n) for n in sizes)
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
    sizes = [int(n) for n in sizes]
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
        return list(activation) + [output]
    return [activation] * (n_layers - 1) + [output]


def _is_prelu(act):
    return (act.func if isinstance(act, functools.partial) else act) is activations.prelu


def uses_layer_alpha(act):
    """True when ``act`` is PReLU taking its learnable alpha from the layer's ``"alpha"``
    (not from a ``functools.partial(fnbp.prelu, alpha=...)``)."""
    return _is_prelu(act) and "alpha" not in getattr(act, "keywords", {})


def _check_keyword_options(act, name):
    if isinstance(act, functools.partial) and act.args:
        raise ValueError(f"{name}: give an activation's options by keyword, e.g. "
                         f"functools.partial(fnbp.leaky_relu, slope=0.2); a positional argument binds the "
                         f"pre-activation a itself (got {act!r})")


def activation_rule(act, layer, name="fnbp.backprop"):
    """(rule, extra_args) for an activation spec: the custom_vjp rule and the
    arguments that follow ``a`` (e.g. the leaky slope, or PReLU's alpha from the layer)."""
    _check_keyword_options(act, name)
    fn, args, kwargs = ((act.func, act.args, act.keywords) if isinstance(act, functools.partial) else (act, (), {}))
    rule = getattr(fn, "rule", None)
    if rule is None:
        raise ValueError(f"{name}: activation {act!r} has no hand-written rule (use one of fnbp's activations)")
    names = list(inspect.signature(fn).parameters)[1:]
    bound = dict(zip(names, args), **kwargs)
    if fn is activations.prelu and "alpha" not in bound:
        if "alpha" not in layer:
            raise ValueError(f"{name}: prelu needs a learnable 'alpha' in the layer's parameters "
                             f"(fnbp.mlp.init(..., prelu_alpha=0.25) adds one)")
        bound["alpha"] = layer["alpha"]
    sig = inspect.signature(fn).bind_partial(None, **bound)
    sig.apply_defaults()
    return rule, tuple(sig.arguments[n] for n in names)


def apply_activation(act, a, layer):
    """h = g(a), passing PReLU its learnable alpha from the layer."""
    _check_keyword_options(act, "fnbp.mlp.apply")
    if uses_layer_alpha(act):
        if "alpha" not in layer:
            raise ValueError("fnbp.mlp.apply: prelu needs a learnable 'alpha' in the layer's parameters "
                             "(fnbp.mlp.init(..., prelu_alpha=0.25) adds one)")
        return act(a, layer["alpha"])
    return act(a)


def apply(params, x, *, activation=activations.relu, output=activations.identity):
    """Forward pass y = h_L of the network (custom_vjp layers, so ``jax.grad`` runs our rules).

    Args:
      params: list of layer dicts ``{"W", "b"}`` (``"alpha"`` for PReLU layers).
      x: one example (n_0,) or a mini-batch (batch, n_0).
      activation: g for the hidden layers, or a list of L - 1 per-layer activations;
        any of fnbp's activations (``functools.partial(fnbp.leaky_relu, slope=0.2)``
        for options; ``fnbp.prelu`` takes its alpha from the layer).
      output: g_L for the output layer (identity: logits for softmax_cross_entropy).

    Raises ValueError naming the layer index and the widths when the layers do not chain,
    and when a layer has batch-norm parameters (those need ``apply_stateful``).
    """
    check_params(params, x)
    bn_layers = [k for k, layer in enumerate(params) if "gamma" in layer]
    if bn_layers:
        raise ValueError(f"fnbp.mlp.apply: layers {bn_layers} have batch-norm parameters (gamma, beta); use "
                         "fnbp.mlp.apply_stateful(params, state, x, train=...) with fnbp.mlp.init_state(params)")
    h = x
    for layer, g in zip(params, layer_activations(len(params), activation, output)):
        a = dense(layer["W"], layer["b"], h)      # a_k = W_k h_{k-1} + b_k
        h = apply_activation(g, a, layer)         # h_k = g_k(a_k)
    return h


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
      dropout: drop probability p (inverted dropout, see ``fnbp.norm.dropout``).
      bn_position: "before" or "after" the activation.
      bn_momentum: weight of the new batch in the running averages (PyTorch's
        convention, 0.1; see ``fnbp.norm``).

    With no batch-norm parameters and dropout == 0 this equals ``apply``.
    """
    check_params(params, x)
    if bn_position not in ("before", "after"):
        raise ValueError(f"fnbp.mlp.apply_stateful: bn_position must be 'before' or 'after', got {bn_position!r}")
    if train and dropout and key is None:
        raise ValueError("fnbp.mlp.apply_stateful: dropout in training mode needs an explicit jax.random key")
    if len(state) != len(params):
        raise ValueError(f"fnbp.mlp.apply_stateful: state has {len(state)} entries for {len(params)} layers "
                         "(use fnbp.mlp.init_state(params))")
    h, new_state = x, []
    gs = layer_activations(len(params), activation, output)
    for k, (layer, g, st) in enumerate(zip(params, gs, state)):
        a = dense(layer["W"], layer["b"], h)
        hidden = k < len(params) - 1
        bn = hidden and "gamma" in layer

        def normalise(v, st=st, layer=layer):
            if train:
                return norm.batch_norm_train(v, layer["gamma"], layer["beta"], st, momentum=bn_momentum, eps=bn_eps)
            return norm.batch_norm_eval(v, layer["gamma"], layer["beta"], st, eps=bn_eps), st

        if bn and bn_position == "before":
            a, st = normalise(a)
        h = apply_activation(g, a, layer)
        if bn and bn_position == "after":
            h, st = normalise(h)
        if hidden and train and dropout:
            h = norm.dropout(h, dropout, jax.random.fold_in(key, k))
        new_state.append(st)
    return h, new_state
