"""A LeNet-style convolutional network built from fnbp's rules.

    x (B, H, W, C)  ->  [conv k x k -> (batch norm) -> ReLU -> max-pool] per entry of ``channels``
                    ->  flatten  ->  [(dropout) -> dense -> ReLU] per entry of ``hidden``
                    ->  (dropout) -> dense -> logits (B, n_classes)

Every op is a hand-written rule (``fnbp.conv.conv2d_xla``, ``fnbp.max_pool``, ``fnbp.flatten``,
``fnbp.dense``, ``fnbp.relu``, ``fnbp.pool.batch_norm_channels``, ``fnbp.dropout``), so
``jax.grad`` of the loss through ``apply`` runs the rules' backward equations.

Parameters are a plain pytree::

    {"conv":  [{"W": (C_out, C_in, k, k), "b": (C_out,)[, "gamma", "beta": (C_out,)]}, ...],
     "dense": [{"W": (n_out, n_in), "b": (n_out,)[, "gamma", "beta"]}, ...]}

and the architecture's static choices (image shape, widths, kernel, padding, pooling) live in a
hashable ``LeNet`` description.  This is the functional LeNet the notebooks derive by hand; to train a LeNet,
``fnbp.nn.lenet`` composes the same network from ``fnbp.nn`` layers (``fnbp.train.train(..., model=...)``).
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from . import graph, keys, norm, regularization
from .graph import Const, Input, Param, State
from .activations import relu
from .conv import conv2d_xla, conv_output_size
from .layers import dense
from .ops import batch_norm_eval
from .pool import batch_norm_channels, flatten, max_pool, pool_output_size

__all__ = ["LeNet", "lenet", "init", "init_state", "network", "apply", "apply_stateful", "shift_augment", "num_params",
           "AUGMENT_KEY", "Network"]


@dataclasses.dataclass(frozen=True)
class LeNet:
    """The architecture: input image shape (H, W, C), conv widths, kernel, padding, pool, hidden widths.

    ``lenet((28, 28, 1))`` is the issue's network: conv 5x5x32 -> 2x2 max-pool -> conv 5x5x64
    -> pool -> dense 128 -> 10 (VALID convolutions: 28 -> 24 -> 12 -> 8 -> 4, 1024 features).
    """
    image_shape: tuple = (28, 28, 1)
    channels: tuple = (32, 64)
    kernel: int = 5
    padding: object = "VALID"
    pool: int = 2
    hidden: tuple = (128,)
    n_classes: int = 10
    batch_norm: bool = False

    def __post_init__(self):
        if len(self.image_shape) != 3 or not all(isinstance(n, int) and n >= 1 for n in self.image_shape):
            raise ValueError(f"fnbp.cnn.LeNet: image_shape must be (H, W, C) positive ints, got {self.image_shape!r}")
        for what, sizes in (("channels", self.channels), ("hidden", self.hidden), ("n_classes", (self.n_classes,))):
            if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sizes):
                raise ValueError(f"fnbp.cnn.LeNet: {what} must be positive ints, got {getattr(self, what)!r}")
        self.feature_shape()                      # raises a named error when the image is too small

    def feature_shape(self):
        """(H, W, C) after the conv/pool blocks (raises ValueError when a kernel or window does not fit)."""
        H, W, C = self.image_shape
        for k, c in enumerate(self.channels):
            name = f"fnbp.cnn.LeNet: conv block {k}"
            H, W = (conv_output_size(n, self.kernel, 1, self.padding, name) for n in (H, W))
            H, W = (pool_output_size(n, self.pool, self.pool, name) for n in (H, W))
            C = c
        return H, W, C


def lenet(image_shape=(28, 28, 1), n_classes=10, **options):
    """Sensible LeNet sizes for an image shape: the issue's network for 28 x 28 (MNIST); for small
    images such as digits' 8 x 8, 3 x 3 SAME convolutions of 16 and 32 channels and a 64-unit layer
    (8 -> 4 -> 2, 128 features)."""
    image_shape = tuple(int(n) for n in image_shape)
    if min(image_shape[:2]) >= 20:
        return LeNet(image_shape=image_shape, n_classes=n_classes, **options)
    small = dict(channels=(16, 32), kernel=3, padding="SAME", hidden=(64,))
    small.update(options)
    return LeNet(image_shape=image_shape, n_classes=n_classes, **small)


def init(key, arch=LeNet(), *, dtype=jnp.float32):
    """He-normal convolution and hidden weights (std sqrt(2 / fan_in), fan_in = C_in k k for a conv,
    n_in for a dense layer: for the ReLUs that follow), Glorot-uniform output layer, zero biases;
    batch-norm gamma = 1, beta = 0 when ``arch.batch_norm``."""
    keys = iter(jax.random.split(key, len(arch.channels) + len(arch.hidden) + 1))
    conv, c_in = [], arch.image_shape[2]
    for c_out in arch.channels:
        fan_in = c_in * arch.kernel * arch.kernel
        layer = {"W": jax.random.normal(next(keys), (c_out, c_in, arch.kernel, arch.kernel), dtype)
                 * math.sqrt(2.0 / fan_in), "b": jnp.zeros((c_out,), dtype)}
        if arch.batch_norm:
            layer.update(gamma=jnp.ones((c_out,), dtype), beta=jnp.zeros((c_out,), dtype))
        conv.append(layer)
        c_in = c_out
    dense_layers, n_in = [], math.prod(arch.feature_shape())
    for n_out in arch.hidden:
        layer = {"W": jax.random.normal(next(keys), (n_out, n_in), dtype) * math.sqrt(2.0 / n_in),
                 "b": jnp.zeros((n_out,), dtype)}
        if arch.batch_norm:
            layer.update(gamma=jnp.ones((n_out,), dtype), beta=jnp.zeros((n_out,), dtype))
        dense_layers.append(layer)
        n_in = n_out
    r = math.sqrt(6.0 / (n_in + arch.n_classes))
    dense_layers.append({"W": jax.random.uniform(next(keys), (arch.n_classes, n_in), dtype, -r, r),
                         "b": jnp.zeros((arch.n_classes,), dtype)})
    return {"conv": conv, "dense": dense_layers}


def num_params(params):
    """Number of parameters (every leaf of the pytree)."""
    return sum(int(v.size) for v in jax.tree_util.tree_leaves(params))


def init_state(params):
    """Running batch-norm statistics: ``{"mean", "var"}`` for every layer with ``"gamma"``, ``{}`` otherwise."""
    return {part: [norm.init_batch_norm_state(jnp.shape(layer["b"])[0], jnp.result_type(layer["b"]))
                   if "gamma" in layer else {} for layer in params[part]] for part in ("conv", "dense")}


def check_input(arch, x, name):
    """Raise a ValueError naming ``name`` when x is not a batch of ``arch``'s images."""
    if jnp.ndim(x) != 4 or tuple(jnp.shape(x)[1:]) != arch.image_shape:
        raise ValueError(f"{name}: x must have shape (batch, {', '.join(map(str, arch.image_shape))}) "
                         f"(channels last, as the architecture's image_shape), got shape {jnp.shape(x)}")


def network(params, *, arch=LeNet(), train=False, dropout=0.0, bn_momentum=0.1, augment=0, bn_eps=1e-5):
    """The LeNet as a ``fnbp.graph.Graph`` with input "x" (and "key" for dropout and shifts).

    Block k (1-based): "conv{k}" (``conv2d_xla``: conv2d's layer with XLA's convolution inside the rule),
    ["bn{k}" per channel], "relu{k}", "pool{k}" (max-pool);
    then "flatten" and dense layers "a{j}", ["bn_d{j}"], "h{j}" (ReLU), with "dropout{j}" on the
    input of dense layer j in training (key ``fold_in(key, j - 1)``); the output is the last
    "a{j}" (logits).  In training with ``augment > 0`` the auxiliary node "x_shifted" applies
    ``shift_augment`` (key ``fold_in(key, AUGMENT_KEY)``) to x first.  Run it with
    ``fnbp.graph.apply`` (autodiff through the rules) or ``forward``/``backward`` (the walker).
    """
    nodes, updates, prev = [], [], Input("x")
    if train and augment:
        nodes.append(graph.node("key_shift", jax.random.fold_in, Input("key"), Const(AUGMENT_KEY), aux=True))
        nodes.append(graph.node("x_shifted", shift_augment, "key_shift", Input("x"), Const(augment), aux=True))
        prev = "x_shifted"

    def normalise(name, v, part, k):
        if train:
            op = batch_norm_channels if part == "conv" else norm.batch_norm
            nodes.append(graph.node(name, op, v, Param(part, k, "gamma"), Param(part, k, "beta"), eps=bn_eps))
            nodes.append(graph.node(f"stats_{name}", norm.running_statistics, v, State(part, k), aux=True,
                                    momentum=bn_momentum))
            updates.append(((part, k), f"stats_{name}"))
        else:
            nodes.append(graph.node(name, batch_norm_eval, v, Param(part, k, "gamma"), Param(part, k, "beta"),
                                    State(part, k, "mean"), State(part, k, "var"), eps=bn_eps))
        return name

    for k, layer in enumerate(params["conv"]):
        i = k + 1
        nodes.append(graph.node(f"conv{i}", conv2d_xla, Param("conv", k, "W"), Param("conv", k, "b"), prev,
                                padding=arch.padding))
        a = normalise(f"bn{i}", f"conv{i}", "conv", k) if "gamma" in layer else f"conv{i}"
        nodes.append(graph.node(f"relu{i}", relu, a))
        nodes.append(graph.node(f"pool{i}", max_pool, f"relu{i}", window=arch.pool))
        prev = f"pool{i}"
    nodes.append(graph.node("flatten", flatten, prev))
    prev, last = "flatten", len(params["dense"]) - 1
    for k, layer in enumerate(params["dense"]):
        i = k + 1
        if train and dropout:
            nodes.append(graph.node(f"key{i}", jax.random.fold_in, Input("key"), Const(k), aux=True))
            nodes.append(graph.node(f"dropout{i}", regularization.dropout, prev, dropout, f"key{i}"))
            prev = f"dropout{i}"
        nodes.append(graph.node(f"a{i}", dense, Param("dense", k, "W"), Param("dense", k, "b"), prev))
        prev = f"a{i}"
        if k < last:
            if "gamma" in layer:
                prev = normalise(f"bn_d{i}", prev, "dense", k)
            nodes.append(graph.node(f"h{i}", relu, prev))
            prev = f"h{i}"
    return graph.make(nodes, prev, updates)


@dataclasses.dataclass(frozen=True)
class Network:
    """The functional LeNet as a model (``graph``, ``init_state``, ``check_params``) for ``fnbp.train``,
    ``fnbp.per_example`` and ``fnbp.dp`` (``model=fnbp.cnn.Network(arch)``), on ``init``'s parameters
    ``{"conv": [...], "dense": [...]}``.  ``dropout``: on the input of every dense layer in training.
    (Shifts of the training images are a recipe: ``fnbp.train.Config(augment=...)``.)"""
    arch: LeNet = LeNet()
    dropout: float = 0.0
    bn_momentum: float = 0.1

    def __post_init__(self):
        if not 0 <= self.dropout < 1:
            raise ValueError(f"fnbp.cnn.Network: dropout must be in [0, 1), got {self.dropout}")

    def graph(self, params, *, train=False, running=True):
        net = network(params, arch=self.arch, train=train, dropout=self.dropout if train else 0.0,
                      bn_momentum=self.bn_momentum)
        if train and not running:
            net = net._replace(nodes=tuple(n for n in net.nodes if not n.name.startswith("stats_")), state_updates=())
        return net

    def init_state(self, params):
        return init_state(params)

    def check_params(self, params, x=None, name="fnbp.cnn"):
        if not isinstance(params, dict) or set(params) != {"conv", "dense"}:
            raise ValueError(f"{name}: a LeNet's params must be a dict with 'conv' and 'dense' (fnbp.cnn.init), "
                             f"got {type(params).__name__}")
        if x is not None:
            check_input(self.arch, x, name)


def apply_stateful(params, state, x, *, arch=LeNet(), train, key=None, dropout=0.0, bn_momentum=0.1, augment=0):
    """Forward pass; returns (logits, new batch-norm state).

    ``train=True``: batch statistics (running ones updated with ``bn_momentum``, PyTorch's
    convention), inverted dropout of probability ``dropout`` on the input of every dense
    layer and random shifts of up to ``augment`` pixels, keyed by ``key``; ``train=False``:
    running statistics, no dropout, no shifts.
    """
    check_input(arch, x, "fnbp.cnn.apply")
    if not 0 <= dropout < 1:
        raise ValueError(f"fnbp.cnn.apply_stateful: dropout must be in [0, 1), got {dropout}")
    if train and (dropout or augment) and key is None:
        raise ValueError("fnbp.cnn.apply_stateful: dropout or shifts in training mode need an explicit "
                         "jax.random key")
    net = network(params, arch=arch, train=train, dropout=dropout, bn_momentum=bn_momentum, augment=augment)
    return graph.apply(net, params, {"x": x, "key": key}, state)


def apply(params, x, *, arch=LeNet()):
    """Logits (B, n_classes) in inference mode (running batch-norm statistics, if any, at their
    initial values unless you use ``apply_stateful``)."""
    return apply_stateful(params, init_state(params), x, arch=arch, train=False)[0]


def shift_augment(key, x, max_shift=2):
    """Data augmentation: each image shifted by its own random (dy, dx) in [-max_shift, max_shift]^2
    (zeros shifted in).  Same key, same shifts."""
    if max_shift == 0:
        return x
    B, H, W, C = x.shape
    shifts = jax.random.randint(key, (B, 2), 0, 2 * max_shift + 1)
    padded = jnp.pad(x, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    return jax.vmap(lambda img, s: lax.dynamic_slice(img, (s[0], s[1], 0), (H, W, C)))(padded, shifts)


AUGMENT_KEY = keys.AUGMENT  # fold_in tag of the augmentation key (``fnbp.keys``)
