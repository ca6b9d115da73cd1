"""The perceptron and its learning rule (Rosenblatt 1958), as pure functions.

In the notes' symbols, with the bias as an input x_0 = 1 (weights w = (w_0, w_1, ..., w_d)):

    u = F(x, W) = h(sum_{i=0}^d w_i x_i),   h = step: h(a) = 1 if a > 0 else 0 (so h(0) = 0)

and, for an example x with desired output y, the perceptron learning rule

    W_i^{t+1} = W_i^t + Delta W_i^t,    Delta W_i^t = c (y - u) x_i,

with c the learning rate.  Examples are presented one at a time, in a fixed order,
epoch after epoch; the weights change only on an error (y != u).  Perceptron
convergence theorem (Rosenblatt 1958): if the classes are linearly separable, the
procedure finds separating weights after finitely many updates -- then a whole epoch
passes without an error.  XOR is not linearly separable, so it never does; two
layers of step units (``xor_network``) do encode it.

``train`` runs the rule with ``jax.lax.scan`` (jit-compatible; ``epochs`` is static)
and returns the final weights, a step-by-step ``Trace`` of arrays (one entry per
presentation, as in the notes' OR table) and the first error-free epoch;
``format_trace`` turns the trace into that table in markdown.

Hand-set weights (the notes' "by hand / no learning" exercise):

* ``A_AND_NOT_B_WEIGHTS`` = (w_0, w_A, w_B) = (-0.5, 1, -1): u = step(A - B - 0.5) is 1
  only for A = 1, B = 0.
* ``xor_network``: two layers of step units in ``fnbp.mlp`` layout,
  h_1 = step(A + B - 0.5) (A OR B), h_2 = step(A + B - 1.5) (A AND B), and the output
  unit is the A AND NOT B perceptron applied to (h_1, h_2): u = step(h_1 - h_2 - 0.5).
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import activations, mlp

__all__ = ["with_bias", "net_input", "predict", "update", "train", "Trace", "PerceptronResult", "format_trace",
           "A_AND_NOT_B_WEIGHTS", "xor_network_params", "xor_network"]


def with_bias(x):
    """Prepend the bias input x_0 = 1 to the last axis: (x_1..x_d) -> (1, x_1..x_d)."""
    x = jnp.asarray(x)
    return jnp.concatenate([jnp.ones(x.shape[:-1] + (1,), x.dtype), x], axis=-1)


def net_input(w, x):
    """sum_{i=0}^d w_i x_i with x_0 = 1; ``x`` holds (x_1..x_d), shape (d,) or (batch, d)."""
    w, x = jnp.asarray(w), jnp.asarray(x)
    dtype = jnp.result_type(w, x, 1.0)
    return with_bias(x.astype(dtype)) @ w.astype(dtype)


def predict(w, x):
    """Perceptron output u = step(sum_{i=0}^d w_i x_i), x_0 = 1 added here (step(0) = 0)."""
    return activations.step(net_input(w, x))


def update(w, x, y, *, c=1.0):
    """One presentation of the rule: returns (w + c (y - u) x, u) with u = predict(w, x).

    ``x`` is one example (x_1..x_d) without x_0; the bias weight w_0 sees x_0 = 1.
    """
    u = predict(w, x)
    return w + c * (y - u) * with_bias(x), u


class Trace(NamedTuple):
    """One entry per presentation (epochs * n_examples), as arrays (the notes' OR table)."""
    epoch: jax.Array            # 1-based epoch number
    step: jax.Array             # 1-based presentation number, counted across epochs
    weights_before: jax.Array   # (steps, d + 1): w at the start of the step
    input: jax.Array            # (steps, d + 1): (x_0 = 1, x_1..x_d)
    net: jax.Array              # sum_i w_i x_i
    output: jax.Array           # u = step(net)
    target: jax.Array           # y
    error: jax.Array            # y - u
    weights: jax.Array          # (steps, d + 1): w after the step


class PerceptronResult(NamedTuple):
    weights: jax.Array          # final weights (w_0..w_d)
    trace: Trace
    converged: jax.Array        # bool: some epoch had no error
    converged_epoch: jax.Array  # 1-based first error-free epoch, -1 if none


def train(w0, x, targets, *, c=1.0, epochs=10):
    """Run the perceptron rule for ``epochs`` epochs over ``x`` in the given order.

    Args:
      w0: initial weights (w_0, w_1..w_d), w_0 the bias weight.
      x: examples (n, d), *without* the bias input (x_0 = 1 is added).
      targets: desired outputs y in {0, 1}, shape (n,).
      c: learning rate.
      epochs: number of passes over the examples (static under ``jax.jit``).

    Every epoch is run (the rule is a fixed point once an epoch is error-free, so
    later epochs repeat it with no change).  Returns ``PerceptronResult(weights, trace,
    converged, converged_epoch)``: ``converged_epoch`` is the first epoch with no
    error (-1 if none), after which the procedure of the notes stops.
    """
    w0, x, targets = jnp.asarray(w0), jnp.asarray(x), jnp.asarray(targets)
    dtype = jnp.result_type(w0, x, targets, c, 1.0)
    w0 = w0.astype(dtype)
    x, targets = x.astype(dtype), targets.astype(dtype)
    if x.ndim != 2 or targets.shape != x.shape[:1] or w0.shape != (x.shape[1] + 1,):
        raise ValueError(f"fnbp.perceptron.train: need x (n, d), targets (n,) and w0 (d + 1,), got x {x.shape}, "
                         f"targets {targets.shape}, w0 {w0.shape}")
    n = x.shape[0]
    xs = jnp.tile(x, (epochs, 1))
    ys = jnp.tile(targets, epochs)

    def one_step(w, xy):
        xi, yi = xy
        xb = with_bias(xi)
        a = xb @ w
        u = activations.step(a)
        w_new = w + c * (yi - u) * xb                        # Delta W_i = c (y - u) x_i
        return w_new, (w, xb, a, u, yi - u, w_new)

    w, (w_before, inputs, net, out, err, w_after) = jax.lax.scan(one_step, w0, (xs, ys))
    steps = jnp.arange(1, epochs * n + 1)
    trace = Trace(epoch=(steps - 1) // n + 1, step=steps, weights_before=w_before, input=inputs, net=net,
                  output=out, target=ys, error=err, weights=w_after)
    clean = jnp.all(err.reshape(epochs, n) == 0, axis=1)
    converged = jnp.any(clean)
    epoch = jnp.where(converged, jnp.argmax(clean) + 1, -1)
    return PerceptronResult(w, trace, converged, epoch)


def _fmt(v):
    v = float(v)
    return str(int(v)) if v == int(v) else f"{v:g}"


def _vec(v):
    return "(" + ", ".join(_fmt(e) for e in np.asarray(v)) + ")"


def format_trace(trace, *, max_steps=None):
    """The trace as a markdown table, one row per presentation (the notes' OR table layout).

    ``max_steps`` keeps only the first rows (e.g. up to the end of the converged epoch).
    """
    rows = ["| epoch | step | w before (w_0, ..., w_d) | input (x_0, ..., x_d) | sum_i w_i x_i | output u | "
            "target y | error y - u | w after |",
            "|---|---|---|---|---|---|---|---|---|"]
    t = jax.tree_util.tree_map(np.asarray, trace)
    n = len(t.step) if max_steps is None else min(max_steps, len(t.step))
    for i in range(n):
        rows.append(f"| {int(t.epoch[i])} | {int(t.step[i])} | {_vec(t.weights_before[i])} | {_vec(t.input[i])} | "
                    f"{_fmt(t.net[i])} | {_fmt(t.output[i])} | {_fmt(t.target[i])} | {_fmt(t.error[i])} | "
                    f"{_vec(t.weights[i])} |")
    return "\n".join(rows)


# --- hand-set weights -----------------------------------------------------------
A_AND_NOT_B_WEIGHTS = np.array([-0.5, 1.0, -1.0])   # (w_0, w_A, w_B): u = step(A - B - 0.5)


def xor_network_params(dtype=jnp.float32):
    """Hand-set 2-2-1 network of step units for A XOR B, in ``fnbp.mlp`` layout.

    Hidden: h_1 = step(A + B - 0.5) = A OR B,  h_2 = step(A + B - 1.5) = A AND B.
    Output: u = step(h_1 - h_2 - 0.5) = h_1 AND NOT h_2 (the ``A_AND_NOT_B_WEIGHTS`` perceptron).
    """
    return [{"W": jnp.array([[1.0, 1.0], [1.0, 1.0]], dtype), "b": jnp.array([-0.5, -1.5], dtype)},
            {"W": jnp.array([A_AND_NOT_B_WEIGHTS[1:]], dtype), "b": jnp.array(A_AND_NOT_B_WEIGHTS[:1], dtype)}]


def xor_network(x, params=None):
    """A XOR B for x = (A, B) in {0, 1}^2, shape (2,) or (batch, 2): step units throughout
    (``fnbp.mlp.apply`` with ``fnbp.step`` hidden and output).  Returns 0/1, shape () or (batch,)."""
    x = jnp.asarray(x, jnp.result_type(x, 1.0))
    params = xor_network_params(x.dtype) if params is None else params
    return mlp.apply(params, x, activation=activations.step, output=activations.step)[..., 0]
