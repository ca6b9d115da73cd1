"""Every rule of fnbp with inputs for ``fnbp.check``: what ``fnbp check`` runs.

The rows are registered beside each rule's definition (:mod:`fnbp.check_cases`: the rule, the
name of its plain-jnp reference in :mod:`fnbp.reference`, the kind of inputs); importing the
modules below registers them.  This module draws the inputs of each kind: ``check_all`` checks
each row for one example and for a batch, ``format_table`` prints the result.  Inputs are drawn
at random in float64 (pre-activations and residuals pushed away from 0 by 0.1, so no case sits on
a kink; ``fnbp.check`` would report and skip such coordinates anyway).
"""
import functools

import jax
import numpy as np

from . import (activations, check_cases, conv, feedback, layers, losses, norm, ops,  # noqa: F401  (registering)
               per_example, pool, reference, regularization)
from .crosscheck import check_many

__all__ = ["CASES", "case_names", "check_all", "format_row", "format_table"]


def _away_from_zero(x, margin=0.1):
    return np.where(x >= 0, x + margin, x - margin)


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _inputs(kind, rng, batch):
    """Float64 numpy inputs for one case (no compilation); ``batch`` is None (one example) or an int."""
    lead = () if batch is None else (batch,)
    n_in, n_out, n_cls = 5, 4, 6
    normal = rng.standard_normal
    if kind == "dense":
        return (normal((n_out, n_in)), normal((n_out,)), normal(lead + (n_in,)))
    if kind == "activation":
        return (_away_from_zero(normal(lead + (n_out,))),)
    if kind == "prelu":
        return (_away_from_zero(normal(lead + (n_out,))), 0.25 + 0.1 * normal((n_out,)))
    if kind == "regression":
        y = normal(lead + (n_out,))
        return (y, y + _away_from_zero(normal(lead + (n_out,))))
    if kind == "probabilities":
        return (_softmax(normal(lead + (n_cls,))), _softmax(normal(lead + (n_cls,))))
    if kind == "labels":
        return (3.0 * normal(lead + (n_cls,)), rng.integers(0, n_cls, lead).astype(np.int32))
    if kind == "batch_norm":
        return (normal((batch or 5, n_out)) * 2 + 1, 1 + 0.2 * normal((n_out,)), normal((n_out,)))
    if kind == "dropout":
        return (normal(lead + (n_out,)), 0.3, jax.random.PRNGKey(int(rng.integers(2**31))))
    if kind == "params":
        params = [{"W": normal((n_out, n_in)), "b": normal((n_out,))},
                  {"W": normal((2, n_out)), "b": normal((2,))}]
        return (params, np.float64(0.3))
    if kind == "dropout_rows":
        return (normal((batch, n_out)), 0.3, jax.random.split(jax.random.PRNGKey(int(rng.integers(2**31))), batch))
    if kind == "pair":                # v broadcast along the batch (add/mul sum its cotangent back)
        return (normal(lead + (n_out,)), normal((n_out,)))
    if kind == "positive":
        return (np.exp(normal(lead + (n_out,))),)
    if kind == "bn_eval":
        return (normal(lead + (n_out,)), 1 + 0.2 * normal((n_out,)), normal((n_out,)), normal((n_out,)),
                1 + np.abs(normal((n_out,))))
    if kind == "dense_fa":
        return (normal((n_out, n_in)), normal((n_out,)), normal(lead + (n_in,)), normal((n_out, n_in)))
    if kind == "conv":
        return (normal((3, 2, 3, 3)), normal((3,)), normal((batch, 6, 5, 2)))
    if kind == "maps":
        return (normal((batch, 6, 6, 2)),)
    if kind == "maps_bn":
        return (normal((batch, 4, 3, 2)) * 2 + 1, 1 + 0.2 * normal((2,)), normal((2,)))
    if kind in ("elman", "lstm", "gru"):     # (W_x, W_h, biases..., x (B, T, n_in), states...), T = 3, H = 3
        k, H, B, T = {"elman": 1, "lstm": 4, "gru": 3}[kind], 3, batch, 3
        biases = (normal((k * H,)),) * (2 if kind == "gru" else 1)
        states = (normal((B, H)),) * (2 if kind == "lstm" else 1)
        return (0.5 * normal((k * H, n_in)), 0.5 * normal((k * H, H))) + tuple(0.5 * b for b in biases) + (
            normal((B, T, n_in)),) + tuple(0.5 * s for s in states)
    if kind == "embedding":
        return (normal((7, n_out)), rng.integers(0, 7, (batch, 3)).astype(np.int32))
    raise ValueError(f"fnbp.checklist: no inputs of kind {kind!r}")


def _checked(case, args):
    """(fn, ref, args) as ``check_many`` takes them: options bound, fixed inputs closed over, and for a
    surrogate row fn's value replaced by the reference's (its backward kept)."""
    ref = getattr(reference, case.reference) if isinstance(case.reference, str) else case.reference
    fn = case.fn
    if case.options:
        fn, ref = functools.partial(fn, **case.options), functools.partial(ref, **case.options)
    if case.surrogate:
        plain_fn = fn

        def fn(*a):
            out = plain_fn(*a)
            return out + jax.lax.stop_gradient(ref(*a) - out)
    if case.argnums is None:
        return fn, ref, args

    def closed(f):
        def g(*checked):
            full = list(args)
            for i, v in zip(case.argnums, checked):
                full[i] = v
            return f(*full)
        return g
    return closed(fn), closed(ref), tuple(args[i] for i in case.argnums)


CASES = check_cases.CASES


def case_names():
    """The registered rules' names (what ``fnbp check --rule`` accepts)."""
    return [case.name for case in CASES]


def check_all(seed=0, batch_sizes=(None, 7), rules=None, on_result=None, chunk=8):
    """Run ``fnbp.check`` on every registered rule (or those named in ``rules``), for one example and a batch.

    ``on_result(result)`` is called after each check (progress display); ``chunk`` checks
    share one compiled program.
    """
    if rules is not None:
        unknown = sorted(set(rules) - set(case_names()))
        if unknown:
            raise ValueError(f"fnbp check: unknown rule(s) {', '.join(unknown)}; the rules are "
                             f"{', '.join(case_names())}")
    todo = []
    for n, case in enumerate(CASES):
        if rules is not None and case.name not in rules:
            continue
        for batch in batch_sizes:
            if case.batch_only and batch is None:
                continue
            if case.inputs == "params" and batch != batch_sizes[-1]:
                continue
            label = (f"{case.name} ({'params' if case.inputs == 'params' else 'one example' if batch is None else f'batch {batch}'})")
            args = _inputs(case.inputs, np.random.default_rng([seed, n, batch or 0]), batch)
            fn, ref, args = _checked(case, args)
            todo.append((fn, ref, args, label, jax.random.PRNGKey(1000 * seed + n)))
    results = []
    for start in range(0, len(todo), chunk):              # one compiled program per chunk of checks
        for result in check_many(todo[start:start + chunk]):
            results.append(result)
            if on_result is not None:
                on_result(result)
    return results


def format_row(r):
    """One markdown table row for a ``CheckResult``."""
    return (f"| {r.name} | {len(r.argnums)} | {max(r.autodiff_rel, default=0):.1e} | "
            f"{max(r.fd_rel, default=0):.1e} | {sum(r.fd_coords)} | {r.vmap_abs:.0e} | "
            f"{'yes' if r.ok else 'NO'} |")


TABLE_HEADER = ("| rule | args checked | vs autodiff (max rel) | vs finite diff (max rel) | coords | vmap | ok |\n"
                "|---|---|---|---|---|---|---|")


def format_table(results):
    """A markdown table, one row per rule: worst errors over its arguments."""
    return "\n".join([TABLE_HEADER] + [format_row(r) for r in results])
