"""Rules as first-class objects: ``fnbp.Rule`` and its one constructor ``fnbp.rule``.

A rule is the pair the notes derive by hand for every operation:

    fwd(*args, **options) -> (out, residuals)      the forward, keeping what the backward needs
    bwd(residuals, g, **options) -> cotangents     g = grad_out E  ->  (grad_{arg_1} E, ..., grad_{arg_n} E)

(JAX's ``custom_vjp`` conventions.)  ``fnbp.rule(fwd, bwd)`` turns the pair into a
differentiable function: ``jax.grad``, ``jax.vjp``, ``jit``, ``vmap`` and ``remat`` of it
run *your* ``bwd``, and its ``.rule`` attribute is the ``Rule`` that the explicit
walker (``fnbp.backprop``) and ``fnbp.check`` call directly.  This module is the only
place in fnbp where a ``jax.custom_vjp`` is built.

Arguments: the positional parameters of ``fwd`` are traced inputs (arrays, or
Python numbers such as a slope); each gets a cotangent (``None`` for integer inputs
such as labels, and for inputs that are hyperparameters).  The keyword-only
parameters of ``fwd`` (``*, reduction="mean"``) are static options: hashable
values passed by keyword to both ``fwd`` and ``bwd``.

Example (a student's own activation)::

    def softplus_fwd(a):
        '''g(a) = log(1 + e^a).  Backward: delta = grad_h E (.) sigmoid(a).'''
        return jnp.logaddexp(a, 0.0), a          # output, residual a
    def softplus_bwd(a, grad_h):
        return (grad_h * jax.nn.sigmoid(a),)      # g'(a) = sigmoid(a)
    softplus = fnbp.rule(softplus_fwd, softplus_bwd)
"""
import functools
import inspect
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["Rule", "rule", "rule_of", "as_cotangent"]


class Rule(NamedTuple):
    """A hand-written forward/backward pair (see the module docstring for the conventions)."""
    fwd: Callable
    bwd: Callable
    name: str


def rule_of(fn):
    """The ``Rule`` behind ``fn`` (unwrapping ``functools.partial``), or None if it has none."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    r = getattr(fn, "rule", None)
    return r if isinstance(r, Rule) else None


def _split_signature(fwd, name):
    sig = inspect.signature(fwd)
    positional, options = [], []
    for p in sig.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            positional.append(p.name)
        elif p.kind == p.KEYWORD_ONLY:
            options.append(p.name)
        else:
            raise TypeError(f"fnbp.rule: {name}'s fwd must have named parameters (no *args/**kwargs), got {sig}")
    if not positional:
        raise TypeError(f"fnbp.rule: {name}'s fwd needs at least one positional (traced) input, got {sig}")
    return sig, positional, options


def _leaf_marker(x):
    dtype = jnp.result_type(x)
    return jnp.zeros((0,), dtype) if jnp.issubdtype(dtype, jnp.inexact) else None


def _type_marker(x):
    """Zero-size stand-ins recording an input's dtypes (leaf by leaf, for a pytree input),
    kept as residuals so that the backward returns cotangents of the primal's type
    (None for integer inputs such as labels, and for keys)."""
    if isinstance(x, (list, tuple, dict)):
        return jax.tree_util.tree_map(_leaf_marker, x)
    return _leaf_marker(x)


def _is_none(x):
    return x is None


def as_cotangent(ct, marker):
    """Cast a rule's cotangent to its primal input's type (the one place where this is decided)."""
    if marker is None or ct is None:
        return None
    if isinstance(marker, (list, tuple, dict)):
        return jax.tree_util.tree_map(as_cotangent, ct, marker, is_leaf=_is_none)
    ct = jnp.asarray(ct)
    return ct if ct.dtype == marker.dtype else ct.astype(marker.dtype)


def rule(fwd, bwd, *, name=None, check=None):
    """A differentiable function from a hand-written forward ``fwd`` and backward ``bwd``.

    Args:
      fwd: ``fwd(*args, **options) -> (out, residuals)``; its signature is the
        function's signature, its docstring the function's docstring.
      bwd: ``bwd(residuals, g, **options) -> (cotangent of each positional arg)``;
        a single array is accepted when fwd has one positional input.
      name: the op's name (default: fwd's name without a ``_fwd``/``_forward`` suffix).
      check: optional ``check(*args, **options)`` run at trace time before the op
        (shape/type validation that raises a named ValueError or TypeError).

    Returns a function ``f(*args, **options)`` with ``f.rule = Rule(fwd, bwd, name)``.
    """
    if not callable(fwd) or not callable(bwd):
        raise TypeError(f"fnbp.rule: fwd and bwd must be callables, got {type(fwd).__name__} and "
                        f"{type(bwd).__name__}")
    if name is None:
        name = fwd.__name__.lstrip("_")
        for suffix in ("_fwd", "_forward"):
            name = name[: -len(suffix)] if name.endswith(suffix) else name
    sig, positional, option_names = _split_signature(fwd, name)
    n_in = len(positional)

    def primal(options, *args):
        return fwd(*args, **dict(options))[0]

    op = jax.custom_vjp(primal, nondiff_argnums=(0,))

    def op_fwd(options, *args):
        out, residuals = fwd(*args, **dict(options))
        return out, (residuals, tuple(_type_marker(a) for a in args))

    def op_bwd(options, saved, g):
        residuals, markers = saved
        cts = bwd(residuals, g, **dict(options))
        if not isinstance(cts, (tuple, list)):
            cts = (cts,)
        if len(cts) != n_in:
            raise ValueError(f"fnbp.rule {name!r}: bwd returned {len(cts)} cotangents for {n_in} inputs "
                             f"({', '.join(positional)}); return one per input, None for those without")
        return tuple(as_cotangent(ct, m) for ct, m in zip(cts, markers))

    op.defvjp(op_fwd, op_bwd)

    @functools.wraps(fwd)
    def f(*args, **kwargs):
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"fnbp.{name}: {e}") from None
        bound.apply_defaults()
        values = tuple(bound.arguments[p] for p in positional)
        for p, v in zip(positional, values):
            if isinstance(v, (list, tuple)) and all(isinstance(leaf, (int, float, bool, complex))
                                                    for leaf in jax.tree_util.tree_leaves(v)):
                raise TypeError(f"fnbp.{name}: {p} must be an array, got a Python {type(v).__name__} of numbers "
                                f"(use jnp.asarray({p}))")
        options = tuple((o, bound.arguments[o]) for o in option_names)
        if check is not None:
            check(*values, **dict(options))
        try:
            hash(options)
        except TypeError:
            raise TypeError(f"fnbp.{name}: options {', '.join(option_names)} must be hashable (numbers, strings, "
                            f"tuples), got {dict(options)!r}") from None
        return op(options, *values)

    f.__name__ = f.__qualname__ = name
    del f.__wrapped__
    f.__signature__ = sig
    f.rule = Rule(fwd, bwd, name)
    f.check = check            # the explicit walker runs it before calling fwd
    return f
