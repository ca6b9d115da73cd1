"""The rule tests' access to fnbp's one oracle (``fnbp.crosscheck``): our VJP vs autodiff of the
plain reference and vs central finite differences, all cases of a file compiled into one program.

Used by tests/test_layers.py, tests/test_activations.py and tests/test_losses.py.
"""
import jax
import numpy as np

from fnbp import crosscheck
from fnbp.crosscheck import AUTODIFF_RTOL as AD_RTOL, FD_TOL as FD_RTOL     # the one oracle's tolerances


def max_rel(x, ref):
    """max |x - ref| / max |ref|; the absolute error when ref is all zeros."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert x.shape == ref.shape, (x.shape, ref.shape)
    if not ref.size:
        return 0.0
    diff, scale = np.max(np.abs(x - ref)), np.max(np.abs(ref))
    return float(diff / scale) if scale > 0 else float(diff)


def compile_fast(fn, *args):
    """fn(*args) through jax.jit, compiled without XLA's backend optimisations.

    The oracles below compile many small one-off programs; the optimisations buy
    nothing at these sizes and cost ~40% of the compile time.  (Plain ``jax.jit``
    is what the jit-vs-plain-call tests use.)
    """
    compiled = jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})
    return compiled(*args)


def vjp_check(checks, seed=0, eps=1e-6):
    """Our VJPs against jax.vjp of the references and against finite differences: fnbp's own
    oracle (``fnbp.crosscheck.check_many``, what ``fnbp check`` runs), on every coordinate.

    ``checks`` is a list of (rule, ref, args, argnums); all run in one compiled program.
    Returns one dict per check: ``out`` (our forward), ``c`` (the output cotangent),
    ``grads`` (our VJP, per argnum), ``ad``/``fd`` (per argnum: relative error vs autodiff
    of the reference / vs central finite differences).
    """
    cases = [(rule, ref, args, f"case {k}", jax.random.PRNGKey(1000 * seed + k))
             for k, (rule, ref, args, _) in enumerate(checks)]
    checked = []
    for (_, _, _, argnums), (result, out, c, grads) in zip(checks, crosscheck.check_many(
            cases, eps=eps, n_coords=10**9, values=True)):
        assert result.argnums == tuple(argnums), (result.name, result.argnums, argnums)
        checked.append({"out": out, "c": c, "grads": {i: grads[i] for i in argnums},
                        "ad": dict(zip(argnums, result.autodiff_rel)), "fd": dict(zip(argnums, result.fd_rel)),
                        "result": result})
    return checked


def assert_within_tolerances(results):
    for k, res in enumerate(results):
        for i in res["ad"]:
            assert res["ad"][i] <= AD_RTOL, (k, i, "vs autodiff of the reference", res["ad"][i])
            assert res["fd"][i] <= FD_RTOL, (k, i, "vs finite differences", res["fd"][i])


def away_from_zero(x, margin=0.1):
    return np.where(x >= 0, x + margin, x - margin)


def tree_rel_err(a, b):
    """Largest per-leaf max_rel; the two trees must have the same structure."""
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    return max(max_rel(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
