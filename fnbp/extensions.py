"""Per-rule extensions (BackPACK's design): what a rule with parameters tells the quantities above the walker.

A layer with weights W and bias b is, per example n, a dense layer applied at S positions p (one position
for a dense layer on (B, n_in); the H_out W_out output pixels of a convolution; the T steps of a dense layer
on a sequence (B, T, n_in)).  Its rule registers a *view*: from the node's argument values, its options and the
cotangent delta = grad_a E arriving at its output, the rows

    P      (B, S, K)       example n's inputs at each position (h_{k-1,n} for dense, its patches for conv)
    delta  (B, S, C_out)   example n's delta at each position

so that example n's gradients are grad_W E_n = delta_n^T P_n (C_out x K, put into W's shape by ``to_W``) and
grad_b E_n = sum_p delta_{n,p}.  Every first-order quantity (per-example gradients, their norms, sum of
squares, variance, DP's clipped sum) and every curvature quantity is then written once, over (P, delta), in
``fnbp.per_example`` / ``fnbp.curvature`` -- for every rule that has a view.

A rule with several weights (the recurrent rules: W_x and W_h, each consumed at every step) registers one view
per weight: ``weight`` and ``bias`` are then tuples of argument positions, one (W, b) pair per weight (b None
where that weight has no bias of its own), and its view returns a tuple of ``Rows``, one per pair.  A view that
needs what the rule's forward kept (``residuals=True``) is called as view(args, options, delta, residuals) with
the node's residuals from the walker's tape, so it can run the rule's own backward scan instead of the forward
again (``fnbp.rnn``: delta_t = grad_{a_t} E at every step, from the BPTT reverse scan).

Rules that couple the examples of a batch (batch norm) are registered as such and refused by name; a
parametrised node whose rule has no view is refused by name too.  (The L2 penalty is not a node of the model:
``fnbp.per_example.walk`` reads its gradient from the objective and adds it once, never clipped.)

This module imports only ``fnbp.rules``: the rules register themselves beside their definitions.
"""
from typing import Any, Callable, NamedTuple

from .rules import Rule, rule_of

__all__ = ["Rows", "PerExample", "Part", "register", "parts", "rows_of", "register_coupling", "per_example",
           "couples_examples", "register_second_derivative", "second_derivative", "LINEAR"]


class Rows(NamedTuple):
    """What one parametrised node saw, as rows per example and position (see the module docstring)."""
    patches: object      # P: (B, S, K)
    delta: object        # delta: (B, S, C_out)


class PerExample(NamedTuple):
    """A rule's per-example extension (several weights: tuples, one entry per weight; see ``parts``)."""
    weight: Any          # position of W among the rule's arguments (a tuple: one per weight)
    bias: Any            # position of b (None: no bias) (a tuple: one per weight, None where it has none)
    view: Callable       # view(args, options, delta[, residuals]) -> Rows (a tuple of Rows: one per weight)
    to_W: Callable       # to_W(mat (..., C_out, K), W_shape) -> (..., *W_shape) (a tuple: one per weight)
    residuals: bool = False   # the view takes the rule's residuals as a fourth argument


class Part(NamedTuple):
    """One weight of a rule's extension: W's and b's argument positions and W's ``to_W``."""
    weight: int
    bias: Any
    to_W: Callable


_PER_EXAMPLE = {}
_COUPLING = {}
_SECOND = {}
LINEAR = None
"""``register_second_derivative(rule, LINEAR)``: the rule is (piecewise) linear in its one argument."""


def _key(rule):
    """The ``Rule`` itself (hashable: its fwd, bwd and name), from a rule or a function made by ``fnbp.rule``."""
    return rule if isinstance(rule, Rule) else rule_of(rule)


def _same(mat, shape):
    return mat


def register(rule, *, view, to_W=_same, weight=0, bias=1, residuals=False):
    """Declare ``rule``'s per-example view (beside the rule's definition).  Several weights: ``weight`` a tuple of
    positions, ``bias`` a tuple of the same length (None entries: no bias), ``to_W`` one function or a tuple, and
    the view returns a tuple of ``Rows`` in ``weight``'s order.  ``residuals``: the view also takes the rule's
    residuals (view(args, options, delta, residuals))."""
    several = isinstance(weight, tuple)
    if several and not (isinstance(bias, tuple) and len(bias) == len(weight)) or not several and isinstance(bias, tuple):
        raise ValueError(f"fnbp.extensions.register: weight and bias must both be positions or tuples of the same "
                         f"length, got weight={weight!r}, bias={bias!r}")
    _PER_EXAMPLE[_key(rule)] = PerExample(weight, bias, view, to_W, residuals)


def parts(ext):
    """The ``Part`` (W position, b position, to_W) of each weight of the extension ``ext``, in its view's order."""
    if not isinstance(ext.weight, tuple):
        return (Part(ext.weight, ext.bias, ext.to_W),)
    to_W = ext.to_W if isinstance(ext.to_W, tuple) else (ext.to_W,) * len(ext.weight)
    return tuple(Part(w, b, f) for w, b, f in zip(ext.weight, ext.bias, to_W))


def rows_of(ext, args, options, delta, residuals=None):
    """The view's ``Rows`` as a tuple, one per ``parts(ext)`` entry (the rule's residuals passed when it asks)."""
    rows = ext.view(args, options, delta, residuals) if ext.residuals else ext.view(args, options, delta)
    return tuple(rows) if isinstance(ext.weight, tuple) else (rows,)


def register_coupling(rule, why):
    """Declare that ``rule`` couples the examples of a batch (``why`` goes into the refusal)."""
    _COUPLING[_key(rule)] = why


def per_example(rule):
    """The ``PerExample`` extension of ``rule`` (a ``Rule`` or a function made by ``fnbp.rule``), or None."""
    return _PER_EXAMPLE.get(_key(rule))


def couples_examples(rule):
    """Why ``rule`` couples the examples of a batch, or None."""
    return _COUPLING.get(_key(rule))



def register_second_derivative(rule, fn):
    """Declare the elementwise second derivative of a one-argument rule h = g(a) (beside the rule), for
    ``fnbp.curvature.diag_hessian``: ``fn(a, h) -> g''(a)`` (a the argument, h the output), or ``LINEAR`` (None)
    for a rule that is linear or piecewise linear in its argument (relu, pooling, flatten: g'' = 0)."""
    _SECOND[_key(rule)] = fn


def second_derivative(rule):
    """(registered, fn): whether ``rule`` declared its second derivative, and ``fn`` (None: linear)."""
    key = _key(rule)
    return key in _SECOND, _SECOND.get(key)
