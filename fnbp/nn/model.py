"""A model is layers composed by one combinator, ``serial``; it lays itself out as the walker's graph.

    model = fnbp.nn.serial(layer_1, ..., layer_L)
    params, state = model.init(key, input_shape)         # input_shape without the batch axis
    y, state = model.apply(params, state, x, train=False, key=None)
    net = model.graph(params, train=True)                # a fnbp.graph.Graph: input "x" (and "key"), output y

Every layer is the same small pair (stax's ``(init, apply)``, here ``init`` and ``build``):

    layer.init(key, input_shape, dtype) -> (params or None, state or None, output_shape)
    layer.build(g, x) -> the name of its output node        (g: a ``Builder``; x: its input node or Input)

``init`` knows the parameter shapes from the input shape; ``build`` adds the layer's nodes -- each one rule
applied to references -- to the graph.  ``model.apply`` runs the graph through the rules (``jax.grad`` of it
runs the hand-written backward), ``fnbp.backprop(..., model=model)`` runs the notes' explicit walker on the
same graph, and per-example quantities, DP-SGD and training take the same ``model=``.

Parameters are a plain list with one entry per layer that HAS parameters (``{"W": (n_out, n_in), "b":
(n_out,)}`` for a dense layer, so an MLP's params are ``fnbp.mlp``'s list); batch-norm running statistics
likewise, one entry per layer with state.  A model is hashable (static under ``jax.jit``) and describes itself
as JSON (``describe``/``from_description``), which checkpoints record.
"""
import dataclasses
import importlib

import jax
import jax.numpy as jnp

from .. import graph
from ..graph import Input

__all__ = ["Layer", "Builder", "Sequence", "Model", "serial", "init_layers", "build_layers", "describe_layer", "who"]


class Layer:
    """Base of every layer: no parameters, no state, the input shape unchanged (override what differs)."""
    has_params = False
    has_state = False

    def init(self, key, input_shape, dtype):
        """(params or None, state or None, output shape without the batch axis)."""
        del key, dtype
        return None, None, tuple(input_shape)

    def build(self, g, x):
        """Add the layer's nodes with ``g.node``; return the name of its output node."""
        raise NotImplementedError

    def init_state(self, params):
        """Fresh state (running statistics) from the layer's params (layers with state override it)."""
        del params
        return None

    def describe(self):
        """The layer as JSON: its type and its dataclass fields."""
        return describe_layer(self)

    @property
    def kind(self):
        """The layer's node names say this: ``"dense"``, ``"conv2d"``, an activation's rule name."""
        return type(self).__name__.lower()


def who(layer):
    """How error messages name a layer: ``fnbp.nn.Dense``."""
    return f"fnbp.nn.{type(layer).__name__}"


@dataclasses.dataclass
class Builder:
    """What ``build`` adds nodes through: node names are prefixed with the layer's place (``"2.conv"``),
    ``param``/``state`` refer into the layer's own entry of params/state."""
    train: bool
    nodes: list
    updates: list
    prefix: str = ""
    running: bool = True        # training mode: also update running statistics (needs the state)
    params_path: tuple = ()
    state_path: tuple = ()
    counter: list = dataclasses.field(default_factory=lambda: [0])   # dropout layers so far (shared)

    def node(self, name, op, *args, aux=False, **options):
        """Add ``name = op(*args, **options)`` (a node of ``fnbp.graph``); returns its full name."""
        full = f"{self.prefix}.{name}" if name else self.prefix
        self.nodes.append(graph.node(full, op, *args, aux=aux, **options))
        return full

    def param(self, *path):
        """A reference to this layer's parameter ``path`` (e.g. ``"W"``)."""
        return graph.Param(*self.params_path, *path)

    def state(self, *path):
        """A reference to this layer's running statistics ``path`` (e.g. ``"mean"``)."""
        return graph.State(*self.state_path, *path)

    def update_state(self, node_name, *path):
        """The aux node ``node_name`` writes this layer's new state (at ``path`` inside it)."""
        self.updates.append((self.state_path + tuple(path), node_name))

    def dropout_key(self):
        """An aux node holding this dropout layer's key: ``fnbp.keys.dropout(key, k)`` for the model's k-th
        dropout layer (0-based, in order), the masks of ``fnbp.mlp.apply_stateful``."""
        k = self.counter[0]
        self.counter[0] += 1
        return self.node("key", jax.random.fold_in, Input("key"), graph.Const(k), aux=True)

    def sub(self):
        """The builder of a branch (``Residual``'s layers): same graph, node names under this layer's."""
        return Builder(self.train, self.nodes, self.updates, prefix=self.prefix + "/", params_path=self.params_path,
                       state_path=self.state_path, running=self.running, counter=self.counter)


def init_layers(layers, key, input_shape, dtype, who_):
    """(params list, state list, output shape) of layers applied in sequence: layer j with parameters gets
    ``split(key, n_with_params)[j]`` (so ``nn.mlp(sizes)`` draws ``fnbp.mlp.init``'s weights)."""
    n_keys = sum(1 for layer in layers if layer.has_params)
    keys = iter(jax.random.split(key, max(n_keys, 1)))
    params, state, shape = [], [], tuple(input_shape)
    for i, layer in enumerate(layers):
        try:
            p, s, shape = layer.init(next(keys) if layer.has_params else None, shape, dtype)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{who_}: layer {i} ({who(layer)}) on input shape {shape}: {e}") from None
        if layer.has_params:
            params.append(p)
        if layer.has_state:
            state.append(s)
    return params, state, shape


def build_layers(layers, g, x):
    """Add ``layers`` in sequence to ``g``'s graph from input ``x``; returns the last output node's name.
    Layer i's nodes are named ``"{prefix}{i}.{type}"``; its params entry is the next one of ``g``'s."""
    params_base, state_base = g.params_path or (), g.state_path or ()
    p = s = 0
    for i, layer in enumerate(layers):
        name = f"{i}.{layer.kind}"                          # "0.dense", "1.relu", "3.residual/1.conv2d"
        sub = Builder(g.train, g.nodes, g.updates, prefix=g.prefix + name,
                      params_path=params_base + (p,) if layer.has_params else None,
                      state_path=state_base + (s,) if layer.has_state else None, running=g.running, counter=g.counter)
        x = layer.build(sub, x)
        p += layer.has_params
        s += layer.has_state
    return x


class Sequence:
    """What a model and a branch (``Residual``) share: layers in sequence, ``self.layers``."""

    @property
    def has_params(self):
        return any(layer.has_params for layer in self.layers)

    @property
    def has_state(self):
        return any(layer.has_state for layer in self.layers)

    def init_state(self, params):
        """Fresh running statistics for ``params`` (one entry per layer with state)."""
        it, out = iter(params or []), []
        for layer in self.layers:
            p = next(it) if layer.has_params else None
            if layer.has_state:
                out.append(layer.init_state(p))
        return out


@dataclasses.dataclass(frozen=True)
class Model(Sequence):
    """Layers in sequence (make it with ``serial``).  See the module docstring."""
    layers: tuple

    def __post_init__(self):
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"fnbp.nn.serial: layer {i} must be an fnbp.nn layer (Dense(10), Relu(), ...), "
                                f"got {layer!r:.80}")

    def init(self, key, input_shape, dtype=jnp.float32):
        """``(params, state)`` for inputs of shape (batch, *input_shape); same key, same parameters."""
        try:
            input_shape = tuple(int(n) for n in input_shape)
        except TypeError:
            raise TypeError(f"fnbp.nn.Model.init: input_shape must be a tuple of sizes without the batch axis, "
                            f"e.g. (28, 28, 1) or (64,), got {input_shape!r}") from None
        params, state, _ = init_layers(self.layers, key, input_shape, dtype, "fnbp.nn.Model.init")
        return params, state

    def output_shape(self, input_shape):
        """The output's shape (without the batch axis) for inputs of ``input_shape`` (nothing is allocated)."""
        out = []

        def shapes():
            params, state, shape = init_layers(self.layers, jax.random.key(0), tuple(input_shape), jnp.float32,
                                               "fnbp.nn.Model.output_shape")
            out.append(tuple(shape))
            return params
        jax.eval_shape(shapes)
        return out[0]

    def check_params(self, params, x=None, name="fnbp.nn.Model"):
        """Raise a named ValueError when params do not have one entry per layer with parameters."""
        n = sum(1 for layer in self.layers if layer.has_params)
        if not isinstance(params, (list, tuple)) or len(params) != n:
            got = f"{len(params)} entries" if isinstance(params, (list, tuple)) else type(params).__name__
            raise ValueError(f"{name}: params must be a list with one entry per layer with parameters ({n} for "
                             f"this model: {[who(l) for l in self.layers if l.has_params]}), got {got} "
                             f"(use model.init(key, input_shape))")
        if x is not None and jnp.ndim(x) < 1:
            raise ValueError(f"{name}: x must be a batch (batch, ...), got a scalar")

    def graph(self, params=None, *, train=False, running=True):
        """The model as a ``fnbp.graph.Graph``: input "x" (and "key" for dropout), output y, running
        statistics written by aux nodes in training (``state_updates``; ``running=False`` leaves them out)."""
        if params is not None:
            self.check_params(params, name="fnbp.nn.Model.graph")
        g = Builder(bool(train), [], [], running=running)
        out = build_layers(self.layers, g, Input("x"))
        if isinstance(out, Input):                     # a model of no layer: y = x
            raise ValueError("fnbp.nn.Model.graph: the model has no layer that computes anything")
        return graph.make(g.nodes, out, g.updates)

    def apply(self, params, state, x, *, train=False, key=None):
        """``(y, new_state)``: the forward pass through the rules (``jax.grad`` of it runs their backward).
        ``train=True``: batch statistics (running ones updated) and dropout from ``key``."""
        self.check_params(params, x, name="fnbp.nn.Model.apply")
        if state is None:
            state = self.init_state(params)
        net = self.graph(params, train=train)
        if train and key is None and any(n.op is jax.random.fold_in for n in net.nodes):
            raise ValueError("fnbp.nn.Model.apply: dropout in training mode needs an explicit jax.random key (key=)")
        return graph.apply(net, params, {"x": x, "key": key}, state)

    def __call__(self, params, x, *, state=None, train=False, key=None):
        """y alone (``apply(...)[0]``)."""
        return self.apply(params, state, x, train=train, key=key)[0]

    def describe(self):
        """The model as JSON (checkpoints record it; ``from_description`` rebuilds it)."""
        return {"serial": [layer.describe() for layer in self.layers]}



def serial(*layers):
    """The model applying ``layers`` in sequence (a ``Model``).  A list or tuple of layers is accepted too."""
    if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
        layers = tuple(layers[0])
    if not layers:
        raise ValueError("fnbp.nn.serial: give at least one layer, e.g. serial(Dense(10))")
    return Model(tuple(layers))


def _function_name(fn):
    base = fn.func if hasattr(fn, "func") else fn
    module, name = getattr(base, "__module__", None), getattr(base, "__qualname__", None)
    if not module or not name or "<" in name:
        return None
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    obj = mod
    for part in name.split("."):
        obj = getattr(obj, part, None)
    if obj is base:
        return f"{module}:{name}"
    for attr, value in vars(mod).items():          # a rule made by fnbp.rule(fwd, bwd) is named after its fwd
        if value is base and not attr.startswith("__"):
            return f"{module}:{attr}"
    return None


def describe_layer(layer):
    """``{"type": "Dense", field: value, ...}``: functions by ``module:name`` (None when not importable),
    sub-layers described in turn."""
    out = {"type": type(layer).__name__}
    if type(layer).__module__ != "fnbp.nn.layers":
        out["type"] = f"{type(layer).__module__}:{type(layer).__qualname__}"
    for f in dataclasses.fields(layer):
        v = getattr(layer, f.name)
        if isinstance(v, Layer):
            v = describe_layer(v)
        elif isinstance(v, tuple) and v and all(isinstance(u, Layer) for u in v):
            v = [describe_layer(u) for u in v]
        elif callable(v):
            v = {"function": _function_name(v), "options": dict(getattr(v, "keywords", {}) or {})}
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out
