"""Per-example quantities from ONE backward pass of the explicit rules (BackPACK's first-order extensions).

For a mini-batch of B examples with the loss summed over the batch (reduction='sum'),
the backward pass gives every example its own row delta_{k,n} = grad_{a_{k,n}} E_n of
layer k, and the forward its own input h_{k-1,n}.  Example n's gradient of its OWN loss
E_n = L(y_n; d_n) for a dense layer is one outer product (one position):

    grad_{W_k} E_n = delta_{k,n} h_{k-1,n}^T          (n_out x n_in)
    grad_{b_k} E_n = delta_{k,n}

so every per-example quantity below is a cheap function of (delta_k, h_{k-1}), shapes
(B, n_out) and (B, n_in):

    grads            delta_{k,n} h_{k-1,n}^T stacked: (B, n_out, n_in)  (BackPACK BatchGrad; this one is big)
    batch_l2         ||grad_{W_k} E_n||^2 = ||delta_{k,n}||^2 ||h_{k-1,n}||^2,
                     ||grad_{b_k} E_n||^2 = ||delta_{k,n}||^2   (B,) per leaf, NO outer product (BatchL2Grad)
    grad_norms       sqrt(sum over every leaf of batch_l2): (B,)
    sum_grad_squared sum_n (grad E_n)^2 elementwise = (delta_k^2)^T (H_{k-1}^2): one GEMM (SumGradSquared)
    variance         1/B sum_n (grad E_n - g_bar)^2 = SGS / B - g_bar^2, g_bar = 1/B sum_n grad E_n
                     (biased, over the B examples' own-loss gradients; BackPACK's Variance up to its
                     1/B scaling of individual gradients under reduction='mean')

Every function takes ``fnbp.backprop``'s arguments ``(params, x, d, activation=, output=, loss=)``
with x a mini-batch (B, n_0); the loss spec's reduction is ignored (each example's own loss).
Options: ``dropout=p, key=k`` drops hidden units with one mask per example: example n's mask in
hidden layer k is ``jax.random.bernoulli(fold_in(split(k, B)[n], k), 1 - p, (n_k,))``, the mask
``fnbp.mlp.apply_stateful(params, state, x[n], train=True, key=split(k, B)[n], dropout=p)`` draws.
Batch norm couples the examples of a batch (example n's output depends on the others), so there
is no per-example gradient: it is refused.

(delta_k, h_{k-1}) come from ``fnbp.backprop.forward_backward``, the notes' loop of rules.
"""
import jax
import jax.numpy as jnp

from . import activations, losses, norm
from .backprop import forward_backward
from .mlp import uses_layer_alpha, layer_activations

__all__ = ["layer_passes", "grads", "batch_l2", "grad_norms", "sum_grad_squared", "variance",
           "squared_norms_from_passes",
           "norms_from_passes"]


def _dropout_hook(p, keys, k):
    """(fwd, bwd) applying the dropout rule to hidden layer k with example n's key fold_in(keys[n], k)."""
    rule = norm.dropout.rule

    def fwd(h):
        return jax.vmap(lambda h_n, key_n: rule.fwd(h_n, p, jax.random.fold_in(key_n, k)))(h, keys)

    def bwd(res, grad_h):
        return jax.vmap(lambda r, g_n: rule.bwd(r, g_n)[0])(res, grad_h)

    return fwd, bwd


def layer_passes(params, x, d, *, activation=activations.relu, output=activations.identity, loss=losses.half_sse,
                 dropout=0.0, key=None, name="fnbp.per_example"):
    """(E, passes): the summed loss and per dense layer a ``LayerPass`` (h_prev, delta, grad_W, grad_b, ...)
    with every example's own delta row; refuses what couples examples or has no per-example rule here."""
    if not isinstance(params, (list, tuple)) or not params:
        raise ValueError(f"{name}: params must be a non-empty list of {{'W', 'b'}} dicts, got {type(params).__name__}")
    if any(isinstance(layer, dict) and ("gamma" in layer or "beta" in layer) for layer in params):
        raise ValueError(f"{name}: batch norm couples the examples of a batch (each example's normalised value "
                         "depends on the batch mean and variance), so an example has no gradient of its own; "
                         "use a network without batch-norm parameters (gamma, beta)")
    if jnp.ndim(x) != 2:
        raise ValueError(f"{name}: x must be a mini-batch of shape (batch, n_0), got shape {jnp.shape(x)}")
    gs = layer_activations(len(params), activation, output)
    if any(uses_layer_alpha(g) and "alpha" in layer for g, layer in zip(gs, params)):
        raise ValueError(f"{name}: per-example gradients of a learnable PReLU slope are not implemented; "
                         "use a fixed slope (functools.partial(fnbp.prelu, alpha=...) or fnbp.leaky_relu)")
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise ValueError(f"{name}: dropout must be a drop probability in [0, 1), got {dropout!r}")
    hooks = None
    if dropout:
        if key is None:
            raise ValueError(f"{name}: dropout={dropout} needs an explicit jax.random key (key=...)")
        keys = jax.random.split(key, jnp.shape(x)[0])
        hooks = [_dropout_hook(dropout, keys, k) for k in range(len(params) - 1)]
    return forward_backward(params, x, d, activation=activation, output=output, loss=loss, reduction="sum",
                            after_hidden=hooks, name=name)


def _passes(name, params, x, d, activation, output, loss, dropout, key):
    return layer_passes(params, x, d, activation=activation, output=output, loss=loss, dropout=dropout, key=key,
                        name=f"fnbp.per_example.{name}")[1]


def grads(params, x, d, *, activation=activations.relu, output=activations.identity, loss=losses.half_sse,
          dropout=0.0, key=None):
    """Per-example gradients grad_theta E_n of each example's own loss: params' structure with a leading
    batch axis, W: (B, n_out, n_in) = delta_n h_n^T, b: (B, n_out) = delta_n.  Forms B x |theta| numbers:
    use ``grad_norms``/``fnbp.dp`` when only norms or a clipped sum are needed."""
    passes = _passes("grads", params, x, d, activation, output, loss, dropout, key)
    return [{"W": jnp.einsum("bo,bi->boi", p.delta, p.h_prev), "b": p.delta} for p in passes]   # delta_n h_n^T


def squared_norms_from_passes(passes):
    """Per layer {"W": ||delta_n||^2 ||h_n||^2, "b": ||delta_n||^2}, each of shape (B,)."""
    out = []
    for p in passes:
        delta_sq = jnp.sum(p.delta * p.delta, axis=-1)             # ||delta_{k,n}||^2
        h_sq = jnp.sum(p.h_prev * p.h_prev, axis=-1)               # ||h_{k-1,n}||^2
        out.append({"W": delta_sq * h_sq, "b": delta_sq})
    return out


def norms_from_passes(passes):
    """||grad_theta E_n||_2 over every parameter, (B,): sqrt of the sum of ``squared_norms_from_passes``."""
    return jnp.sqrt(sum(layer["W"] + layer["b"] for layer in squared_norms_from_passes(passes)))


def batch_l2(params, x, d, *, activation=activations.relu, output=activations.identity, loss=losses.half_sse,
             dropout=0.0, key=None):
    """Squared L2 norm of each example's gradient per parameter leaf, without forming it:
    ||grad_{W_k} E_n||^2 = ||delta_{k,n}||^2 ||h_{k-1,n}||^2 and ||grad_{b_k} E_n||^2 = ||delta_{k,n}||^2
    (the Frobenius norm of a rank-one matrix).  Returns params' structure with (B,) leaves."""
    passes = _passes("batch_l2", params, x, d, activation, output, loss, dropout, key)
    return squared_norms_from_passes(passes)


def grad_norms(params, x, d, *, activation=activations.relu, output=activations.identity, loss=losses.half_sse,
               dropout=0.0, key=None):
    """||grad_theta E_n||_2 over all parameters, per example: (B,), from ``batch_l2`` (no per-example gradient)."""
    passes = _passes("grad_norms", params, x, d, activation, output, loss, dropout, key)
    return norms_from_passes(passes)


def _sgs(passes):
    return [{"W": jnp.einsum("bo,bi->oi", p.delta * p.delta, p.h_prev * p.h_prev),   # (delta^2)^T (H^2)
             "b": jnp.sum(p.delta * p.delta, axis=0)} for p in passes]


def sum_grad_squared(params, x, d, *, activation=activations.relu, output=activations.identity, loss=losses.half_sse,
                     dropout=0.0, key=None):
    """sum_n (grad_theta E_n)^2 elementwise, params' structure: W: (delta^2)^T (H^2), one GEMM
    ((delta_n h_n^T)^2 = delta_n^2 (h_n^2)^T entrywise); b: sum_n delta_n^2."""
    passes = _passes("sum_grad_squared", params, x, d, activation, output, loss, dropout, key)
    return _sgs(passes)


def variance(params, x, d, *, activation=activations.relu, output=activations.identity, loss=losses.half_sse,
             dropout=0.0, key=None):
    """Elementwise variance of the per-example gradients over the batch, 1/B sum_n (grad E_n - g_bar)^2
    = SGS / B - g_bar^2 with g_bar = 1/B sum_n grad E_n (the gradient of the mean loss).
    Clamped at 0 (rounding can make SGS / B - g_bar^2 slightly negative)."""
    passes = _passes("variance", params, x, d, activation, output, loss, dropout, key)
    B = jnp.shape(x)[0]
    out = []
    for p, sgs in zip(passes, _sgs(passes)):
        g_bar = {"W": p.grad_W / B, "b": p.grad_b / B}
        out.append({n: jnp.maximum(sgs[n] / B - g_bar[n] ** 2, 0) for n in ("W", "b")})
    return out
