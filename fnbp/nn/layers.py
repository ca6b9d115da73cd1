"""The layers: each knows its parameter shapes from its input shape and adds its nodes to the walker's graph.

Shapes exclude the batch axis B.  Every node is one hand-written rule (the op named beside each layer):

| layer | input -> output | params | rule |
|---|---|---|---|
| ``Dense(n_out)`` | (..., n_in) -> (..., n_out) | W (n_out, n_in), b (n_out,) | ``fnbp.dense``: a = W h + b |
| ``Conv2D(c_out, kernel)`` | (H, W, C_in) -> (H_out, W_out, c_out) | W (c_out, C_in, kh, kw), b (c_out,) | ``fnbp.conv.conv2d_xla`` |
| ``MaxPool(window)`` / ``AvgPool`` | (H, W, C) -> (H', W', C) | -- | ``fnbp.max_pool`` / ``fnbp.avg_pool`` |
| ``Flatten()`` | (H, W, C) -> (H W C,) | -- | ``fnbp.flatten`` |
| ``GlobalAvgPool()`` | (H, W, C) -> (C,) | -- | ``fnbp.global_avg_pool`` |
| ``BatchNorm()`` | (..., C) -> same | gamma, beta (C,); state mean, var (C,) | ``fnbp.batch_norm`` over all axes but C |
| ``Dropout(p)`` | same | -- (a key per step) | ``fnbp.dropout`` (training only) |
| ``Activation(g)``, ``Relu()`` ... | same | -- | g, any rule (yours too) |
| ``PReLU(alpha)`` | (..., C) -> same | alpha (C,) | ``fnbp.prelu`` |
| ``Residual(*layers)`` | x -> x + f(x) | the branch's | ``fnbp.ops.add``: the fan-out of x |

``Residual`` is the notes' sum over consumers: x feeds the branch f and the sum, so the walker's grad_table
adds the two cotangents, grad_x E = grad_y E + (df/dx)^T grad_y E.
"""
import dataclasses
import functools
import math
import operator

import jax
import jax.numpy as jnp

from .. import activations, norm, ops, pool, regularization
from ..conv import conv2d_xla, conv_output_size
from ..graph import Const
from ..layers import dense
from ..pool import pool_output_size
from .model import Layer, Sequence, build_layers, init_layers, who

__all__ = ["Dense", "Conv2D", "MaxPool", "AvgPool", "Flatten", "GlobalAvgPool", "BatchNorm", "Dropout", "Activation",
           "PReLU", "Residual", "Relu", "Tanh", "Sigmoid", "Identity", "Softmax", "LeakyRelu", "Step", "Sign", "INITS"]

INITS = ("glorot", "he", "uniform")


def _size(layer, name, value, minimum=1):
    """An int-like ``value`` (Python or numpy/JAX integer) >= minimum, else a ValueError naming the layer."""
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{who(layer)}: {name} must be an integer, got {value!r}") from None
    if v < minimum:
        raise ValueError(f"{who(layer)}: {name} must be >= {minimum}, got {v}")
    return v


def _weights(key, shape, fan_in, fan_out, init, dtype):
    """W of ``shape``: glorot uniform in +-sqrt(6 / (fan_in + fan_out)), he normal with std sqrt(2 / fan_in),
    or the notes' uniform in [-1, 1]."""
    if init == "glorot":
        r = math.sqrt(6.0 / (fan_in + fan_out))
        return jax.random.uniform(key, shape, dtype, -r, r)
    if init == "he":
        return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / fan_in)
    return jax.random.uniform(key, shape, dtype, -1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Dense(Layer):
    """a = W h + b on the last axis: h (..., n_in) -> a (..., n_out); W (n_out, n_in), b (n_out,).
    ``weight_init``: "glorot" (default, as ``fnbp.mlp.init``), "he" or "uniform" (b uniform too, the notes')."""
    n_out: int
    weight_init: str = "glorot"
    has_params = True

    def __post_init__(self):
        object.__setattr__(self, "n_out", _size(self, "n_out", self.n_out))
        if self.weight_init not in INITS:
            raise ValueError(f"fnbp.nn.Dense: weight_init must be one of {INITS}, got {self.weight_init!r}")

    def init(self, key, input_shape, dtype):
        if len(input_shape) < 1:
            raise ValueError("fnbp.nn.Dense: the input must have a feature axis (..., n_in)")
        n_in = input_shape[-1]
        k_W, k_b = jax.random.split(key)
        W = _weights(k_W, (self.n_out, n_in), n_in, self.n_out, self.weight_init, dtype)
        b = (jax.random.uniform(k_b, (self.n_out,), dtype, -1.0, 1.0) if self.weight_init == "uniform"
             else jnp.zeros((self.n_out,), dtype))
        return {"W": W, "b": b}, None, tuple(input_shape[:-1]) + (self.n_out,)

    def build(self, g, x):
        return g.node("", dense, g.param("W"), g.param("b"), x)         # a = W h + b


@dataclasses.dataclass(frozen=True)
class Conv2D(Layer):
    """a = W * h + b: h (H, W, C_in) -> a (H_out, W_out, c_out); W (c_out, C_in, kh, kw) He-normal, b zeros.
    ``kernel``: an int k (k x k) or (kh, kw); ``stride`` >= 1; ``padding``: "SAME", "VALID" or an int."""
    c_out: int
    kernel: object = 3
    stride: int = 1
    padding: object = "SAME"
    has_params = True

    def __post_init__(self):
        object.__setattr__(self, "c_out", _size(self, "c_out", self.c_out))
        k = self.kernel if isinstance(self.kernel, (tuple, list)) else (self.kernel, self.kernel)
        if len(k) != 2:
            raise ValueError(f"fnbp.nn.Conv2D: kernel must be an int or (kh, kw), got {self.kernel!r}")
        object.__setattr__(self, "kernel", tuple(_size(self, "kernel", v) for v in k))
        object.__setattr__(self, "stride", _size(self, "stride", self.stride))
        if not isinstance(self.padding, str):
            object.__setattr__(self, "padding", _size(self, "padding", self.padding, 0))

    def init(self, key, input_shape, dtype):
        if len(input_shape) != 3:
            raise ValueError(f"fnbp.nn.Conv2D: the input must be images (H, W, C_in), got shape {input_shape}")
        H, W_, C_in = input_shape
        kh, kw = self.kernel
        H_out = conv_output_size(H, kh, self.stride, self.padding, "fnbp.nn.Conv2D")
        W_out = conv_output_size(W_, kw, self.stride, self.padding, "fnbp.nn.Conv2D")
        fan_in = C_in * kh * kw
        W = jax.random.normal(key, (self.c_out, C_in, kh, kw), dtype) * math.sqrt(2.0 / fan_in)
        return {"W": W, "b": jnp.zeros((self.c_out,), dtype)}, None, (H_out, W_out, self.c_out)

    def build(self, g, x):
        return g.node("", conv2d_xla, g.param("W"), g.param("b"), x, stride=self.stride, padding=self.padding)


@dataclasses.dataclass(frozen=True)
class _Pool(Layer):
    window: int = 2
    stride: int = None

    def __post_init__(self):
        object.__setattr__(self, "window", _size(self, "window", self.window))
        if self.stride is not None:
            object.__setattr__(self, "stride", _size(self, "stride", self.stride))

    def init(self, key, input_shape, dtype):
        if len(input_shape) != 3:
            raise ValueError(f"{who(self)}: the input must be feature maps (H, W, C), got shape {input_shape}")
        H, W, C = input_shape
        s = self.window if self.stride is None else self.stride
        return None, None, (pool_output_size(H, self.window, s, who(self)),
                            pool_output_size(W, self.window, s, who(self)), C)

    def build(self, g, x):
        return g.node("", self.op, x, window=self.window, stride=self.stride)


@dataclasses.dataclass(frozen=True)
class MaxPool(_Pool):
    """Max over each window (the first maximum on ties): (H, W, C) -> (H', W', C); stride defaults to window."""
    op = staticmethod(pool.max_pool)


@dataclasses.dataclass(frozen=True)
class AvgPool(_Pool):
    """Mean over each window: (H, W, C) -> (H', W', C); stride defaults to window."""
    op = staticmethod(pool.avg_pool)


@dataclasses.dataclass(frozen=True)
class Flatten(Layer):
    """(H, W, C) -> (H W C,), ordered (i, j, c) as numpy's reshape."""

    def init(self, key, input_shape, dtype):
        return None, None, (math.prod(input_shape),)

    def build(self, g, x):
        return g.node("", pool.flatten, x)


@dataclasses.dataclass(frozen=True)
class GlobalAvgPool(Layer):
    """Mean over the spatial axes: (H, W, C) -> (C,)."""

    def init(self, key, input_shape, dtype):
        if len(input_shape) != 3 or min(input_shape[:2]) < 1:
            raise ValueError(f"fnbp.nn.GlobalAvgPool: the input must be non-empty feature maps (H, W, C), got "
                             f"shape {input_shape}")
        return None, None, (input_shape[-1],)

    def build(self, g, x):
        return g.node("", pool.global_avg_pool, x)


@dataclasses.dataclass(frozen=True)
class BatchNorm(Layer):
    """Batch norm over every axis but the last (1-D for (n,), per channel for (H, W, C)); ``fnbp.norm``.
    Training: the batch's statistics, running ones updated with ``momentum`` (PyTorch's convention);
    inference: the running statistics.  Params gamma (ones), beta (zeros); state mean (0), var (1)."""
    momentum: float = 0.1
    eps: float = 1e-5
    has_params = True
    has_state = True

    def __post_init__(self):
        for name in ("momentum", "eps"):
            v = getattr(self, name)
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise TypeError(f"fnbp.nn.BatchNorm: {name} must be a number, got {v!r}") from None
            object.__setattr__(self, name, v)
        if not 0 <= self.momentum <= 1 or not self.eps > 0:
            raise ValueError(f"fnbp.nn.BatchNorm: momentum must be in [0, 1] and eps > 0, got momentum="
                             f"{self.momentum}, eps={self.eps}")

    def init(self, key, input_shape, dtype):
        C = input_shape[-1]
        params = {"gamma": jnp.ones((C,), dtype), "beta": jnp.zeros((C,), dtype)}
        return params, self.init_state(params), tuple(input_shape)

    def init_state(self, params):
        return norm.init_batch_norm_state(jnp.shape(params["gamma"])[0], jnp.result_type(params["gamma"]))

    def build(self, g, x):
        if g.train:
            if g.running:
                stats = g.node("stats", norm.running_statistics, x, g.state(), aux=True, momentum=self.momentum)
                g.update_state(stats)
            return g.node("", norm.batch_norm, x, g.param("gamma"), g.param("beta"), eps=self.eps)
        return g.node("", ops.batch_norm_eval, x, g.param("gamma"), g.param("beta"), g.state("mean"),
                      g.state("var"), eps=self.eps)


@dataclasses.dataclass(frozen=True)
class Dropout(Layer):
    """Inverted dropout of drop probability p in training (``fnbp.dropout``), the identity in inference.
    The model's k-th dropout layer draws its mask from ``fnbp.keys.dropout(key, k)``."""
    p: float = 0.5

    def __post_init__(self):
        try:
            p = float(self.p)
        except (TypeError, ValueError):
            raise TypeError(f"fnbp.nn.Dropout: p must be a drop probability in [0, 1), got {self.p!r}") from None
        if not 0 <= p < 1:
            raise ValueError(f"fnbp.nn.Dropout: p must be a drop probability in [0, 1), got {p}")
        object.__setattr__(self, "p", p)

    def build(self, g, x):
        if not g.train or self.p == 0:
            return x
        return g.node("", regularization.dropout, x, Const(self.p), g.dropout_key())


@dataclasses.dataclass(frozen=True, eq=False)
class Activation(Layer):
    """h = g(a) elementwise, for any rule g: fnbp's (``fnbp.relu``, ``functools.partial(fnbp.leaky_relu,
    slope=0.2)``) or your own ``fnbp.rule``.  The explicit walker needs a rule; ``apply`` takes any function."""
    fn: object

    def __post_init__(self):
        if not callable(self.fn):
            hint = (f" (use fnbp.activations.ACTIVATIONS[{self.fn!r}])" if isinstance(self.fn, str) else "")
            raise TypeError(f"fnbp.nn.Activation: the activation must be a function such as fnbp.relu, got "
                            f"{self.fn!r}{hint}")
        if isinstance(self.fn, functools.partial) and self.fn.args:
            raise ValueError(f"fnbp.nn.Activation: give the activation's options by keyword, e.g. "
                             f"functools.partial(fnbp.leaky_relu, slope=0.2), got {self.fn!r}")

    def _key(self):
        fn = self.fn
        if isinstance(fn, functools.partial):               # partials compare by identity: compare what they hold
            return (fn.func, fn.args, tuple(sorted(fn.keywords.items())))
        return fn

    def __eq__(self, other):
        return type(other) is type(self) and other._key() == self._key()

    def __hash__(self):
        return hash((Activation, self._key()))

    @property
    def kind(self):
        fn = self.fn.func if isinstance(self.fn, functools.partial) else self.fn
        r = getattr(fn, "rule", None)
        return getattr(r, "name", None) or getattr(fn, "__name__", "activation")

    def build(self, g, x):
        return g.node("", self.fn, x)


@dataclasses.dataclass(frozen=True)
class PReLU(Layer):
    """h = max(a, 0) + alpha min(a, 0) with a learnable slope per unit: alpha (C,), initialised to ``alpha``."""
    alpha: float = 0.25
    has_params = True

    def init(self, key, input_shape, dtype):
        return {"alpha": jnp.full((input_shape[-1],), self.alpha, dtype)}, None, tuple(input_shape)

    def build(self, g, x):
        return g.node("", activations.prelu, x, g.param("alpha"))


class Residual(Sequence, Layer):
    """y = x + f(x), f the layers given in sequence (their output shape must equal their input's).
    Params: a list, one entry per layer of f with parameters (state likewise)."""

    def __init__(self, *layers):
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        if not layers:
            raise ValueError("fnbp.nn.Residual: give the branch's layers, e.g. Residual(Dense(64), Relu())")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"fnbp.nn.Residual: layer {i} must be an fnbp.nn layer, got {layer!r:.80}")
        self.layers = tuple(layers)

    def __eq__(self, other):
        return type(other) is Residual and other.layers == self.layers

    def __hash__(self):
        return hash((Residual, self.layers))

    def __repr__(self):
        return f"Residual({', '.join(map(repr, self.layers))})"

    def init(self, key, input_shape, dtype):
        params, state, shape = init_layers(self.layers, key if key is not None else jax.random.key(0),
                                           input_shape, dtype, "fnbp.nn.Residual")
        if tuple(shape) != tuple(input_shape):
            raise ValueError(f"fnbp.nn.Residual: the branch maps shape {tuple(input_shape)} to {tuple(shape)}; "
                             f"y = x + f(x) needs the same shape")
        return params, state, tuple(input_shape)

    def build(self, g, x):
        f_x = build_layers(self.layers, g.sub(), x)                     # the branch f(x)
        return g.node("add", ops.add, x, f_x)                           # y = x + f(x): x has two consumers

    def describe(self):
        return {"type": "Residual", "layers": [layer.describe() for layer in self.layers]}


def Relu():
    """``Activation(fnbp.relu)``."""
    return Activation(activations.relu)


def Tanh():
    """``Activation(fnbp.tanh)``."""
    return Activation(activations.tanh)


def Sigmoid():
    """``Activation(fnbp.sigmoid)``."""
    return Activation(activations.sigmoid)


def Identity():
    """``Activation(fnbp.identity)``."""
    return Activation(activations.identity)


def Softmax():
    """``Activation(fnbp.softmax)`` (over the last axis)."""
    return Activation(activations.softmax)


def LeakyRelu(slope=0.01):
    """``Activation(functools.partial(fnbp.leaky_relu, slope=slope))``."""
    return Activation(functools.partial(activations.leaky_relu, slope=slope))


def Step():
    """``Activation(fnbp.step)`` (zero derivative: the perceptron's)."""
    return Activation(activations.step)


def Sign():
    """``Activation(fnbp.sign)``."""
    return Activation(activations.sign)
