"""Presets: the MLP and the LeNet as ``fnbp.nn`` models (compositions of layers, nothing else)."""
from .. import activations
from .layers import Activation, BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool
from .model import serial

__all__ = ["mlp", "lenet"]


def mlp(sizes, activation=activations.relu, output=activations.identity, *, batch_norm=False, dropout=0.0,
        init="glorot"):
    """Dense layers of widths ``sizes`` = (n_0, n_1, ..., n_L): per hidden layer ``Dense -> [BatchNorm] ->
    activation -> [Dropout]``, then ``Dense -> output``.  ``mlp(sizes).init(key, (sizes[0],))`` gives the
    parameters of ``fnbp.mlp.init(key, sizes)`` (same key, same numbers); the dropout masks are those of
    ``fnbp.mlp.apply_stateful`` (layer k's from ``fold_in(key, k)``)."""
    sizes = tuple(sizes)
    if len(sizes) < 2:
        raise ValueError(f"fnbp.nn.mlp: sizes must list the input width and at least one layer width, got {sizes}")
    layers = []
    for k, n_out in enumerate(sizes[1:]):
        layers.append(Dense(n_out, weight_init=init))
        if k < len(sizes) - 2:
            if batch_norm:
                layers.append(BatchNorm())
            layers.append(Activation(activation))
            if dropout:
                layers.append(Dropout(dropout))
        elif output is not activations.identity:
            layers.append(Activation(output))
    return serial(*layers)


def lenet(image_shape=(28, 28, 1), n_classes=10, *, channels=None, kernel=None, padding=None, pool=2, hidden=None,
          batch_norm=False, dropout=0.0):
    """A LeNet: per entry of ``channels`` ``Conv2D -> [BatchNorm] -> Relu -> MaxPool(pool)``, ``Flatten``, per
    entry of ``hidden`` ``[Dropout] -> Dense (He) -> [BatchNorm] -> Relu``, ``[Dropout] -> Dense(n_classes)``.

    Sizes follow ``fnbp.cnn.lenet``: for 28 x 28 images the issue's network (5x5 VALID convolutions of 32 and 64
    channels, 128 hidden units: 28 -> 24 -> 12 -> 8 -> 4); for small images such as the digits' 8 x 8, 3x3 SAME
    convolutions of 16 and 32 channels and 64 hidden units.  ``image_shape`` (H, W, C) is checked here;
    ``init(key, image_shape)`` gives the parameters."""
    try:
        image_shape = tuple(int(n) for n in image_shape)
    except TypeError:
        raise TypeError(f"fnbp.nn.lenet: image_shape must be (H, W, C), got {image_shape!r}") from None
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ValueError(f"fnbp.nn.lenet: image_shape must be (H, W, C) positive ints, got {image_shape}")
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 1:
        raise ValueError(f"fnbp.nn.lenet: n_classes must be an int >= 1, got {n_classes!r}")
    big = min(image_shape[:2]) >= 20
    if channels is None:
        channels = (32, 64) if big else (16, 32)
    kernel = kernel if kernel is not None else (5 if big else 3)
    padding = padding if padding is not None else ("VALID" if big else "SAME")
    hidden = hidden if hidden is not None else ((128,) if big else (64,))
    layers = []
    for c in channels:
        layers += [Conv2D(c, kernel, padding=padding)] + ([BatchNorm()] if batch_norm else [])
        layers += [Activation(activations.relu), MaxPool(pool)]
    layers.append(Flatten())
    for n in hidden:
        layers += ([Dropout(dropout)] if dropout else []) + [Dense(n, weight_init="he")]
        layers += ([BatchNorm()] if batch_norm else []) + [Activation(activations.relu)]
    layers += ([Dropout(dropout)] if dropout else []) + [Dense(n_classes)]
    model = serial(*layers)
    model.output_shape(image_shape)          # a kernel or window that does not fit the image: a named error here
    return model
