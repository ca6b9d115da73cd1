"""Per-example quantities of convolutional networks (any walker network of conv2d and dense layers).

A convolution is a dense layer applied at every output position p (``fnbp.conv``): with
P_{n,p} example n's input patch at p (kh kw C_in numbers, ordered (i, j, c) as ``im2col``)
and delta_{n,p} = grad_{a_{n,p}} E its row of delta_k (C_out numbers), example n's own
gradient sums over its S = H_out W_out positions (fan-out of the shared weights):

    grad_{W_k} E_n = sum_p delta_{n,p} P_{n,p}^T = delta_n^T P_n     (C_out x K, K = kh kw C_in)
    grad_{b_k} E_n = sum_p delta_{n,p}

with delta_n (S, C_out) and P_n (S, K) example n's rows.  A dense layer is the case S = 1
(P_n = h_{k-1,n}^T).  Its squared norm needs no per-example gradient (ghost norm; Goodfellow
2015, Li et al. 2022, Opacus' ghost clipping): with the Gram matrices over positions

    ||grad_{W_k} E_n||^2 = sum_{p,p'} (delta_{n,p} . delta_{n,p'}) (P_{n,p} . P_{n,p'})
                         = sum of the entrywise product (delta_n delta_n^T) (.) (P_n P_n^T)   (S x S each)

("gram": B S^2 (C_out + K) multiply-adds, two B x S x S arrays) -- or "direct": form
delta_n^T P_n by one batched GEMM (B S C_out K multiply-adds, a B x C_out x K array) and
take its squared Frobenius norm.  ``norm_method`` picks "gram" when 2 S^2 <= C_out K (the two
Gram matrices are no bigger than the per-example gradients: Bu et al.'s "mixed ghost norm"
rule, 2022), else "direct".  For a dense layer (S = 1) "gram" is ||delta_n||^2 ||h_{k-1,n}||^2.

The clipped sum of DP-SGD stays ONE GEMM per layer, the ordinary grad_W product with the rows
of delta scaled by the clip factors c_n (every position of example n by the same c_n):

    sum_n c_n grad_{W_k} E_n = (c (.) delta)^T P     ((B S) x C_out)^T ((B S) x K)

Shapes here: ``PatchPass.patches`` (B, S, K), ``delta`` (B, S, C_out).  The walk refuses what
couples examples (batch norm) or has no per-example rule here (parameters of any other op,
weights shared by two layers); dropout draws one mask per example (``fnbp.per_example``).
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from . import activations, conv, graph, losses, regularization
from .per_example import dropout_per_example
from .rules import rule_of

__all__ = ["PatchPass", "METHODS", "network_passes", "norm_method", "patch_grads", "patch_batch_l2",
           "patch_norms", "patch_sum_grad_squared", "patch_clipped_sum", "as_params_tree"]

METHODS = ("auto", "gram", "direct")
"""Ways to get a layer's per-example squared norm: "auto" (``norm_method``'s rule), "gram", "direct"."""


class PatchPass(NamedTuple):
    """What one conv (or dense: S = 1) layer saw in one walk; arrays carry the batch axis of x."""
    path: tuple          # where the layer's {"W", "b"} sits in params, e.g. ("conv", 0)
    patches: Any         # P: (B, S, K) input patches over the S output positions; dense: h_{k-1} as (B, 1, n_in)
    delta: Any           # delta_k = grad_a E per position, example n's own under reduction='sum': (B, S, C_out)
    grad_W: Any          # the batch gradient sum_n delta_n^T P_n, in W's shape
    grad_b: Any          # sum over examples and positions of delta
    W_shape: tuple       # (C_out, C_in, kh, kw) for a conv, (n_out, n_in) for a dense layer


def _to_W(mat, W_shape):
    """(..., C_out, K) with K ordered (i, j, c) -> (..., C_out, C_in, kh, kw); dense shapes unchanged."""
    if len(W_shape) == 2:
        return mat
    C_out, C_in, kh, kw = W_shape
    return jnp.moveaxis(mat.reshape(mat.shape[:-1] + (kh, kw, C_in)), -1, -3)


def _network(params, x, arch, dropout, key, name):
    from . import cnn                                        # cnn imports train: import here, not at load
    if isinstance(arch, cnn.LeNet):
        if not isinstance(params, dict) or set(params) != {"conv", "dense"}:
            raise ValueError(f"{name}: a LeNet's params must be a dict with 'conv' and 'dense' (fnbp.cnn.init), "
                             f"got {type(params).__name__}")
        if jnp.ndim(x) != 4 or tuple(jnp.shape(x)[1:]) != arch.image_shape:
            raise ValueError(f"{name}: x must have shape (batch, {', '.join(map(str, arch.image_shape))}) for "
                             f"arch's image_shape, got shape {jnp.shape(x)}")
        if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
            raise ValueError(f"{name}: dropout must be a drop probability in [0, 1), got {dropout!r}")
        if dropout and key is None:
            raise ValueError(f"{name}: dropout={dropout} needs an explicit jax.random key (key=...)")
        return cnn.network(params, arch=arch, train=True, dropout=dropout)
    if isinstance(arch, graph.Graph):
        if dropout:
            raise ValueError(f"{name}: dropout={dropout!r} applies to a LeNet arch; a fnbp.graph.Graph carries "
                             "its own dropout nodes (give key= for them)")
        return arch
    raise ValueError(f"{name}: arch must be a fnbp.cnn.LeNet or a fnbp.graph.Graph (input 'x', output y), "
                     f"got {type(arch).__name__}")


def _bn_error(name):
    return ValueError(f"{name}: batch norm couples the examples of a batch (each example's normalised value "
                      "depends on the batch mean and variance), so an example has no gradient of its own; "
                      "use a network without batch-norm parameters (gamma, beta)")


def _layers(net, name):
    """[(node, params path of its {W, b}, 'conv2d' | 'dense')], refusing what has no per-example rule here."""
    layers, owner = [], {}
    for n in net.nodes:
        if n.aux:
            if n.op is jax.random.fold_in:                   # a dropout key: made per example below
                continue
            raise ValueError(f"{name}: auxiliary node {n.name!r} (running statistics, augmentation) is not "
                             "supported by per-example quantities; build the network without it")
        r = rule_of(n.op)
        op = r.name if r is not None else getattr(n.op, "__name__", repr(n.op))
        if "batch_norm" in op:
            raise _bn_error(name)
        used = [a for a in n.args if isinstance(a, graph.Param)]
        W, b = (n.args + (None, None))[:2]
        if (op in ("conv2d", "dense") and len(used) == 2 and isinstance(W, graph.Param) and isinstance(b, graph.Param)
                and W.path[-1:] == ("W",) and b.path == W.path[:-1] + ("b",)):
            path = W.path[:-1]
            if path in owner:
                raise ValueError(f"{name}: nodes {owner[path]!r} and {n.name!r} share the weights at {path}; "
                                 "per-example norms of shared weights are not implemented")
            owner[path] = n.name
            layers.append((n.name, path, op))
        elif used:
            raise ValueError(f"{name}: node {n.name!r} ({op}) uses parameters {[u.path for u in used]}; per-example "
                             "quantities are implemented for the W, b of conv2d and dense layers only")
    return layers


def _per_example_masks(net):
    nodes = []
    for n in net.nodes:
        if n.aux and n.op is jax.random.fold_in:
            n = graph.node(n.name, lambda keys, k: jax.vmap(lambda key: jax.random.fold_in(key, k))(keys),
                           *n.args, aux=True)
        elif rule_of(n.op) is regularization.dropout.rule:
            n = graph.node(n.name, dropout_per_example, *n.args)
        nodes.append(n)
    return graph.make(nodes, net.output, net.state_updates)


def network_passes(params, x, d, *, arch, activation=activations.relu, output=activations.identity,
                   loss=losses.softmax_cross_entropy, dropout=0.0, key=None, name="fnbp.per_example"):
    """(E, passes): the summed loss and a ``PatchPass`` per conv/dense layer of the network ``arch``
    (a ``fnbp.cnn.LeNet`` with params from ``fnbp.cnn.init``, or any ``fnbp.graph.Graph`` with input
    "x" and output y), from one walk (``fnbp.graph.forward``/``backward``) with reduction='sum'.
    Dropout: one mask per example, example n's from ``jax.random.split(key, B)[n]``."""
    if activation is not activations.relu or output is not activations.identity:
        raise ValueError(f"{name}: with arch= the network fixes its activations; leave activation= and output= "
                         f"at their defaults, got activation={activation!r}, output={output!r}")
    if any(isinstance(layer, dict) and ("gamma" in layer or "beta" in layer)
           for layer in jax.tree_util.tree_leaves(params, is_leaf=lambda t: isinstance(t, dict) and "W" in t)):
        raise _bn_error(name)
    net = _network(params, x, arch, dropout, key, name)
    layers = _layers(net, name)
    if not layers:
        raise ValueError(f"{name}: the network has no conv2d or dense layer with parameters W, b")
    spec = losses.loss_spec(loss, name=name)
    if not spec.takes_reduction:
        raise ValueError(f"{name}: the loss must take reduction= (each example's own loss needs "
                         f"reduction='sum'), got {loss!r}")
    B = jnp.shape(x)[0]
    keys = None if key is None else jax.random.split(key, B)
    net = graph.objective(_per_example_masks(net), spec._replace(reduction="sum"))
    E, tape = graph.forward(net, params, {"x": x, "d": d, "key": keys}, who=name)
    trace = graph.trace(tape, graph.backward(tape, who=name)).nodes
    options = {n.name: dict(n.options) for n in net.nodes}
    passes = []
    for node_name, path, op in layers:
        t = trace[node_name]
        W, _, h_prev = t.inputs
        if t.grad_output is None:                            # no gradient reached this layer
            delta, grad_W, grad_b = jnp.zeros_like(t.output), jnp.zeros_like(W), jnp.zeros_like(t.inputs[1])
        else:
            delta, (grad_W, grad_b) = t.grad_output, t.grad_inputs[:2]
        if op == "conv2d":
            C_out, _, kh, kw = jnp.shape(W)
            cols = conv.im2col(h_prev, kh, kw, stride=options[node_name]["stride"],
                               padding=options[node_name]["padding"])
            patches, delta = cols.reshape(B, -1, cols.shape[-1]), delta.reshape(B, -1, C_out)
        else:
            if jnp.ndim(h_prev) != 2:
                raise ValueError(f"{name}: dense node {node_name!r} needs a (batch, n_in) input, got shape "
                                 f"{jnp.shape(h_prev)}")
            patches, delta = h_prev[:, None, :], delta[:, None, :]
        passes.append(PatchPass(path, patches, delta, grad_W, grad_b, tuple(jnp.shape(W))))
    return E, passes


def norm_method(S, C_out, K, method="auto"):
    """'gram' or 'direct' for a layer of S positions and a C_out x K weight matrix: ``method`` itself
    when forced, else 'gram' iff 2 S^2 <= C_out K (the two B x S x S Gram matrices are no bigger than
    the B x C_out x K per-example gradients; always 'gram' for a dense layer, S = 1)."""
    if method not in METHODS:
        raise ValueError(f"fnbp.per_example: method must be one of {METHODS}, got {method!r}")
    if method != "auto":
        return method
    return "gram" if 2 * S * S <= C_out * K else "direct"


def _per_example_matrices(p):
    return jnp.einsum("bso,bsk->bok", p.delta, p.patches)          # delta_n^T P_n: one batched GEMM


def patch_grads(p):
    """Example n's gradients {"W": delta_n^T P_n in W's shape, (B,) + W_shape; "b": sum_p delta_{n,p}, (B, C_out)}."""
    return {"W": _to_W(_per_example_matrices(p), p.W_shape), "b": jnp.sum(p.delta, axis=1)}


def patch_batch_l2(p, method="auto"):
    """{"W": ||delta_n^T P_n||_F^2, "b": ||sum_p delta_{n,p}||^2}, each (B,), by ``norm_method``'s choice:
    "gram" sums (delta_n delta_n^T) (.) (P_n P_n^T) over all position pairs (p, p'), "direct" squares
    the per-example matrix."""
    _, S, C_out = p.delta.shape
    if norm_method(S, C_out, p.patches.shape[-1], method) == "gram":
        gram_delta = jnp.einsum("bso,bto->bst", p.delta, p.delta)      # delta_{n,p} . delta_{n,p'}
        gram_patches = jnp.einsum("bsk,btk->bst", p.patches, p.patches)   # P_{n,p} . P_{n,p'}
        w = jnp.sum(gram_delta * gram_patches, axis=(1, 2))
    else:
        G = _per_example_matrices(p)
        w = jnp.sum(G * G, axis=(1, 2))
    delta_b = jnp.sum(p.delta, axis=1)
    return {"W": w, "b": jnp.sum(delta_b * delta_b, axis=-1)}


def patch_norms(passes, method="auto"):
    """||grad_theta E_n||_2 over every layer's W and b, (B,), from ``patch_batch_l2``."""
    return jnp.sqrt(sum(sq["W"] + sq["b"] for sq in (patch_batch_l2(p, method) for p in passes)))


def patch_sum_grad_squared(p):
    """sum_n (grad E_n)^2 entrywise: S = 1: (delta^2)^T (H^2), one GEMM; else the per-example matrices
    delta_n^T P_n (one batched GEMM, B x C_out x K) squared and summed over n (no shortcut: positions mix)."""
    if p.delta.shape[1] == 1:
        sq_W = jnp.einsum("bo,bk->ok", p.delta[:, 0] ** 2, p.patches[:, 0] ** 2)
    else:
        sq_W = jnp.sum(_per_example_matrices(p) ** 2, axis=0)
    return {"W": _to_W(sq_W, p.W_shape), "b": jnp.sum(jnp.sum(p.delta, axis=1) ** 2, axis=0)}


def patch_clipped_sum(p, c):
    """sum_n c_n grad E_n: {"W": (c (.) delta)^T P, ONE GEMM over the B S rows, "b": (c (.) delta) summed}."""
    B, S, C_out = p.delta.shape
    weighted = p.delta * c[:, None, None].astype(p.delta.dtype)        # every position of n scaled by c_n
    mat = lax.dot_general(weighted.reshape(B * S, C_out), p.patches.reshape(B * S, -1), (((0,), (0,)), ((), ())))
    return {"W": _to_W(mat, p.W_shape), "b": jnp.sum(weighted, axis=(0, 1))}


def as_params_tree(params, passes, values, fill):
    """params' structure with ``values[i]`` (a {"W", "b"} dict) at ``passes[i].path`` and ``fill(leaf)``
    for every other leaf (parameters the loss does not reach)."""
    placed = {p.path: v for p, v in zip(passes, values)}

    def build(tree, path):
        here = placed.get(path, {})
        if isinstance(tree, dict):
            return {k: here[k] if k in here else build(v, path + (k,)) for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(build(v, path + (i,)) for i, v in enumerate(tree))
        return fill(tree)

    return build(params, ())
