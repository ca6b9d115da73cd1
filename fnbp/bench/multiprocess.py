"""The multi-process case of ``fnbp.bench``: the data-parallel fnbp step over 2 processes x 2 simulated
CPU devices (``jax.distributed`` over 127.0.0.1, gloo collectives), beside the simulated-devices row.

Both processes run ``python -m fnbp.bench.multiprocess`` (the child below): each joins the run
(``fnbp.parallel.initialize``), builds the 4-device global mesh, and alternates a fixed number of
rounds of (the 4-device data-parallel step, the same step on its own first device) -- a fixed count,
not a time budget, because every process must run the same collective steps.  Process 0 reports.
"""
import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from .harness import summarize
from .registry import register
from .report import device_ratio_summary

N_PROCESSES, DEVICES_PER_PROCESS = 2, 2
MARKER = "@@MULTIPROCESS@@"


def child(argv=None):
    p = argparse.ArgumentParser(prog="python -m fnbp.bench.multiprocess")
    p.add_argument("--coordinator"), p.add_argument("--process-id", type=int)
    p.add_argument("--sizes"), p.add_argument("--batch-size", type=int), p.add_argument("--rounds", type=int)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from fnbp import parallel
    parallel.initialize(a.coordinator, N_PROCESSES, a.process_id)
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from .steps import JaxStep, init_params, make_data, step_flops, step_functions
    sizes, B = tuple(int(s) for s in a.sizes.split(",")), a.batch_size
    mesh = parallel.make_mesh()
    fn, opt = step_functions()["fnbp_autodiff"]
    x_np, y_np = make_data(sizes, B, a.seed + 1)
    params = init_params(sizes, a.seed)

    def place_dp(p_, s, x, y):
        p_, s = parallel.replicate(mesh, (p_, s))
        sh = parallel.batch_sharding(mesh)
        x, y = (jax.make_array_from_callback(v.shape, sh, lambda idx, v=v: v[idx]) for v in (x, y))
        return p_, s, x, y

    def place_one(p_, s, x, y):
        return jax.device_put((p_, s, x, y), jax.local_devices()[0])

    runners = {"multi_process": JaxStep(fn, opt, params, x_np, y_np, place=place_dp),
               "one_device": JaxStep(fn, opt, params, x_np, y_np, place=place_one)}
    samples = {n: {"wall": [], "cpu": []} for n in runners}
    for r in range(2 + a.rounds):                    # 2 warm-up rounds; the same order in every process
        for n in (runners if r % 2 == 0 else reversed(list(runners))):
            t0, c0 = time.perf_counter(), time.process_time()
            runners[n]()
            if r >= 2:
                samples[n]["wall"].append(time.perf_counter() - t0)
                samples[n]["cpu"].append(time.process_time() - c0)
    flops = step_flops(sizes, B)
    row = {"batch_size": B, "flops": flops, "processes": jax.process_count(), "devices": jax.device_count()}
    for n, r in runners.items():
        v = summarize(samples[n], flops=flops, batch_size=B)
        v["compile_s"] = r.compile_s
        v["all_reduces"] = len(re.findall(r"all-reduce(?:-start)?\(", r.hlo))
        row[n] = v
    row["ratio_mp_to_one_device"] = row["multi_process"]["ms_median"] / row["one_device"]["ms_median"]
    if jax.process_index() == 0:
        print(MARKER + json.dumps(row), flush=True)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_multiprocess(sizes, batch_size, rounds, seed, log, timeout=900):
    """Start the 2 processes; returns their row or why it was not run."""
    label = f"{N_PROCESSES} processes x {DEVICES_PER_PROCESS} simulated CPU devices (jax.distributed, gloo)"
    base = {"label": label, "rows": []}
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                        + f" --xla_force_host_platform_device_count={DEVICES_PER_PROCESS}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    pkg_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    coordinator = f"127.0.0.1:{_free_port()}"
    cmd = [sys.executable, "-m", "fnbp.bench.multiprocess", "--coordinator", coordinator, "--sizes",
           ",".join(map(str, sizes)), "--batch-size", str(batch_size), "--rounds", str(rounds), "--seed", str(seed)]
    log(f"multi-process: {' '.join(cmd[1:])} --process-id 0..{N_PROCESSES - 1}")
    procs = [subprocess.Popen(cmd + ["--process-id", str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(N_PROCESSES)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        return dict(base, status=f"failed: no result within {timeout} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    bad = [(i, p.returncode, outs[i][1]) for i, p in enumerate(procs) if p.returncode != 0]
    if bad:
        i, rc, err = bad[0]
        return dict(base, status=f"failed (process {i}, exit {rc}): {err.strip()[-800:]}")
    line = next((ln for ln in outs[0][0].splitlines() if ln.startswith(MARKER)), None)
    if line is None:
        return dict(base, status=f"failed: no result line from process 0: {outs[0][0][-400:]}")
    return dict(base, status="ok", xla_flags=env["XLA_FLAGS"], rows=[json.loads(line[len(MARKER):])])


def _run(ctx):
    n = N_PROCESSES * DEVICES_PER_PROCESS
    batches = [B for B in ctx.batch_sizes if B % n == 0]
    if not batches:
        return {"label": "multi-process", "status": f"not run: no batch size divisible by {n}", "rows": []}
    return bench_multiprocess(ctx.sizes, batches[-1], 5 if ctx.quick else 20, ctx.seed, ctx.log)


def render(mp, result):
    L = [f"## Data parallel over processes: {mp['label']}\n"]
    if mp["status"] != "ok":
        return L + [f"{mp['status']}\n"]
    L.append("The same fnbp autodiff step as the simulated-devices row, over a 4-device mesh spanning "
             f"{N_PROCESSES} processes on this machine (`fnbp.parallel.initialize`, gradients all-reduced by gloo "
             "over loopback TCP), vs the same step on process 0's first device; a fixed number of alternating "
             "rounds (every process must run the same collectives). Measures the cost of cross-process "
             "collectives on one machine, not a speed-up.\n")
    L.append("| B | run | ms/step median [IQR] | examples/s | CPU ms (process 0) | all-reduces | ratio to 1 device |")
    L.append("|---|---|---|---|---|---|---|")
    for r in mp["rows"]:
        for n, lab in (("multi_process", mp["label"]), ("one_device", "1 device (process 0)")):
            x = r[n]
            ratio = f"{r['ratio_mp_to_one_device']:.3f}" if n == "multi_process" else "1"
            L.append(f"| {r['batch_size']} | {lab} | {x['ms_median']:.3f} [{x['ms_q1']:.3f}–{x['ms_q3']:.3f}] | "
                     f"{x['examples_per_s']:.0f} | {x['cpu_ms_median']:.3f} | {x['all_reduces']} | {ratio} |")
    return L + [""]


def summary(mp):
    return device_ratio_summary(mp, "multi_process", "ratio_mp_to_one_device")


register("multiprocess", run=_run, render=render, summary=summary,
         help="data parallel over 2 processes x 2 simulated CPU devices (jax.distributed, gloo) vs one device")

if __name__ == "__main__":
    child()
