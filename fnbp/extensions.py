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

Rules that couple the examples of a batch (batch norm) are registered as such and refused by name; a
parametrised node whose rule has no view is refused by name too.  (The L2 penalty is not a node of the model:
``fnbp.per_example.walk`` reads its gradient from the objective and adds it once, never clipped.)

This module imports only ``fnbp.rules``: the rules register themselves beside their definitions.
"""
from typing import Callable, NamedTuple

from .rules import Rule, rule_of

__all__ = ["Rows", "PerExample", "register", "register_coupling", "per_example",
           "couples_examples", "register_second_derivative", "second_derivative", "LINEAR"]


class Rows(NamedTuple):
    """What one parametrised node saw, as rows per example and position (see the module docstring)."""
    patches: object      # P: (B, S, K)
    delta: object        # delta: (B, S, C_out)


class PerExample(NamedTuple):
    """A rule's per-example extension."""
    weight: int          # position of W among the rule's arguments
    bias: int            # position of b (None: no bias)
    view: Callable       # view(args, options, delta) -> Rows
    to_W: Callable       # to_W(mat (..., C_out, K), W_shape) -> (..., *W_shape)


_PER_EXAMPLE = {}
_COUPLING = {}
_SECOND = {}
LINEAR = None
"""``register_second_derivative(rule, LINEAR)``: the rule is (piecewise) linear in its one argument."""


def _key(rule):
    """The ``Rule`` itself (hashable: its fwd, bwd and name), from a rule or a function made by ``fnbp.rule``."""
    return rule if isinstance(rule, Rule) else rule_of(rule)


def register(rule, *, view, to_W=lambda mat, shape: mat, weight=0, bias=1):
    """Declare ``rule``'s per-example view (beside the rule's definition)."""
    _PER_EXAMPLE[_key(rule)] = PerExample(weight, bias, view, to_W)


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
