"""The one helper every optimizer is built on, in optax's manner, and the checks it runs.

:func:`leafwise_optimizer` writes once what every optimizer of the notes does: check the
hyperparameters, build the state (step count k and trees shaped like the parameters), evaluate
the learning rate η_k (a number or a schedule k ↦ η_k), apply a per-leaf update rule written in
the docstring's symbols, and count the step.  A factory then only states its rule.

All checks on trees run at trace time (structure, shapes, dtypes): under ``jit`` they cost
nothing per step and nothing is checked on the device.
"""
import math
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

Schedule = Callable[[jax.Array], jax.Array]
ScalarOrSchedule = Union[float, jax.Array, Schedule]

_INT32_MAX = np.iinfo(np.int32).max

# kind of a hyperparameter: (text for the message, test on a finite float)
NONNEG = ("a number ≥ 0", lambda x: x >= 0)
POS = ("a number > 0", lambda x: x > 0)
UNIT = ("a number in [0, 1)", lambda x: 0 <= x < 1)


def _where(fn_name):
    return f"fnbp.optim.{fn_name}"


def check_hyperparameter(fn_name: str, arg: str, value, kind, schedule_ok=False):
    """Refuse a concrete hyperparameter of the wrong type (TypeError) or outside ``kind`` (ValueError).

    The message names the function, the argument, what was expected and what came.  A real
    number means a Python int/float or a real scalar array (not bool, str, complex or a
    non-scalar); NaN and ±inf are refused.  Traced values (under ``jit``/``vmap``) are not
    checked; with ``schedule_ok`` a callable (a schedule k ↦ η_k) passes.
    """
    text, ok = kind
    if isinstance(value, jax.core.Tracer) or (schedule_ok and callable(value)):
        return
    expected = text + (" or a schedule (a function of the step count)" if schedule_ok else "")
    dtype = getattr(value, "dtype", None)
    number = isinstance(value, (int, float, np.number, np.ndarray, jax.Array)) and not isinstance(value, bool)
    if not number or (dtype is not None and (np.dtype(dtype).kind not in "iuf" or np.ndim(value) != 0)):
        shown = f"{type(value).__name__} {value!r}" if dtype is None else f"array of dtype {dtype} shape {np.shape(value)}"
        raise TypeError(f"{_where(fn_name)}: {arg} must be {expected}, got {shown}")
    x = float(value)
    if not (math.isfinite(x) and ok(x)):
        raise ValueError(f"{_where(fn_name)}: {arg} must be {expected}, got {value!r}")


def check_trees(fn_name: str, what: str, tree, others: dict, dtypes=False):
    """Refuse ``tree`` (named ``what``) unless each tree in ``others`` ({name: tree}) has its
    structure, leaf shapes and (with ``dtypes``) leaf dtypes.  Trace-time only.

    Returns the leaves of ``tree`` and, per other tree, its leaves in the same order.
    """
    treedef = jax.tree_util.tree_structure(tree)
    columns = [jax.tree_util.tree_leaves(tree)]
    for name, other in others.items():
        other_def = jax.tree_util.tree_structure(other)
        if other_def != treedef:
            raise ValueError(f"{_where(fn_name)}: {what} pytree structure differs from the {name}'s:\n"
                             f"  {what}: {treedef}\n  {name}: {other_def}")
        columns.append(treedef.flatten_up_to(other))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    for name, column in zip(others, columns[1:]):
        for path, x, y in zip(paths, columns[0], column):
            if jnp.shape(x) != jnp.shape(y) or (dtypes and jnp.result_type(x) != jnp.result_type(y)):
                raise ValueError(f"{_where(fn_name)}: {what} leaf {path or '(root)'} must match the {name}'s "
                                 f"shape {jnp.shape(y)} and dtype {jnp.result_type(y)}, got shape "
                                 f"{jnp.shape(x)} and dtype {jnp.result_type(x)}")
    return treedef, columns


def check_floating(fn_name: str, what: str, tree):
    """Refuse integer, bool or complex leaves (adaptive rules would return NaN or wrong steps)."""
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise TypeError(f"{_where(fn_name)}: {what} must be floating-point arrays, got leaf "
                            f"{jax.tree_util.keystr(path) or '(root)'} of dtype {jnp.result_type(x)}")


def learning_rate_at(learning_rate: ScalarOrSchedule, count):
    """η_k: the schedule evaluated at the step count k, or the constant."""
    return learning_rate(count) if callable(learning_rate) else learning_rate


def increment(count):
    """k + 1, saturating at the int32 maximum."""
    return jnp.where(count < _INT32_MAX, count + 1, count)


def in_dtype(dtype, x):
    """A hyperparameter in a leaf's dtype; Python numbers stay weakly typed (as in optax)."""
    return x if isinstance(x, (int, float)) else jnp.asarray(x, dtype)


def update_moment(moment, value, rho):
    """An exponential moving average (Kingma & Ba's biased moment estimate): ρ·m + (1 − ρ)·value."""
    return rho * moment + (1 - rho) * value


def bias_correction(rho, i):
    """1 − ρ^i: divides a moving average started at 0 after i steps to unbias it (m̂ = m / (1 − ρ^i))."""
    return 1 - rho ** i


class LookaheadTransformation(optax.GradientTransformation):
    """An ``optax.GradientTransformation`` (the same two fields ``init``, ``update``, so ``optax.chain``
    and friends take it) that also says where the gradient must be evaluated::

        theta_tilde = opt.lookahead(params, state)     # θ̃; = params for all but nesterov
        grads = jax.grad(loss)(theta_tilde)
        updates, state = opt.update(grads, state, params)

    Use :func:`gradient_point` to accept any transformation (plain optax ones look at θ itself).
    """

    def __new__(cls, init, update, lookahead=None):
        self = super().__new__(cls, init, update)
        self.lookahead = lookahead if lookahead is not None else (lambda params, state: params)
        return self


def leafwise_optimizer(name: str, state_type, leaf_update, learning_rate: ScalarOrSchedule,
                       hyper: Optional[dict] = None, *, fill: Optional[dict] = None,
                       constants: Optional[dict] = None, per_step=None, lookahead=None):
    """Build optimizer ``name`` from its per-leaf rule.

    Args:
      state_type: a NamedTuple ``(count, *trees, *constants)``; every field after ``count`` that
        is not in ``constants`` is a tree shaped like the parameters.
      leaf_update: ``(g, *state leaves, eta=η_k, **hyperparameters, **per-step scalars) ->
        (Δθ leaf, *new state leaves)`` for one leaf; every scalar arrives in the leaf's dtype.
      learning_rate: η, a number or a schedule k ↦ η_k (validated as ≥ 0).
      hyper: ``{symbol: (argument name, value, kind)}``: each is validated under the argument's
        name and passed to ``leaf_update`` under the docstring's symbol.
      fill: ``{tree field: initial value}`` (default 0).
      constants: ``{field: value}`` stored in the state as arrays and carried unchanged.
      per_step: ``count -> {name: scalar}`` computed once a step (e.g. Adam's bias corrections).
      lookahead: ``(params, state) -> θ̃``, where the gradient is to be evaluated.
    """
    hyper = hyper or {}
    fill, constants = fill or {}, constants or {}
    check_hyperparameter(name, "learning_rate", learning_rate, NONNEG, schedule_ok=True)
    for arg, value, kind in hyper.values():
        check_hyperparameter(name, arg, value, kind)
    trees = [f for f in state_type._fields[1:] if f not in constants]

    def init(params):
        check_floating(name, "parameters", params)
        zero = jnp.zeros([], jnp.int32)
        return state_type(count=zero, **{f: jnp.asarray(v) for f, v in constants.items()},
                          **{f: jax.tree_util.tree_map(lambda p, f=f: jnp.full_like(p, fill.get(f, 0)), params)
                             for f in trees})

    def update(grads, state, params=None):
        check_floating(name, "gradients", grads)
        others = {f"state.{f}": getattr(state, f) for f in trees}
        treedef, columns = check_trees(name, "gradients", grads, others, dtypes=True)
        if params is not None:
            check_trees(name, "gradients", grads, {"parameters": params})
        scalars = {"eta": learning_rate_at(learning_rate, state.count),
                   **{symbol: value for symbol, (_, value, _) in hyper.items()},
                   **(per_step(state.count) if per_step else {})}
        rows = [leaf_update(g, *leaves, **{k: in_dtype(jnp.result_type(g), v) for k, v in scalars.items()})
                for g, *leaves in zip(*columns)]
        outs = [treedef.unflatten(list(col)) for col in zip(*rows)] if rows else [treedef.unflatten([])] * (1 + len(trees))
        new_state = state_type(count=increment(state.count), **dict(zip(trees, outs[1:])),
                               **{f: getattr(state, f) for f in constants})
        return outs[0], new_state

    return LookaheadTransformation(init, update, lookahead)


def apply_updates(params, updates):
    """θ ← θ + Δθ leaf by leaf, keeping each parameter's dtype (as ``optax.apply_updates``).

    Refuses (ValueError, at trace time) updates whose structure or leaf shapes differ from the
    parameters' instead of broadcasting them.
    """
    treedef, (updates_leaves, params_leaves) = check_trees("apply_updates", "updates", updates,
                                                           {"parameters": params})
    return treedef.unflatten([jnp.asarray(p + u).astype(jnp.asarray(p).dtype)
                              for u, p in zip(updates_leaves, params_leaves)])

