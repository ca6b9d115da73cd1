"""Benchmark: fnbp's hand-written rules vs JAX autodiff vs PyTorch vs the machine's GEMM rate.

One process times one full training step (forward, backward, Adam update) of the
784-512-512-10 ReLU network with softmax cross-entropy, float32, for

1. ``fnbp_autodiff``: ``jax.value_and_grad`` through fnbp's custom_vjp layers
   (``fnbp.mlp.apply`` + ``fnbp.losses.softmax_cross_entropy``) + ``fnbp.optim.adam``;
2. ``fnbp_backprop``: the explicit loop ``fnbp.backprop.backprop`` + ``fnbp.optim.adam``;
3. ``peer_jax``: ``jax.value_and_grad`` of a plain-jnp forward (``h @ W.T + b``,
   ``jax.nn.relu``, ``optax.softmax_cross_entropy_with_integer_labels(...).mean()``) + ``optax.adam``;
4. ``torch_eager``: PyTorch eager on CPU, same model, ``torch.optim.Adam`` (skipped with a
   note when torch is not installed; it is not a dependency of fnbp);
5. ``gemm``: the limit, a jit-compiled ``a @ b`` on random square float32 matrices at the
   size with the best rate in a sweep over ``--gemm-sizes``.

1-3 are jit-compiled with the parameter and optimizer buffers donated.  All variants of one
batch size are interleaved (A B C D E, D A E C B, ...: one step of each per round -- a few in
a row for a reference much faster than the slowest --, in a random order per round) so that
drift on a shared machine hits all alike, after a warm-up, until every variant has at least
``--min-time`` seconds of samples.  Reported per variant: median ms/step and its spread (IQR
and min-max), examples/s, achieved GFLOP/s (see ``step_flops``), the fraction of the GEMM rate
measured in the same rounds, the ratio to the peer (3) -- both the ratio of medians and the
median of the per-round ratios --, compile time (trace + lower + compile) and XLA's temp
memory for the compiled step.  Every call is also timed in process CPU time (all threads):
on a shared machine the wall clock includes waiting for a core, the CPU time does not.

Diagnostics in the same rounds: the step's matrix products alone (``GemmsOnly``) and the
Adam update alone (``AdamOnly``), to show where a step's time goes; and the weight-gradient
product timed in both layouts ``fnbp.layers.dense_backward`` chooses between.

Also timed: the optimizer update alone (``fnbp.optim.adam`` vs ``optax.adam`` on the
784-512-512-10 parameters, jit, donated); per-example gradients (``vmap(grad)`` through our
rules vs through the plain-jnp forward); and data-parallel training over N simulated CPU
devices with ``fnbp.parallel`` (in a subprocess, because the device count is fixed when JAX
starts).

Usage::

    python -m experiments.bench                      # full run, writes experiments/results/bench.{md,json}
    python -m experiments.bench --quick --json /tmp/b.json --md /tmp/b.md
    fnbp bench --quick --batch-sizes 8 --sizes 16,8,8,4 --json /tmp/b.json

Nothing here asserts speed; ``tests/test_bench.py`` only checks the report's fields.
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "experiments" / "results"

DEFAULT_SIZES = (784, 512, 512, 10)
DEFAULT_BATCH_SIZES = (32, 128, 512, 2048)
QUICK_BATCH_SIZES = (32, 512)
DEFAULT_GEMM_SIZES = (256, 512, 1024, 2048)
QUICK_GEMM_SIZES = (256, 512)
LEARNING_RATE = 1e-3

STEP_VARIANTS = ("fnbp_autodiff", "fnbp_backprop", "peer_jax", "torch_eager", "gemm")
LABELS = {
    "fnbp_autodiff": "fnbp: value_and_grad through custom_vjp rules + fnbp.optim.adam",
    "fnbp_backprop": "fnbp: explicit fnbp.backprop loop + fnbp.optim.adam",
    "peer_jax": "peer: value_and_grad of plain jnp + optax.adam",
    "torch_eager": "PyTorch eager (CPU) + torch.optim.Adam",
    "gemm": "limit: jit(a @ b), square float32 GEMM",
}
SHORT = {"fnbp_autodiff": "fnbp autodiff", "fnbp_backprop": "fnbp backprop", "peer_jax": "peer (jax+optax)",
         "torch_eager": "torch eager", "gemm": "GEMM limit"}
FLOP_FORMULA = ("FLOPs/step = 2*B*P (forward) + 2*B*P (weight gradients) + 2*B*(P - P1) (input gradients), "
                "P = number of weight-matrix entries sum_k n_{k-1} n_k (biases not counted), P1 = n_0 n_1 "
                "(the first layer's input gradient is not needed). Not counted: bias adds and bias "
                "gradients, ReLU, softmax/cross-entropy, the Adam update (all O(B*n) or O(P), not GEMMs).")


# --------------------------------------------------------------------------- FLOP count
def weight_counts(sizes):
    """(P, P1): weight-matrix entries of the whole network and of the first layer."""
    sizes = [int(n) for n in sizes]
    P = sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    return P, sizes[0] * sizes[1]


def step_flops(sizes, batch_size):
    """FLOPs of one training step's matrix products: 4*B*P + 2*B*(P - P1) (see FLOP_FORMULA)."""
    P, P1 = weight_counts(sizes)
    B = int(batch_size)
    return 2 * B * P + 2 * B * P + 2 * B * (P - P1)


# --------------------------------------------------------------------------- statistics and timing
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


def interleaved(fns, min_time, *, min_samples=5, warmup=2, max_time=None, calibrate=(), max_reps=64):
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

    Returns name -> {"wall": [s], "cpu": [s], "round": [r]}: wall-clock time and the process's
    CPU time (all threads, ``time.process_time``) of each call, and the round it ran in.
    """
    names = list(fns)
    last = {}
    for _ in range(warmup):
        for n in names:
            t0 = time.perf_counter()
            fns[n]()
            last[n] = time.perf_counter() - t0
    slowest = max(last.values()) if last else 0.0
    reps = {n: int(min(max_reps, max(1, round(slowest / max(last.get(n, slowest), 1e-9)))))
            if n in calibrate else 1 for n in names}
    samples = {n: {"wall": [], "cpu": [], "round": []} for n in names}
    order_rng = np.random.default_rng(len(names))
    start = time.perf_counter()
    r = 0
    while True:
        done = all(sum(samples[n]["wall"]) >= min_time and len(samples[n]["wall"]) >= min_samples for n in names)
        if done or (max_time is not None and time.perf_counter() - start > max_time
                    and all(len(samples[n]["wall"]) >= min_samples for n in names)):
            break
        for i in order_rng.permutation(len(names)):
            n = names[i]
            for _ in range(reps[n]):
                c0 = time.process_time()
                t0 = time.perf_counter()
                fns[n]()
                t1 = time.perf_counter()
                c1 = time.process_time()
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


# --------------------------------------------------------------------------- machine description
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


# --------------------------------------------------------------------------- compiled-program inspection
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


# --------------------------------------------------------------------------- the models
def make_data(sizes, batch_size, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch_size, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], size=batch_size).astype(np.int32)
    return x, y


def init_params(sizes, seed):
    import jax
    from fnbp import mlp
    return mlp.init(jax.random.PRNGKey(seed), sizes)


def peer_loss(params, x, y):
    """The peer's plain-jnp forward: h @ W.T + b, jax.nn.relu, optax's integer-label cross-entropy."""
    import jax
    import optax
    h = x
    for k, layer in enumerate(params):
        h = h @ layer["W"].T + layer["b"]
        if k < len(params) - 1:
            h = jax.nn.relu(h)
    return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()


def fnbp_loss(params, x, y):
    from fnbp import losses, mlp
    return losses.softmax_cross_entropy(mlp.apply(params, x), y)


def step_functions():
    """name -> (step(params, opt_state, x, y) -> (params, opt_state, E), optimizer)."""
    import jax
    import optax
    from fnbp import losses, optim
    from fnbp import backprop

    ours_opt, peer_opt = optim.adam(LEARNING_RATE), optax.adam(LEARNING_RATE)

    def fnbp_autodiff(params, opt_state, x, y):
        E, grads = jax.value_and_grad(fnbp_loss)(params, x, y)
        updates, opt_state = ours_opt.update(grads, opt_state, params)
        return optim.apply_updates(params, updates), opt_state, E

    def fnbp_backprop(params, opt_state, x, y):
        E, grads = backprop(params, x, y, loss=losses.softmax_cross_entropy)
        updates, opt_state = ours_opt.update(grads, opt_state, params)
        return optim.apply_updates(params, updates), opt_state, E

    def peer_jax(params, opt_state, x, y):
        E, grads = jax.value_and_grad(peer_loss)(params, x, y)
        updates, opt_state = peer_opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, E

    return {"fnbp_autodiff": (fnbp_autodiff, ours_opt), "fnbp_backprop": (fnbp_backprop, ours_opt),
            "peer_jax": (peer_jax, peer_opt)}


class JaxStep:
    """A jit-compiled, donated training step holding its own parameter and optimizer buffers."""

    def __init__(self, fn, opt, params, x, y, *, donate=True, place=None):
        import jax
        import jax.numpy as jnp
        params = jax.tree_util.tree_map(jnp.array, params)        # own copy: the buffers get donated
        opt_state = opt.init(params)
        if place is not None:
            params, opt_state, x, y = place(params, opt_state, x, y)
        jitted = jax.jit(fn, donate_argnums=(0, 1) if donate else ())
        t0 = time.perf_counter()
        self.compiled = jitted.lower(params, opt_state, x, y).compile()
        self.compile_s = time.perf_counter() - t0
        self.temp_bytes = temp_bytes(self.compiled)
        self.hlo = self.compiled.as_text()
        self.params, self.opt_state, self.x, self.y = params, opt_state, x, y
        self.last_loss = None

    def __call__(self):
        import jax
        self.params, self.opt_state, E = out = self.compiled(self.params, self.opt_state, self.x, self.y)
        jax.block_until_ready(out)
        self.last_loss = E


class Gemm:
    """jit(a @ b) on random n x n float32 matrices."""

    def __init__(self, n, seed=0):
        import jax
        import jax.numpy as jnp
        rng = np.random.default_rng(seed)
        self.a = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
        self.b = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
        self.n, self.flops = n, 2 * n ** 3
        self.compiled = jax.jit(lambda a, b: a @ b).lower(self.a, self.b).compile()

    def __call__(self):
        self.compiled(self.a, self.b).block_until_ready()


def torch_available():
    import importlib.util
    return importlib.util.find_spec("torch") is not None


class TorchStep:
    """PyTorch eager training step on CPU: nn.Linear/ReLU, F.cross_entropy, torch.optim.Adam."""

    def __init__(self, params, x, y, threads):
        import torch
        import torch.nn.functional as F
        torch.set_num_threads(threads)
        layers = []
        for k, layer in enumerate(params):
            W, b = np.asarray(layer["W"]), np.asarray(layer["b"])
            lin = torch.nn.Linear(W.shape[1], W.shape[0])
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(W.copy()))
                lin.bias.copy_(torch.from_numpy(b.copy()))
            layers.append(lin)
            if k < len(params) - 1:
                layers.append(torch.nn.ReLU())
        self.model = torch.nn.Sequential(*layers)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=LEARNING_RATE)
        self.x = torch.from_numpy(np.ascontiguousarray(x))
        self.y = torch.from_numpy(np.asarray(y).astype(np.int64))
        self.F = F
        self.last_loss = None

    def __call__(self):
        self.opt.zero_grad(set_to_none=True)
        loss = self.F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        self.last_loss = loss.detach()


# --------------------------------------------------------------------------- the benchmarks
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


class GemmsOnly:
    """Diagnostic: exactly the step's matrix products, nothing else, through fnbp's own
    ``dense_forward``/``dense_backward`` (so the layouts are the ones the step uses) on random
    inputs of the step's shapes: per layer the forward product, the weight gradient, and the
    input gradient of every layer but the first.  Same FLOP count as ``step_flops``."""

    def __init__(self, sizes, batch_size, seed):
        import jax
        import jax.numpy as jnp
        from fnbp.layers import dense_backward, dense_forward
        rng = np.random.default_rng(seed)

        def arr(*shape):
            return jnp.asarray(rng.standard_normal(shape), jnp.float32)

        self.args = [(arr(n_out, n_in), jnp.zeros((n_out,), jnp.float32), arr(batch_size, n_in),
                      arr(batch_size, n_out)) for n_in, n_out in zip(sizes[:-1], sizes[1:])]

        def f(args):
            outs = []
            for k, (W, b, h, d) in enumerate(args):
                a, res = dense_forward(W, b, h)
                gW, gb, gh = dense_backward(res, d)
                outs += [a, gW] + ([gh] if k else [])
            return outs

        self.compiled = jax.jit(f).lower(self.args).compile()
        self.hlo = self.compiled.as_text()

    def __call__(self):
        import jax
        jax.block_until_ready(self.compiled(self.args))


class AdamOnly:
    """Diagnostic: fnbp.optim.adam's update + apply_updates alone on the network's parameters
    (jit, donated), to see the optimizer's share of a step."""

    def __init__(self, params, seed, opt=None, apply=None):
        import jax
        import jax.numpy as jnp
        from fnbp import optim
        opt = opt or optim.adam(LEARNING_RATE)
        apply = apply or optim.apply_updates
        rng = np.random.default_rng(seed + 2)
        grads = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype) * 1e-2, params)

        def upd(p, s, g, _):
            u, s = opt.update(g, s, p)
            return apply(p, u), s, jnp.zeros(())

        self.step = JaxStep(upd, opt, params, grads, None)
        self.compile_s, self.temp_bytes, self.hlo = self.step.compile_s, self.step.temp_bytes, self.step.hlo

    def __call__(self):
        self.step()


def normalized_entry(hlo_text):
    """The ENTRY computation with value names and metadata removed (to compare two programs)."""
    entry = hlo_text[hlo_text.index("ENTRY"):]
    entry = re.sub(r", metadata=\{[^}]*\}", "", entry)
    return re.sub(r"%[\w.\-]+", "%_", entry)


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
        "autodiff_and_backprop_same_program": normalized_entry(runners["fnbp_autodiff"].hlo)
        == normalized_entry(runners["fnbp_backprop"].hlo),
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
    import importlib.util
    if importlib.util.find_spec("fnbp.parallel") is None:
        return dict(base, status="not run: fnbp.parallel missing", rows=[])
    sizes_ok = [B for B in batch_sizes if B % n_devices == 0]
    if not sizes_ok:
        return dict(base, status=f"not run: no batch size divisible by {n_devices}", rows=[])
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n_devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "experiments.bench", "--_simulated-devices", str(n_devices),
           "--sizes", ",".join(map(str, sizes)), "--batch-sizes", ",".join(map(str, sizes_ok)),
           "--min-time", str(min_time), "--seed", str(seed)]
    log(f"simulated devices: {' '.join(cmd[1:])}")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return dict(base, status=f"failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}", rows=[])
    marker = "@@SIMULATED@@"
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(marker)), None)
    if line is None:
        return dict(base, status=f"failed: no result line in the subprocess output: {proc.stdout[-400:]}", rows=[])
    return dict(base, status="ok", xla_flags=env["XLA_FLAGS"], rows=json.loads(line[len(marker):]))


# --------------------------------------------------------------------------- report
def _f(x, digits=3):
    if x is None:
        return "—"
    if isinstance(x, str):
        return x
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _mb(b):
    return "—" if b is None else f"{b / 2**20:.2f}"


def _spread(r, prefix="ms"):
    return (f"{_f(r[prefix + '_median'])} [{_f(r[prefix + '_q1'])}–{_f(r[prefix + '_q3'])}]"
            + (f" ({_f(r['ms_min'])}–{_f(r['ms_max'])})" if prefix == "ms" else ""))


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


def render_markdown(result):
    m = result["machine"]
    net = result["network"]
    L = []
    L.append("# Benchmark: hand-written rules vs autodiff vs PyTorch vs the machine's GEMM rate\n")
    if result["quick"]:
        L.append("**Quick mode** (`--quick`): short runs, reduced batch sizes; not the headline numbers.\n")
    L.append(f"Network {'-'.join(map(str, net['sizes']))}, ReLU, softmax cross-entropy, float32, Adam "
             f"(lr {net['learning_rate']}). One step = forward + backward + Adam update. Generated by "
             f"`{result['command']}` ({result['seconds']:.0f} s); regenerate, do not edit.\n")
    L.append("## Summary\n")
    L.append("| B | fnbp autodiff / peer: wall (CPU) | fnbp backprop / peer: wall (CPU) | fnbp % of GEMM rate: wall "
             "(CPU) | temp MB fnbp / peer | torch eager / fnbp: wall (CPU) |")
    L.append("|---|---|---|---|---|---|")
    for st in result["train_step"]:
        a, bp, pe, t = (st["variants"].get(n, {}) for n in ("fnbp_autodiff", "fnbp_backprop", "peer_jax",
                                                              "torch_eager"))
        torch_cell = (f"{t['ms_median'] / a['ms_median']:.2f} ({t['cpu_ms_median'] / a['cpu_ms_median']:.2f})"
                      if "ms_median" in t else t.get("skipped", "—"))
        L.append(f"| {st['batch_size']} | {a['ratio_to_peer']:.3f} ({a['ratio_to_peer_cpu']:.3f}) | "
                 f"{bp['ratio_to_peer']:.3f} ({bp['ratio_to_peer_cpu']:.3f}) | {100 * a['frac_gemm']:.0f}% "
                 f"({100 * a['frac_gemm_cpu']:.0f}%) | {_mb(a['temp_bytes'])} / {_mb(pe['temp_bytes'])} | {torch_cell} |")
    o, p = result["optimizer"], result["per_example"]
    L.append(f"\nAdam update alone, fnbp / optax: {o['ratio_fnbp_to_optax']:.3f} wall, "
             f"{o['ratio_fnbp_to_optax_cpu']:.3f} CPU. Per-example gradients (B = {p['batch_size']}), fnbp rules / "
             f"plain autodiff: {p['ratio_fnbp_to_peer']:.3f} wall, {p['ratio_fnbp_to_peer_cpu']:.3f} CPU. "
             "Ratios below 1 favour fnbp. Details and spreads below.\n")
    L.append("What the fnbp variants do differently from the peer (all in the library, measured here): the "
             "weight gradient of a narrow layer (n_out <= `fnbp.layers.NARROW_GRAD_W`) is computed from a "
             "materialised delta^T so that XLA runs it as a plain GEMM (see 'The weight-gradient layout'); "
             "`fnbp.optim.adam` folds the bias corrections into two per-leaf scalars (one division per element "
             "instead of three, see 'f32 divides'); the softmax cross-entropy backward is the fused "
             "softmax(y) - onehot(d) (no scatter); ReLU keeps a mask. `fnbp_autodiff` and `fnbp_backprop` run "
             "the same rules and XLA compiles them to the same program (checked below), so their difference "
             "is a measure of the noise.\n")
    L.append("## Machine\n")
    v = m["versions"]
    L.append(f"- CPU: {m['cpu_model']}, {m['usable_cores']} usable cores ({m['logical_cores']} logical); "
             f"SIMD: {', '.join(m['cpu_flags_simd']) or 'unknown'}")
    L.append(f"- **No GPU**: JAX backend `{m['jax_backend']}`, devices {m['jax_devices']}; every number is CPU only."
             if not m["gpu"] else f"- JAX backend `{m['jax_backend']}`, devices {m['jax_devices']}.")
    la = m.get("loadavg_at_start") or []
    L.append(f"- Shared machine: load average {', '.join(f'{x:.1f}' for x in la)} on {m['usable_cores']} cores "
             "when the run started (other jobs running). Wall-clock times therefore include waiting for a core; "
             "the 'CPU' columns (process CPU time per step, all threads) show what a step costs whatever share "
             "of the machine it got, and 'CPU share' how much of the cores it got.")
    L.append(f"- Versions: python {m['python']}, jax {v['jax']}, jaxlib {v['jaxlib']}, optax {v['optax']}, "
             f"numpy {v['numpy']}, torch {v['torch'] or 'not installed'}")
    L.append(f"- Platform: {m['platform']}\n")

    L.append("## How it is measured\n")
    L.append(f"- {net['flop_formula']} Here P = {net['P']:,}, P1 = {net['P1']:,}.")
    L.append(f"- The variants of one batch size run interleaved (A B C ..., C A B ..., in a random order per round, so "
             "that no variant always follows the same one; the GEMM and the two diagnostics run a few times in a row "
             "so that they take about as long as the slowest step), after 2 warm-up steps each, until each has >= "
             f"{result['min_time_s']} s of samples. "
             "ms/step: median [IQR] (min–max). GFLOP/s from the median. '% GEMM': the step's GFLOP/s over the "
             "GEMM rate measured *in the same rounds* (the GEMM row); '% GEMM (CPU)' the same with FLOPs per "
             "CPU-second. Ratio to peer: median over the peer's median; 'paired' is the median of the per-round "
             "ratios.")
    L.append("- jax variants: `jax.jit(step, donate_argnums=(0, 1))` (parameters and optimizer state donated), "
             "compiled ahead of time; 'compile s' = trace + lower + compile; 'temp MB' = "
             "`compiled.memory_analysis().temp_size_in_bytes`.")
    if result["torch_threads"]:
        L.append(f"- PyTorch: eager, `torch.set_num_threads({result['torch_threads']})`, "
                 f"`OMP_WAIT_POLICY={result.get('omp_wait_policy')}`, default `torch.optim.Adam` (for-loop CPU "
                 "path), `F.cross_entropy`, `zero_grad(set_to_none=True)`; same initial weights and data.")
    else:
        L.append(f"- PyTorch: **skipped** ({result.get('torch_skipped', 'torch is not installed')}; torch is not a "
                 "dependency of fnbp: `pip install torch` into the venv to include it).")
    L.append("")

    g = result["gemm"]
    L.append("## The limit: float32 GEMM rate (jit(a @ b), square, interleaved sweep)\n")
    L.append("| n | GFLOP/s (median) | GFLOP/s (best sample) | ms median | GFLOP per CPU-s | CPU share |")
    L.append("|---|---|---|---|---|---|")
    for n, r in g["sizes"].items():
        L.append(f"| {n} | {_f(r['gflops'])} | {_f(r['gflops_best'])} | {_f(r['ms_median'])} | "
                 f"{_f(r['gflop_per_cpu_s'])} | {_f(r.get('cpu_share'))} |")
    in_rounds = ", ".join(f"{_f(st['gemm_gflops_concurrent'])} (B = {st['batch_size']})" for st in result["train_step"])
    L.append(f"\nGEMM rate of the sweep (best median over the sizes): **{_f(g['rate_gflops'])} GFLOP/s** at "
             f"n = {g['best_size']} ({_f(g['rate_gflops_best_sample'])} in the best single sample). That size is "
             f"re-timed inside every batch size's rounds, where it ran at {in_rounds} GFLOP/s; the '% GEMM' columns "
             "use the rate of the same rounds. A CPU share near 1/cores means the process had one core's worth of "
             "the machine while it ran (the rest went to other jobs).\n")

    L.append("## One training step\n")
    L.append("| B | variant | ms/step median [IQR] (min–max) | examples/s | GFLOP/s | % GEMM | ratio to peer "
             "(paired [IQR]) | CPU ms/step [IQR] | CPU ratio to peer | % GEMM (CPU) | CPU share | compile s | "
             "temp MB |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in result["train_step"]:
        B = s["batch_size"]
        for name in STEP_VARIANTS:
            r = s["variants"].get(name)
            if r is None:
                continue
            if "skipped" in r:
                L.append(f"| {B} | {SHORT[name]} | skipped: {r['skipped']} |" + " |" * 10)
                continue
            if name == "gemm":
                L.append(f"| {B} | GEMM n={s['gemm_size']} | {_spread(r)} | | {_f(r['gflops'])} | 100 | | "
                         f"{_spread(r, 'cpu_ms')} | | 100 | {_f(r.get('cpu_share'))} | | |")
                continue
            pr, pc = r["ratio_to_peer_paired"], r["ratio_to_peer_cpu_paired"]
            L.append(f"| {B} | {SHORT[name]} | {_spread(r)} | {_f(r['examples_per_s'])} | {_f(r['gflops'])} | "
                     f"{100 * r['frac_gemm']:.0f} | {r['ratio_to_peer']:.3f} ({pr['median']:.3f} "
                     f"[{pr['q1']:.2f}–{pr['q3']:.2f}]) | {_spread(r, 'cpu_ms')} | {r['ratio_to_peer_cpu']:.3f} "
                     f"({pc['median']:.3f} [{pc['q1']:.2f}–{pc['q3']:.2f}]) | {100 * r['frac_gemm_cpu']:.0f} | "
                     f"{_f(r.get('cpu_share'))} | {_f(r['compile_s'])} | {_mb(r['temp_bytes'])} |")
    L.append("")

    L.append("### Where a step's time goes (fnbp, CPU time, same rounds)\n")
    L.append("'GEMMs only' runs exactly the step's matrix products through `fnbp.layers.dense_forward`/"
             "`dense_backward` (same shapes and layouts, nothing else); 'Adam only' runs `fnbp.optim.adam`'s "
             "update on the same parameters. Shares are of the fnbp autodiff step's CPU time; 'rest' is "
             "everything else (bias adds, ReLU, loss, bias gradients, copies, per-op overhead).\n")
    L.append("| B | GEMMs only: CPU ms | GEMMs: GFLOP per CPU-s | GEMMs: % of square GEMM (CPU) | GEMMs share | "
             "Adam only: CPU ms | Adam share | rest share | autodiff and backprop compile to the same program |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for s in result["train_step"]:
        d = s["diagnostics"]
        gq, aq = d["gemms_only"], d["adam_only"]
        L.append(f"| {s['batch_size']} | {_f(gq['cpu_ms_median'])} | {_f(gq['gflop_per_cpu_s'])} | "
                 f"{100 * gq['frac_gemm_cpu']:.0f} | {100 * gq['share_of_fnbp_step_cpu']:.0f}% | "
                 f"{_f(aq['cpu_ms_median'])} | {100 * aq['share_of_fnbp_step_cpu']:.0f}% | "
                 f"{100 * d['rest_share_of_fnbp_step_cpu']:.0f}% | "
                 f"{'yes' if d['autodiff_and_backprop_same_program'] else 'no'} |")
    L.append("")

    L.append("### Targets (report only; never asserted)\n")
    L.append("| target | B | value (wall) | met (wall) | value (CPU) | met (CPU) |")
    L.append("|---|---|---|---|---|---|")
    for t in result["targets"]:
        yes = lambda b: "yes" if b else "**no**"  # noqa: E731
        L.append(f"| {t['target']} | {t['batch_size']} | {t['value']:.3f} | {yes(t['met'])} | "
                 + (f"{t['value_cpu']:.3f} | {yes(t['met_cpu'])} |" if "value_cpu" in t else "— | — |"))
    L.append("")

    big = result["train_step"][-1]
    L.append(f"### Where the GEMMs ran (compiled HLO at B = {big['batch_size']})\n")
    L.append("XLA:CPU hands a dot either to YNNPACK (`__ynn_fusion`) or runs it as a plain XLA dot; "
             "'lhs_c=0' marks a transposed-LHS product (the batch axis contracted as the leading axis of both "
             "operands, the in-place layout of a weight gradient delta^T H).\n")
    L.append("| program | dots | in YNNPACK | plain dots (shape, contracting dims) | f32 copies (entry) | "
             "transpose fusions (entry) |")
    L.append("|---|---|---|---|---|---|")
    progs = [(SHORT[n], big["variants"][n]["hlo_dots"]) for n in ("fnbp_autodiff", "fnbp_backprop", "peer_jax")]
    progs.append(("GEMMs only (diagnostic)", big["diagnostics"]["gemms_only"]["hlo_dots"]))
    for lab, d in progs:
        L.append(f"| {lab} | {d['n_dots']} | {d['n_ynn']} | {'; '.join(d['plain_dots']) or '—'} | {d['n_copies']} | "
                 f"{d['n_transpose_fusions']} |")
    L.append("")

    lay = result["grad_w_layouts"]
    L.append("### The weight-gradient layout (`fnbp.layers.dense_backward`)\n")
    L.append("grad_W = delta^T H timed alone in both layouts: 'in place' contracts the batch axis as the leading "
             "axis of both operands (a transposed-LHS GEMM), 'materialised' copies delta^T to an (n_out, B) array "
             f"first (included in its time). dense_backward materialises for n_out <= {lay['narrow_grad_w']} "
             "(`NARROW_GRAD_W`). GFLOP/s from the wall-clock median, and per CPU-second.\n")
    L.append("| layer (n_out x n_in) | B | in place: GFLOP/s (per CPU-s) | in YNNPACK | materialised: GFLOP/s "
             "(per CPU-s) | in YNNPACK | materialised speed-up (wall / CPU) | dense_backward uses |")
    L.append("|---|---|---|---|---|---|---|---|")
    for r in lay["rows"]:
        a, b = r["in_place"], r["materialized_T"]
        L.append(f"| {r['layer']} ({r['n_out']} x {r['n_in']}) | {r['batch_size']} | {_f(a['gflops'])} "
                 f"({_f(a['gflop_per_cpu_s'])}) | {'yes' if a['ynn'] else 'no'} | {_f(b['gflops'])} "
                 f"({_f(b['gflop_per_cpu_s'])}) | {'yes' if b['ynn'] else 'no'} | {r['speedup_materialized']:.2f} / "
                 f"{r['speedup_materialized_cpu']:.2f} | {r['chosen'].replace('_T', '')} |")
    L.append("")

    o = result["optimizer"]
    L.append(f"## Optimizer update alone (Adam on the {'-'.join(map(str, net['sizes']))} parameters, "
             f"{o['n_params']:,} numbers; update + apply_updates, jit, donated)\n")
    L.append("| optimizer | ms median [IQR] (min–max) | CPU ms [IQR] | effective GB/s (7 x 4 B x params) | "
             "fusions | f32 divides | temp MB |")
    L.append("|---|---|---|---|---|---|---|")
    for n, r in o["variants"].items():
        L.append(f"| {n} | {_spread(r)} | {_spread(r, 'cpu_ms')} | {_f(r['effective_gb_per_s'])} | "
                 f"{r['n_fusions']} | {r['elementwise_divides']} | {_mb(r['temp_bytes'])} |")
    op, oc = o["ratio_fnbp_to_optax_paired"], o["ratio_fnbp_to_optax_cpu_paired"]
    L.append(f"\nfnbp / optax: **{o['ratio_fnbp_to_optax']:.3f}** wall (paired {op['median']:.3f} "
             f"[{op['q1']:.2f}–{op['q3']:.2f}]), **{o['ratio_fnbp_to_optax_cpu']:.3f}** CPU (paired "
             f"{oc['median']:.3f} [{oc['q1']:.2f}–{oc['q3']:.2f}]).\n")

    p = result["per_example"]
    L.append(f"## Per-example gradients (jit(vmap(grad)), B = {p['batch_size']})\n")
    L.append("| gradients through | ms median [IQR] (min–max) | examples/s | CPU ms [IQR] | compile s | temp MB |")
    L.append("|---|---|---|---|---|---|")
    for n, r in p["variants"].items():
        L.append(f"| {n} | {_spread(r)} | {_f(r['examples_per_s'])} | {_spread(r, 'cpu_ms')} | "
                 f"{_f(r['compile_s'])} | {_mb(r['temp_bytes'])} |")
    pp = p["ratio_fnbp_to_peer_paired"]
    L.append(f"\nfnbp rules / plain-jnp autodiff: **{p['ratio_fnbp_to_peer']:.3f}** wall (paired {pp['median']:.3f} "
             f"[{pp['q1']:.2f}–{pp['q3']:.2f}]), {p['ratio_fnbp_to_peer_cpu']:.3f} CPU; max relative difference "
             f"of the gradients {p['max_rel_diff']:.1e}.\n")

    sim = result["simulated_devices"]
    L.append(f"## Data parallel: {sim['label']}\n")
    if sim["status"] != "ok":
        L.append(f"{sim['status']}\n")
    else:
        L.append("fnbp autodiff step with the parameters and optimizer state replicated "
                 "(`fnbp.parallel.replicate`) and the batch split over the devices (`fnbp.parallel.batch_sharding`), "
                 "vs the same step on one of the simulated devices, interleaved, in a subprocess started with "
                 f"`XLA_FLAGS={sim['xla_flags']}`. The simulated devices share the machine's "
                 f"{m['usable_cores']} cores: this measures the cost of partitioning (all-reduces, per-device "
                 "dispatch), not a speed-up.\n")
        L.append("| B | run | ms/step median [IQR] | examples/s | GFLOP/s | CPU ms | all-reduces | ratio to 1 device "
                 "(wall / CPU) |")
        L.append("|---|---|---|---|---|---|---|---|")
        for r in sim["rows"]:
            for n, lab in (("data_parallel", sim["label"]), ("one_device", "1 device (same process)")):
                x = r[n]
                ratio = (f"{r['ratio_dp_to_one_device']:.3f} / {r['ratio_dp_to_one_device_cpu']:.3f}"
                         if n == "data_parallel" else "1")
                L.append(f"| {r['batch_size']} | {lab} | {_f(x['ms_median'])} [{_f(x['ms_q1'])}–{_f(x['ms_q3'])}] | "
                         f"{_f(x['examples_per_s'])} | {_f(x['gflops'])} | {_f(x['cpu_ms_median'])} | "
                         f"{x['all_reduces']} | {ratio} |")
        L.append("")
    if result.get("notes"):
        L.append("## Notes\n")
        L.extend(f"- {n}" for n in result["notes"])
        L.append("")
    return "\n".join(L) + "\n"


def print_table(result):
    print(f"\n{'B':>5} {'variant':<18} {'ms median':>10} {'IQR':>19} {'ex/s':>9} {'GFLOP/s':>8} {'%GEMM':>6} "
          f"{'x peer':>7} {'paired':>7} {'CPU ms':>8} {'CPU x peer':>10} {'%GEMM cpu':>9} {'compile':>8} {'temp MB':>8}")
    for s in result["train_step"]:
        for name in STEP_VARIANTS:
            r = s["variants"].get(name)
            if r is None:
                continue
            if "skipped" in r:
                print(f"{s['batch_size']:>5} {SHORT[name]:<18} skipped: {r['skipped']}")
                continue
            if name == "gemm":
                print(f"{s['batch_size']:>5} {'GEMM n=' + str(s['gemm_size']):<18} {r['ms_median']:>10.3f} "
                      f"{r['ms_q1']:>9.3f}-{r['ms_q3']:<9.3f} {'':>9} {r['gflops']:>8.1f} {'':>6} {'':>7} {'':>7} "
                      f"{r['cpu_ms_median']:>8.3f}")
                continue
            print(f"{s['batch_size']:>5} {SHORT[name]:<18} {r['ms_median']:>10.3f} {r['ms_q1']:>9.3f}-{r['ms_q3']:<9.3f} "
                  f"{r['examples_per_s']:>9.0f} {r['gflops']:>8.1f} {100 * r['frac_gemm']:>6.0f} "
                  f"{r['ratio_to_peer']:>7.3f} {r['ratio_to_peer_paired']['median']:>7.3f} {r['cpu_ms_median']:>8.3f} "
                  f"{r['ratio_to_peer_cpu']:>10.3f} {100 * r['frac_gemm_cpu']:>9.0f} "
                  f"{_f(r['compile_s']):>8} {_mb(r['temp_bytes']):>8}")
    o, p = result["optimizer"], result["per_example"]
    print(f"\nAdam update alone: fnbp {o['variants']['fnbp_adam']['ms_median']:.3f} ms, optax "
          f"{o['variants']['optax_adam']['ms_median']:.3f} ms: ratio {o['ratio_fnbp_to_optax']:.3f} "
          f"(CPU {o['ratio_fnbp_to_optax_cpu']:.3f})")
    print(f"Per-example grads (B={p['batch_size']}): fnbp {p['variants']['fnbp_rules']['examples_per_s']:.0f} ex/s, "
          f"plain {p['variants']['peer_autodiff']['examples_per_s']:.0f} ex/s: ratio {p['ratio_fnbp_to_peer']:.3f} "
          f"(CPU {p['ratio_fnbp_to_peer_cpu']:.3f})")
    sim = result["simulated_devices"]
    print(f"{sim['label']}: {sim['status']}")
    for r in sim["rows"]:
        print(f"  B={r['batch_size']}: {r['data_parallel']['ms_median']:.3f} ms vs 1 device "
              f"{r['one_device']['ms_median']:.3f} ms (ratio {r['ratio_dp_to_one_device']:.3f}, "
              f"CPU {r['ratio_dp_to_one_device_cpu']:.3f}, {r['data_parallel']['all_reduces']} all-reduces)")


# --------------------------------------------------------------------------- command line
def _ints(text):
    try:
        vals = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def build_parser():
    p = argparse.ArgumentParser(prog="fnbp bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"short run: >= 0.1 s of samples per variant, batch sizes {QUICK_BATCH_SIZES}, "
                        f"GEMM sizes {QUICK_GEMM_SIZES} (unless given explicitly)")
    p.add_argument("--batch-sizes", type=_ints, default=None,
                   help=f"comma-separated batch sizes (default {DEFAULT_BATCH_SIZES}, quick {QUICK_BATCH_SIZES})")
    p.add_argument("--sizes", type=_ints, default=DEFAULT_SIZES, help="network layer widths n_0,...,n_L")
    p.add_argument("--gemm-sizes", type=_ints, default=None,
                   help=f"square GEMM sizes for the limit (default {DEFAULT_GEMM_SIZES}, quick {QUICK_GEMM_SIZES})")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds of samples per variant (default 1.0, quick 0.1)")
    p.add_argument("--per-example-batch", type=int, default=128, help="batch size of the per-example gradients")
    p.add_argument("--simulated-devices", type=int, default=8,
                   help="N simulated CPU devices for the data-parallel row (0: skip)")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch even when it is installed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None,
                   help="write the JSON report here (default experiments/results/bench.json for a full run, "
                        "none for --quick)")
    p.add_argument("--md", type=Path, default=None,
                   help="write the markdown report here (default experiments/results/bench.md for a full run, "
                        "none for --quick)")
    p.add_argument("--_simulated-devices", dest="child_devices", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    quick = args.quick
    batch_sizes = args.batch_sizes or (QUICK_BATCH_SIZES if quick else DEFAULT_BATCH_SIZES)
    gemm_sizes = args.gemm_sizes or (QUICK_GEMM_SIZES if quick else DEFAULT_GEMM_SIZES)
    min_time = args.min_time if args.min_time is not None else (0.1 if quick else 1.0)
    sizes = args.sizes
    if len(sizes) < 2:
        raise SystemExit("fnbp bench: --sizes needs at least an input width and one layer width")

    if args.child_devices is not None:                # inside the simulated-devices subprocess
        rows = simulated_child(args.child_devices, sizes, batch_sizes, min_time, args.seed)
        print("@@SIMULATED@@" + json.dumps(rows), flush=True)
        return 0

    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.1f} s] {msg}", file=sys.stderr, flush=True)

    # PyTorch's OpenMP threads otherwise spin-wait after every parallel region, stealing the
    # cores from the JAX step that runs next (and, on a shared machine, from everyone): set
    # before torch is first imported (libgomp reads it when it loads).
    omp_policy_set = "OMP_WAIT_POLICY" not in os.environ
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import jax
    if jax.config.jax_enable_x64:
        log("note: jax_enable_x64 is on; the benchmark uses float32 arrays explicitly")
    machine = machine_description()
    use_torch = torch_available() and not args.no_torch
    cores = machine["usable_cores"]
    threads = cores if use_torch else None
    P, P1 = weight_counts(sizes)
    log(f"machine: {machine['cpu_model']}, {machine['usable_cores']} cores, jax {machine['versions']['jax']}, "
        f"torch {machine['versions']['torch']}")
    log(f"GEMM sweep {gemm_sizes} ...")
    gemm = bench_gemm(gemm_sizes, min_time / 2 if not quick else min_time, args.seed, cores)
    log(f"  GEMM rate {gemm['rate_gflops']:.1f} GFLOP/s at n={gemm['best_size']}")
    steps = []
    for B in batch_sizes:
        steps.append(bench_train_step(sizes, B, min_time=min_time, seed=args.seed, gemm_size=gemm["best_size"],
                                      use_torch=use_torch, threads=threads, cores=cores, log=log,
                                      torch_skip_reason="--no-torch" if args.no_torch else "torch not installed"))
    log("weight-gradient layouts ...")
    layouts = bench_grad_w_layouts(sizes, batch_sizes, min_time=min_time / 4, seed=args.seed, cores=cores,
                                   layers=[len(sizes) - 2] if quick else None)
    log("optimizer update alone ...")
    optimizer = bench_optimizer(sizes, min_time=min_time, seed=args.seed, cores=cores)
    log("per-example gradients ...")
    per_example = bench_per_example(sizes, args.per_example_batch if not quick else min(args.per_example_batch, 32),
                                    min_time=min_time, seed=args.seed, cores=cores)
    if args.simulated_devices > 0:
        sim_batches = [B for B in batch_sizes if B % args.simulated_devices == 0]
        sim_batches = sim_batches[-1:] if quick else sim_batches
        simulated = bench_simulated(args.simulated_devices, sizes, sim_batches, min_time, args.seed, log)
    else:
        simulated = {"n_devices": 0, "label": "simulated devices", "status": "not run: --simulated-devices 0",
                     "rows": []}
    notes = []
    if use_torch:
        notes.append(f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
                     + (" (set by the benchmark: with libgomp's default spin-waiting, PyTorch's idle threads "
                        "took the cores from the interleaved JAX steps and from the other jobs on this shared "
                        "machine, and PyTorch itself ran several times slower)" if omp_policy_set else
                        " (from the environment)"))
    if not use_torch:
        notes.append("PyTorch rows skipped: " + ("--no-torch given." if args.no_torch else "torch is not installed."))
    result = {
        "schema": 1, "quick": quick, "command": "python -m experiments.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine, "min_time_s": min_time, "torch_threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") if use_torch else None,
        "torch_skipped": None if use_torch else ("--no-torch given" if args.no_torch else "torch is not installed"),
        "network": {"sizes": list(sizes), "P": P, "P1": P1, "flop_formula": FLOP_FORMULA,
                    "activation": "relu", "loss": "softmax cross-entropy (mean)", "dtype": "float32",
                    "learning_rate": LEARNING_RATE},
        "gemm": gemm, "train_step": steps, "grad_w_layouts": layouts, "optimizer": optimizer, "per_example": per_example,
        "simulated_devices": simulated, "notes": notes,
    }
    result["targets"] = targets(result)
    result["seconds"] = time.perf_counter() - t_start
    print_table(result)
    json_path = args.json if args.json is not None else (None if quick else RESULTS_DIR / "bench.json")
    md_path = args.md if args.md is not None else (None if quick else RESULTS_DIR / "bench.md")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1) + "\n")
        log(f"wrote {json_path}")
    if md_path is not None:
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(render_markdown(result))
        log(f"wrote {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
