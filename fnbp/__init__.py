"""fnbp -- functional backprop.

Neural-network layers as pure JAX functions whose gradients are the hand-derived
backprop rules of the lecture notes, encoded with ``jax.custom_vjp``:

    h_0 = x;  a_k = W_k h_{k-1} + b_k;  h_k = g_k(a_k);  y = h_L;  E = L(y; d)
    delta_k = grad_{h_k} E (.) g'_k(a_k);  grad_{b_k} E = delta_k;
    grad_{W_k} E = delta_k h_{k-1}^T;      grad_{h_{k-1}} E = W_k^T delta_k

Modules: layers, activations, losses, norm, regularization (dropout), conv, pool (the rules); cnn (LeNet); reference (plain jnp);
ops (add, mul, log); graph (the walker: the notes' general back-propagation);
crosscheck (``fnbp.check``); mlp (with ``backprop``, the walker on the MLP); skip (a
skip-connection graph); optim; train, data, checkpoint, parallel; perceptron;
per_example, dp, feedback (per-example quantities, DP-SGD, feedback alignment and
straight-through estimators); curvature (diag GGN, KFLR/KFAC factors, diag Hessian).
"""
from . import (activations, checkpoint, cnn, conv, data, graph, layers, losses, mlp, norm, ops, optim, parallel,
               perceptron, pool, reference, regularization, rules, skip, train)
from . import curvature, dp, extensions, feedback, keys, nn, objective, per_example
from . import charlm, reference_rnn, rnn, rnn_steps
from .activations import identity, leaky_relu, prelu, relu, sigmoid, sign, softmax, step, tanh
from .mlp import backprop
from .crosscheck import check
from .layers import dense
from .rules import Rule, rule
from .norm import batch_norm
from .regularization import dropout
from .conv import conv2d
from .embeddings import embedding
from .pool import avg_pool, flatten, global_avg_pool, max_pool

__version__ = "0.1.0"

__all__ = ["Rule", "rule", "dense", "identity", "sigmoid", "tanh", "relu", "leaky_relu", "prelu", "step", "sign", "softmax",
           "batch_norm", "dropout", "conv2d", "max_pool", "avg_pool", "flatten", "global_avg_pool",
           "embedding", "backprop", "check",
           "activations", "layers", "losses", "norm", "reference", "mlp", "optim", "train", "data", "checkpoint",
           "parallel", "perceptron", "graph", "ops", "skip", "conv", "pool", "cnn", "per_example", "dp", "feedback",
           "nn", "keys", "extensions", "objective", "rnn", "rnn_steps", "reference_rnn", "charlm", "curvature"]
