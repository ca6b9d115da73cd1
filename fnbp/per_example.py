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

CNNs: every function takes ``arch=`` -- a ``fnbp.cnn.LeNet`` (params from ``fnbp.cnn.init``) or any
``fnbp.graph.Graph`` of conv2d and dense layers (stride and padding as its nodes say) -- and then
returns params' structure ({"conv": [...], "dense": [...]} for a LeNet).  A conv layer is a dense
layer at each of its S = H_out W_out output positions p, on example n's patch P_{n,p} (K = kh kw C_in):

    grad_{W_k} E_n = sum_p delta_{n,p} P_{n,p}^T = delta_n^T P_n        (C_out x K; (B, C_out, C_in, kh, kw) stacked)
    ||grad_{W_k} E_n||^2 = sum_{p,p'} (delta_{n,p} . delta_{n,p'}) (P_{n,p} . P_{n,p'})   ("gram", S x S per example)
                         = ||delta_n^T P_n||_F^2                                           ("direct")
    grad_{b_k} E_n = sum_p delta_{n,p}

``method=`` ("auto", "gram", "direct") picks the norm form; "auto" takes "gram" when 2 S^2 <= C_out K
(``fnbp.per_example_conv.norm_method``).  sum_grad_squared and variance of a conv layer square the
per-example matrices delta_n^T P_n (positions mix, so no one-GEMM form as for dense layers).

(delta_k, h_{k-1}) come from the network walker (``fnbp.graph.forward``/``backward`` on
``fnbp.mlp.network``): node "a{k}"'s input h_{k-1} and the cotangent delta_k arriving at it.
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from . import activations, graph, losses, mlp, regularization
from .check_cases import register as register_check
from .mlp import uses_layer_alpha, layer_activations
from .rules import rule

__all__ = ["LayerPass", "layer_passes", "dropout_per_example", "grads", "batch_l2", "grad_norms",
           "sum_grad_squared", "variance", "squared_norms_from_passes", "norms_from_passes"]


class LayerPass(NamedTuple):
    """What dense layer k saw in one walk (arrays with the batch axis of x)."""
    h_prev: Any        # h_{k-1}, the layer's input, (B, n_in)
    delta: Any         # delta_k = grad_{a_k} E, example n's own row under reduction='sum', (B, n_out)
    grad_W: Any        # delta_k^T H_{k-1}
    grad_b: Any        # sum over the batch of delta_k


def _dropout_per_example_fwd(h, p, keys):
    """Inverted dropout with one mask per example: row n of h (B, n_units) uses ``fnbp.dropout``'s
    mask from keys[n] (keys: B keys).  Backward: grad_h_n = grad_y_n m_n / (1 - p), as ``dropout``."""
    return jax.vmap(lambda h_n, key_n: regularization.dropout.rule.fwd(h_n, p, key_n))(h, keys)


def _dropout_per_example_bwd(res, grad_y):
    return jax.vmap(lambda r, g_n: regularization.dropout.rule.bwd(r, g_n)[0])(res, grad_y), None, None


dropout_per_example = rule(_dropout_per_example_fwd, _dropout_per_example_bwd, name="dropout_per_example")
register_check(dropout_per_example, "dropout_per_example", "dropout_rows", argnums=(0,), batch_only=True)


def _fold_in_each(keys, k):
    return jax.vmap(lambda key_n: jax.random.fold_in(key_n, k))(keys)


def _per_example_masks(net):
    """The MLP graph with its dropout nodes drawing one mask per example: "key{i}" folds k into each
    example's key, "dropout{i}" is ``dropout_per_example``."""
    nodes = []
    for n in net.nodes:
        if n.name.startswith("key"):
            n = graph.node(n.name, _fold_in_each, *n.args, aux=True)
        elif n.name.startswith("dropout"):
            n = graph.node(n.name, dropout_per_example, *n.args)
        nodes.append(n)
    return graph.make(nodes, net.output, net.state_updates)


def layer_passes(params, x, d, *, activation=activations.relu, output=activations.identity, loss=losses.half_sse,
                 dropout=0.0, key=None, name="fnbp.per_example"):
    """(E, passes): the summed loss and per dense layer a ``LayerPass`` (h_prev, delta, grad_W, grad_b)
    with every example's own delta row; refuses what couples examples or has no per-example rule here."""
    if not isinstance(params, (list, tuple)) or not params:
        raise ValueError(f"{name}: params must be a non-empty list of {{'W', 'b'}} dicts, got {type(params).__name__}")
    if any(isinstance(layer, dict) and ("gamma" in layer or "beta" in layer) for layer in params):
        raise ValueError(f"{name}: batch norm couples the examples of a batch (each example's normalised value "
                         "depends on the batch mean and variance), so an example has no gradient of its own; "
                         "use a network without batch-norm parameters (gamma, beta)")
    if jnp.ndim(x) != 2:
        raise ValueError(f"{name}: x must be a mini-batch of shape (batch, n_0), got shape {jnp.shape(x)}")
    mlp.check_params(params, x, name=name)
    gs = layer_activations(len(params), activation, output)
    if any(uses_layer_alpha(g) and "alpha" in layer for g, layer in zip(gs, params)):
        raise ValueError(f"{name}: per-example gradients of a learnable PReLU slope are not implemented; "
                         "use a fixed slope (functools.partial(fnbp.prelu, alpha=...) or fnbp.leaky_relu)")
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise ValueError(f"{name}: dropout must be a drop probability in [0, 1), got {dropout!r}")
    keys = None
    if dropout:
        if key is None:
            raise ValueError(f"{name}: dropout={dropout} needs an explicit jax.random key (key=...)")
        keys = jax.random.split(key, jnp.shape(x)[0])
    spec = losses.loss_spec(loss, name=name)
    if not spec.takes_reduction:
        raise ValueError(f"{name}: the loss must take reduction= (each example's own loss needs "
                         f"reduction='sum'), got {loss!r}")
    net = mlp.network(params, activation=activation, output=output, train=True, dropout=dropout, running=False,
                      who=name)
    net = graph.objective(_per_example_masks(net) if dropout else net, spec._replace(reduction="sum"))
    E, tape = graph.forward(net, params, {"x": x, "d": d, "key": keys}, who=name)
    nodes = graph.trace(tape, graph.backward(tape, who=name)).nodes
    passes = []
    for i in range(1, len(params) + 1):
        a = nodes[f"a{i}"]                       # inputs (W_k, b_k, h_{k-1}); grad_output delta_k
        delta = a.grad_output if a.grad_output is not None else jnp.zeros_like(a.output)
        grad_W, grad_b = a.grad_inputs[:2] if a.grad_output is not None else (jnp.zeros_like(a.inputs[0]),
                                                                               jnp.zeros_like(a.inputs[1]))
        passes.append(LayerPass(a.inputs[2], delta, grad_W, grad_b))
    return E, passes


def _passes(name, params, x, d, activation, output, loss, dropout, key):
    return layer_passes(params, x, d, activation=activation, output=output, loss=loss, dropout=dropout, key=key,
                        name=f"fnbp.per_example.{name}")[1]


def _net_passes(name, params, x, d, arch, activation, output, loss, dropout, key, method="auto"):
    """The conv/dense layers' ``PatchPass``es of network ``arch`` (``fnbp.per_example_conv``); for an MLP
    (arch None) only method='auto' is meaningful (its dense layers always use the rank-one form)."""
    from . import per_example_conv
    who = f"fnbp.per_example.{name}"
    if method not in per_example_conv.METHODS:
        raise ValueError(f"{who}: method must be one of {per_example_conv.METHODS}, got {method!r}")
    if arch is None:
        if method != "auto":
            raise ValueError(f"{who}: method={method!r} chooses the Gram or direct form for a network given by "
                             "arch=; an MLP's dense layers always use ||delta_n||^2 ||h_n||^2")
        return None
    return per_example_conv.network_passes(params, x, d, arch=arch, activation=activation, output=output,
                                           loss=loss, dropout=dropout, key=key, name=who)[1]


def grads(params, x, d, *, activation=activations.relu, output=activations.identity, loss=losses.half_sse,
          dropout=0.0, key=None, arch=None):
    """Per-example gradients grad_theta E_n of each example's own loss: params' structure with a leading
    batch axis, W: (B, n_out, n_in) = delta_n h_n^T, b: (B, n_out) = delta_n.  Forms B x |theta| numbers:
    use ``grad_norms``/``fnbp.dp`` when only norms or a clipped sum are needed.

    ``arch``: a ``fnbp.cnn.LeNet`` (params from ``fnbp.cnn.init``) or any ``fnbp.graph.Graph`` of conv2d
    and dense layers; a conv layer's W gradient is then delta_n^T P_n = sum_p delta_{n,p} P_{n,p}^T,
    (B, C_out, C_in, kh, kw) (``fnbp.per_example_conv``)."""
    net = _net_passes("grads", params, x, d, arch, activation, output, loss, dropout, key)
    if net is not None:
        from . import per_example_conv as pc
        return pc.as_params_tree(params, net, [pc.patch_grads(p) for p in net],
                                 lambda v: jnp.zeros((jnp.shape(x)[0],) + jnp.shape(v), jnp.result_type(v)))
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
             dropout=0.0, key=None, arch=None, method="auto"):
    """Squared L2 norm of each example's gradient per parameter leaf, without forming it:
    ||grad_{W_k} E_n||^2 = ||delta_{k,n}||^2 ||h_{k-1,n}||^2 and ||grad_{b_k} E_n||^2 = ||delta_{k,n}||^2
    (the Frobenius norm of a rank-one matrix).  Returns params' structure with (B,) leaves.

    With ``arch`` (a CNN, see ``grads``), a conv layer's ||delta_n^T P_n||^2 from the Gram matrices over
    positions (``method="gram"``) or the per-example matrix (``"direct"``); ``"auto"`` picks per layer by
    size (``fnbp.per_example_conv.norm_method``)."""
    net = _net_passes("batch_l2", params, x, d, arch, activation, output, loss, dropout, key, method)
    if net is not None:
        from . import per_example_conv as pc
        return pc.as_params_tree(params, net, [pc.patch_batch_l2(p, method) for p in net],
                                 lambda v: jnp.zeros((jnp.shape(x)[0],), jnp.result_type(v)))
    passes = _passes("batch_l2", params, x, d, activation, output, loss, dropout, key)
    return squared_norms_from_passes(passes)


def grad_norms(params, x, d, *, activation=activations.relu, output=activations.identity, loss=losses.half_sse,
               dropout=0.0, key=None, arch=None, method="auto"):
    """||grad_theta E_n||_2 over all parameters, per example: (B,), from ``batch_l2`` (no per-example gradient;
    ``arch`` and ``method`` as there)."""
    net = _net_passes("grad_norms", params, x, d, arch, activation, output, loss, dropout, key, method)
    if net is not None:
        from . import per_example_conv as pc
        return pc.patch_norms(net, method)
    passes = _passes("grad_norms", params, x, d, activation, output, loss, dropout, key)
    return norms_from_passes(passes)


def _sgs(passes):
    return [{"W": jnp.einsum("bo,bi->oi", p.delta * p.delta, p.h_prev * p.h_prev),   # (delta^2)^T (H^2)
             "b": jnp.sum(p.delta * p.delta, axis=0)} for p in passes]


def _net_sgs_and_mean(params, net, fill):
    from . import per_example_conv as pc
    B = jnp.shape(net[0].delta)[0]
    sgs = pc.as_params_tree(params, net, [pc.patch_sum_grad_squared(p) for p in net], fill)
    g_bar = pc.as_params_tree(params, net, [{"W": p.grad_W / B, "b": p.grad_b / B} for p in net], fill)
    return sgs, g_bar


def sum_grad_squared(params, x, d, *, activation=activations.relu, output=activations.identity, loss=losses.half_sse,
                     dropout=0.0, key=None, arch=None):
    """sum_n (grad_theta E_n)^2 elementwise, params' structure: W: (delta^2)^T (H^2), one GEMM
    ((delta_n h_n^T)^2 = delta_n^2 (h_n^2)^T entrywise); b: sum_n delta_n^2.  With ``arch`` (a CNN), a conv
    layer's sum_n (delta_n^T P_n)^2 from the per-example matrices (positions mix: no one-GEMM form)."""
    net = _net_passes("sum_grad_squared", params, x, d, arch, activation, output, loss, dropout, key)
    if net is not None:
        return _net_sgs_and_mean(params, net, jnp.zeros_like)[0]
    passes = _passes("sum_grad_squared", params, x, d, activation, output, loss, dropout, key)
    return _sgs(passes)


def variance(params, x, d, *, activation=activations.relu, output=activations.identity, loss=losses.half_sse,
             dropout=0.0, key=None, arch=None):
    """Elementwise variance of the per-example gradients over the batch, 1/B sum_n (grad E_n - g_bar)^2
    = SGS / B - g_bar^2 with g_bar = 1/B sum_n grad E_n (the gradient of the mean loss).
    Clamped at 0 (rounding can make SGS / B - g_bar^2 slightly negative).  ``arch`` as in ``grads``."""
    B = jnp.shape(x)[0]
    net = _net_passes("variance", params, x, d, arch, activation, output, loss, dropout, key)
    if net is not None:
        sgs, g_bar = _net_sgs_and_mean(params, net, jnp.zeros_like)
        return jax.tree_util.tree_map(lambda s, g: jnp.maximum(s / B - g ** 2, 0), sgs, g_bar)
    passes = _passes("variance", params, x, d, activation, output, loss, dropout, key)
    out = []
    for p, sgs in zip(passes, _sgs(passes)):
        g_bar = {"W": p.grad_W / B, "b": p.grad_b / B}
        out.append({n: jnp.maximum(sgs[n] / B - g_bar[n] ** 2, 0) for n in ("W", "b")})
    return out
