"""Timing and measuring for ``fnbp.bench``: interleaved repeats, medians, paired ratios, the
machine's description, and what XLA says about a compiled program.

``interleaved`` is the one timing loop every case uses: all variants of one comparison run
side by side, one call of each per round in a shuffled order, so that drift on a shared
machine hits them alike; ``summarize`` turns a variant's samples into medians, quartiles and
rates; ``paired_ratio`` is the median over rounds of the per-round ratio of two variants.
"""
import os
import platform
import re
import time
from pathlib import Path

import numpy as np


def summarize(samples, *, flops=None, batch_size=None, cores=None):
    """Wall-clock median, quartiles, min, max of one variant's step times (in ms), plus rates;
    and the same for the process CPU time per step (all threads), when ``samples`` has it."""
    t = np.asarray(samples["wall"], dtype=float)
    q1, med, q3 = np.percentile(t, [25, 50, 75])
    out = {"n_samples": int(t.size), "total_s": float(t.sum()),
           "ms_median": 1e3 * med, "ms_q1": 1e3 * q1, "ms_q3": 1e3 * q3,
           "ms_min": 1e3 * t.min(), "ms_max": 1e3 * t.max()}
    if batch_size is not None:
        out["examples_per_s"] = batch_size / med
    if flops is not None:
        out["gflops"] = flops / med / 1e9
        out["gflops_best"] = flops / t.min() / 1e9
    if samples.get("cpu"):
        c = np.asarray(samples["cpu"], dtype=float)
        cq1, cmed, cq3 = np.percentile(c, [25, 50, 75])
        out.update(cpu_ms_median=1e3 * cmed, cpu_ms_q1=1e3 * cq1, cpu_ms_q3=1e3 * cq3)
        if flops is not None:
            out["gflop_per_cpu_s"] = flops / cmed / 1e9
        if cores:
            out["cpu_share"] = cmed / (med * cores)      # fraction of the machine's cores this variant got
    return out


def interleaved(fns, min_time, *, min_samples=5, warmup=2, max_time=None, calibrate=(), max_reps=64,
                clock=time.perf_counter, cpu_clock=time.process_time, seed=None):
    """Time ``fns`` (name -> callable running one synchronous step) interleaved.

    Round r runs every function once, in an order drawn at random for that round (seeded):
    A B C, C A B, B C A, ...  A fixed cyclic order would give every variant the same
    predecessor in every round, and the predecessor matters (its threads, its cache
    footprint), so the order is shuffled rather than rotated.  The functions named in ``calibrate`` (references and diagnostics
    much faster than the compared steps, e.g. one GEMM) instead run ``reps`` times in a row,
    chosen after the warm-up to take about as long as the slowest function (at most
    ``max_reps``), so that they do not make the round count explode.  (Never for the variants
    being compared with each other: back-to-back repeats of one program run with warmer
    caches than interleaved calls, which would favour the repeated one.)  Stops when every
    function has >= ``min_time`` seconds and >= ``min_samples`` samples, or after ``max_time``
    seconds (once ``min_samples`` is met).

    The round orders come from ``numpy.random.default_rng(seed)``, ``seed`` defaulting to the
    number of functions (so a given set of variants always runs in the same sequence of orders).
    ``clock`` and ``cpu_clock`` (seconds) are ``time.perf_counter`` and ``time.process_time``;
    the tests pass a fake clock that the functions advance.

    Returns name -> {"wall": [s], "cpu": [s], "round": [r]}: wall-clock time and the process's
    CPU time (all threads, ``time.process_time``) of each call, and the round it ran in.
    """
    names = list(fns)
    last = {}
    for _ in range(warmup):
        for n in names:
            t0 = clock()
            fns[n]()
            last[n] = clock() - t0
    slowest = max(last.values()) if last else 0.0
    reps = {n: int(min(max_reps, max(1, round(slowest / max(last.get(n, slowest), 1e-9)))))
            if n in calibrate else 1 for n in names}
    samples = {n: {"wall": [], "cpu": [], "round": []} for n in names}
    order_rng = np.random.default_rng(len(names) if seed is None else seed)
    start = clock()
    r = 0
    while True:
        done = all(sum(samples[n]["wall"]) >= min_time and len(samples[n]["wall"]) >= min_samples for n in names)
        if done or (max_time is not None and clock() - start > max_time
                    and all(len(samples[n]["wall"]) >= min_samples for n in names)):
            break
        for i in order_rng.permutation(len(names)):
            n = names[i]
            for _ in range(reps[n]):
                c0, t0 = cpu_clock(), clock()
                fns[n]()
                t1, c1 = clock(), cpu_clock()
                samples[n]["wall"].append(t1 - t0)
                samples[n]["cpu"].append(c1 - c0)
                samples[n]["round"].append(r)
        r += 1
    return samples


def _per_round(samples, kind):
    """round -> median of that round's calls."""
    by = {}
    for rd, t in zip(samples["round"], samples[kind]):
        by.setdefault(rd, []).append(t)
    return {rd: float(np.median(ts)) for rd, ts in by.items()}


def paired_ratio(num, den, kind="wall"):
    """Median and IQR over rounds of (num's median in the round) / (den's median in the round)."""
    a, b = _per_round(num, kind), _per_round(den, kind)
    rat = np.asarray([a[rd] / b[rd] for rd in sorted(set(a) & set(b))])
    q1, med, q3 = np.percentile(rat, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "rounds": int(rat.size)}


def busy_cores(seconds=1.0):
    """How many cores other work kept busy over the next ``seconds`` (Linux ``/proc/stat``: the non-idle share of
    all cores' time, times the cores), read while this process waits; None where there is no /proc/stat.  Unlike
    the 1-minute load average it does not lag: a job that ended a minute ago does not count."""
    def sample():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)       # total, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / (total1 - total0))


QUIET_BUSY_CORES = 0.25        # other work below this many busy cores: a quiet machine


def machine_description():
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_model": None, "cpu_flags_simd": [], "logical_cores": os.cpu_count()}
    try:
        info["usable_cores"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["usable_cores"] = os.cpu_count()
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        info["cpu_model"] = m.group(1).strip() if m else None
        m = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        if m:
            flags = set(m.group(1).split())
            info["cpu_flags_simd"] = sorted(f for f in flags if f in {
                "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                "amx_tile", "amx_bf16", "sse4_2"})
        m = re.search(r"^cpu MHz\s*:\s*(.+)$", text, re.M)
        info["cpu_mhz"] = float(m.group(1)) if m else None
    except OSError:
        pass
    try:
        info["loadavg_at_start"] = list(os.getloadavg())
    except OSError:
        pass
    from importlib import metadata
    versions = {}
    for mod in ("jax", "jaxlib", "optax", "numpy", "torch"):     # without importing torch
        try:
            versions[mod] = metadata.version(mod)
        except metadata.PackageNotFoundError:
            versions[mod] = None
    info["versions"] = versions
    import jax
    info["jax_backend"] = jax.default_backend()
    info["jax_devices"] = [str(d) for d in jax.devices()]
    info["gpu"] = any(d.platform == "gpu" for d in jax.devices())
    info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    return info


def temp_bytes(compiled):
    """XLA's temp buffer size of a compiled executable, or None when the backend does not say."""
    try:
        ma = compiled.memory_analysis()
    except Exception:                                   # noqa: BLE001 (backend-dependent)
        return None
    if ma is None:
        return None
    v = getattr(ma, "temp_size_in_bytes", None)
    return int(v) if v is not None else None


def dot_summary(hlo_text):
    """The compiled step's dots: how many ran as YNNPACK fusions and how many as plain XLA dots,
    and the plain dots' contraction layouts (lhs contracting dim 0 = a transposed-LHS GEMM)."""
    entry = re.sub(r", metadata=\{[^}]*\}", "", hlo_text[hlo_text.index("ENTRY"):])
    ynn_calls = set(re.findall(r"fusion\([^)]*\)[^\n]*calls=(%[\w.\-]+)[^\n]*__ynn_fusion", hlo_text))
    comps = {}
    for m in re.finditer(r"^(?:ENTRY )?(%[\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo_text, re.M | re.S):
        comps[m.group(1)] = m.group(2)
    dots = []
    for name, body in comps.items():
        for d in re.finditer(r"= (f32\[[\d,]*\])\{[\d,]*\} dot\(([^)]*)\), lhs_contracting_dims=\{(\d*)\}, "
                             r"rhs_contracting_dims=\{(\d*)\}", body):
            dots.append({"computation": name, "ynn": name in ynn_calls, "shape": d.group(1),
                         "lhs_contracting": d.group(3), "rhs_contracting": d.group(4)})
    return {"n_dots": len(dots), "n_ynn": sum(d["ynn"] for d in dots),
            "plain_dots": [f"{d['shape']} lhs_c={d['lhs_contracting']} rhs_c={d['rhs_contracting']}"
                           for d in dots if not d["ynn"]],
            "n_copies": len(re.findall(r"= f32\[[\d,]*\]\{[\d,]*\} copy\(", entry)),
            "n_transpose_fusions": len(re.findall(r"= f32\[[\d,]*\]\{[\d,]*\} fusion\([^\n]*transpose", entry))}


def normalized_program(hlo_text):
    """Every computation of a compiled module (the fused ones and ENTRY), with value names,
    metadata and the module's header and stack-frame tables removed: equal for two programs
    that XLA compiled to the same thing, whatever the Python functions and values were called.
    (Comparing ENTRY alone is not enough: it only names the fusions it calls.)"""
    body = hlo_text[re.search(r"^(?:%|ENTRY )", hlo_text, re.M).start():]
    body = re.sub(r", metadata=\{[^}]*\}", "", body)
    return re.sub(r"%[\w.\-]+", "%_", body)
