"""The cross-check: every hand-written backward rule against two independent oracles.

For a function f with a hand-written rule and its plain reference r (same forward,
no custom rule), at the same float64 inputs and a random output cotangent c:

(a) autodiff: our VJP  c^T J_f  against ``jax.vjp`` of the reference  c^T J_r,
    entry by entry;
(b) finite differences: entry k of our VJP against the central difference
    (<c, f(x + eps e_k)> - <c, f(x - eps e_k)>) / (2 eps) on sampled coordinates k
    (CS231n's ``grad_check_sparse``).  A coordinate whose one-sided differences
    disagree sits on a kink (ReLU at 0, |r| at 0): it is counted in ``kinks`` and
    left out, since no derivative exists there for the differences to confirm;
(c) transformations: ``vmap`` of f's value and VJP gives the unbatched numbers,
    and (``check``) ``jit`` of f gives the value of the plain eager call.

``jax.grad`` of a rule runs *our* backward, so it is never the oracle by itself;
and a function with no hand-written rule at all (``jnp.tanh``) is refused: checking
autodiff against autodiff proves nothing.  Everything one check needs is one
compiled program (the 2 x n_coords forward evaluations are one vmapped call).

``fnbp check`` prints one row per rule (``--rule NAME`` for some of them).
"""
import inspect
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

__all__ = ["check", "check_many", "CheckResult", "Mismatch", "AUTODIFF_RTOL", "FD_TOL", "KINK_RTOL", "uses_rule"]

AUTODIFF_RTOL = 1e-10   # our VJP vs autodiff of the reference, relative, float64
FD_TOL = 1e-6           # our VJP vs central finite differences, relative, float64
KINK_RTOL = 1e-3        # one-sided differences disagreeing by more than this: a kink, not a derivative


class Mismatch(NamedTuple):
    """Where our VJP and an oracle disagree most: argument, index, analytic and oracle value."""
    oracle: str          # "autodiff" or "finite differences"
    arg: str             # the argument's name (with its pytree path)
    index: tuple         # index inside that array
    analytic: float      # our hand-written VJP's entry
    numeric: float       # the oracle's entry
    rel_error: float

    def __str__(self):
        return (f"{self.arg}{list(self.index)}: our rule gives {self.analytic:.10g}, {self.oracle} gives "
                f"{self.numeric:.10g} (relative error {self.rel_error:.1e})")


class CheckResult(NamedTuple):
    """Per checked (floating) argument: the relative error vs autodiff and vs finite differences."""
    name: str
    argnums: tuple
    argnames: tuple
    autodiff_rel: tuple
    fd_rel: tuple
    fd_coords: tuple      # coordinates checked by finite differences, per argument
    kinks: tuple          # of those, coordinates that sat on a kink (left out), per argument
    jit_abs: Optional[float]    # jit vs the plain eager call (None: not compared, see check_many)
    vmap_abs: float
    worst: Optional[Mismatch]   # the largest disagreement (None when there is none)

    @property
    def ok(self):
        return (all(e <= AUTODIFF_RTOL for e in self.autodiff_rel) and all(e <= FD_TOL for e in self.fd_rel)
                and (self.jit_abs is None or self.jit_abs <= 1e-12) and self.vmap_abs <= 1e-12)

    def __str__(self):
        head = (f"{self.name}: {'ok' if self.ok else 'MISMATCH'} (autodiff rel {max(self.autodiff_rel, default=0):.1e}, "
                f"finite differences rel {max(self.fd_rel, default=0):.1e} on {sum(self.fd_coords)} coordinates"
                f"{f', {sum(self.kinks)} on a kink left out' if sum(self.kinks) else ''}"
                f"{'' if self.jit_abs is None else f', jit {self.jit_abs:.0e}'}, "
                f"vmap {self.vmap_abs:.0e})")
        return head if self.ok or self.worst is None else f"{head}\n  worst: {self.worst}"


def _rule_calls(jaxpr):
    """Number of hand-written-rule (custom VJP) calls in a jaxpr, nested jaxprs included."""
    count = 0
    for eqn in jaxpr.eqns:
        count += "custom_vjp" in eqn.primitive.name
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    count += _rule_calls(inner)
    return count


def uses_rule(fn, *args):
    """True when evaluating fn(*args) goes through at least one hand-written rule."""
    return _rule_calls(jax.make_jaxpr(fn)(*args).jaxpr) > 0


def _to_f64(tree):
    return jax.tree_util.tree_map(
        lambda v: np.asarray(v, np.float64) if jnp.issubdtype(jnp.result_type(v), jnp.floating) else v, tree)


def _inexact(x):
    leaves = jax.tree_util.tree_leaves(x)
    return bool(leaves) and all(jnp.issubdtype(jnp.result_type(v), jnp.inexact) for v in leaves)


def _flat(tree):
    leaves = jax.tree_util.tree_leaves(tree)
    return np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in leaves]) if leaves else np.zeros(0)


def _locate(tree, k, argname):
    """(name with pytree path, index) of flat entry k of a pytree argument."""
    paths, _ = jax.tree_util.tree_flatten_with_path(tree)
    for path, leaf in paths:
        n = int(np.size(leaf))
        if k < n:
            return argname + jax.tree_util.keystr(path), tuple(int(i) for i in np.unravel_index(k, np.shape(leaf)))
        k -= n
    raise IndexError(k)


def _argnames(fn, n):
    try:
        names = [p.name for p in inspect.signature(fn).parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        names = []
    return tuple(names[i] if i < len(names) else f"arg{i}" for i in range(n))


def _max_abs_diff(a, b):
    diffs = [np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
             if np.size(x) and np.asarray(x).dtype != jax.dtypes.float0]
    return float(max(diffs, default=0.0))


def _program(fn, ref, args, argnums, eps):
    """The one compiled program of a check: values and VJPs of fn and ref, the finite-difference
    evaluations, and vmap of fn's value and VJP over (args, other)."""
    def value_and_vjp(ct, *a):
        out, vjp = jax.vjp(fn, *a)
        return out, vjp(ct)

    def run(ct, args, other, coords, signs):
        out, ours = value_and_vjp(ct, *args)
        out_ref, vjp_ref = jax.vjp(ref, *args)
        theirs = vjp_ref(ct)
        f0 = jnp.vdot(ct, out)
        shifted = []
        for i, (k, s) in zip(argnums, zip(coords, signs)):
            flat, unravel = ravel_pytree(args[i])

            def along(k, s, i=i, flat=flat, unravel=unravel):
                new = list(args)
                new[i] = unravel(flat.at[k].add(s * eps))
                return jnp.vdot(ct, fn(*new))
            shifted.append(jax.vmap(along)(k, s))
        stacked = jax.tree_util.tree_map(lambda x, y: jnp.stack([x, y]), tuple(args), tuple(other))
        batched = jax.vmap(value_and_vjp, in_axes=(None,) + (0,) * len(args))(ct, *stacked)
        second = value_and_vjp(ct, *other)
        return out, out_ref, ours, theirs, f0, shifted, batched, second
    return value_and_vjp, run


class _Case(NamedTuple):
    name: str
    fn: Callable
    args: tuple
    argnums: tuple
    argnames: tuple
    ct: np.ndarray
    other: tuple
    coords: list
    signs: list
    value_and_vjp: Callable
    run: Callable


def _kind(a):
    leaves = jax.tree_util.tree_leaves(a)
    return ", ".join(f"{jnp.result_type(v)}{list(np.shape(v))}" for v in leaves[:3]) if leaves else "no arrays"


def _output_shape(f, args, name, what):
    """The ShapeDtypeStruct of ``f(*args)``: one array, else a ValueError naming ``what`` (fn or the reference)."""
    try:
        out = jax.eval_shape(f, *args)
    except (TypeError, ValueError) as e:
        raise ValueError(f"fnbp.check: {name}: calling {what} on the inputs failed: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from e
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise ValueError(f"fnbp.check: {name}: {what} must return one array, got "
                         f"{jax.tree_util.tree_structure(out)}")
    return out


def _prepare(fn, ref, args, name, key, eps, n_coords):
    name = name or getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", "rule")
    key = jax.random.PRNGKey(0) if key is None else key
    args = _to_f64(args)
    if not uses_rule(fn, *args):
        raise TypeError(f"fnbp.check: {name} has no hand-written rule (no function made with fnbp.rule runs "
                        f"inside it), so its gradient is JAX's autodiff and checking it against autodiff "
                        f"proves nothing; wrap your fwd/bwd pair with fnbp.rule(fwd, bwd)")
    argnums = tuple(i for i, a in enumerate(args) if _inexact(a) and _flat(a).size)
    if not argnums:
        kinds = ", ".join(f"{n}: {_kind(a)}" for n, a in zip(_argnames(fn, len(args)), args))
        raise ValueError(f"fnbp.check: {name} has no floating-point input with any entries ({kinds}), so there is "
                         f"no gradient to check: it would check nothing; pass the inputs to differentiate as float "
                         f"arrays")
    out_shape = _output_shape(fn, args, name, "fn")
    ref_shape = _output_shape(ref, args, name, "the reference")
    if ref_shape.shape != out_shape.shape:
        raise ValueError(f"fnbp.check: {name}'s reference returns shape {ref_shape.shape} but {name} returns shape "
                         f"{out_shape.shape}; the reference must compute the same forward")
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    ct = rng.standard_normal(out_shape.shape)
    other = tuple(jax.tree_util.tree_map(lambda v: v + 0.01 * rng.standard_normal(np.shape(v)), a)
                  if i in argnums else a for i, a in enumerate(args))
    coords, signs = [], []
    for i in argnums:
        size = _flat(args[i]).size
        k = np.arange(size) if size <= n_coords else np.sort(rng.choice(size, n_coords, replace=False))
        coords.append(np.concatenate([k, k]))
        signs.append(np.concatenate([np.ones(k.size), -np.ones(k.size)]))
    value_and_vjp, run = _program(fn, ref, args, argnums, eps)
    return _Case(name, fn, args, argnums, _argnames(fn, len(args)), ct, other, coords, signs, value_and_vjp, run)


def _result(case, outputs, eps, eager):
    out, out_ref, ours, theirs, f0, shifted, batched, second = outputs
    np.testing.assert_allclose(np.asarray(out), np.asarray(out_ref), rtol=1e-10, atol=1e-12,
                               err_msg=f"fnbp.check: {case.name}'s forward differs from the reference's")
    jit_abs = _max_abs_diff(out, case.fn(*case.args)) if eager else None     # jit vs the plain (eager) call
    vmap_abs = max(_max_abs_diff(jax.tree_util.tree_map(lambda x: x[0], batched), (out, ours)),
                   _max_abs_diff(jax.tree_util.tree_map(lambda x: x[1], batched), second))
    ad_rel, fd_rel, fd_coords, kinks, worst = [], [], [], [], None
    for j, i in enumerate(case.argnums):
        g, g_ref = _flat(ours[i]), _flat(theirs[i])
        scale = np.max(np.abs(g_ref)) if g_ref.size and np.any(g_ref) else 1.0
        err = np.abs(g - g_ref) / scale
        ad_rel.append(float(err.max(initial=0.0)))
        candidates = []
        if err.size and ad_rel[-1] > 0:
            k = int(np.argmax(err))
            candidates.append(("autodiff", k, g[k], g_ref[k], ad_rel[-1]))
        n = case.coords[j].size // 2
        k, vals = case.coords[j][:n], np.asarray(shifted[j])
        f_plus, f_minus = vals[:n], vals[n:]
        d_plus, d_minus = (f_plus - float(f0)) / eps, (float(f0) - f_minus) / eps
        central = (f_plus - f_minus) / (2 * eps)
        kink = np.abs(d_plus - d_minus) > KINK_RTOL * np.maximum(1.0, np.maximum(np.abs(d_plus), np.abs(d_minus)))
        fd_scale = max(np.max(np.abs(g)), np.max(np.abs(central[~kink]), initial=0.0)) if np.any(g) else 1.0
        fd_err = np.where(kink, 0.0, np.abs(central - g[k]) / fd_scale)
        fd_rel.append(float(fd_err.max(initial=0.0)))
        fd_coords.append(int(n - kink.sum()))
        kinks.append(int(kink.sum()))
        if fd_err.size and fd_rel[-1] > 0:
            m = int(np.argmax(fd_err))
            candidates.append(("finite differences", int(k[m]), g[k[m]], central[m], fd_rel[-1]))
        for oracle, kk, analytic, numeric, rel in candidates:
            if worst is None or rel / _LIMIT[oracle] > worst.rel_error / _LIMIT[worst.oracle]:
                arg, index = _locate(case.args[i], kk, case.argnames[i])
                worst = Mismatch(oracle, arg, index, float(analytic), float(numeric), float(rel))
    return CheckResult(case.name, case.argnums, tuple(case.argnames[i] for i in case.argnums), tuple(ad_rel),
                       tuple(fd_rel), tuple(fd_coords), tuple(kinks), jit_abs, vmap_abs, worst)


_LIMIT = {"autodiff": AUTODIFF_RTOL, "finite differences": FD_TOL}


def check_many(cases, *, eps=1e-6, n_coords=40, eager=False, values=False):
    """``check`` for a list of ``(fn, ref, args, name, key)`` in ONE compiled program (faster than one by one).

    ``eager=True`` also compares the jit-compiled forward with a plain eager call (slow: it
    compiles every primitive on its own); ``check`` does, ``fnbp check`` does not.
    ``values=True`` returns ``(result, out, ct, vjp)`` per case: our forward, the
    output cotangent c and our VJP c^T J (one entry per argument).
    """
    with jax.enable_x64(True):
        prepared = [_prepare(fn, ref, tuple(args), name, key, eps, n_coords) for fn, ref, args, name, key in cases]

        def run_all(inputs):
            return [c.run(*x) for c, x in zip(prepared, inputs)]
        inputs = [(c.ct, c.args, c.other, c.coords, c.signs) for c in prepared]
        compiled = jax.jit(run_all).lower(inputs).compile({"xla_backend_optimization_level": 0})
        results = []
        for c, outputs in zip(prepared, compiled(inputs)):
            result = _result(c, outputs, eps, eager)
            results.append((result, np.asarray(outputs[0]), c.ct, outputs[2]) if values else result)
        return results


def check(fn: Callable, ref: Callable, *args, name=None, key=None, eps=1e-6, n_coords=40) -> CheckResult:
    """Cross-check the hand-written VJP of ``fn`` against ``ref`` at ``args`` (run in float64).

    Args:
      fn: a function whose gradient is a hand-written rule, e.g. ``fnbp.sigmoid``,
        ``functools.partial(fnbp.losses.half_sse, reduction='sum')`` or your own
        ``fnbp.rule(fwd, bwd)``.  A function that uses no hand-written rule is refused
        (TypeError).
      ref: the plain-jnp reference with the same forward (``fnbp.reference``).
      *args: inputs (arrays or pytrees); floating ones are checked, integer ones
        (labels) and keys are passed through.
      key: ``jax.random`` key for the cotangent and the sampled coordinates (default key 0).
      eps: finite-difference step.
      n_coords: coordinates per argument checked by finite differences (all if fewer).

    Returns a ``CheckResult``; ``result.ok`` applies AUTODIFF_RTOL and FD_TOL, and
    ``result.worst`` names the argument, index, our value and the oracle's value of
    the largest disagreement.  ``print(result)`` says all of it.
    """
    return check_many([(fn, ref, args, name, key)], eps=eps, n_coords=n_coords, eager=True)[0]
