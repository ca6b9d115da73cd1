"""The data-parallel case of ``fnbp.bench``: the fnbp autodiff step over N simulated CPU devices
(``fnbp.parallel``) vs the same step on one of them, in a subprocess (the device count is fixed
when JAX starts: ``python -m fnbp.bench --_simulated-devices N`` is that subprocess).
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from . import report
from .harness import interleaved, summarize
from .registry import register
from .steps import JaxStep, init_params, make_data, step_flops, step_functions


def simulated_child(n_devices, sizes, batch_sizes, min_time, seed):
    """Runs inside the subprocess started with --_simulated-devices N: data-parallel step on N
    simulated CPU devices vs the same step on one of them, interleaved, per batch size."""
    import jax
    from fnbp import parallel
    devices = jax.devices()
    if len(devices) < n_devices:
        raise RuntimeError(f"expected {n_devices} simulated devices, JAX sees {len(devices)} "
                           f"(XLA_FLAGS={os.environ.get('XLA_FLAGS')!r})")
    mesh = parallel.make_mesh(n_devices)
    fn, opt = step_functions()["fnbp_autodiff"]
    rows = []
    for B in batch_sizes:
        parallel.check_batch_size(B, n_devices)
        x_np, y_np = make_data(sizes, B, seed + 1)
        params = init_params(sizes, seed)

        def place_dp(p, s, x, y):
            p, s = parallel.replicate(mesh, (p, s))
            sh = parallel.batch_sharding(mesh)
            return p, s, jax.device_put(x, sh), jax.device_put(y, sh)

        def place_one(p, s, x, y):
            return jax.device_put((p, s, x, y), devices[0])

        runners = {"data_parallel": JaxStep(fn, opt, params, x_np, y_np, place=place_dp),
                   "one_device": JaxStep(fn, opt, params, x_np, y_np, place=place_one)}
        samples = interleaved(runners, min_time, min_samples=5)
        flops = step_flops(sizes, B)
        row = {"batch_size": B, "flops": flops}
        for n, r in runners.items():
            v = summarize(samples[n], flops=flops, batch_size=B, cores=os.cpu_count())
            v["compile_s"], v["temp_bytes"] = r.compile_s, r.temp_bytes
            v["all_reduces"] = len(re.findall(r"all-reduce(?:-start)?\(", r.hlo))
            row[n] = v
        row["ratio_dp_to_one_device"] = row["data_parallel"]["ms_median"] / row["one_device"]["ms_median"]
        row["ratio_dp_to_one_device_cpu"] = (row["data_parallel"]["cpu_ms_median"]
                                             / row["one_device"]["cpu_ms_median"])
        rows.append(row)
    return rows


def bench_simulated(n_devices, sizes, batch_sizes, min_time, seed, log):
    """Start the simulated-devices subprocess; returns its rows or why it was not run."""
    label = f"simulated ({n_devices} CPU devices on {os.cpu_count()} cores)"
    base = {"n_devices": n_devices, "label": label}
    sizes_ok = [B for B in batch_sizes if B % n_devices == 0]
    if not sizes_ok:
        return dict(base, status=f"not run: no batch size divisible by {n_devices}", rows=[])
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n_devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    # the child imports the same fnbp as this process (a source tree on PYTHONPATH or an installed one)
    pkg_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "fnbp.bench", "--_simulated-devices", str(n_devices),
           "--sizes", ",".join(map(str, sizes)), "--batch-sizes", ",".join(map(str, sizes_ok)),
           "--min-time", str(min_time), "--seed", str(seed)]
    log(f"simulated devices: {' '.join(cmd[1:])}")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return dict(base, status=f"failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}", rows=[])
    marker = "@@SIMULATED@@"
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(marker)), None)
    if line is None:
        return dict(base, status=f"failed: no result line in the subprocess output: {proc.stdout[-400:]}", rows=[])
    return dict(base, status="ok", xla_flags=env["XLA_FLAGS"], rows=json.loads(line[len(marker):]))


def _run_simulated(ctx):
    n = ctx.simulated_devices
    if n <= 0:
        return {"n_devices": 0, "label": "simulated devices", "status": "not run: --simulated-devices 0", "rows": []}
    batches = [B for B in ctx.batch_sizes if B % n == 0]
    return bench_simulated(n, ctx.sizes, batches[-1:] if ctx.quick else batches, ctx.min_time, ctx.seed, ctx.log)


register("simulated_devices", run=_run_simulated, render=report.render_simulated, summary=report.summary_simulated,
         help="data parallel over N simulated CPU devices vs one device (subprocess)")
