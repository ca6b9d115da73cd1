"""Models you compose from layers (stax's pairs, Equinox's shapes): ``fnbp.nn.serial(*layers)``.

    from fnbp import nn
    model = nn.serial(nn.Conv2D(8, 3), nn.Relu(), nn.MaxPool(2),
                      nn.Residual(nn.Conv2D(8, 3), nn.Relu()),
                      nn.Flatten(), nn.Dense(10))
    params, state = model.init(key, (8, 8, 1))
    y, state = model.apply(params, state, x)
    E, grads = fnbp.backprop(params, x, d, model=model, loss=fnbp.losses.softmax_cross_entropy)

Layers: ``fnbp.nn.layers``; the combinator and the layer protocol: ``fnbp.nn.model``; presets ``mlp``, ``lenet``.
"""
from .layers import (INITS, Activation, AvgPool, BatchNorm, Conv2D, Dense, Dropout, Flatten, GlobalAvgPool,
                     Identity, LeakyRelu, MaxPool, PReLU, Relu, Residual, Sigmoid, Sign, Softmax, Step, Tanh)
from .describe import from_description
from .model import Builder, Layer, Model, serial
from .presets import lenet, mlp
from .recurrent import GRU, LSTM, Elman, Embedding

__all__ = ["Layer", "Builder", "Model", "serial", "from_description", "Dense", "Conv2D", "MaxPool", "AvgPool",
           "Flatten", "GlobalAvgPool", "BatchNorm", "Dropout", "Activation", "PReLU", "Residual", "Relu", "Tanh",
           "Sigmoid", "Identity", "Softmax", "LeakyRelu", "Step", "Sign", "mlp", "lenet", "INITS",
           "Embedding", "Elman", "LSTM", "GRU"]
