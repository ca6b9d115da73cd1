"""Curvature from the same backward pass (BackPACK's second-order quantities): diag GGN, KFLR/KFAC, diag Hessian.

Notation as in ``fnbp.per_example``: each parametrised node (dense, conv2d) sees, per example n, its input rows
P_n (S, K) at S positions and a cotangent delta_n (S, C_out) at its pre-activation a.  A *column* is a cotangent
fed into the output y of the network instead of grad_y E; the walker's rules carry it back (their ``bwd``
applied to it, exactly as in an ordinary backward: nothing is differentiated twice), so every node sees that
column's delta.  With a factorisation of the loss Hessian w.r.t. the output, per example,

    H_{L,n} = d^2 E / dy_n^2 = S_n S_n^T          (C columns s_{n,c}, C = the number of outputs)

the columns s_c back-propagated give delta_{n,c}, and the generalised Gauss-Newton matrix restricted to W is
G_W = sum_n J_n^T H_{L,n} J_n, whose diagonal is

    diag G_W = sum_{n,c} (delta_{n,c}^T P_n)^2       (dense, S = 1: sum_c (delta_c^2)^T (P^2), one GEMM per column)
    diag G_b = sum_{n,c} (sum_p delta_{n,c,p})^2.

Factors (``hessian_factor``): half_sse H = I (S = I); sse H = 2 I; mse H = 2/C I; softmax cross-entropy on logits
H = diag(p) - p p^T, S = diag(sqrt p) - p sqrt(p)^T (BackPACK's symmetric factor; S S^T = H since sum p = 1).
Other losses (mae, cross_entropy on probabilities, a student's rule) are refused by name.

Conventions (BackPACK's): the quantities are of the objective E as the loss reduces it: ``reduction='mean'``
(the default) is E = 1/B sum_n E_n, so every column carries 1/sqrt(B) and diag_ggn = 1/B sum_n diag(J_n^T H_n J_n);
``reduction='sum'`` gives the sum over examples.  That is what BackPACK returns for a loss with the same reduction.

Kronecker factors (``kflr``, ``kfac``), per parametrised node, with W's curvature ~ G (x) A over the rows of the
(C_out, K) matrix delta^T P (``to_W`` maps it to W's shape):

    A = 1/B sum_n sum_p P_{n,p} P_{n,p}^T   (K, K)   input factor: dense E[h h^T]; conv the expanded patches summed
                                                      over positions (Grosse & Martens 2016, KFC)
    G = sum_{n,c} sum_p delta_{n,c,p} delta_{n,c,p}^T  (C_out, C_out), columns exact (KFLR) or sampled (KFAC);
                                                      they carry the loss's 1/sqrt(B) (BackPACK's normalisation)

The bias is a separate factor pair (BackPACK returns [G] for the bias): b ~ G (x) A_b with A_b = 1/B sum_n S,
a (1, 1) array (the bias as a weight on a constant input 1; A_b = 1 for a dense layer).

``diag_hessian`` (BackPACK's DiagHessian): the Hessian w.r.t. an activation's input a of h = g(a) is
diag(g'(a)) H_h diag(g'(a)) + diag(g''(a) (.) grad_h E); the second term, per example, is factored as
sqrt|r| e_u columns (r = g''(a) (.) grad_h E, one column per unit u, sign(r) kept as the column's weight) and
back-propagated from that node with the same rules.  Dense/conv2d are linear in h and in W (no term); relu,
pooling and flatten are piecewise linear (registered as such, ``fnbp.extensions.register_second_derivative``);
sigmoid and tanh register g''.  A node without a registration is refused by name.  For a piecewise-linear network
diag_hessian = diag_ggn.

Against BackPACK (``backpack-for-pytorch`` 1.7, float64; tests/test_curvature.py and tests/test_per_example.py
run it where FNBP_TORCH_PYTHON names a venv with it): the same MLPs and CNNs (conv, max pool, flatten, dense;
tanh, sigmoid, relu; cross-entropy and MSE, 'mean' and 'sum') agree to a relative 1e-10 (measured <= 4e-15)
once these conventions are lined up:

  - layouts: Dense W is (out, in) in both; conv W OIHW in both; images NHWC here, NCHW in torch; Flatten orders
    (i, j, c) here, (c, i, j) in torch (the Dense after it has its columns permuted); a conv's patch entries
    (KFLR's A) are (i, j, c) here (``fnbp.conv.im2col``), (c, i, j) in torch's unfold.
  - losses: torch's CrossEntropyLoss is ``softmax_cross_entropy``; MSELoss('mean') = 1/(B C) sum (y - d)^2 is
    ``mse`` with reduction='mean', MSELoss('sum') is ``sse`` with reduction='sum'.
  - DiagGGNExact, DiagHessian: of the loss as reduced, as here: equal without rescaling.
  - KFLR: BackPACK returns [G, A] for a weight (G first, as ``KronFactors``) and [G] for a bias.  Dense: G, A
    and the bias's G equal ours.  Conv: A equals ours; G does NOT: BackPACK sums the columns over the positions
    before the outer product, sum_{m,n} (sum_p delta_{m,n,p}) (sum_p delta_{m,n,p})^T (the bias's exact GGN
    block; its diagonal is our ``diag_ggn`` of b), while ours is KFC's sum_{m,n,p} delta_{m,n,p} delta_{m,n,p}^T
    (positions uncorrelated).  Both are |T| = H_out W_out times Grosse & Martens' Gamma in scale.  A conv's
    bias: BackPACK's [G_bp] (its exact GGN block), ours KronFactors(G, A_b = S) (the bias as a weight on a
    constant input, consistent with W's factors).
  - first order (BatchL2Grad, SumGradSquared, Variance; ``fnbp.per_example``): BackPACK's per-example gradient
    is that of example n's term of the reduced loss, grad E_n / B under 'mean'; so under 'mean' its three
    quantities are ``batch_l2``, ``sum_grad_squared`` and ``variance`` (each of E_n's own gradients) over B^2,
    under 'sum' equal.

Every function takes ``(params, x, d, *, model=None, loss=...)`` like ``fnbp.per_example``: ``model`` any
``fnbp.nn`` model or a ``fnbp.graph.Graph`` with input "x"; without it, the MLP (``per_example.network``).
Refused by name: batch norm, dropout (no per-example masks here), a parametrised rule without an extension,
shared weights, a loss without a Hessian factor.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from . import activations, extensions, graph, losses, per_example
from .rules import rule_of

__all__ = ["KronFactors", "hessian_factor", "sampled_factor", "diag_ggn", "diag_ggn_mc", "kflr", "kfac",
           "diag_hessian"]


class KronFactors(NamedTuple):
    """A parameter's curvature ~ G (x) A (see the module docstring)."""
    G: object            # (C_out, C_out) output factor
    A: object            # (K, K) input factor (bias: (1, 1))


_SQUARE = {losses.half_sse: lambda C: 1.0, losses.sse: lambda C: 2.0, losses.mse: lambda C: 2.0 / C}


def _loss_kind(spec, name):
    if spec.fn is losses.softmax_cross_entropy:
        return "softmax_cross_entropy"
    if spec.fn in _SQUARE:
        return "square"
    fn_name = getattr(spec.fn, "__name__", repr(spec.fn))
    raise ValueError(f"{name}: the loss {fn_name!r} has no Hessian factor here (half_sse, sse, mse and "
                     f"softmax_cross_entropy have one)")


def _scale(spec, B):
    return 1.0 / B if spec.reduction == "mean" else 1.0


def hessian_factor(y, spec, name="fnbp.curvature.hessian_factor"):
    """Columns (C, B, C) with sum_c s_c s_c^T = d^2 E / dy_n^2 per example n (E reduced as ``spec`` says)."""
    B, C = y.shape
    kind, s = _loss_kind(spec, name), _scale(spec, B)
    if kind == "square":
        h = _SQUARE[spec.fn](C)
        return jnp.broadcast_to(jnp.sqrt(h * s) * jnp.eye(C, dtype=y.dtype)[:, None, :], (C, B, C))
    p = jax.nn.softmax(y, axis=-1)
    sqrt_p = jnp.sqrt(p)                                   # column c: sqrt(p_c) (e_c - p)
    cols = sqrt_p.T[:, :, None] * (jnp.eye(C, dtype=y.dtype)[:, None, :] - p[None])
    return jnp.sqrt(s) * cols


def sampled_factor(y, spec, key, samples, name="fnbp.curvature.sampled_factor"):
    """Columns (samples, B, C): gradients grad_y E_n at targets drawn from the model's predictive distribution
    (softmax cross-entropy: labels ~ Cat(softmax y); square losses: d = y + eps / sqrt(h)), scaled by
    1/sqrt(samples); E[sum_m s_m s_m^T] = d^2 E / dy_n^2."""
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"{name}: samples must be a positive int, got {samples!r}")
    B, C = y.shape
    kind, s = _loss_kind(spec, name), _scale(spec, B)
    if kind == "square":
        eps = jax.random.normal(key, (samples, B, C), y.dtype)
        return jnp.sqrt(_SQUARE[spec.fn](C) * s / samples) * eps
    p = jax.nn.softmax(y, axis=-1)
    labels = jax.random.categorical(key, y, axis=-1, shape=(samples, B))
    return jnp.sqrt(s / samples) * (p[None] - jax.nn.one_hot(labels, C, dtype=y.dtype))


# --- the walk ----------------------------------------------------------------------------------------------------
def _backward(tape, seeds):
    """The walker's backward from cotangents ``seeds`` {Out(node): ct} (any nodes, not only the output): each
    node's rule ``bwd`` on the summed cotangent at its output; {node name: that cotangent}."""
    table, D_of = dict(seeds), {}
    for n in reversed(tape.net.nodes):
        D = table.get(graph.Out(n.name))
        if n.aux or D is None:
            continue
        D_of[n.name] = D
        cts = rule_of(n.op).bwd(tape.residuals[n.name], D, **dict(n.options))
        cts = tuple(cts) if isinstance(cts, (tuple, list)) else (cts,)
        for ref, G in zip(n.args, cts):
            if G is not None and isinstance(ref, graph.Out):
                table[ref] = table[ref] + G if ref in table else G
    return D_of


class _Setup(NamedTuple):
    net: object
    layers: list
    spec: object
    tape: object
    y: object


def _setup(params, x, d, model, loss, activation, output, name):
    net = per_example.network(params, x, model=model, activation=activation, output=output, name=name)
    for n in net.nodes:
        if n.aux:
            raise ValueError(f"{name}: node {n.name!r} is auxiliary (dropout's key, running statistics); "
                             "curvature quantities need a deterministic network: build it without dropout")
    layers = per_example.extension_layers(net, name)
    for n, ext in layers:
        if len(extensions.parts(ext)) > 1:
            raise ValueError(f"{name}: node {n.name!r} ({rule_of(n.op).name}) has several weights (a recurrent layer); "
                             "curvature quantities support rules with one weight")
    spec = losses.loss_spec(loss, name=name)
    _loss_kind(spec, name)
    y, tape = graph.forward(net, params, {"x": x}, who=name)
    if jnp.ndim(y) != 2:
        raise ValueError(f"{name}: the network's output must be (batch, C), got shape {jnp.shape(y)}")
    if jnp.shape(d)[:1] != jnp.shape(y)[:1]:
        raise ValueError(f"{name}: d must have one target per example ({jnp.shape(y)[0]}), got shape "
                         f"{jnp.shape(d)}")
    return _Setup(net, layers, spec, tape, y)


def _layer_deltas(st, seed_ref, cols):
    """Back-propagate columns (M, B, ...) seeded at ``seed_ref``: per layer the view's delta (M, B, S, C_out)."""
    def one(col):
        D_of = _backward(st.tape, {seed_ref: col})
        out = []
        for n, ext in st.layers:
            t_in = st.tape.args[n.name]
            D = D_of.get(n.name)
            if D is None:
                D = jnp.zeros_like(st.tape.values[n.name])
            out.append(ext.view(t_in, dict(n.options), D).delta)
        return out
    return jax.vmap(one)(cols)


def _patches(st):
    out = []
    for n, ext in st.layers:
        zero = jnp.zeros_like(st.tape.values[n.name])
        out.append(ext.view(st.tape.args[n.name], dict(n.options), zero).patches)
    return out


def _diag_terms(P, delta, weight=None):
    """sum_{m,n} w_{m,n} (delta_{m,n}^T P_n)^2 (C_out, K) and sum_{m,n} w_{m,n} (sum_p delta_{m,n,p})^2 (C_out,)."""
    M, B, S, _ = delta.shape
    w = jnp.ones((M, B), delta.dtype) if weight is None else weight
    if S == 1:                                              # one GEMM over the M B rows
        W_diag = jnp.einsum("mbo,bk->ok", w[:, :, None] * delta[:, :, 0] ** 2, P[:, 0] ** 2)
    else:
        mats = jnp.einsum("mbso,bsk->mbok", delta, P)
        W_diag = jnp.einsum("mb,mbok->ok", w, mats ** 2)
    b_diag = jnp.einsum("mb,mbo->o", w, jnp.sum(delta, axis=2) ** 2)
    return W_diag, b_diag


def _as_tree(params, st, values):
    rows = [per_example.LayerRows(n.name, n.args[ext.weight].path,
                                  None if ext.bias is None else n.args[ext.bias].path,
                                  None, None, None, None, None, None) for n, ext in st.layers]
    return per_example.as_params_tree(params, rows, values, jnp.zeros_like)


def _diag_from_columns(params, st, cols):
    P = _patches(st)
    deltas = _layer_deltas(st, graph.Out(st.net.output), cols)
    values = []
    for (n, ext), P_l, d_l in zip(st.layers, P, deltas):
        W_diag, b_diag = _diag_terms(P_l, d_l)
        values.append((ext.to_W(W_diag, tuple(jnp.shape(st.tape.args[n.name][ext.weight]))), b_diag))
    return _as_tree(params, st, values)


def diag_ggn(params, x, d, *, model=None, loss=losses.half_sse, activation=activations.relu,
             output=activations.identity):
    """The exact diagonal of the generalised Gauss-Newton matrix of E (BackPACK's DiagGGNExact), params'
    structure: C back-propagated columns of the loss Hessian's factor (see the module docstring)."""
    st = _setup(params, x, d, model, loss, activation, output, "fnbp.curvature.diag_ggn")
    return _diag_from_columns(params, st, hessian_factor(st.y, st.spec, "fnbp.curvature.diag_ggn"))


def diag_ggn_mc(params, x, d, *, key, samples=1, model=None, loss=losses.half_sse, activation=activations.relu,
                output=activations.identity):
    """A Monte Carlo estimate of ``diag_ggn`` (BackPACK's DiagGGNMC): ``samples`` back-propagated columns of
    gradients at targets sampled from the model's predictive distribution (explicit jax.random ``key``)."""
    name = "fnbp.curvature.diag_ggn_mc"
    st = _setup(params, x, d, model, loss, activation, output, name)
    return _diag_from_columns(params, st, sampled_factor(st.y, st.spec, key, samples, name))


def _kron(params, st, cols):
    P = _patches(st)
    deltas = _layer_deltas(st, graph.Out(st.net.output), cols)
    B = st.y.shape[0]
    values = []
    for P_l, d_l in zip(P, deltas):
        A = jnp.einsum("bsk,bsl->kl", P_l, P_l) / B
        G = jnp.einsum("mbso,mbsp->op", d_l, d_l)
        A_b = jnp.full((1, 1), P_l.shape[1], P_l.dtype)
        values.append((KronFactors(G, A), KronFactors(G, A_b)))
    return _as_tree(params, st, values)


def kflr(params, x, d, *, model=None, loss=losses.half_sse, activation=activations.relu,
         output=activations.identity):
    """Kronecker factors with the exact loss-Hessian columns (KFLR, Botev et al. 2017): params' structure with
    ``KronFactors(G, A)`` at each W and ``KronFactors(G, A_b)`` at each b (see the module docstring)."""
    st = _setup(params, x, d, model, loss, activation, output, "fnbp.curvature.kflr")
    return _kron(params, st, hessian_factor(st.y, st.spec, "fnbp.curvature.kflr"))


def kfac(params, x, d, *, key, samples=1, model=None, loss=losses.half_sse, activation=activations.relu,
         output=activations.identity):
    """Kronecker factors with sampled columns (KFAC, Martens & Grosse 2015; KFC for conv), as ``kflr``."""
    name = "fnbp.curvature.kfac"
    st = _setup(params, x, d, model, loss, activation, output, name)
    return _kron(params, st, sampled_factor(st.y, st.spec, key, samples, name))


def diag_hessian(params, x, d, *, model=None, loss=losses.half_sse, activation=activations.relu,
                 output=activations.identity):
    """The exact diagonal of the Hessian of E (BackPACK's DiagHessian), params' structure: the GGN's columns plus,
    for each activation with a second derivative, its residual term's signed columns (module docstring)."""
    name = "fnbp.curvature.diag_hessian"
    st = _setup(params, x, d, model, loss, activation, output, name)
    parametrised = {n.name for n, _ in st.layers}
    for n in st.net.nodes:
        if n.name in parametrised:
            continue
        registered, _ = extensions.second_derivative(rule_of(n.op))
        if not registered or len(n.args) != 1:
            raise ValueError(f"{name}: node {n.name!r} ({rule_of(n.op).name}) has no registered second derivative "
                             "(fnbp.extensions.register_second_derivative)")
    loss_rule = rule_of(st.spec.fn)
    _, res = loss_rule.fwd(st.y, d, reduction=st.spec.reduction)
    grad_y = loss_rule.bwd(res, jnp.ones((), st.y.dtype), reduction=st.spec.reduction)[0]
    first = _backward(st.tape, {graph.Out(st.net.output): grad_y})       # grad_h E at every node's output
    P = _patches(st)
    sources = [(graph.Out(st.net.output), hessian_factor(st.y, st.spec, name), None)]
    for n in st.net.nodes:
        fn = extensions.second_derivative(rule_of(n.op))[1] if n.name not in parametrised else None
        if fn is None or n.name not in first or not isinstance(n.args[0], graph.Out):
            continue
        a, h = st.tape.args[n.name][0], st.tape.values[n.name]
        r = fn(a, h) * first[n.name]                           # g''(a) (.) grad_h E, per example and unit
        B, U = r.shape[0], r[0].size
        flat = r.reshape(B, U)
        eye = jnp.eye(U, dtype=r.dtype)                          # column u: sqrt|r_u| e_u
        cols = (eye[:, None, :] * jnp.sqrt(jnp.abs(flat))[None]).reshape((U,) + r.shape)
        sources.append((n.args[0], cols, jnp.sign(flat).T))
    totals = None
    for ref, cols, weight in sources:
        deltas = _layer_deltas(st, ref, cols)
        terms = [_diag_terms(P_l, d_l, weight) for P_l, d_l in zip(P, deltas)]
        totals = terms if totals is None else [(w + tw, b + tb) for (w, b), (tw, tb) in zip(totals, terms)]
    values = [(ext.to_W(w, tuple(jnp.shape(st.tape.args[n.name][ext.weight]))), b)
              for (n, ext), (w, b) in zip(st.layers, totals)]
    return _as_tree(params, st, values)
