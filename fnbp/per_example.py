"""Per-example quantities from ONE backward pass of the explicit rules, for any model (BackPACK's first order).

For a mini-batch of B examples with the loss summed over the batch (reduction='sum'), the walker's backward
pass gives every parametrised node the cotangent delta = grad_a E whose rows are each example's own, and the
forward its inputs.  Each rule with weights registers a view of them (``fnbp.extensions``, beside the rule):
example n's inputs P_n (S, K) at the S positions where its W acts and its delta_n (S, C_out), so that

    grad_W E_n = delta_n^T P_n = sum_p delta_{n,p} P_{n,p}^T,      grad_b E_n = sum_p delta_{n,p}

(dense: S = 1, P_n = h_{k-1,n}^T, so grad_W E_n = delta_n h_n^T; a dense layer on a sequence: S = T; conv2d: the
S = H_out W_out output pixels, P_n the im2col patches; a recurrent layer, ``fnbp.rnn``: one view per weight, each
S = T, W_x against the inputs x_t and W_h against h_{t-1}, both with BPTT's delta_t).  Every quantity below is written once over (P, delta):

    grads            delta_n^T P_n stacked, (B,) + W's shape           (BackPACK BatchGrad; this one is big)
    batch_l2         ||grad_W E_n||^2 per leaf, (B,), without forming it when cheaper:
                       "gram":   sum of (delta_n delta_n^T) (.) (P_n P_n^T)   (S x S; = ||delta_n||^2 ||h_n||^2
                                 for S = 1, the ghost norm)
                       "direct": ||delta_n^T P_n||_F^2 from one batched GEMM
                     "auto" takes "gram" iff 2 S^2 <= C_out K (Bu et al.'s mixed ghost norm rule)
    grad_norms       sqrt of the sum of batch_l2 over every leaf, (B,)
    sum_grad_squared sum_n (grad E_n)^2 entrywise: (delta^2)^T (P^2), one GEMM, when S = 1; else squared
                     per-example matrices (positions mix)
    variance         1/B sum_n (grad E_n - g_bar)^2 = SGS / B - g_bar^2, g_bar = 1/B sum_n grad E_n
    clipped sum      sum_n c_n grad_W E_n = (c (.) delta)^T P, ONE GEMM over the B S rows, or sum_n c_n G_n from
                     the per-example matrices G_n a "direct" layer formed for its norm (``clip_method``, ``fnbp.dp``)

Every function takes ``(params, x, d, *, model=, loss=)``: ``model`` any ``fnbp.nn`` model (or a
``fnbp.graph.Graph`` with input "x"); without it, ``fnbp.backprop``'s MLP (``activation=``, ``output=``).
``dropout``/``key``: the model's dropout layers draw one mask per example, example n's from
``fnbp.keys.per_example(key, B)[n]`` (the mask ``model.apply`` on x[n] alone with that key draws).
Refused by name: batch norm (it couples the examples: no example has a gradient of its own), a node with
parameters whose rule has no per-example extension, and weights shared by two nodes.
``arch=`` (a ``fnbp.cnn.LeNet`` or a Graph) is the earlier spelling of ``model=`` for the functional LeNet.
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from . import activations, extensions, graph, keys, losses, mlp, regularization
from .layers import weight_gradient
from .nn.recurrent import zero_state
from .objective import objective
from .rules import rule_of

__all__ = ["METHODS", "LayerRows", "network", "extension_layers", "walk", "norm_method", "clip_method", "rows_grads",
           "rows_batch_l2", "rows_norms", "rows_sum_grad_squared", "rows_clipped_sum", "rows_norms_and_clipped_sums",
           "as_params_tree", "grads", "batch_l2", "grad_norms", "sum_grad_squared", "variance"]

METHODS = ("auto", "gram", "direct")
"""Ways to get a layer's per-example squared norm: "auto" (``norm_method``'s rule), "gram", "direct"."""


class LayerRows(NamedTuple):
    """What one parametrised node saw in one walk (arrays carry the batch axis of x)."""
    node: str            # the node's name, e.g. "0.conv2d"
    W_path: tuple        # where its W sits in params, e.g. (0, "W")
    b_path: Any          # where its b sits (None: no bias)
    patches: Any         # P: (B, S, K)
    delta: Any           # delta per position, example n's own under reduction='sum': (B, S, C_out)
    grad_W: Any          # the batch gradient sum_n delta_n^T P_n, in W's shape
    grad_b: Any          # its bias gradient
    W_shape: tuple
    to_W: Any            # (..., C_out, K) -> (..., *W_shape)


def network(params, x, *, model=None, arch=None, activation=activations.relu, output=activations.identity,
            dropout=0.0, name="fnbp.per_example"):
    """The graph the quantities walk, in training mode: ``model``'s, ``arch``'s, or the MLP's."""
    if model is not None and arch is not None:
        raise ValueError(f"{name}: give model= or arch=, not both")
    legacy = activation is not activations.relu or output is not activations.identity or dropout
    if arch is not None and not isinstance(arch, graph.Graph) and not (activation is not activations.relu
                                                                      or output is not activations.identity):
        from . import cnn                             # the functional LeNet (fnbp.cnn): its dropout is an option
        if not isinstance(arch, cnn.LeNet):
            raise ValueError(f"{name}: arch must be a fnbp.cnn.LeNet or a fnbp.graph.Graph, got {type(arch).__name__}")
        if not isinstance(params, dict) or set(params) != {"conv", "dense"}:
            raise ValueError(f"{name}: a LeNet's params must be a dict with 'conv' and 'dense' (fnbp.cnn.init), "
                             f"got {type(params).__name__}")
        cnn.check_input(arch, x, name)
        if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
            raise ValueError(f"{name}: dropout must be a drop probability in [0, 1), got {dropout!r}")
        return cnn.network(params, arch=arch, train=True, dropout=dropout)
    if model is not None or arch is not None:
        if legacy:
            raise ValueError(f"{name}: activation=, output= and dropout= describe the MLP used without a model; a "
                             f"model carries its own (got activation={activation!r}, output={output!r}, "
                             f"dropout={dropout!r})")
        if isinstance(model or arch, graph.Graph):
            return model or arch
        if arch is not None:
            raise ValueError(f"{name}: arch must be a fnbp.cnn.LeNet or a fnbp.graph.Graph, got {type(arch).__name__}")
        if not hasattr(model, "graph"):
            raise TypeError(f"{name}: model must be an fnbp.nn model (fnbp.nn.serial(...)) or a fnbp.graph.Graph, "
                            f"got {type(model).__name__}")
        model.check_params(params, x, name=name)
        return model.graph(params, train=True)
    if jnp.ndim(x) != 2:
        raise ValueError(f"{name}: x must be a mini-batch of shape (batch, n_0), got shape {jnp.shape(x)}")
    mlp.check_params(params, x, name=name)
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise ValueError(f"{name}: dropout must be a drop probability in [0, 1), got {dropout!r}")
    return mlp.network(params, activation=activation, output=output, train=True, dropout=dropout, running=False,
                       who=name)


def extension_layers(net, name):
    """[(node, PerExample extension)] of the parametrised nodes; refuses what has no per-example rule."""
    for n in net.nodes:                                   # coupling first: batch norm's aux comes before its node
        r = None if n.aux else rule_of(n.op)
        why = r is not None and extensions.couples_examples(r)
        if why:
            raise ValueError(f"{name}: node {n.name!r} ({r.name}): {why}")
    layers, owner = [], {}
    for n in net.nodes:
        if n.aux:
            if n.op is jax.random.fold_in:                # a dropout key: made per example by _per_example_masks
                continue
            if n.op is zero_state:                        # a recurrent layer's h_0 = 0: a row per example, no params
                continue
            raise ValueError(f"{name}: auxiliary node {n.name!r} (running statistics, augmentation) is not supported "
                             "by per-example quantities; build the network without it")
        used = [a for a in n.args if isinstance(a, graph.Param)]
        if not used:
            continue
        r = rule_of(n.op)
        ext = extensions.per_example(r) if r is not None else None
        refs = [] if ext is None else [(n.args[p.weight], None if p.bias is None else n.args[p.bias])
                                       for p in extensions.parts(ext)]
        if ext is None or any(not isinstance(W, graph.Param) or (b is not None and not isinstance(b, graph.Param))
                              for W, b in refs):
            op = r.name if r is not None else getattr(n.op, "__name__", repr(n.op))
            raise ValueError(f"{name}: node {n.name!r} ({op}) uses parameters {[u.path for u in used]} but its rule "
                             f"has no per-example extension (fnbp.extensions.register: dense, conv2d, embedding and "
                             f"the recurrent rules have one)")
        for ref in (ref for pair in refs for ref in pair):
            if ref is not None:
                if ref.path in owner:
                    raise ValueError(f"{name}: nodes {owner[ref.path]!r} and {n.name!r} share the parameter "
                                     f"{ref.path}; per-example quantities of shared weights are not implemented")
                owner[ref.path] = n.name
        layers.append((n, ext))
    if not layers:
        raise ValueError(f"{name}: the network has no node with a per-example extension (dense, conv2d)")
    return layers


def _fold_in_each(keys_, k):
    return jax.vmap(lambda key_n: jax.random.fold_in(key_n, k))(keys_)


def _per_example_masks(net):
    """The graph with its dropout drawing one mask per example (by op identity): each key node folds its tag
    into every example's key, each dropout node is ``fnbp.regularization.dropout_per_example``."""
    nodes = []
    for n in net.nodes:
        if n.aux and n.op is jax.random.fold_in:
            n = n._replace(op=_fold_in_each)
        elif rule_of(n.op) is regularization.dropout.rule:
            n = n._replace(op=regularization.dropout_per_example)
        nodes.append(n)
    return net._replace(nodes=tuple(nodes))


def walk(params, x, d, *, model=None, loss=losses.half_sse, l2=0.0, key=None, arch=None,
         activation=activations.relu, output=activations.identity, dropout=0.0, name="fnbp.per_example"):
    """(E, rows, penalty): one forward and one backward of the walker with reduction='sum' (E = sum_n E_n plus
    l2 * Omega when ``l2``), a ``LayerRows`` per parametrised node, and the L2 penalty's (value, gradient in
    params' structure), None without ``l2`` -- the objective's one L2 node, added once, never clipped."""
    net = network(params, x, model=model, arch=arch, activation=activation, output=output, dropout=dropout,
                  name=name)
    layers = extension_layers(net, name)
    spec = losses.loss_spec(loss, name=name)
    if not spec.takes_reduction:
        raise ValueError(f"{name}: the loss must take reduction= (each example's own loss needs reduction='sum'), "
                         f"got {loss!r}")
    if jnp.ndim(x) < 2:
        raise ValueError(f"{name}: x must be a mini-batch (batch, ...), got shape {jnp.shape(x)}")
    B = jnp.shape(x)[0]
    with_l2 = mlp.has_l2(l2)
    net = objective(_per_example_masks(net), spec._replace(reduction="sum"), l2=with_l2)
    if key is None and any(n.aux and n.op is _fold_in_each for n in net.nodes):
        raise ValueError(f"{name}: the model's dropout needs an explicit jax.random key (key=...)")
    keys_ = None if key is None else keys.per_example(key, B)
    E, tape = graph.forward(net, params, {"x": x, "d": d, "key": keys_, "l2": l2}, who=name)
    trace = graph.trace(tape, graph.backward(tape, who=name)).nodes
    rows = []
    for n, ext in layers:
        t = trace[n.name]
        reached = t.grad_output is not None
        delta = t.grad_output if reached else jax.tree_util.tree_map(jnp.zeros_like, t.output)   # no gradient
        views = extensions.rows_of(ext, t.inputs, dict(n.options), delta, tape.residuals[n.name])
        for part, view in zip(extensions.parts(ext), views):         # one LayerRows per weight of the node
            W = t.inputs[part.weight]
            grad_W = t.grad_inputs[part.weight] if reached else jnp.zeros_like(W)
            b_path, grad_b = None, None
            if part.bias is not None:
                b_path = n.args[part.bias].path
                grad_b = t.grad_inputs[part.bias] if reached else jnp.zeros_like(t.inputs[part.bias])
            rows.append(LayerRows(n.name, n.args[part.weight].path, b_path, view.patches, view.delta, grad_W, grad_b,
                                  tuple(jnp.shape(W)), part.to_W))
    penalty = (trace["penalty"].output, trace["penalty"].grad_inputs[0]) if with_l2 else None
    return E, rows, penalty


def norm_method(S, C_out, K, method="auto"):
    """'gram' or 'direct' for a layer of S positions and a C_out x K weight matrix: ``method`` itself when forced,
    else 'gram' iff 2 S^2 <= C_out K (the two B x S x S Gram matrices are no bigger than the B x C_out x K
    per-example gradients; always 'gram' for a dense layer, S = 1)."""
    if method not in METHODS:
        raise ValueError(f"fnbp.per_example: method must be one of {METHODS}, got {method!r}")
    if method != "auto":
        return method
    return "gram" if 2 * S * S <= C_out * K else "direct"


def clip_method(S, C_out, K, method="auto"):
    """'gram' or 'direct' for a layer's part of the DP-SGD step (``rows_norms_and_clipped_sums``): ``method``
    itself when forced; else 'direct' iff 1 < S and C_out <= S.

    Per example, "direct" forms G_n = delta_n^T P_n (S C_out K multiply-adds, the ordinary grad_W GEMM's share)
    and then only ||G_n||^2 and sum_n c_n G_n (2 C_out K); "gram" forms the Gram matrices (S^2 (C_out + K))
    and then still the clipped-sum GEMM (S C_out K).  "direct" is the faster when 2 C_out K < S^2 (C_out + K),
    which C_out <= S and S >= 2 imply (S^2 (C_out + K) > S^2 K >= S C_out K >= 2 C_out K); its memory, B C_out K
    numbers for the G_n (against 2 B S^2 for the Gram matrices), is then no bigger than the patches P (B S K) the
    walk holds anyway.  Every conv layer of the MNIST LeNet is "direct"; a dense layer (S = 1) always "gram" (the
    ghost norm).  ``method="gram"`` is the lean choice where memory is the limit (K and C_out large, S small)."""
    if method not in METHODS:
        raise ValueError(f"fnbp.per_example: method must be one of {METHODS}, got {method!r}")
    if method != "auto":
        return method
    return "direct" if 1 < S and C_out <= S else "gram"


def _matrices(r):
    return jnp.einsum("bso,bsk->bok", r.delta, r.patches)          # delta_n^T P_n: one batched GEMM


def rows_grads(r):
    """Example n's gradients: (W: (B,) + W_shape, b: (B, C_out))."""
    return r.to_W(_matrices(r), r.W_shape), jnp.sum(r.delta, axis=1)


def rows_batch_l2(r, method="auto"):
    """(||grad_W E_n||^2, ||grad_b E_n||^2), each (B,), by ``norm_method``'s choice of form (0 without a bias)."""
    _, S, C_out = r.delta.shape
    if S == 1:                                                       # ghost norm: ||delta_n||^2 ||h_n||^2
        w = jnp.sum(r.delta[:, 0] ** 2, axis=-1) * jnp.sum(r.patches[:, 0] ** 2, axis=-1)
    elif norm_method(S, C_out, r.patches.shape[-1], method) == "gram":
        gram_delta = jnp.einsum("bso,bto->bst", r.delta, r.delta)       # delta_{n,p} . delta_{n,p'}
        gram_patches = jnp.einsum("bsk,btk->bst", r.patches, r.patches)  # P_{n,p} . P_{n,p'}
        w = jnp.sum(gram_delta * gram_patches, axis=(1, 2))
    else:
        G = _matrices(r)
        w = jnp.sum(G * G, axis=(1, 2))
    if r.b_path is None:                                             # no bias (embedding, a recurrent W_h)
        return w, jnp.zeros_like(w)
    delta_b = jnp.sum(r.delta, axis=1)
    return w, jnp.sum(delta_b * delta_b, axis=-1)


def rows_norms(rows, method="auto"):
    """||grad_theta E_n||_2 over every layer's W and b, (B,)."""
    return jnp.sqrt(sum(w + b for w, b in (rows_batch_l2(r, method) for r in rows)))


def rows_sum_grad_squared(r):
    """sum_n (grad E_n)^2 entrywise: S = 1: (delta^2)^T (P^2), one GEMM; else the squared per-example matrices."""
    if r.delta.shape[1] == 1:
        sq_W = jnp.einsum("bo,bk->ok", r.delta[:, 0] ** 2, r.patches[:, 0] ** 2)
    else:
        sq_W = jnp.sum(_matrices(r) ** 2, axis=0)
    return r.to_W(sq_W, r.W_shape), jnp.sum(jnp.sum(r.delta, axis=1) ** 2, axis=0)


def rows_norms_and_clipped_sums(rows, factors, method="auto"):
    """(norms (B,), [(W sum, b sum)] per row): the per-example norms over every layer and the clipped sums
    sum_n c_n grad E_n, with c = ``factors(norms)`` (B,), from the rows of ONE walk (book-keeping, Bu et al. 2023).

    Per layer by ``clip_method``: a "gram" layer (and every dense one, S = 1) gets its norm from the Gram
    matrices (the ghost norm) and its clipped sum from ONE GEMM over the B S rows, (c (.) delta)^T P
    (``rows_clipped_sum``); a "direct" layer forms its per-example matrices G_n = delta_n^T P_n once, for the norm
    ||G_n||_F^2 AND for the clipped sum sum_n c_n G_n (B C_out K multiply-adds), instead of a second GEMM over the
    B S rows.  Either way no layer does more GEMM work than the ordinary step's grad_W, and there is no second
    backward.  Equal to ``rows_norms`` and ``rows_clipped_sum`` (up to rounding)."""
    parts, kept = [], []
    for r in rows:
        _, S, C_out = r.delta.shape
        direct = S > 1 and clip_method(S, C_out, r.patches.shape[-1], method) == "direct"
        G = _matrices(r) if direct else None
        kept.append(G)
        if direct:
            w = jnp.sum(G * G, axis=(1, 2))
            if r.b_path is not None:                                 # no bias (embedding, a recurrent W_h): 0
                delta_b = jnp.sum(r.delta, axis=1)
                w = w + jnp.sum(delta_b * delta_b, axis=-1)
            parts.append(w)
        else:
            parts.append(sum(rows_batch_l2(r, method)))
    norms = jnp.sqrt(sum(parts))
    c = factors(norms)
    sums = []
    for r, G in zip(rows, kept):
        if G is None:
            sums.append(rows_clipped_sum(r, c))
        else:
            cw = c.astype(G.dtype)
            sums.append((r.to_W(jnp.einsum("b,bok->ok", cw, G), r.W_shape),
                         jnp.einsum("b,bo->o", cw, jnp.sum(r.delta, axis=1))))
    return norms, sums


def rows_clipped_sum(r, c):
    """sum_n c_n grad E_n: W: (c (.) delta)^T P, ONE GEMM over the B S rows (the ordinary grad_W product on the
    reweighted delta); b: (c (.) delta) summed."""
    B, S, C_out = r.delta.shape
    weighted = r.delta * c[:, None, None].astype(r.delta.dtype)       # every position of n scaled by c_n
    mat = weight_gradient(weighted.reshape(B * S, C_out), r.patches.reshape(B * S, -1))
    return r.to_W(mat, r.W_shape), jnp.sum(weighted, axis=(0, 1))


def as_params_tree(params, rows, values, fill):
    """params' structure with ``values[i]`` = (W value, b value) at ``rows[i]``'s paths and ``fill(leaf)`` for
    every other leaf (parameters the loss does not reach)."""
    placed = {}
    for r, (w, b) in zip(rows, values):
        placed[r.W_path] = w
        if r.b_path is not None:
            placed[r.b_path] = b

    def build(tree, path):
        if path in placed:
            return placed[path]
        if isinstance(tree, dict):
            return {k: build(v, path + (k,)) for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(build(v, path + (i,)) for i, v in enumerate(tree))
        return fill(tree)

    return build(params, ())


def _rows(fn, params, x, d, model, loss, activation, output, dropout, key, arch, method="auto"):
    name = f"fnbp.per_example.{fn}"
    if method not in METHODS:
        raise ValueError(f"{name}: method must be one of {METHODS}, got {method!r}")
    return walk(params, x, d, model=model, loss=loss, key=key, arch=arch, activation=activation, output=output,
                dropout=dropout, name=name)[1]


def grads(params, x, d, *, model=None, loss=losses.half_sse, key=None, activation=activations.relu,
          output=activations.identity, dropout=0.0, arch=None):
    """Per-example gradients grad_theta E_n of each example's own loss: params' structure with a leading batch
    axis (W: (B,) + W's shape = delta_n^T P_n; b: (B, C_out)).  Forms B x |theta| numbers: use ``grad_norms``
    or ``fnbp.dp`` when only norms or a clipped sum are needed."""
    rows = _rows("grads", params, x, d, model, loss, activation, output, dropout, key, arch)
    B = jnp.shape(x)[0]
    return as_params_tree(params, rows, [rows_grads(r) for r in rows],
                          lambda v: jnp.zeros((B,) + jnp.shape(v), jnp.result_type(v)))


def batch_l2(params, x, d, *, model=None, loss=losses.half_sse, key=None, method="auto",
             activation=activations.relu, output=activations.identity, dropout=0.0, arch=None):
    """||grad E_n||^2 per parameter leaf, (B,) leaves in params' structure, without forming the gradients
    (``method``: "auto", "gram", "direct"; see the module docstring)."""
    rows = _rows("batch_l2", params, x, d, model, loss, activation, output, dropout, key, arch, method)
    B = jnp.shape(x)[0]
    return as_params_tree(params, rows, [rows_batch_l2(r, method) for r in rows],
                          lambda v: jnp.zeros((B,), jnp.result_type(v)))


def grad_norms(params, x, d, *, model=None, loss=losses.half_sse, key=None, method="auto",
               activation=activations.relu, output=activations.identity, dropout=0.0, arch=None):
    """||grad_theta E_n||_2 over all parameters, per example: (B,) (no per-example gradient is formed)."""
    rows = _rows("grad_norms", params, x, d, model, loss, activation, output, dropout, key, arch, method)
    return rows_norms(rows, method)


def _sgs_and_mean(params, rows):
    B = jnp.shape(rows[0].delta)[0]
    sgs = as_params_tree(params, rows, [rows_sum_grad_squared(r) for r in rows], jnp.zeros_like)
    g_bar = as_params_tree(params, rows, [(r.grad_W / B, None if r.grad_b is None else r.grad_b / B) for r in rows],
                           jnp.zeros_like)
    return sgs, g_bar


def sum_grad_squared(params, x, d, *, model=None, loss=losses.half_sse, key=None, activation=activations.relu,
                     output=activations.identity, dropout=0.0, arch=None):
    """sum_n (grad_theta E_n)^2 entrywise, params' structure: (delta^2)^T (P^2), one GEMM, for a dense layer
    ((delta_n h_n^T)^2 = delta_n^2 (h_n^2)^T); the squared per-example matrices where positions mix."""
    rows = _rows("sum_grad_squared", params, x, d, model, loss, activation, output, dropout, key, arch)
    return _sgs_and_mean(params, rows)[0]


def variance(params, x, d, *, model=None, loss=losses.half_sse, key=None, activation=activations.relu,
             output=activations.identity, dropout=0.0, arch=None):
    """Elementwise variance of the per-example gradients over the batch, 1/B sum_n (grad E_n - g_bar)^2
    = SGS / B - g_bar^2 with g_bar = 1/B sum_n grad E_n (the gradient of the mean loss), clamped at 0
    (rounding can make the difference slightly negative)."""
    rows = _rows("variance", params, x, d, model, loss, activation, output, dropout, key, arch)
    B = jnp.shape(x)[0]
    sgs, g_bar = _sgs_and_mean(params, rows)
    return jax.tree_util.tree_map(lambda s, g: jnp.maximum(s / B - g ** 2, 0), sgs, g_bar)

