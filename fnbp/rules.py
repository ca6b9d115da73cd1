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
Python numbers such as a slope); each gets a cotangent: an array of the input's shape
and a floating dtype for a float input, ``None`` for integer inputs such as labels and
keys, and ``None`` for the float inputs the rule declares non-differentiable
(``fnbp.rule(fwd, bwd, nondiff=("slope",))``: hyperparameters such as a slope or a
drop probability).  Anything else (a bare array instead of ``(out, residuals)``, the
wrong number of cotangents, a wrong shape, an integer, boolean or complex cotangent of
a real input, ``None`` for an undeclared float input) is a ``RuleError`` naming the
rule, raised at trace time.  The keyword-only parameters of ``fwd``
(``*, reduction="mean"``) are static options: hashable values passed by keyword to
both ``fwd`` and ``bwd``; a numpy or concrete JAX scalar option (``np.int64(2)``) is
passed on as the Python number it holds.

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
import numpy as np

__all__ = ["Rule", "RuleError", "rule", "rule_of", "as_cotangent", "check_cotangents", "out_sharding", "PrimalType"]


class RuleError(TypeError, ValueError):
    """A hand-written rule broke the conventions (fwd's return structure, bwd's cotangents); names the rule."""


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


@jax.tree_util.register_static
class PrimalType:
    """What a cotangent must look like to match its primal input (trace-time only, no array).

    dtype: the primal's dtype.  shape: its shape.  sharding: its ``NamedSharding`` when it lives on a mesh
    with Explicit axes (sharding in the type), else None (Auto meshes, one device).
    varying: the manual mesh axes it varies over inside ``jax.shard_map`` (its vma).
    Kept in a rule's residuals as a static pytree node (no leaves, no device memory).
    """
    __slots__ = ("dtype", "sharding", "varying", "shape")

    def __init__(self, dtype, sharding, varying, shape=None):
        self.dtype, self.sharding, self.varying, self.shape = dtype, sharding, varying, shape

    def _key(self):
        return (self.dtype, self.sharding, self.varying, self.shape)

    def __eq__(self, other):
        return isinstance(other, PrimalType) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        return (f"PrimalType(dtype={self.dtype}, shape={self.shape}, sharding={self.sharding}, "
                f"varying={set(self.varying) or '{}'})")


def _varying_axes(aval):
    """The manual axes an abstract value varies over (``vma``; JAX 0.10 keeps it in ``aval.mat.varying``)."""
    vma = getattr(aval, "vma", None)
    if vma is None:
        mat = getattr(aval, "mat", None)
        vma = getattr(mat, "varying", None)
    return frozenset(vma or ())


def _explicit_sharding(aval):
    """The aval's NamedSharding if its mesh has an Explicit axis, else None."""
    sharding = getattr(aval, "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty:
        return None
    explicit = jax.sharding.AxisType.Explicit
    return sharding if any(t == explicit for t in mesh.axis_types) else None


def out_sharding(like):
    """The ``out_sharding`` for a contraction whose result must have ``like``'s sharding.

    ``lax.dot_general``, ``jnp.einsum`` and ``lax.conv_general_dilated`` refuse to guess
    the output sharding when they contract an axis sharded on an Explicit mesh (a
    batch-sharded delta^T H, or W^T delta with W sharded along n_out); a backward
    passes ``out_sharding=out_sharding(W)`` (or ``h_prev``) to get the cotangent of
    the primal's sharding (XLA inserts the all-reduce).  None -- let JAX decide --
    on one device, on Auto meshes and inside ``shard_map``.  Trace time only.
    """
    return _explicit_sharding(jax.typeof(like))


def _leaf_marker(x):
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.inexact):
        return None
    aval = jax.typeof(x)
    return PrimalType(dtype, _explicit_sharding(aval), _varying_axes(aval), tuple(jnp.shape(x)))


def _type_marker(x, nondiff=False):
    """The ``PrimalType`` of an input (leaf by leaf, for a pytree input), kept in the
    residuals so that the backward returns cotangents of the primal's type (None for
    integer inputs such as labels, for keys, and for inputs declared ``nondiff``).
    Static: costs nothing at run time."""
    if nondiff:
        return None
    if isinstance(x, (list, tuple, dict)):
        return jax.tree_util.tree_map(_leaf_marker, x)
    return _leaf_marker(x)


def _is_none(x):
    return x is None


def _is_marker_leaf(x):
    return x is None or isinstance(x, PrimalType)


def as_cotangent(ct, marker):
    """A rule's cotangent as its primal input's type (the one place where this is decided).

    * dtype: cast to the primal's dtype;
    * varying manual axes (inside ``jax.shard_map(..., check_vma=True)``): a cotangent
      that varies over an axis its primal does not (a replicated W's delta^T H, summed
      over this device's examples only) is ``psum``-med over that axis -- the sum over
      every consumer of W, as JAX's own transpose of an implicit ``pvary`` does; one
      that does not vary over an axis its primal varies over is ``pcast`` to varying;
    * sharding on an Explicit mesh: ``reshard`` to the primal's sharding when the rule's
      result has another (contractions should already ask for it with ``out_sharding``).

    Each step is skipped when the type already matches, so on one device this is the
    identity and costs nothing at run time.
    """
    if marker is None or ct is None:
        return None
    if isinstance(marker, (list, tuple, dict)):
        return jax.tree_util.tree_map(as_cotangent, ct, marker, is_leaf=_is_none)
    ct = jnp.asarray(ct)
    if ct.dtype != marker.dtype:
        ct = ct.astype(marker.dtype)
    have = _varying_axes(jax.typeof(ct))
    extra, missing = have - marker.varying, marker.varying - have
    if extra:
        ct = jax.lax.psum(ct, tuple(sorted(extra, key=str)))
    if missing:
        ct = jax.lax.pcast(ct, tuple(sorted(missing, key=str)), to="varying")
    if marker.sharding is not None and jax.typeof(ct).sharding != marker.sharding:
        ct = jax.sharding.reshard(ct, marker.sharding)
    return ct


def _describe(x):
    if x is None:
        return "None"
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{type(x).__name__} {x.dtype}{list(x.shape)}"
    return f"{type(x).__name__} {x!r:.40}"


def _check_leaf(where, ct, marker):
    """Refuse a cotangent that does not fit its float primal (``where`` names the rule and input)."""
    if ct is None:
        raise RuleError(f"{where}: bwd returned None for a float input of shape {marker.shape}; return its "
                        f"cotangent, or declare the input non-differentiable (fnbp.rule(..., nondiff=(name,)))")
    if not isinstance(ct, (jax.Array, np.ndarray, np.generic, int, float, complex)):
        raise RuleError(f"{where}: the cotangent must be an array, got {_describe(ct)}")
    try:
        dtype, shape = jnp.result_type(ct), tuple(jnp.shape(ct))
    except (TypeError, ValueError):
        raise RuleError(f"{where}: the cotangent must be an array, got {_describe(ct)}") from None
    if not jnp.issubdtype(dtype, jnp.inexact) or (jnp.issubdtype(dtype, jnp.complexfloating)
                                                   and not jnp.issubdtype(marker.dtype, jnp.complexfloating)):
        raise RuleError(f"{where}: the cotangent has dtype {dtype} but the input is {marker.dtype}; a "
                        f"{'complex' if jnp.issubdtype(dtype, jnp.complexfloating) else 'non-float'} cotangent "
                        f"is not cast silently (return a {marker.dtype} array)")
    if marker.shape is not None and shape != marker.shape:
        raise RuleError(f"{where}: the cotangent has shape {shape} but the input has shape {marker.shape} "
                        f"(a cotangent has its input's shape)")


def _check_cotangent(where, ct, marker):
    """Check one input's cotangent (a pytree input's leaf by leaf) against its marker."""
    if marker is None:
        return                                        # integer / key / nondiff input: the cotangent is dropped
    if isinstance(marker, (list, tuple, dict)):
        leaves, treedef = jax.tree_util.tree_flatten(marker, is_leaf=_is_marker_leaf)
        try:
            cts = treedef.flatten_up_to(ct)
        except (ValueError, TypeError):
            shown = jax.tree_util.tree_structure(jax.tree_util.tree_map(lambda _: 0, marker, is_leaf=_is_marker_leaf))
            raise RuleError(f"{where}: the cotangent must have the input's structure {str(shown):.200}, got "
                            f"{str(jax.tree_util.tree_structure(ct, is_leaf=_is_none)):.200}") from None
        for c, m in zip(cts, leaves):
            _check_cotangent(where, c, m)
        return
    _check_leaf(where, ct, marker)


def _static(name, option, value):
    """An option as a hashable static value: a numpy scalar or a concrete 0-d JAX array becomes the Python
    number it holds (``np.int64(2)`` -> 2); a traced one is refused by name."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, jax.Array) and jnp.ndim(value) == 0:
        if isinstance(value, jax.core.Tracer):
            raise TypeError(f"fnbp.{name}: option {option} must be a static value, got a traced {value.dtype} "
                            f"scalar (options are fixed at trace time; pass a Python number)")
        return value.item()
    return value


def _check_fwd_result(name, result):
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        got = (f"a {type(result).__name__} of {len(result)}" if isinstance(result, (tuple, list))
               else _describe(result))
        raise RuleError(f"fnbp.rule {name!r}: fwd must return the pair (out, residuals), got {got}")
    return result


def check_cotangents(f, args, cts):
    """Refuse what ``f.rule.bwd`` returned for the inputs ``args`` as ``fnbp.rule`` does inside jax.grad:
    one cotangent per positional input, each of its input's shape and a float dtype, None only for integer
    inputs and those in ``f.nondiff``.  For callers of ``rule.bwd`` outside JAX's transforms (the explicit
    walker).  Returns the cotangents as a tuple, or raises a :class:`RuleError` naming the rule."""
    r = rule_of(f)
    if r is None:
        raise TypeError(f"fnbp.rules.check_cotangents: {f!r} was not made by fnbp.rule")
    _, positional, _ = _split_signature(r.fwd, r.name)
    nondiff = getattr(f, "nondiff", ())
    cts = cts if isinstance(cts, (tuple, list)) else (cts,)
    if len(cts) != len(positional):
        raise RuleError(f"fnbp.rule {r.name!r}: bwd returned {len(cts)} cotangents for {len(positional)} inputs "
                        f"({', '.join(positional)}); return one per input, None for those without")
    for p, ct, a in zip(positional, cts, args):
        _check_cotangent(f"fnbp.rule {r.name!r}: input {p}", ct, _type_marker(a, p in nondiff))
    return tuple(cts)


def rule(fwd, bwd, *, name=None, check=None, nondiff=()):
    """A differentiable function from a hand-written forward ``fwd`` and backward ``bwd``.

    Args:
      fwd: ``fwd(*args, **options) -> (out, residuals)``; its signature is the
        function's signature, its docstring the function's docstring.
      bwd: ``bwd(residuals, g, **options) -> (cotangent of each positional arg)``;
        a single array is accepted when fwd has one positional input.
      name: the op's name (default: fwd's name without a ``_fwd``/``_forward`` suffix).
      check: optional ``check(*args, **options)`` run at trace time before the op
        (shape/type validation that raises a named ValueError or TypeError).
      nondiff: names of positional inputs that are not differentiated (hyperparameters
        such as a slope, a drop probability, a fixed feedback matrix): bwd returns None
        for them even when they are floats.  None for an undeclared float input is a
        ``RuleError``.

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
    nondiff = (nondiff,) if isinstance(nondiff, str) else tuple(nondiff)
    unknown = [p for p in nondiff if p not in positional]
    if unknown:
        raise TypeError(f"fnbp.rule: {name}'s nondiff names {', '.join(map(repr, unknown))}, which are not "
                        f"positional inputs of fwd ({', '.join(positional)})")
    skip = tuple(p in nondiff for p in positional)

    def primal(options, *args):
        return _check_fwd_result(name, fwd(*args, **dict(options)))[0]

    op = jax.custom_vjp(primal, nondiff_argnums=(0,))

    def op_fwd(options, *args):
        out, residuals = _check_fwd_result(name, fwd(*args, **dict(options)))
        return out, (residuals, tuple(_type_marker(a, s) for a, s in zip(args, skip)))

    def op_bwd(options, saved, g):
        residuals, markers = saved
        cts = bwd(residuals, g, **dict(options))
        if not isinstance(cts, (tuple, list)):
            cts = (cts,)
        if len(cts) != n_in:
            raise RuleError(f"fnbp.rule {name!r}: bwd returned {len(cts)} cotangents for {n_in} inputs "
                            f"({', '.join(positional)}); return one per input, None for those without")
        for p, ct, m in zip(positional, cts, markers):
            _check_cotangent(f"fnbp.rule {name!r}: input {p}", ct, m)
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
        options = tuple((o, _static(name, o, bound.arguments[o])) for o in option_names)
        if check is not None:
            check(*values, **dict(options))
        try:
            hash(options)
        except TypeError:
            raise TypeError(f"fnbp.{name}: options {', '.join(option_names)} must be hashable (numbers, strings, "
                            f"tuples), got {dict(options)!r}") from None
        return op(options, *values)

    f.__name__ = f.__qualname__ = name
    f.nondiff = nondiff
    del f.__wrapped__
    f.__signature__ = sig
    f.rule = Rule(fwd, bwd, name)
    f.check = check            # the explicit walker runs it before calling fwd
    return f
