"""The cross-check: every hand-written backward rule against two independent oracles.

For a rule f (our custom_vjp function) and its plain reference r (same forward,
no custom rule), at the same float64 inputs and a random output cotangent c:

(a) autodiff: our VJP  c^T J_f  against ``jax.vjp`` of the reference  c^T J_r;
(b) finite differences: <c^T J_f, v> against the central difference
    (<c, f(x + eps v)> - <c, f(x - eps v)>) / (2 eps) along random directions v;
(c) transformations: ``jit`` and ``vmap`` of f (and of its VJP) give the same
    numbers as the plain call.

Note that ``jax.grad`` of a custom_vjp function runs *our* rule, so it is never
the oracle by itself: the oracle is autodiff of the reference, and finite
differences of the forward.  (``jax.test_util.check_grads`` likewise needs
``modes=("rev",)`` on custom_vjp functions.)

``python -m fnbp check`` (or ``fnbp check``) prints one table row per rule.
"""
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from . import activations, layers, losses, norm, reference

__all__ = ["check", "CheckResult", "CASES", "check_all", "format_table", "AUTODIFF_RTOL", "FD_TOL"]

AUTODIFF_RTOL = 1e-10   # our VJP vs autodiff of the reference, relative, float64
FD_TOL = 1e-6           # our VJP vs central finite differences, relative, float64


class CheckResult(NamedTuple):
    """Per differentiable argument: max abs/rel error vs autodiff and vs finite differences."""
    name: str
    argnums: tuple
    autodiff_abs: tuple
    autodiff_rel: tuple
    fd_abs: tuple
    fd_rel: tuple
    jit_abs: float
    vmap_abs: float

    @property
    def ok(self):
        return (all(e <= AUTODIFF_RTOL for e in self.autodiff_rel) and all(e <= FD_TOL for e in self.fd_rel)
                and self.jit_abs <= 1e-12 and self.vmap_abs <= 1e-12)


def _to_f64(x):
    return jax.tree_util.tree_map(
        lambda v: jnp.asarray(v, jnp.float64) if jnp.issubdtype(jnp.result_type(v), jnp.floating) else jnp.asarray(v),
        x)


def _max_abs(tree):
    leaves = [np.max(np.abs(np.asarray(x))) for x in jax.tree_util.tree_leaves(tree) if np.size(x)]
    return float(max(leaves)) if leaves else 0.0


def _tree_diff(a, b):
    def diff(x, y):
        if np.asarray(x).dtype == jax.dtypes.float0:      # cotangent of an integer argument
            return np.zeros(np.shape(x))
        return jnp.asarray(x) - jnp.asarray(y)
    return jax.tree_util.tree_map(diff, a, b)


def _inexact(x):
    leaves = jax.tree_util.tree_leaves(x)
    return bool(leaves) and all(jnp.issubdtype(jnp.result_type(v), jnp.inexact) for v in leaves)


def check(rule: Callable, ref: Callable, *args, name=None, key=None, eps=1e-6, n_directions=4) -> CheckResult:
    """Cross-check the custom VJP of ``rule`` against ``ref`` at ``args`` (run in float64).

    Args:
      rule: the function with a hand-written rule, e.g. ``fnbp.sigmoid`` or
        ``functools.partial(fnbp.losses.half_sse, reduction='sum')``.
      ref: the plain-jnp reference with the same forward.
      *args: inputs (arrays or pytrees); floating ones are checked, integer ones
        (labels) are passed through.
      key: ``jax.random`` key for the cotangent and the directions (default key 0).
      eps: finite-difference step.
      n_directions: random directions per argument for the finite differences.

    Returns a ``CheckResult`` with, per floating argument, the max absolute and
    relative error of our VJP vs ``jax.vjp`` of ``ref`` and vs central finite
    differences, and the max deviation of ``jit``/``vmap`` from the plain call.
    ``result.ok`` applies the project's tolerances (AUTODIFF_RTOL, FD_TOL).
    """
    name = name or getattr(rule, "__name__", None) or getattr(getattr(rule, "func", None), "__name__", "rule")
    key = jax.random.PRNGKey(0) if key is None else key
    with jax.enable_x64(True):
        args = _to_f64(args)
        argnums = tuple(i for i, a in enumerate(args) if _inexact(a))
        out, vjp_rule = jax.vjp(rule, *args)
        out_ref, vjp_ref = jax.vjp(ref, *args)
        k_ct, k_dir, k_vmap = jax.random.split(key, 3)
        ct = jax.random.normal(k_ct, jnp.shape(out), jnp.float64)
        g_rule, g_ref = vjp_rule(ct), vjp_ref(ct)

        ad_abs, ad_rel, fd_abs, fd_rel = [], [], [], []
        for i in argnums:
            diff = _max_abs(_tree_diff(g_rule[i], g_ref[i]))
            ad_abs.append(diff)
            ad_rel.append(diff / max(_max_abs(g_ref[i]), 1e-300) if diff else 0.0)

            flat, unravel = ravel_pytree(args[i])
            g_flat = ravel_pytree(g_rule[i])[0]

            @jax.jit
            def f_along(x_flat, i=i, unravel=unravel):
                new_args = list(args)
                new_args[i] = unravel(x_flat)
                return jnp.vdot(ct, rule(*new_args))

            worst_abs = worst_rel = 0.0
            for v in jax.random.normal(jax.random.fold_in(k_dir, i), (n_directions, flat.size), jnp.float64):
                v = v / jnp.linalg.norm(v)
                fd = (f_along(flat + eps * v) - f_along(flat - eps * v)) / (2 * eps)
                analytic = jnp.vdot(g_flat, v)
                err = float(abs(fd - analytic))
                scale = max(float(abs(fd)), float(abs(analytic)), 1.0)
                worst_abs, worst_rel = max(worst_abs, err), max(worst_rel, err / scale)
            fd_abs.append(worst_abs)
            fd_rel.append(worst_rel)

        # (c) jit and vmap agree with the plain call, for the value and the VJP.
        def value_and_vjp(*a):
            o, f_vjp = jax.vjp(rule, *a)
            return o, f_vjp(ct)

        plain = value_and_vjp(*args)
        jit_abs = _max_abs(_tree_diff(jax.jit(value_and_vjp)(*args), plain))
        other = jax.tree_util.tree_map(
            lambda x: x + 0.01 * jax.random.normal(k_vmap, jnp.shape(x), x.dtype)
            if jnp.issubdtype(x.dtype, jnp.floating) else x, args)
        stacked = jax.tree_util.tree_map(lambda x, y: jnp.stack([x, y]), args, other)
        batched = jax.vmap(value_and_vjp)(*stacked)
        second = value_and_vjp(*other)
        vmap_abs = max(_max_abs(_tree_diff(jax.tree_util.tree_map(lambda x: x[0], batched), plain)),
                       _max_abs(_tree_diff(jax.tree_util.tree_map(lambda x: x[1], batched), second)))
    return CheckResult(name, argnums, tuple(ad_abs), tuple(ad_rel), tuple(fd_abs), tuple(fd_rel),
                       jit_abs, vmap_abs)


# --- the registry of every rule with inputs away from kinks -----------------------
def _away_from_zero(x, margin=0.1):
    return jnp.where(x >= 0, x + margin, x - margin)


def _inputs(kind, key, batch):
    """Inputs for one case; ``batch`` is None (one example) or an int."""
    lead = () if batch is None else (batch,)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    n_in, n_out, n_cls = 5, 4, 6
    normal = functools.partial(jax.random.normal, dtype=jnp.float64)
    if kind == "dense":
        return (normal(k1, (n_out, n_in)), normal(k2, (n_out,)), normal(k3, lead + (n_in,)))
    if kind == "activation":
        return (_away_from_zero(normal(k1, lead + (n_out,))),)
    if kind == "prelu":
        return (_away_from_zero(normal(k1, lead + (n_out,))), 0.25 + 0.1 * normal(k2, (n_out,)))
    if kind == "regression":
        y = normal(k1, lead + (n_out,))
        return (y, y + _away_from_zero(normal(k2, lead + (n_out,))))
    if kind == "probabilities":
        return (jax.nn.softmax(normal(k1, lead + (n_cls,))), jax.nn.softmax(normal(k2, lead + (n_cls,))))
    if kind == "labels":
        return (3.0 * normal(k1, lead + (n_cls,)), jax.random.randint(k2, lead, 0, n_cls))
    if kind == "batch_norm":
        return (normal(k1, (batch or 5, n_out)) * 2 + 1, 1 + 0.2 * normal(k2, (n_out,)), normal(k3, (n_out,)))
    if kind == "dropout":
        return (normal(k1, lead + (n_out,)), k2)
    if kind == "params":
        params = [{"W": normal(k1, (n_out, n_in)), "b": normal(k2, (n_out,))},
                  {"W": normal(k3, (2, n_out)), "b": normal(k4, (2,))}]
        return (params, jnp.asarray(0.3, jnp.float64))
    raise ValueError(kind)


def _cases():
    cases = [("dense", layers.dense, reference.dense, "dense")]
    for act in ["identity", "sigmoid", "tanh", "relu", "step", "sign", "softmax"]:
        cases.append((act, getattr(activations, act), getattr(reference, act), "activation"))
    cases.append(("leaky_relu", functools.partial(activations.leaky_relu, slope=0.1),
                  functools.partial(reference.leaky_relu, slope=0.1), "activation"))
    cases.append(("prelu", activations.prelu, reference.prelu, "prelu"))
    for loss, kind in [("half_sse", "regression"), ("sse", "regression"), ("mse", "regression"),
                       ("mae", "regression"), ("cross_entropy", "probabilities"),
                       ("softmax_cross_entropy", "labels")]:
        for reduction in ("mean", "sum"):
            cases.append((f"{loss}[{reduction}]", functools.partial(getattr(losses, loss), reduction=reduction),
                          functools.partial(getattr(reference, loss), reduction=reduction), kind))
    cases.append(("l2_penalty", losses.l2_penalty, reference.l2_penalty, "params"))
    cases.append(("batch_norm", norm.batch_norm, reference.batch_norm, "batch_norm"))
    cases.append(("dropout(p=0.3)", lambda x, key: norm.dropout(x, 0.3, key),
                  lambda x, key: reference.dropout(x, 0.3, key), "dropout"))
    return cases


CASES = _cases()


def check_all(key=None, batch_sizes=(None, 7)):
    """Run ``check`` on every registered rule, for one example and for a batch."""
    key = jax.random.PRNGKey(0) if key is None else key
    results = []
    with jax.enable_x64(True):
        for n, (name, rule, ref, kind) in enumerate(CASES):
            for batch in batch_sizes:
                if kind in ("params", "batch_norm") and batch is None:
                    continue
                if kind == "params" and batch is not None and batch != batch_sizes[-1]:
                    continue
                label = f"{name} ({'params' if kind == 'params' else 'one example' if batch is None else f'batch {batch}'})"
                args = _inputs(kind, jax.random.fold_in(key, n), batch)
                results.append(check(rule, ref, *args, name=label, key=jax.random.fold_in(key, 1000 + n)))
    return results


def format_table(results):
    """A markdown table, one row per rule: worst errors over its arguments."""
    rows = ["| rule | args checked | vs autodiff (max rel) | vs finite diff (max rel) | jit | vmap | ok |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r.name} | {len(r.argnums)} | {max(r.autodiff_rel, default=0):.1e} | "
                    f"{max(r.fd_rel, default=0):.1e} | {r.jit_abs:.0e} | {r.vmap_abs:.0e} | "
                    f"{'yes' if r.ok else 'NO'} |")
    return "\n".join(rows)
