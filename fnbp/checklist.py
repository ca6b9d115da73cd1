"""Every rule of fnbp with inputs for ``fnbp.check``: what ``fnbp check`` runs.

``CASES`` lists (name, rule, reference, kind); ``check_all`` checks each for one
example and for a batch, ``format_table`` prints the result.  Inputs are drawn at
random in float64 (pre-activations and residuals pushed away from 0 by 0.1, so no
case sits on a kink; ``fnbp.check`` would report and skip such coordinates anyway).
"""
import functools

import jax
import numpy as np

from . import activations, layers, losses, norm, reference, regularization
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
        return (normal(lead + (n_out,)), jax.random.PRNGKey(int(rng.integers(2**31))))
    if kind == "params":
        params = [{"W": normal((n_out, n_in)), "b": normal((n_out,))},
                  {"W": normal((2, n_out)), "b": normal((2,))}]
        return (params, np.float64(0.3))
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
    cases.append(("dropout", lambda x, key: regularization.dropout(x, 0.3, key), lambda x, key: reference.dropout(x, 0.3, key),
                  "dropout"))
    return cases


CASES = _cases()


def case_names():
    """The registered rules' names (what ``fnbp check --rule`` accepts)."""
    return [name for name, *_ in CASES]


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
    for n, (name, rule, ref, kind) in enumerate(CASES):
        if rules is not None and name not in rules:
            continue
        for batch in batch_sizes:
            if kind in ("params", "batch_norm") and batch is None:
                continue
            if kind == "params" and batch is not None and batch != batch_sizes[-1]:
                continue
            label = f"{name} ({'params' if kind == 'params' else 'one example' if batch is None else f'batch {batch}'})"
            args = _inputs(kind, np.random.default_rng([seed, n, batch or 0]), batch)
            todo.append((rule, ref, args, label, jax.random.PRNGKey(1000 * seed + n)))
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
