"""What ``fnbp check`` runs, declared beside each rule: ``register(fn, reference, inputs)``.

Each module that defines a rule registers it on the line after its definition, e.g.

    relu = rule(_relu_fwd, _relu_bwd, check=_floating("relu"))
    register(relu, "relu", "activation")

``reference`` names the plain-jnp function of :mod:`fnbp.reference` with the same forward (or is
a callable), ``inputs`` names the kind of inputs :mod:`fnbp.checklist` draws for it ("dense",
"activation", "maps", ...).  ``variants`` registers one row per set of static options
(``({"reduction": "mean"}, {"reduction": "sum"})`` for the losses).  A rule whose backward is not
the derivative of its forward (a straight-through estimator, feedback alignment's grad_h) is
checked through a wrapper ``fn`` that calls it; ``covers`` then names the rule the row checks.

This module imports nothing above :mod:`fnbp.rules`, so every layer may register here;
``tests/test_checklist.py`` fails for a rule object in the package that no entry covers.
"""
from typing import Any, Callable, NamedTuple, Union

from .rules import Rule, rule_of

__all__ = ["CheckCase", "CASES", "register", "covered_rules"]


class CheckCase(NamedTuple):
    """One row of ``fnbp check``."""
    name: str                          # the row's name (what ``fnbp check --rule`` accepts)
    fn: Callable                       # the function checked (the rule itself, or a wrapper calling it)
    reference: Union[str, Callable]    # a function name in fnbp.reference, or a plain-jnp callable
    inputs: str                        # the input kind fnbp.checklist draws
    options: dict                      # static keyword options passed to fn and reference
    rule: Rule                         # the rule this row checks
    batch_only: bool                   # no single-example row (batch norm, feature maps)
    argnums: Any                       # the positional inputs checked (None: every floating one); the rest fixed
    surrogate: bool                    # checked as fn + stop_gradient(reference - fn): backward = reference's


CASES: list = []


def register(fn, reference, inputs, *, name=None, covers=None, variants=None, batch_only=False, argnums=None,
             surrogate=False):
    """Add ``fn``'s row(s) to ``CASES`` (one per entry of ``variants``); returns ``fn``.

    ``covers``: the rule function whose ``Rule`` the row checks (default ``fn`` itself).
    ``argnums``: the positional inputs checked; the others are held fixed (a drop probability, a key).
    ``surrogate=True``: for a rule whose backward is by design not its forward's derivative, the row checks
    ``fn(x) + stop_gradient(reference(x) - fn(x))`` -- the value of the surrogate ``reference``, the
    backward of ``fn`` -- so autodiff and finite differences of ``reference`` both confirm the backward.
    """
    covered = rule_of(fn if covers is None else covers)
    if covered is None:
        raise TypeError(f"fnbp.check_cases.register: {name or fn!r} is not a function made with fnbp.rule "
                        f"(and covers= names none)")
    name = name or covered.name
    for options in variants or ({},):
        label = name + (f"[{','.join(str(v) for v in options.values())}]" if len(variants or ()) > 1 else "")
        if any(c.name == label for c in CASES):
            raise ValueError(f"fnbp.check_cases.register: a row named {label!r} is registered twice")
        CASES.append(CheckCase(label, fn, reference, inputs, dict(options), covered, batch_only,
                               None if argnums is None else tuple(argnums), surrogate))
    return fn


def covered_rules() -> Any:
    """The ``Rule`` objects some registered row checks."""
    return {c.rule for c in CASES}
