"""Shared oracle for the rule tests: our custom VJP vs autodiff of the plain reference and
vs central finite differences, all cases of a file compiled into one program.

Used by tests/test_layers.py, tests/test_activations.py and tests/test_losses.py.
"""
import jax
import jax.numpy as jnp
import numpy as np

AD_RTOL = 1e-10     # our VJP vs autodiff of the reference (relative, float64)
FD_RTOL = 1e-6      # our VJP vs central finite differences (relative, float64)


def max_rel(x, ref):
    """max |x - ref| / max |ref|; the absolute error when ref is all zeros."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert x.shape == ref.shape, (x.shape, ref.shape)
    if not ref.size:
        return 0.0
    diff, scale = np.max(np.abs(x - ref)), np.max(np.abs(ref))
    return float(diff / scale) if scale > 0 else float(diff)


def _flat(x):
    """The leaves of the pytree x, flattened into one float64 numpy vector (no jax op: nothing to compile)."""
    return np.concatenate([np.ravel(np.asarray(leaf, np.float64)) for leaf in jax.tree_util.tree_leaves(x)])


def _unravel_like(x):
    """Inverse of _flat for pytrees shaped like x, traceable inside jit."""
    leaves, treedef = jax.tree_util.tree_flatten(x)
    shapes = [np.shape(leaf) for leaf in leaves]
    offsets = np.cumsum([0] + [int(np.prod(s)) for s in shapes])

    def unravel(v):
        return treedef.unflatten([v[offsets[k]:offsets[k + 1]].reshape(shapes[k]) for k in range(len(shapes))])
    return unravel


def compile_fast(fn, *args):
    """fn(*args) through jax.jit, compiled without XLA's backend optimisations.

    The oracles below compile many small one-off programs; the optimisations buy
    nothing at these sizes and cost ~40% of the compile time.  (Plain ``jax.jit``
    is what the jit-vs-plain-call tests use.)
    """
    compiled = jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})
    return compiled(*args)


def vjp_check(checks, seed=0, eps=1e-6):
    """Our VJPs against jax.vjp of the references and against finite differences.

    ``checks`` is a list of (rule, ref, args, argnums).  For each, with a random
    output cotangent c: our VJP c^T J and the reference's (autodiff), and the
    central differences of the scalar <c, rule(...)> along every coordinate of
    every argument in argnums (x +- eps e_k; all 2n evaluations of our forward
    in one vmapped call).  Everything runs in one compiled program (one
    compilation for all checks; jit vs plain calls is tested separately).

    Returns one dict per check: ``out`` (our forward), ``c``, ``grads`` (our
    VJP, per argnum), ``ad``/``fd`` (per argnum: relative error vs autodiff of
    the reference / vs finite differences).
    """
    rng = np.random.default_rng(seed)
    cs, stacks, unravels = [], [], []
    for rule, _, args, argnums in checks:
        cs.append(rng.standard_normal(jax.eval_shape(rule, *args).shape))
        flat = _flat([args[i] for i in argnums])
        steps = eps * np.eye(flat.size)
        stacks.append(np.concatenate([flat + steps, flat - steps]))
        unravels.append(_unravel_like([args[i] for i in argnums]))

    def run(all_args, cs, stacks):
        results = []
        for (rule, ref, _, argnums), args, c, stack, unravel in zip(checks, all_args, cs, stacks, unravels):
            out, vjp_rule = jax.vjp(rule, *args)
            out_ref, vjp_ref = jax.vjp(ref, *args)
            ours, theirs = vjp_rule(c), vjp_ref(c)

            def along(v, rule=rule, args=args, argnums=argnums, c=c, unravel=unravel):
                new = list(args)
                for i, x in zip(argnums, unravel(v)):
                    new[i] = x
                return jnp.vdot(c, rule(*new))
            vals = jax.vmap(along)(stack)
            n = stack.shape[0] // 2
            results.append((out, out_ref, [ours[i] for i in argnums], [theirs[i] for i in argnums],
                            (vals[:n] - vals[n:]) / (2 * eps)))
        return results

    checked = []
    outputs = compile_fast(run, [tuple(check[2]) for check in checks], cs, stacks)
    for (_, _, _, argnums), c, (out, out_ref, ours, theirs, fd) in zip(checks, cs, outputs):
        np.testing.assert_allclose(out, out_ref, rtol=1e-12, atol=1e-12)      # same forward as the reference
        res, start = {"out": np.asarray(out), "c": c, "grads": {}, "ad": {}, "fd": {}}, 0
        for i, g_tree, g_ref in zip(argnums, ours, theirs):
            g = _flat(g_tree)
            fd_i = np.asarray(fd)[start:start + g.size]
            start += g.size
            # relative to the gradient's size; absolute where our gradient vanishes (step, sign), since
            # the differences of a piecewise-constant forward are then rounding noise (~1e-16 |f| / eps)
            scale = max(np.max(np.abs(fd_i)), np.max(np.abs(g))) if np.any(g) else 1.0
            res["grads"][i] = g_tree
            res["ad"][i] = max_rel(g, _flat(g_ref))
            res["fd"][i] = float(np.max(np.abs(fd_i - g)) / scale)
        checked.append(res)
    return checked


def assert_within_tolerances(results):
    for k, res in enumerate(results):
        for i in res["ad"]:
            assert res["ad"][i] <= AD_RTOL, (k, i, "vs autodiff of the reference", res["ad"][i])
            assert res["fd"][i] <= FD_RTOL, (k, i, "vs finite differences", res["fd"][i])


def away_from_zero(x, margin=0.1):
    return np.where(x >= 0, x + margin, x - margin)
