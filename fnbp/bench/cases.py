"""The cases of ``fnbp.bench`` (see ``registry``): the GEMM limit, one MLP training step, the
weight-gradient layouts, the optimizer update alone, and per-example gradients.

Each ``bench_*`` function is usable on its own (plain arguments, returns the report section);
the ``register`` calls at the bottom wire them to a run's ``Context``.
"""
import re
import time

import numpy as np

from . import report
from .harness import dot_summary, interleaved, normalized_program, paired_ratio, summarize, temp_bytes
from .registry import register
from .steps import (LABELS, LEARNING_RATE, SHORT, AdamOnly, Gemm, GemmsOnly, JaxStep, TorchStep, fnbp_loss,
                    init_params, make_data, peer_loss, step_flops, step_functions)


def bench_gemm(sizes, min_time, seed, cores):
    """Interleaved sweep of square GEMM sizes; returns the table and the best size."""
    gemms = {n: Gemm(n, seed) for n in sizes}
    samples = interleaved({n: g for n, g in gemms.items()}, min_time, min_samples=5, calibrate=tuple(gemms))
    rows = {n: summarize(samples[n], flops=gemms[n].flops, cores=cores) for n in sizes}
    best = max(sizes, key=lambda n: rows[n]["gflops"])
    return {"sizes": {str(n): rows[n] for n in sizes}, "best_size": int(best),
            "rate_gflops": rows[best]["gflops"],
            "rate_gflops_best_sample": max(r["gflops_best"] for r in rows.values()),
            "rate_gflop_per_cpu_s": rows[best]["gflop_per_cpu_s"]}


def bench_train_step(sizes, batch_size, *, min_time, seed, gemm_size, use_torch, threads, cores, log,
                     torch_skip_reason="torch not installed"):
    import jax
    x_np, y_np = make_data(sizes, batch_size, seed + 1)
    params = init_params(sizes, seed)
    x, y = jax.numpy.asarray(x_np), jax.numpy.asarray(y_np)
    flops = step_flops(sizes, batch_size)
    runners = {}
    for name, (fn, opt) in step_functions().items():
        runners[name] = JaxStep(fn, opt, params, x, y)
    if use_torch:
        runners["torch_eager"] = TorchStep(params, x_np, y_np, threads)
    gemm = Gemm(gemm_size, seed)
    runners["gemm"] = gemm
    runners["diag_gemms_only"] = GemmsOnly(sizes, batch_size, seed)
    runners["diag_adam_only"] = AdamOnly(params, seed)
    samples = interleaved(runners, min_time, min_samples=5, calibrate=("gemm", "diag_gemms_only", "diag_adam_only"))
    gemm_stats = summarize(samples["gemm"], flops=gemm.flops, cores=cores)
    out = {"batch_size": batch_size, "flops": flops, "gemm_size": gemm_size,
           "gemm_gflops_concurrent": gemm_stats["gflops"],
           "gemm_gflop_per_cpu_s_concurrent": gemm_stats["gflop_per_cpu_s"], "variants": {}}
    peer = samples["peer_jax"]
    peer_wall, peer_cpu = float(np.median(peer["wall"])), float(np.median(peer["cpu"]))
    for name, r in runners.items():
        if name == "gemm":
            out["variants"][name] = dict(gemm_stats, label=LABELS[name] + f" (n = {gemm_size}, interleaved)")
            continue
        if name.startswith("diag_"):
            continue
        row = summarize(samples[name], flops=flops, batch_size=batch_size, cores=cores)
        row["label"] = LABELS[name]
        row["frac_gemm"] = row["gflops"] / gemm_stats["gflops"]
        row["frac_gemm_cpu"] = row["gflop_per_cpu_s"] / gemm_stats["gflop_per_cpu_s"]
        row["ratio_to_peer"] = row["ms_median"] / (1e3 * peer_wall)
        row["ratio_to_peer_paired"] = paired_ratio(samples[name], peer)
        row["ratio_to_peer_cpu"] = row["cpu_ms_median"] / (1e3 * peer_cpu)
        row["ratio_to_peer_cpu_paired"] = paired_ratio(samples[name], peer, "cpu")
        row["final_loss"] = float(r.last_loss)
        if isinstance(r, JaxStep):
            row["compile_s"] = r.compile_s
            row["temp_bytes"] = r.temp_bytes
            row["hlo_dots"] = dot_summary(r.hlo)
        else:
            row["compile_s"] = None
            row["temp_bytes"] = None
        out["variants"][name] = row
    if not use_torch:
        out["variants"]["torch_eager"] = {"label": LABELS["torch_eager"], "skipped": torch_skip_reason}
    peer_temp = out["variants"]["peer_jax"]["temp_bytes"]
    for name in ("fnbp_autodiff", "fnbp_backprop"):
        t = out["variants"][name]["temp_bytes"]
        out["variants"][name]["temp_ratio_to_peer"] = (t / peer_temp if t is not None and peer_temp else None)
    ours_cpu = out["variants"]["fnbp_autodiff"]["cpu_ms_median"]
    g = summarize(samples["diag_gemms_only"], flops=flops, cores=cores)
    a = summarize(samples["diag_adam_only"], cores=cores)
    out["diagnostics"] = {
        "gemms_only": dict(g, frac_gemm_cpu=g["gflop_per_cpu_s"] / gemm_stats["gflop_per_cpu_s"],
                           share_of_fnbp_step_cpu=g["cpu_ms_median"] / ours_cpu,
                           hlo_dots=dot_summary(runners["diag_gemms_only"].hlo)),
        "adam_only": dict(a, share_of_fnbp_step_cpu=a["cpu_ms_median"] / ours_cpu),
        "rest_share_of_fnbp_step_cpu": 1 - (g["cpu_ms_median"] + a["cpu_ms_median"]) / ours_cpu,
        "autodiff_and_backprop_same_program": normalized_program(runners["fnbp_autodiff"].hlo)
        == normalized_program(runners["fnbp_backprop"].hlo),
    }
    log(f"  B={batch_size}: " + ", ".join(
        f"{SHORT[n]} {v['ms_median']:.3f} ms ({v['cpu_ms_median']:.3f} CPU)" for n, v in out["variants"].items()
        if "ms_median" in v))
    return out


def bench_optimizer(sizes, *, min_time, seed, cores):
    """The Adam update alone: fnbp.optim.adam vs optax.adam (update + apply_updates), jit, donated."""
    import jax
    import optax
    from fnbp import optim
    params = init_params(sizes, seed)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    runners = {"fnbp_adam": AdamOnly(params, seed, optim.adam(LEARNING_RATE), optim.apply_updates),
               "optax_adam": AdamOnly(params, seed, optax.adam(LEARNING_RATE), optax.apply_updates)}
    samples = interleaved(runners, min_time, min_samples=20)
    rows = {}
    for n, r in runners.items():
        row = summarize(samples[n], cores=cores)
        row["compile_s"], row["temp_bytes"] = r.compile_s, r.temp_bytes
        entry = re.sub(r", metadata=\{[^}]*\}", "", r.hlo[r.hlo.index("ENTRY"):])
        row["n_fusions"] = len(re.findall(r"= [^\n]*fusion\(", entry))
        row["elementwise_divides"] = len(re.findall(r"= f32\[\d[\d,]*\]\{[\d,]*\} divide\(", r.hlo))
        # bytes an ideal single pass moves: read g, s, r, theta; write s, r, theta (float32)
        row["ideal_bytes_per_update"] = 7 * 4 * n_params
        row["effective_gb_per_s"] = row["ideal_bytes_per_update"] / (row["ms_median"] / 1e3) / 1e9
        rows[n] = row
    f, o = rows["fnbp_adam"], rows["optax_adam"]
    return {"n_params": n_params, "variants": rows,
            "ratio_fnbp_to_optax": f["ms_median"] / o["ms_median"],
            "ratio_fnbp_to_optax_paired": paired_ratio(samples["fnbp_adam"], samples["optax_adam"]),
            "ratio_fnbp_to_optax_cpu": f["cpu_ms_median"] / o["cpu_ms_median"],
            "ratio_fnbp_to_optax_cpu_paired": paired_ratio(samples["fnbp_adam"], samples["optax_adam"], "cpu")}


def bench_per_example(sizes, batch_size, *, min_time, seed, cores):
    """Per-example gradients vmap(grad(loss of one example)): our rules vs the plain-jnp forward."""
    import jax
    import jax.numpy as jnp
    params = init_params(sizes, seed)
    x_np, y_np = make_data(sizes, batch_size, seed + 3)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)

    class PerExample:
        def __init__(self, loss):
            f = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0)))
            t0 = time.perf_counter()
            self.compiled = f.lower(params, x, y).compile()
            self.compile_s = time.perf_counter() - t0
            self.temp_bytes = temp_bytes(self.compiled)
            self.out = None

        def __call__(self):
            self.out = self.compiled(params, x, y)
            jax.block_until_ready(self.out)

    runners = {"fnbp_rules": PerExample(fnbp_loss), "peer_autodiff": PerExample(peer_loss)}
    samples = interleaved(runners, min_time, min_samples=5)
    a = jax.tree_util.tree_leaves(runners["fnbp_rules"].out)
    b = jax.tree_util.tree_leaves(runners["peer_autodiff"].out)
    max_rel = max(float(jnp.max(jnp.abs(u - v)) / (jnp.max(jnp.abs(v)) + 1e-30)) for u, v in zip(a, b))
    rows = {}
    for n, r in runners.items():
        row = summarize(samples[n], batch_size=batch_size, cores=cores)
        row["compile_s"], row["temp_bytes"] = r.compile_s, r.temp_bytes
        rows[n] = row
    f, o = rows["fnbp_rules"], rows["peer_autodiff"]
    return {"batch_size": batch_size, "variants": rows, "max_rel_diff": max_rel,
            "ratio_fnbp_to_peer": f["ms_median"] / o["ms_median"],
            "ratio_fnbp_to_peer_paired": paired_ratio(samples["fnbp_rules"], samples["peer_autodiff"]),
            "ratio_fnbp_to_peer_cpu": f["cpu_ms_median"] / o["cpu_ms_median"]}


def bench_grad_w_layouts(sizes, batch_sizes, *, min_time, seed, cores, layers=None):
    """The weight gradient delta^T H of each layer in the two layouts ``fnbp.layers.dense_backward``
    chooses between: the batch axis contracted in place as the leading axis of both operands
    (``dot_general(delta, H, contract 0 with 0)``), or delta^T materialised as an (n_out, B) array
    first (what dense_backward does for n_out <= NARROW_GRAD_W).  Interleaved per shape."""
    import jax
    import jax.numpy as jnp
    from jax import lax
    from fnbp.layers import NARROW_GRAD_W

    def in_place(d, h):
        return lax.dot_general(d, h, (((0,), (0,)), ((), ())))

    def materialized(d, h):
        return lax.dot_general(lax.optimization_barrier(d.T), h, (((1,), (0,)), ((), ())))

    rng = np.random.default_rng(seed)
    shapes = list(zip(sizes[:-1], sizes[1:]))
    layers = range(len(shapes)) if layers is None else layers
    rows = []
    for k in layers:
        n_in, n_out = shapes[k]
        for B in batch_sizes:
            d = jnp.asarray(rng.standard_normal((B, n_out)), jnp.float32)
            h = jnp.asarray(rng.standard_normal((B, n_in)), jnp.float32)
            fns = {}
            for name, f in (("in_place", in_place), ("materialized_T", materialized)):
                c = jax.jit(f).lower(d, h).compile()
                fns[name] = (lambda c=c: c(d, h).block_until_ready())
                fns[name].ynn = "__ynn_fusion" in c.as_text()
            samples = interleaved(fns, min_time, min_samples=20)
            flops = 2 * B * n_out * n_in
            row = {"layer": k, "n_out": n_out, "n_in": n_in, "batch_size": B, "flops": flops,
                   "chosen": "materialized_T" if n_out <= NARROW_GRAD_W and B > 1 else "in_place"}
            for name in fns:
                row[name] = dict(summarize(samples[name], flops=flops, cores=cores), ynn=fns[name].ynn)
            row["speedup_materialized_cpu"] = (row["in_place"]["cpu_ms_median"]
                                               / row["materialized_T"]["cpu_ms_median"])
            row["speedup_materialized"] = row["in_place"]["ms_median"] / row["materialized_T"]["ms_median"]
            rows.append(row)
    return {"narrow_grad_w": NARROW_GRAD_W, "rows": rows}


def targets(result):
    """The issue's targets, checked against this run (report only; never asserted).

    Step-time targets are checked on wall-clock medians (the headline) and, alongside, on
    process CPU time per step (what the step costs, whatever share of the machine it got)."""
    rows = []
    for s in result["train_step"]:
        v = s["variants"]
        B = s["batch_size"]
        for name in ("fnbp_autodiff", "fnbp_backprop"):
            r = v[name]
            rows.append({"target": f"{SHORT[name]}: step time <= 1.00x peer (aim 0.95x)", "batch_size": B,
                         "value": r["ratio_to_peer"], "value_cpu": r["ratio_to_peer_cpu"],
                         "met": bool(r["ratio_to_peer"] <= 1.0), "met_cpu": bool(r["ratio_to_peer_cpu"] <= 1.0)})
            if r["temp_bytes"] is not None and v["peer_jax"]["temp_bytes"] is not None:
                rows.append({"target": f"{SHORT[name]}: temp memory <= peer", "batch_size": B,
                             "value": r["temp_bytes"] / max(v["peer_jax"]["temp_bytes"], 1),
                             "met": bool(r["temp_bytes"] <= v["peer_jax"]["temp_bytes"])})
            if B >= 512:
                rows.append({"target": f"{SHORT[name]}: >= 90% of the GEMM rate (B >= 512)", "batch_size": B,
                             "value": r["frac_gemm"], "value_cpu": r["frac_gemm_cpu"],
                             "met": bool(r["frac_gemm"] >= 0.9), "met_cpu": bool(r["frac_gemm_cpu"] >= 0.9)})
            if "ms_median" in v.get("torch_eager", {}):
                t = v["torch_eager"]
                rows.append({"target": f"{SHORT[name]}: faster than torch eager", "batch_size": B,
                             "value": r["ms_median"] / t["ms_median"],
                             "value_cpu": r["cpu_ms_median"] / t["cpu_ms_median"],
                             "met": bool(r["ms_median"] < t["ms_median"]),
                             "met_cpu": bool(r["cpu_ms_median"] < t["cpu_ms_median"])})
    return rows


# --------------------------------------------------------------------------- registration
def _run_gemm(ctx):
    ctx.log(f"GEMM sweep {ctx.gemm_sizes} ...")
    out = bench_gemm(ctx.gemm_sizes, ctx.min_time if ctx.quick else ctx.min_time / 2, ctx.seed, ctx.cores)
    ctx.log(f"  GEMM rate {out['rate_gflops']:.1f} GFLOP/s at n={out['best_size']}")
    return out


def _run_train_step(ctx):
    return [bench_train_step(ctx.sizes, B, min_time=ctx.min_time, seed=ctx.seed,
                             gemm_size=ctx.results["gemm"]["best_size"], use_torch=ctx.use_torch,
                             threads=ctx.threads, cores=ctx.cores, log=ctx.log,
                             torch_skip_reason=ctx.torch_skip_reason)
            for B in ctx.batch_sizes]


def _run_grad_w_layouts(ctx):
    ctx.log("weight-gradient layouts ...")
    return bench_grad_w_layouts(ctx.sizes, ctx.batch_sizes, min_time=ctx.min_time / 4, seed=ctx.seed,
                                cores=ctx.cores, layers=[len(ctx.sizes) - 2] if ctx.quick else None)


def _run_optimizer(ctx):
    ctx.log("optimizer update alone ...")
    return bench_optimizer(ctx.sizes, min_time=ctx.min_time, seed=ctx.seed, cores=ctx.cores)


def _run_per_example(ctx):
    ctx.log("per-example gradients ...")
    B = min(ctx.per_example_batch, 32) if ctx.quick else ctx.per_example_batch
    return bench_per_example(ctx.sizes, B, min_time=ctx.min_time, seed=ctx.seed, cores=ctx.cores)


register("gemm", run=_run_gemm, render=report.render_gemm,
         help="the limit: interleaved sweep of square float32 GEMMs (jit(a @ b))")
register("train_step", run=_run_train_step, render=report.render_train_step, summary=report.summary_train_step,
         requires=("gemm",), help="one MLP training step: fnbp (autodiff, backprop) vs jax+optax vs torch eager")
register("grad_w_layouts", run=_run_grad_w_layouts, render=report.render_grad_w_layouts,
         help="the weight gradient delta^T H in both layouts fnbp.layers.dense_backward chooses between")
register("optimizer", run=_run_optimizer, render=report.render_optimizer, summary=report.summary_optimizer,
         help="the Adam update alone: fnbp.optim.adam vs optax.adam")
register("per_example", run=_run_per_example, render=report.render_per_example,
         summary=report.summary_per_example, help="per-example gradients jit(vmap(grad)): fnbp rules vs plain jnp")
