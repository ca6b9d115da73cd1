"""Tests of fnbp.bench: the FLOP count, the timing harness (interleaving order, calibrated
repeats, stopping rule, statistics) on a fake clock, the case registry, the markdown of a known
result, and one quick run end to end.

The quick run is one subprocess (the test process has float64 enabled by conftest; the
benchmark must see JAX's defaults), ``fnbp bench --quick`` on a tiny network and batch from
outside the source tree, writing JSON and markdown to a temporary directory. Nothing here
asserts speed: only exact quantities, and that every timed field is positive and finite.
"""
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fnbp
from fnbp import bench
from fnbp.bench import harness, registry, report

ROOT = Path(__file__).resolve().parents[1]
TINY = (16, 8, 8, 4)
TINY_B = 8
N_SIM = 2


def hand_flops(sizes, B):
    """Independent count, layer by layer: forward a_k = H W_k^T (2 B n_in n_out multiply-adds
    counted as 2 FLOPs each), weight gradient delta^T H (same), input gradient delta W_k for
    every layer except the first (its input is the data)."""
    total = 0
    for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        total += 2 * B * n_in * n_out          # forward
        total += 2 * B * n_out * n_in          # grad W
        if k > 0:
            total += 2 * B * n_out * n_in      # grad h_{k-1}
    return total


def test_flops_784_512_512_10():
    sizes = (784, 512, 512, 10)
    P = 784 * 512 + 512 * 512 + 512 * 10
    assert bench.weight_counts(sizes) == (P, 784 * 512) == (668_672, 401_408)
    for B in (1, 32, 128, 512, 2048):
        assert bench.step_flops(sizes, B) == hand_flops(sizes, B)
    assert bench.step_flops(sizes, 2048) == 6_572_474_368          # 4*2048*668672 + 2*2048*267264


def _dot_flops(jaxpr):
    """2 x multiply-adds of every dot_general and conv_general_dilated (conv2d_xla's forward) of a jaxpr,
    sub-jaxprs (the rules' custom_vjp) included: a convolution's output entry costs a kernel's size / C_out."""
    total = 0
    for e in jaxpr.eqns:
        if e.primitive.name == "dot_general":
            (lhs_contracting, _), _ = e.params["dimension_numbers"]
            total += 2 * math.prod(e.outvars[0].aval.shape) * math.prod(e.invars[0].aval.shape[d]
                                                                          for d in lhs_contracting)
        if e.primitive.name == "conv_general_dilated":
            rhs_shape = e.invars[1].aval.shape
            c_out = rhs_shape[e.params["dimension_numbers"].rhs_spec[0]]
            total += 2 * math.prod(e.outvars[0].aval.shape) * math.prod(rhs_shape) // c_out
        for v in e.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                j = getattr(sub, "jaxpr", sub)
                if hasattr(j, "eqns"):
                    total += _dot_flops(j)
    return total


def test_lenet_flops_hand_count_and_the_programs_dots():
    """The LeNet step's FLOPs: by hand for the issue's network, and from the dots of fnbp's own
    forward program (3 x forward, less the first convolution's input gradient) for the quick one.  (Its
    convolutions are conv2d_xla's XLA convolutions; the im2col conv2d's GEMMs count the same.)"""
    import jax
    import jax.numpy as jnp
    from fnbp import cnn
    from fnbp.bench import lenet
    # 28x28x1 -> conv 5x5x32 (24x24) -> pool 12x12 -> conv 5x5x64 (8x8) -> pool 4x4 -> 1024 -> 128 -> 10, B = 64
    conv1, conv2 = 2 * 64 * 24 * 24 * 32 * 25 * 1, 2 * 64 * 8 * 8 * 64 * 25 * 32
    dense1, dense2 = 2 * 64 * 1024 * 128, 2 * 64 * 128 * 10
    assert lenet.lenet_step_flops(cnn.lenet((28, 28, 1)), 64) == 3 * (conv1 + conv2 + dense1 + dense2) - conv1
    assert lenet.lenet_step_flops(cnn.lenet((28, 28, 1)), 64) == 1_427_079_168
    arch, B = cnn.lenet(**lenet.QUICK_ARCH), TINY_B
    params = jax.eval_shape(lambda: cnn.init(jax.random.key(0), arch))
    x = jax.ShapeDtypeStruct((B,) + arch.image_shape, jnp.float32)
    forward = _dot_flops(jax.make_jaxpr(lambda p, x: cnn.apply(p, x, arch=arch))(params, x).jaxpr)
    c1 = params["conv"][0]
    first = _dot_flops(jax.make_jaxpr(lambda W, b, x: cnn.conv2d_xla(W, b, x, padding=arch.padding))(
        c1["W"], c1["b"], x).jaxpr)
    assert lenet.lenet_step_flops(arch, B) == 3 * forward - first


def test_lenet_targets_from_the_medians():
    from fnbp.bench import lenet
    v = {"fnbp_scan": {"ms_median": 50.0}, "lax_scan": {"ms_median": 510.0}, "fnbp_jit": {"ms_median": 80.0},
         "lax_jit": {"ms_median": 90.0}, "torch_eager": {"skipped": "torch not installed"}}
    t = {r["ratio"]: r for r in lenet.lenet_targets(v)}
    assert set(t) == {"fnbp_scan / lax_jit", "lax_scan / fnbp_scan"}
    assert t["fnbp_scan / lax_jit"]["value"] == pytest.approx(50 / 90) and t["fnbp_scan / lax_jit"]["met"] is True
    assert t["lax_scan / fnbp_scan"]["value"] == pytest.approx(10.2) and t["lax_scan / fnbp_scan"]["met"] is True
    v["fnbp_scan"]["ms_median"] = 60.0                   # 0.667 > 0.6 and 510 / 60 = 8.5 >= 5
    t = {r["ratio"]: r for r in lenet.lenet_targets(v)}
    assert t["fnbp_scan / lax_jit"]["met"] is False and t["lax_scan / fnbp_scan"]["met"] is True
    v["lax_scan"]["ms_median"] = 51.0                    # the reference in scan barely slower: not met
    t = {r["ratio"]: r for r in lenet.lenet_targets(v)}
    assert t["lax_scan / fnbp_scan"]["value"] == pytest.approx(0.85) and t["lax_scan / fnbp_scan"]["met"] is False


def test_lenet_section_of_a_known_result():
    from fnbp.bench import lenet
    paired = {"median": 0.55, "q1": 0.5, "q3": 0.6, "rounds": 5}

    def row(name, ms, ratio):
        return _timed(ms, 2 * ms, label=lenet.LABELS[name], gflops=10.0, frac_gemm=0.125,
                      ratio_to_lax_jit=ratio, ratio_to_lax_jit_paired=paired, compile_s=3.0)

    variants = {"fnbp_scan": row("fnbp_scan", 50.0, 50 / 90), "lax_scan": row("lax_scan", 510.0, 510 / 90),
                "fnbp_jit": row("fnbp_jit", 80.0, 80 / 90), "lax_jit": row("lax_jit", 90.0, 1.0),
                "torch_eager": {"label": lenet.LABELS["torch_eager"], "skipped": "torch not installed"}}
    sec = {"arch": {"image_shape": [28, 28, 1], "channels": [32, 64], "kernel": 5, "padding": "VALID", "pool": 2,
                    "hidden": [128], "n_classes": 10}, "batch_size": 64, "steps_per_call": 8,
           "flops": 1_427_079_168, "flop_formula": "F.", "gemm_size": 1024, "gemm_gflops_concurrent": 80.0,
           "variants": variants, "targets": lenet.lenet_targets(variants), "lax_uses_convolution": True,
           "fnbp_uses_convolution": False}
    lines = lenet.render(sec)
    text = "\n".join(lines)
    assert lines[0] == "## LeNet training step (issue #13), B = 64\n"
    assert "1.43 GFLOP per step" in text and "n = 1024, 80 GFLOP/s" in text
    assert (f"| {lenet.LABELS['fnbp_scan']} | 50 [45–55] | 10 | 0.12 | 0.56 (0.55 [0.50–0.60]) | 100 | 3 |"
            in lines)
    assert f"| {lenet.LABELS['torch_eager']} | skipped: torch not installed | | | | | |" in lines
    assert ("| fnbp in its scan loop <= 0.6x the jit-per-step autodiff reference | fnbp_scan / lax_jit | "
            "0.56× (bound <= 0.6) | yes |") in lines
    assert ("| the autodiff reference inside scan >= 5x slower than fnbp's loop | lax_scan / fnbp_scan | "
            "10.20× (bound >= 5) | yes |") in lines
    out = lenet.summary(sec)
    assert "  target fnbp_scan / lax_jit <= 0.6: 0.56 (met)" in out and any("torch_eager  skipped" in ln for ln in out)


def test_parser():
    args = bench.build_parser().parse_args(["--quick", "--batch-sizes", "8,16", "--sizes", "16,8,4",
                                            "--cases", "optimizer,gemm", "--json", "x.json", "--md", "x.md"])
    assert args.quick and args.batch_sizes == (8, 16) and args.sizes == (16, 8, 4)
    assert args.cases == ("optimizer", "gemm")
    assert args.json == Path("x.json") and args.md == Path("x.md")
    defaults = bench.build_parser().parse_args([])
    assert defaults.sizes == (784, 512, 512, 10) and defaults.batch_sizes is None and defaults.cases is None
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--batch-sizes", "0"])


# --------------------------------------------------------------------------- the harness, on a fake clock
class FakeClock:
    """A clock the timed functions advance: each call of a function costs a known time."""

    def __init__(self):
        self.t = 0.0
        self.log = []

    def __call__(self):
        return self.t

    def fn(self, name, cost):
        def run():
            self.log.append(name)
            self.t += cost
        return run


def _rounds(clock, names, warmup):
    calls = clock.log[warmup * len(names):]
    return [calls[i:i + len(names)] for i in range(0, len(calls), len(names))]


def test_interleaved_runs_each_variant_once_per_round_in_shuffled_orders():
    clock = FakeClock()
    names = ["A", "B", "C", "D"]
    fns = {n: clock.fn(n, 0.01) for n in names}
    samples = harness.interleaved(fns, 0.0, min_samples=20, warmup=2, clock=clock, cpu_clock=clock)
    assert clock.log[:8] == names + names                          # warm-up: every function, in order
    rounds = _rounds(clock, names, warmup=2)
    assert len(rounds) == 20
    for r in rounds:
        assert sorted(r) == names                                   # one call of each per round
    orders = {tuple(r) for r in rounds}
    assert len(orders) > 4                                          # shuffled, not one fixed order
    rotations = {tuple(names[i:] + names[:i]) for i in range(len(names))}
    assert not orders <= rotations                                  # and not a fixed cyclic rotation
    predecessors_of_a = {r[r.index("A") - 1] for r in rounds if r.index("A") > 0}
    assert len(predecessors_of_a) >= 2
    for n in names:
        assert samples[n]["round"] == list(range(20))
        assert samples[n]["wall"] == pytest.approx([0.01] * 20)
        assert samples[n]["cpu"] == pytest.approx([0.01] * 20)
    again = FakeClock()
    harness.interleaved({n: again.fn(n, 0.01) for n in names}, 0.0, min_samples=20, clock=again, cpu_clock=again)
    assert again.log == clock.log                                   # seeded: the same orders every run


def test_interleaved_calibrated_reference_repeats_in_a_row_and_stopping_rule():
    clock = FakeClock()
    fns = {"step": clock.fn("step", 1.0), "other": clock.fn("other", 0.5), "gemm": clock.fn("gemm", 0.25)}
    samples = harness.interleaved(fns, 3.0, min_samples=2, warmup=1, calibrate=("gemm",), clock=clock,
                                  cpu_clock=clock)
    # gemm costs a quarter of the slowest: 4 calls in a row per round; "other" is compared, never repeated
    calls = clock.log[3:]
    assert calls.count("gemm") == 4 * calls.count("step")
    i = calls.index("gemm")
    assert calls[i:i + 4] == ["gemm"] * 4
    assert len(samples["gemm"]["wall"]) == 4 * len(samples["step"]["wall"])
    assert samples["gemm"]["round"][:4] == [0, 0, 0, 0]
    # stop once every variant has >= 3 s: "other" (0.5 s a call) needs 6 rounds
    assert len(samples["other"]["wall"]) == 6 and len(samples["step"]["wall"]) == 6
    assert samples["step"]["wall"] == pytest.approx([1.0] * 6)
    # max_time stops early, once min_samples are there
    clock2 = FakeClock()
    s2 = harness.interleaved({"a": clock2.fn("a", 1.0), "b": clock2.fn("b", 1.0)}, 100.0, min_samples=3,
                             max_time=5.0, clock=clock2, cpu_clock=clock2)
    assert len(s2["a"]["wall"]) == 3


def test_summarize_and_paired_ratio_exact():
    s = {"wall": [0.001, 0.002, 0.003, 0.004, 0.010], "cpu": [0.002] * 5}
    r = harness.summarize(s, flops=2e6, batch_size=10, cores=2)
    assert r["n_samples"] == 5 and r["ms_median"] == pytest.approx(3.0)
    assert (r["ms_q1"], r["ms_q3"], r["ms_min"], r["ms_max"]) == pytest.approx((2.0, 4.0, 1.0, 10.0))
    assert r["examples_per_s"] == pytest.approx(10 / 0.003) and r["gflops"] == pytest.approx(2e6 / 0.003 / 1e9)
    assert r["cpu_share"] == pytest.approx(0.002 / (0.003 * 2))
    num = {"wall": [2.0, 4.0, 9.0], "round": [0, 1, 2]}
    den = {"wall": [1.0, 1.0, 3.0], "round": [0, 1, 2]}
    pr = harness.paired_ratio(num, den)
    assert pr["median"] == pytest.approx(3.0) and pr["rounds"] == 3       # ratios 2, 4, 3
    assert pr["median"] != pytest.approx(np.median(num["wall"]) / np.median(den["wall"]))   # 4 / 1


def test_normalized_program_compares_programs_not_names():
    import jax
    import jax.numpy as jnp
    x = jnp.ones((4, 3), jnp.float32)

    def f(a):
        return jnp.tanh(a) * 2.0

    def g(a):                     # another function, same computation (argument names are in the signature)
        return jnp.tanh(a) * 2.0

    def h(a):
        return jnp.tanh(a) * 3.0 + a

    text = {n: jax.jit(fn).lower(x).compile().as_text() for n, fn in (("f", f), ("g", g), ("h", h))}
    assert harness.normalized_program(text["f"]) == harness.normalized_program(text["g"])
    assert harness.normalized_program(text["f"]) != harness.normalized_program(text["h"])


# --------------------------------------------------------------------------- the registry
def test_registry_order_requirements_and_errors():
    cases = registry.load_cases()
    assert list(cases)[:2] == ["gemm", "train_step"]
    assert [c.name for c in registry.select(("optimizer", "train_step"))] == ["gemm", "train_step", "optimizer"]
    assert [c.name for c in registry.select(("lenet",))] == ["gemm", "lenet"]          # fnbp bench --cases lenet
    with pytest.raises(ValueError, match="unknown case.*'nope'"):
        registry.select(("nope",))
    with pytest.raises(ValueError, match="already registered"):
        registry.register("gemm", run=lambda ctx: {})
    with pytest.raises(ValueError, match="requires \\['missing'\\]"):
        registry.register("new_case", run=lambda ctx: {}, requires=("missing",))
    assert "new_case" not in registry.CASES


# --------------------------------------------------------------------------- the report of a known result
def _timed(ms, cpu_ms, **extra):
    return dict(n_samples=9, ms_median=ms, ms_q1=ms * 0.9, ms_q3=ms * 1.1, ms_min=ms * 0.8, ms_max=ms * 1.2,
                cpu_ms_median=cpu_ms, cpu_ms_q1=cpu_ms * 0.9, cpu_ms_q3=cpu_ms * 1.1, **extra)


def _known_step():
    paired = {"median": 0.96, "q1": 0.9, "q3": 1.0, "rounds": 9}
    dots = {"n_dots": 5, "n_ynn": 4, "plain_dots": ["f32[10,512] lhs_c=0 rhs_c=0"], "n_copies": 1,
            "n_transpose_fusions": 0}

    def variant(ms, ratio, temp):
        return _timed(ms, ms, examples_per_s=32 / (ms / 1e3), gflops=2.0, frac_gemm=0.5, frac_gemm_cpu=0.25,
                      ratio_to_peer=ratio, ratio_to_peer_paired=paired, ratio_to_peer_cpu=ratio * 1.1,
                      ratio_to_peer_cpu_paired=paired, cpu_share=0.5, compile_s=1.5, temp_bytes=temp,
                      final_loss=2.3, hlo_dots=dots)

    return {"batch_size": 32, "flops": 1, "gemm_size": 256, "variants": {
        "fnbp_autodiff": variant(1.9, 0.95, 2 ** 20), "fnbp_backprop": variant(2.0, 1.0, 2 ** 20),
        "peer_jax": variant(2.0, 1.0, 2 ** 21), "torch_eager": {"skipped": "--no-torch"},
        "gemm": _timed(0.5, 0.5, gflops=4.0, cpu_share=0.5)},
        "diagnostics": {"gemms_only": _timed(1.0, 1.0, gflop_per_cpu_s=3.0, frac_gemm_cpu=0.75,
                                             share_of_fnbp_step_cpu=0.5, hlo_dots=dots),
                        "adam_only": _timed(0.2, 0.2, share_of_fnbp_step_cpu=0.1),
                        "rest_share_of_fnbp_step_cpu": 0.4, "autodiff_and_backprop_same_program": True}}


def test_train_step_section_of_a_known_result():
    steps = [_known_step()]
    result = {"targets": [{"target": "fnbp autodiff: step time <= 1.00x peer (aim 0.95x)", "batch_size": 32,
                           "value": 1.25, "value_cpu": 0.5, "met": False, "met_cpu": True}]}
    lines = report.render_train_step(steps, result)
    assert lines[0] == "## One training step\n"
    auto = next(ln for ln in lines if ln.startswith("| 32 | fnbp autodiff |"))
    cells = [c.strip() for c in auto.strip("|").split("|")]
    assert cells[2] == "1.9 [1.71–2.09] (1.52–2.28)"                # median [IQR] (min–max), 3 digits
    assert cells[3] == "16,842"                                      # 32 / 1.9 ms
    assert cells[5] == "50"                                          # % GEMM
    assert cells[6] == "0.950 (0.960 [0.90–1.00])"                   # ratio to peer (paired [IQR])
    assert cells[8] == "1.045 (0.960 [0.90–1.00])"                   # CPU ratio to peer
    assert cells[9] == "25"                                          # % GEMM (CPU)
    assert cells[-1] == "1.00"                                       # temp MB
    assert "| 32 | torch eager | skipped: --no-torch |" in "\n".join(lines)
    assert "| 32 | 1 | 3 | 75 | 50% | 0.2 | 10% | 40% | yes |" in lines
    assert ("| fnbp autodiff: step time <= 1.00x peer (aim 0.95x) | 32 | 1.250 | **no** | 0.500 | yes |"
            in lines)
    assert "| fnbp autodiff | 5 | 4 | f32[10,512] lhs_c=0 rhs_c=0 | 1 | 0 |" in lines


def test_optimizer_section_and_stdout_summary_of_a_known_result():
    o = {"n_params": 1234, "variants": {
        "fnbp_adam": _timed(1.0, 2.0, effective_gb_per_s=5.0, n_fusions=3, elementwise_divides=1, temp_bytes=None),
        "optax_adam": _timed(2.0, 2.0, effective_gb_per_s=2.5, n_fusions=4, elementwise_divides=3, temp_bytes=3 * 2 ** 20)},
        "ratio_fnbp_to_optax": 0.5, "ratio_fnbp_to_optax_paired": {"median": 0.52, "q1": 0.5, "q3": 0.6},
        "ratio_fnbp_to_optax_cpu": 1.0, "ratio_fnbp_to_optax_cpu_paired": {"median": 1.0, "q1": 0.9, "q3": 1.1}}
    lines = report.render_optimizer(o, {"network": {"sizes": [16, 8, 4]}})
    assert lines[0].startswith("## Optimizer update alone (Adam on the 16-8-4 parameters, 1,234 numbers")
    assert "| fnbp_adam | 1 [0.9–1.1] (0.8–1.2) | 2 [1.8–2.2] | 5 | 3 | 1 | — |" in lines
    assert "| optax_adam | 2 [1.8–2.2] (1.6–2.4) | 2 [1.8–2.2] | 2.5 | 4 | 3 | 3.00 |" in lines
    assert ("\nfnbp / optax: **0.500** wall (paired 0.520 [0.50–0.60]), **1.000** CPU (paired 1.000 "
            "[0.90–1.10]).\n") in lines
    assert report.summary_optimizer(o) == ["\nAdam update alone: fnbp 1.000 ms, optax 2.000 ms: ratio 0.500 (CPU 1.000)"]


# --------------------------------------------------------------------------- one quick run, end to end
# every case but per_example_rules, whose quick run (MLP and LeNet rows) tests/test_per_example.py makes and checks
QUICK_CASES = "gemm,train_step,grad_w_layouts,optimizer,per_example,simulated_devices,multiprocess,lenet"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ)
    # no device-count flag of the user's (the bench sets its own); conftest's compile-speed flags stay
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if f.startswith(("--xla_backend_optimization_level", "--xla_cpu_use_fusion_emitters")))
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "fnbp", "bench", "--quick", "--batch-sizes", str(TINY_B),
           "--sizes", ",".join(map(str, TINY)), "--gemm-sizes", "32,64", "--min-time", "0.01",
           "--per-example-batch", "4", "--simulated-devices", str(N_SIM), "--no-torch", "--cases", QUICK_CASES,
           "--json", str(out / "b.json"), "--md", str(out / "b.md")]
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "b.json").read_text()), (out / "b.md").read_text(), proc.stdout


def _pos(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


TIMED = ("ms_median", "ms_q1", "ms_q3", "ms_min", "ms_max", "cpu_ms_median", "n_samples")


@pytest.mark.slow
def test_quick_run_header(quick_run):
    r, _, _ = quick_run
    assert r["schema"] == 1 and r["quick"] is True and r["command"].startswith("fnbp bench --quick")
    m = r["machine"]
    assert m["usable_cores"] >= 1 and m["versions"]["jax"]
    assert set(m["versions"]) == {"jax", "jaxlib", "optax", "numpy", "torch"}
    net = r["network"]
    assert net["sizes"] == list(TINY) and (net["P"], net["P1"]) == (16 * 8 + 8 * 8 + 8 * 4, 16 * 8)
    g = r["gemm"]
    assert set(g["sizes"]) == {"32", "64"} and g["best_size"] in (32, 64)
    assert _pos(g["rate_gflops"]) and _pos(g["rate_gflop_per_cpu_s"])


@pytest.mark.slow
def test_quick_run_train_step_ratios_are_finite_and_positive(quick_run):
    r, _, _ = quick_run
    (s,) = r["train_step"]
    assert s["batch_size"] == TINY_B and s["flops"] == hand_flops(TINY, TINY_B)
    v = s["variants"]
    for name in ("fnbp_autodiff", "fnbp_backprop", "peer_jax"):
        row = v[name]
        for key in TIMED + ("examples_per_s", "gflops", "frac_gemm", "frac_gemm_cpu", "ratio_to_peer",
                            "ratio_to_peer_cpu", "compile_s"):
            assert _pos(row[key]), (name, key, row.get(key))
        assert row["ms_min"] <= row["ms_q1"] <= row["ms_median"] <= row["ms_q3"] <= row["ms_max"]
        for key in ("ratio_to_peer_paired", "ratio_to_peer_cpu_paired"):
            assert all(_pos(row[key][q]) for q in ("median", "q1", "q3"))
        assert row["hlo_dots"]["n_dots"] >= 1 and math.isfinite(row["final_loss"])
        assert row["examples_per_s"] == pytest.approx(TINY_B / (row["ms_median"] / 1e3))
        assert row["gflops"] == pytest.approx(s["flops"] / (row["ms_median"] / 1e3) / 1e9)
    peer = v["peer_jax"]
    for name in ("fnbp_autodiff", "fnbp_backprop"):           # each ratio: the row's own median over the peer's
        assert v[name]["ratio_to_peer"] == pytest.approx(v[name]["ms_median"] / peer["ms_median"], rel=1e-9)
        assert v[name]["ratio_to_peer_cpu"] == pytest.approx(v[name]["cpu_ms_median"] / peer["cpu_ms_median"],
                                                             rel=1e-9)
    assert v["torch_eager"] == {"label": "PyTorch eager (CPU) + torch.optim.Adam", "skipped": "--no-torch"}
    d = s["diagnostics"]
    assert _pos(d["gemms_only"]["cpu_ms_median"]) and _pos(d["adam_only"]["cpu_ms_median"])
    # the report's claim: autodiff through the rules and the explicit loop are one XLA program
    assert d["autodiff_and_backprop_same_program"] is True
    names = {t["target"] for t in r["targets"]}
    assert any("step time" in n for n in names) and any("temp memory" in n for n in names)
    assert all(isinstance(t["met"], bool) and math.isfinite(t["value"]) for t in r["targets"])


@pytest.mark.slow
def test_quick_run_other_cases(quick_run):
    r, _, _ = quick_run
    lay = r["grad_w_layouts"]
    (row,) = lay["rows"]                                  # --quick: the last layer only
    assert (row["n_out"], row["n_in"], row["batch_size"]) == (TINY[-1], TINY[-2], TINY_B)
    assert row["chosen"] == ("materialized_T" if TINY[-1] <= lay["narrow_grad_w"] else "in_place")
    assert _pos(row["speedup_materialized"]) and _pos(row["speedup_materialized_cpu"])
    o = r["optimizer"]
    assert o["n_params"] == 16 * 8 + 8 + 8 * 8 + 8 + 8 * 4 + 4
    assert all(_pos(o["variants"][n][k]) for n in ("fnbp_adam", "optax_adam") for k in TIMED)
    assert _pos(o["ratio_fnbp_to_optax"]) and _pos(o["ratio_fnbp_to_optax_cpu"])
    p = r["per_example"]
    assert p["batch_size"] == 4 and _pos(p["ratio_fnbp_to_peer"])
    assert p["max_rel_diff"] < 1e-4                     # the two per-example gradients agree (float32)
    sim = r["simulated_devices"]
    assert sim["n_devices"] == N_SIM and sim["status"] == "ok", sim["status"]
    (row,) = sim["rows"]
    assert row["batch_size"] == TINY_B and _pos(row["ratio_dp_to_one_device"])
    assert row["data_parallel"]["all_reduces"] >= 1 and row["one_device"]["all_reduces"] == 0
    mp = r["multiprocess"]                                # 2 processes x 2 devices (jax.distributed, gloo)
    assert mp["status"] == "ok", mp["status"]
    (row,) = mp["rows"]
    assert (row["processes"], row["devices"], row["batch_size"]) == (2, 4, TINY_B)
    assert _pos(row["ratio_mp_to_one_device"]) and row["multi_process"]["n_samples"] == 5
    assert row["multi_process"]["all_reduces"] >= 1 and row["one_device"]["all_reduces"] == 0


@pytest.mark.slow
def test_quick_run_lenet(quick_run):
    """The LeNet case of the quick run: every variant timed, the FLOPs, the ratios and the targets
    computed from the medians, and the reference really is JAX's convolution (fnbp's is not)."""
    from fnbp import cnn
    from fnbp.bench import lenet
    r, md, stdout = quick_run
    sec = r["lenet"]
    assert sec["batch_size"] == 8 and sec["steps_per_call"] == 2
    assert sec["flops"] == lenet.lenet_step_flops(cnn.lenet(**lenet.QUICK_ARCH), 8)
    assert sec["gemm_size"] == r["gemm"]["best_size"] and _pos(sec["gemm_gflops_concurrent"])
    v = sec["variants"]
    for name in ("fnbp_scan", "fnbp_im2col_scan", "lax_scan", "fnbp_jit", "fnbp_im2col_jit", "lax_jit"):
        row = v[name]
        for key in TIMED + ("gflops", "frac_gemm", "ratio_to_lax_jit", "compile_s"):
            assert _pos(row[key]), (name, key, row.get(key))
        assert row["gflops"] == pytest.approx(sec["flops"] / (row["ms_median"] / 1e3) / 1e9)
        assert row["frac_gemm"] == pytest.approx(row["gflops"] / sec["gemm_gflops_concurrent"])
        assert row["ratio_to_lax_jit"] == pytest.approx(row["ms_median"] / v["lax_jit"]["ms_median"])
        assert _pos(row["ratio_to_lax_jit_paired"]["median"]) and math.isfinite(row["final_loss"])
    assert v["torch_eager"]["skipped"] == "--no-torch"
    t = {x["ratio"]: x for x in sec["targets"]}
    assert t["fnbp_scan / lax_jit"]["value"] == pytest.approx(v["fnbp_scan"]["ms_median"] / v["lax_jit"]["ms_median"])
    assert t["lax_scan / fnbp_scan"]["value"] == pytest.approx(v["lax_scan"]["ms_median"] / v["fnbp_scan"]["ms_median"])
    assert t["fnbp_scan / lax_jit"]["met"] == (t["fnbp_scan / lax_jit"]["value"] <= 0.6)
    assert t["lax_scan / fnbp_scan"]["met"] == (t["lax_scan / fnbp_scan"]["value"] >= 5)
    assert sec["lax_uses_convolution"] is True and sec["fnbp_uses_convolution"] is True   # conv2d_xla, in its rule
    assert sec["fnbp_im2col_uses_convolution"] is False                                  # im2col + GEMM
    assert all(_pos(sec["xla_over_im2col"][loop]["median"]) for loop in ("scan", "jit"))
    assert lenet.LABELS["fnbp_im2col_scan"] in md and "conv2d_xla / conv2d (paired" in md
    assert "## LeNet training step (issue #13), B = 8" in md and lenet.LABELS["lax_scan"] in md
    assert "LeNet step, B = 8" in stdout and "target fnbp_scan / lax_jit <= 0.6" in stdout


@pytest.mark.slow
def test_quick_run_markdown_is_the_renderer_of_its_json(quick_run):
    r, md, stdout = quick_run
    assert md == report.render_markdown(r)
    assert md.startswith("# Benchmark") and "Quick mode" in md
    for fragment in ("## Machine", "## One training step", "### Targets", "## Optimizer update alone",
                     "## Per-example gradients", "## Data parallel", "## Data parallel over processes",
                     r["machine"]["versions"]["jax"]):
        assert fragment in md, fragment
    assert "fnbp autodiff" in stdout and "peer (jax+optax)" in stdout


@pytest.mark.slow
def test_bench_cli_rejects_an_unknown_case_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fnbp", "bench", "--cases", "gemm,nope"], cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--cases" in proc.stderr and "'nope'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_experiments_script_writes_to_experiments_results_by_default(capsys):
    sys.path.insert(0, str(ROOT))
    try:
        from experiments import bench as script
    finally:
        sys.path.remove(str(ROOT))
    with pytest.raises(SystemExit):
        script.main(["--help"])
    assert str(ROOT / "experiments" / "results" / "bench.json") in re.sub(r"\n\s*", "", capsys.readouterr().out)


@pytest.mark.slow
def test_torch_step_runs_and_learns():
    """The PyTorch variant on a tiny network (skipped when torch is not installed: it is optional)."""
    pytest.importorskip("torch")
    from fnbp.bench.steps import TorchStep, make_data
    rng = np.random.default_rng(0)
    params = [{"W": rng.standard_normal((n_out, n_in)).astype(np.float32) * 0.3,
               "b": np.zeros(n_out, np.float32)} for n_in, n_out in zip(TINY[:-1], TINY[1:])]
    x, y = make_data(TINY, TINY_B, 1)
    step = TorchStep(params, x, y, threads=1)
    step()
    first = float(step.last_loss)
    for _ in range(30):
        step()
    assert math.isfinite(first) and float(step.last_loss) < first


@pytest.mark.slow
def test_torch_lenet_matches_fnbp_and_learns():
    """The PyTorch LeNet computes fnbp's logits from the same weights, and its steps lower the loss
    (skipped when torch is not installed: it is optional)."""
    pytest.importorskip("torch")
    import jax
    import jax.numpy as jnp
    from fnbp import cnn
    from fnbp.bench import lenet
    arch = cnn.lenet(**lenet.QUICK_ARCH)
    key, x, y = lenet._data(arch, 16, 0)
    params = jax.tree_util.tree_map(lambda v: v.astype(jnp.float32), cnn.init(key, arch))
    x = x.astype(jnp.float32)
    step = lenet.TorchLeNet(arch, params, x, y, 8, threads=1)
    ours = np.asarray(cnn.apply(params, x, arch=arch))
    theirs = step.logits(step.batches[0][0]).detach().numpy()
    np.testing.assert_allclose(theirs, ours[:8], rtol=1e-4, atol=1e-5)
    step()
    first = float(step.last_loss)
    for _ in range(20):
        step()
    assert math.isfinite(first) and float(step.last_loss) < first


def test_quick_run_covers_every_case_but_the_one_tested_elsewhere():
    """A new case is in the quick run unless it is added here on purpose (lenet_run: two epochs of a 28 x 28 LeNet
    run by ``test_lenet_run_torch_loop_is_the_same_model_and_the_run_reports_both``; text_run: an LSTM trained on
    Shakespeare, run tiny by ``test_text_run_reports_both_sides_and_they_train_alike``)."""
    assert set(QUICK_CASES.split(",")) | {"per_example_rules", "lenet_run", "text_run"} == set(registry.load_cases())


# --- the per-example benchmark case (fnbp.bench.per_example_rules; moved from tests/test_per_example.py) ---
@pytest.mark.slow
def test_bench_case_reports_the_issue_ratios():
    """The benchmark rows (fnbp.bench case 'per_example_rules') on a tiny network: fields present, and the
    two ways agree in float32.  Speed is reported by the benchmark, never asserted."""
    from fnbp.bench import per_example_rules
    res = per_example_rules.bench_per_example_rules((8, 6, 3), 4, min_time=0.001, seed=0)
    assert set(res["stats"]) == set(per_example_rules.VARIANTS)
    assert all(res["ratios"][k]["median"] > 0 for k in ("norms_time", "dp_time", "dp_vs_plain_step",
                                                         "dp_clip_vs_plain_step", "noise_vs_plain_step"))
    assert res["agreement_float32"]["norms_max_rel"] < 1e-5 and res["agreement_float32"]["dp_step_max_abs"] < 1e-5
    # the split timed apart adds up to the DP step: dp_fnbp = dp_clip - LR / B (noise - p)
    assert res["agreement_float32"]["dp_split_max_abs"] < 1e-6 and res["temp_ratios"]["dp_vs_plain_temp"] > 0
    text = "\n".join(per_example_rules.render(res))
    assert "| DP step, temp memory |" in text and "≤ 0.1" in text
    assert "| … its noise draw alone / ordinary step, time |" in text
    assert "| DP step / ordinary step, temp memory |" in text
    # max_time ends the rounds although no variant could fill a min_time of 10^9 s (else this would never return)
    capped = per_example_rules.bench_per_example_rules((8, 6, 3), 4, min_time=1e9, max_time=0.2, seed=0)
    assert capped["max_time"] == 0.2 and all(st["n_samples"] >= 5 for st in capped["stats"].values())
    assert "min 1000000000.0 s per variant or 0.2 s of rounds." in "\n".join(per_example_rules.render(capped))


@pytest.mark.slow
def test_bench_lenet_rows_report_the_issue_ratios():
    """The LeNet rows of the benchmark on a tiny LeNet: fields present, conv norm methods named, the two ways
    agree in float32, and the rendered section has the LeNet table.  Speed is reported, never asserted."""
    from fnbp.bench import per_example_rules
    arch = fnbp.cnn.LeNet(image_shape=(6, 6, 1), channels=(2,), kernel=3, padding="SAME", hidden=(), n_classes=3)
    res = per_example_rules.bench_per_example_lenet(arch, 3, min_time=0.001, seed=0)
    assert set(res["stats"]) == set(per_example_rules.VARIANTS) and res["conv_norm_methods"] == ["direct"]
    assert all(res["ratios"][k]["median"] > 0 for k in ("norms_time", "dp_time", "dp_vs_plain_step"))
    assert res["agreement_float32"]["norms_max_rel"] < 1e-4 and res["agreement_float32"]["dp_step_max_abs"] < 1e-5
    assert res["agreement_float32"]["dp_split_max_abs"] < 1e-6
    mlp = per_example_rules.bench_per_example_rules((4, 3), 3, min_time=0.001, seed=0)
    text = "\n".join(per_example_rules.render(dict(mlp, lenet=res)))
    assert "### LeNet rows" in text and "Conv norm methods (`fnbp.per_example.norm_method`): direct" in text
    assert text.count("| DP step, temp memory |") == 2


def test_lenet_run_section_of_a_known_result():
    from fnbp.bench import lenet_run
    row = {"epoch_s": [9.0, 4.0, 5.0], "train_s": [8.0, 3.0, 3.5], "test_accuracy": [0.9, 0.95, 0.97],
           "epoch_s_median": 4.5, "images_per_s": 1777.7, "train_images_per_s": 2461.5}
    torch_row = dict(row, epoch_s_median=6.0, images_per_s=1333.3, test_accuracy=[0.9, 0.94, 0.96])
    sec = {"recipe": dict(lenet_run.RECIPE), "data": "mnist", "n_train": 8000, "n_test": 2000,
           "images_per_epoch": 8000, "epochs": 3, "compile_s": 2.0, "fnbp": row, "torch": torch_row,
           "speed_ratio_paired": {"median": 1.25, "q1": 1.2, "q3": 1.3, "rounds": 2}}
    lines = lenet_run.render(sec)
    assert lines[0].startswith("## Whole run: `fnbp train --data mnist --model lenet`")
    assert "| fnbp.train.train (the CLI's recipe) | 4.5 | 1,778 | 2,462 | 0.9700 |" in lines
    assert "| PyTorch loop (eager) | 6 | 1,333 | 2,462 | 0.9600 |" in lines
    assert any("paired by epoch: 1.25 [1.2–1.3] over 2 epochs" in ln for ln in lines)
    assert lenet_run.summary(sec) == ["lenet_run: fnbp 1,778 images/s, PyTorch 1,333 images/s, fnbp / PyTorch 1.25"]
    skipped = dict(sec, torch={"skipped": "--no-torch"})
    del skipped["speed_ratio_paired"]
    assert "| PyTorch loop (eager) | skipped: --no-torch | | | |" in lenet_run.render(skipped)


def test_lenet_run_finds_a_torch_python_or_says_why_not(monkeypatch, tmp_path):
    from fnbp.bench import lenet_run
    assert lenet_run.torch_python(no_torch=True) == (None, "--no-torch")
    monkeypatch.setenv("FNBP_TORCH_PYTHON", str(tmp_path / "nowhere" / "python"))
    python, why = lenet_run.torch_python()
    assert python is None and "FNBP_TORCH_PYTHON=" in why and "does not exist" in why
    monkeypatch.setenv("FNBP_TORCH_PYTHON", sys.executable)
    assert lenet_run.torch_python() == (sys.executable, None)


@pytest.mark.slow
def test_lenet_run_torch_loop_is_the_same_model_and_the_run_reports_both():
    """A 2-epoch run on a tiny synthetic set reports fnbp's side (and PyTorch's, or why it was skipped); where a
    torch Python exists (FNBP_TORCH_PYTHON), the PyTorch child, from fnbp's initial weights, gives fnbp's test
    loss and accuracy (same layouts, flatten order, biases)."""
    import jax
    from fnbp import nn, train
    from fnbp.bench import lenet_run
    python, why = lenet_run.torch_python()
    ds = lenet_run.synthetic_images(128, 64, seed=1)
    sec = lenet_run.bench_lenet_run(ds, 2, python=python, threads=1, skip_reason=why)
    assert len(sec["fnbp"]["epoch_s"]) == 2 and sec["fnbp"]["images_per_s"] > 0 and sec["images_per_epoch"] == 128
    text = "\n".join(lenet_run.render(sec))
    if python is None:
        assert sec["torch"] == {"skipped": why} and f"| PyTorch loop (eager) | skipped: {why} |" in text
        return
    assert len(sec["torch"]["epoch_s"]) == 2 and sec["torch"]["images_per_s"] > 0
    assert sec["speed_ratio_paired"]["rounds"] == 1 and "paired by epoch" in text
    model = nn.lenet((28, 28, 1), 10, dropout=0.25)
    params, _ = model.init(jax.random.key(0), (28, 28, 1))
    params = [dict(layer, b=jax.random.normal(jax.random.key(i + 1), layer["b"].shape) * 0.1)   # biases matter
              for i, layer in enumerate(params)]
    peer = lenet_run.TorchRun(python, ds, params, seed=0, threads=1)
    try:
        got = peer.evaluate()
    finally:
        peer.close()
    loss, acc = train.evaluate(train.Config(), params, None, jax.numpy.asarray(ds.x_test), jax.numpy.asarray(ds.y_test),
                               model=model)
    np.testing.assert_allclose(got["test_loss"], float(loss), rtol=1e-5)
    assert got["test_accuracy"] == pytest.approx(float(acc), abs=1e-9)


# --- the text_run case (fnbp.bench.text_run: fnbp train --data shakespeare --model lstm vs PyTorch's nn.LSTM) ---
TINY_TEXT_FLAGS = ["--hidden", "12", "--embed", "6", "--batch-size", "8", "--seq-len", "16", "--steps-per-epoch", "5",
                   "--epochs", "2", "--lr-decay", "0.1", "--clip", "0.1"]     # decay and clipping at work in 10 steps


def _small_corpus():
    from fnbp import text
    corpus = text.load_shakespeare()
    return corpus._replace(train=corpus.train[:20000], validation=corpus.validation[:6000])


def test_text_run_section_of_a_known_result():
    from fnbp.bench import text_run
    side = {"epochs": [{"seconds": 100.0}, {"seconds": 110.0}], "curve": [[100.0, 1.9], [210.0, 1.7]],
            "train_seconds": 210.0, "steps": 500, "chars": 2048000, "chars_per_s": 9752.4, "final_valid_loss": 1.7,
            "final_valid_bits": 1.7 / math.log(2)}
    torch_side = dict(side, curve=[[120.0, 1.95]], epochs=[{"seconds": 120.0}], train_seconds=120.0, steps=250,
                      chars=1024000, chars_per_s=8533.3, final_valid_loss=1.95, final_valid_bits=1.95 / math.log(2))
    recipe = {"hidden": 256, "embed": 64, "batch_size": 64, "seq_len": 64, "lr": 2e-3, "lr_schedule": "exponential",
              "lr_decay": 3e-4, "clip": 1.0, "optimizer": "adam", "epochs": 20, "steps_per_epoch": 0, "seed": 0}
    sec = {"command": "fnbp train --data shakespeare --model lstm --time-budget 210", "recipe": recipe,
           "seconds": 210.0, "data": "shakespeare", "n_train": 1059140, "n_valid": 117683, "vocab_size": 67,
           "compile_s": 3.0, "initial_valid_loss": {"fnbp": 4.2, "torch": 4.2000001}, "ln_V": math.log(67),
           "fnbp": side, "torch": torch_side, "initial_valid_rel_diff": 2.4e-8, "chars_per_s_ratio": 1.1428,
           "valid_loss_diff": -0.25}
    # equal training time: PyTorch finished first (120 s); fnbp read between (100, 1.9) and (210, 1.7) there
    st = text_run.same_time(sec)
    assert st["first_done"] == "torch" and st["seconds"] == 120.0 and st["torch"] == 1.95
    assert st["fnbp"] == pytest.approx(1.9 - 0.2 * 20 / 110, abs=1e-12)
    assert st["diff"] == pytest.approx(1.9 - 0.2 * 20 / 110 - 1.95, abs=1e-12)
    assert [g["seconds"] for g in st["grid"]] == [60.0, 120.0, 180.0]
    assert st["grid"][0]["fnbp"] == pytest.approx(4.2 - 2.3 * 0.6, abs=1e-12)          # from (0, initial)
    assert st["grid"][0]["torch"] == pytest.approx(4.2000001 - 2.2500001 * 0.5, abs=1e-12)
    assert st["grid"][2]["torch"] == 1.95                                                 # done: its final value
    sec["same_time"] = st
    lines = text_run.render(sec)
    assert lines[0].startswith("## Whole run: `fnbp train --data shakespeare --model lstm` vs PyTorch's `nn.LSTM`")
    assert any(ln.startswith("At equal training time, 120.0 s, when PyTorch finished its run: fnbp 1.8636, "
                             "PyTorch 1.9500 nats/char, fnbp − PyTorch -0.0864 (target ≤ 0") for ln in lines)
    assert "| 60 | 2.8200 | 3.0750 | -0.2550 |" in lines and "| 180 | 1.7545 | 1.9500 | -0.1955 |" in lines
    assert "| fnbp train (the CLI's loop) | 2 | 500 | 210.0 | 9,752 | 1.7000 | 2.4526 |" in lines
    assert "| PyTorch nn.LSTM (eager) | 1 | 250 | 120.0 | 8,533 | 1.9500 | 2.8133 |" in lines
    assert "| 1 | 100.0 | 1.9000 | 120.0 | 1.9500 |" in lines and "| 2 | 210.0 | 1.7000 |  |  |" in lines
    assert any("over the whole run: 1.14. fnbp − PyTorch final validation loss: -0.2500" in ln for ln in lines)
    assert any("relative difference 2.4e-08" in ln for ln in lines)
    assert text_run.summary(sec) == ["text_run: fnbp 1.7000 nats/char after 210 s (9,752 chars/s), PyTorch 1.9500 "
                                     "after 120 s (8,533 chars/s), chars/s fnbp / PyTorch 1.14; at equal training "
                                     "time (120 s) fnbp 1.8636, PyTorch 1.9500"]
    skipped = {k: v for k, v in sec.items() if k not in ("chars_per_s_ratio", "valid_loss_diff",
                                                         "initial_valid_rel_diff", "same_time")}
    skipped.update(torch={"skipped": "--no-torch"}, initial_valid_loss={"fnbp": 4.2})
    text = "\n".join(text_run.render(skipped))
    assert "| PyTorch nn.LSTM (eager) | skipped: --no-torch | | | | | |" in text and "| 2 | 210.0 | 1.7000 |" in text


def test_text_run_takes_the_cli_defaults_and_refuses_what_torch_does_not_run():
    from fnbp._cli_text import TEXT_FLAGS
    from fnbp._cli_model import TEXT_DEFAULTS
    from fnbp.bench import text_run
    args = text_run.cli_args()
    assert (args.model, args.optimizer, args.lr_decay) == ("lstm", "adam", 3e-4)
    assert all(getattr(args, k) == v for k, v in TEXT_FLAGS.items())
    assert all(getattr(args, k) == TEXT_DEFAULTS[k] for k in ("epochs", "batch_size", "lr", "lr_schedule"))
    for flags, what in ((["--model", "gru"], "--model gru"), (["--optimizer", "momentum"], "--optimizer momentum")):
        with pytest.raises(ValueError, match=f"fnbp.bench.text_run: .*{what}"):
            text_run.cli_args(flags)


@pytest.mark.slow
def test_text_run_torch_child_is_the_same_model_from_the_same_weights():
    """From fnbp's initial weights (the CLI's init: every bias nonzero), the PyTorch child's first evaluation
    (before training) is fnbp's validation loss over the whole validation stream (gate order, the bias mapping
    b_ih = b and b_hh = 0, the Linear layer, the validation chunks and carried state); without a torch Python
    (FNBP_TORCH_PYTHON) the reason names it."""
    from fnbp import _cli_text, charlm
    from fnbp.bench import lenet_run, text_run
    python, why = lenet_run.torch_python()
    if python is None:
        assert "FNBP_TORCH_PYTHON" in why
        pytest.skip(why)
    corpus, args = _small_corpus(), text_run.cli_args(TINY_TEXT_FLAGS)
    params, _, _, _, k_train = text_run.initial_state(args, corpus)
    ours = charlm.evaluate(params, corpus.validation, _cli_text.EVAL_ROWS, args.seq_len, "lstm")
    peer = text_run.TorchTextRun(python, corpus, params, args, text_run.epoch_offsets(k_train, 2, args.seq_len), 10.0,
                                 threads=1)
    try:
        theirs = peer.evaluate()["valid_loss"]
    finally:
        peer.close()
    assert abs(theirs - ours) <= 1e-5 * abs(ours), (theirs, ours)


@pytest.mark.slow
def test_text_run_reports_both_sides_and_they_train_alike():
    """A 2-epoch run of 5 steps on a tiny LSTM: both sides' rows and curves; where a torch Python exists
    (FNBP_TORCH_PYTHON), the same chunks (each epoch's offset), clipping, Adam and learning-rate decay give the
    same training and validation losses epoch by epoch (float32, <= 1e-5 relative); a budget of 1e-9 s stops
    each side after its first step.  Without one, the PyTorch row is skipped with the reason."""
    from fnbp.bench import lenet_run, text_run
    python, why = lenet_run.torch_python()
    corpus = _small_corpus()
    assert list(text_run.epoch_offsets(text_run.initial_state(text_run.cli_args(TINY_TEXT_FLAGS), corpus)[4], 2,
                                       16)) != [0, 0]                 # the offsets matter
    sec = text_run.bench_text_run(60.0, flags=TINY_TEXT_FLAGS, corpus=corpus, python=python, threads=1,
                                  skip_reason=why)
    f = sec["fnbp"]
    assert [e["steps"] for e in f["epochs"]] == [5, 5] and f["chars"] == 10 * 8 * 16 and f["chars_per_s"] > 0
    assert [c[1] for c in f["curve"]] == [e["valid_loss"] for e in f["epochs"]]
    text = "\n".join(text_run.render(sec))
    if python is None:
        assert sec["torch"] == {"skipped": why} and f"| PyTorch nn.LSTM (eager) | skipped: {why} |" in text
        return
    t = sec["torch"]
    assert [e["steps"] for e in t["epochs"]] == [5, 5] and t["chars_per_s"] > 0 and "chars_per_s_ratio" in sec
    assert sec["initial_valid_rel_diff"] <= 1e-5
    for key in ("loss", "valid_loss", "grad_norm", "learning_rate"):
        np.testing.assert_allclose([e[key] for e in t["epochs"]], [e[key] for e in f["epochs"]], rtol=1e-5,
                                   err_msg=key)
    assert "| PyTorch nn.LSTM (eager) | 2 | 10 |" in text
    st = sec["same_time"]                          # equal training time: when the first side finished its run
    first = min(("fnbp", "torch"), key=lambda n: sec[n]["train_seconds"])
    assert st["first_done"] == first and st["seconds"] == sec[first]["train_seconds"]
    assert st[first] == sec[first]["final_valid_loss"] and st["diff"] == st["fnbp"] - st["torch"]
    assert f"At equal training time, {st['seconds']:.1f} s" in text
    sec = text_run.bench_text_run(1e-9, flags=TINY_TEXT_FLAGS, corpus=corpus, python=python, threads=1)
    assert [(e["steps"], e["stopped"]) for e in sec["fnbp"]["epochs"]] == [(1, True)]
    assert [(e["steps"], e["stopped"]) for e in sec["torch"]["epochs"]] == [(1, True)]


def test_header_describes_the_mlp_only_where_an_mlp_case_ran():
    # the committed text_run report (a run of that case alone): no MLP network, method or in-process PyTorch
    # lines, which described nothing that ran; with an MLP case in the result, they are back
    r = json.loads((ROOT / "experiments" / "results" / "text_run.json").read_text())
    r["notes"] = []
    head = "\n".join(report.render_header(r))
    assert "Generated by `fnbp bench --cases text_run" in head and "## Machine" in head
    assert "Network 784-512-512-10" not in head and "How it is measured" not in head and "skipped" not in head
    r["optimizer"] = {}
    head = "\n".join(report.render_header(r))
    assert "Network 784-512-512-10" in head and "How it is measured" in head


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_keep_freed_memory_stops_the_page_faults_of_a_reallocated_block():
    # a 64 MB block (glibc's malloc) freed and allocated again: with glibc's defaults a fresh mmap each time
    # (~16,000 minor page faults when touched); after keep_freed_memory() the second allocation reuses the heap (under
    # 1,000), and so it does in a child given fnbp._malloc.child_env() (--torch-malloc same); FNBP_MALLOC=default
    # leaves glibc's defaults
    code = """if True:
        import ctypes, resource, sys
        from fnbp._malloc import keep_freed_memory
        if sys.argv[1] == "off":
            assert keep_freed_memory() == {}
        if sys.argv[1] == "keep":
            assert keep_freed_memory() == {"M_MMAP_THRESHOLD": 2 ** 31 - 1, "M_TRIM_THRESHOLD": 2 ** 31 - 1,
                                           "M_TOP_PAD": 2 ** 28}
        libc, n = ctypes.CDLL(None), 2 ** 26
        libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
        block = libc.malloc(n); ctypes.memset(block, 1, n); libc.free(block)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(n); ctypes.memset(block, 1, n); libc.free(block)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
    from fnbp import _malloc
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("FNBP_BENCH_MALLOC",
                                                                                            "FNBP_MALLOC")}
    env["PYTHONPATH"] = str(ROOT)
    envs = {"default": env, "keep": env, "env": dict(env, **_malloc.child_env()),
            "off": dict(env, FNBP_MALLOC="default")}
    faults = {}
    for mode, mode_env in envs.items():
        proc = subprocess.run([sys.executable, "-c", code, mode], env=mode_env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        faults[mode] = int(proc.stdout.split()[-1])
    assert faults["default"] > 10_000 and faults["off"] > 10_000, faults
    assert faults["keep"] < 1_000 and faults["env"] < 1_000, faults


def test_busy_cores_reads_the_non_idle_share_of_proc_stat(monkeypatch):
    # two readings of /proc/stat's first line, 300 jiffies apart of which 200 idle (+ iowait): 1/3 of 2 cores busy
    lines = iter(["cpu  100 0 100 700 100 0 0 0 0 0\n", "cpu  150 0 150 880 120 0 0 0 0 0\n"])
    monkeypatch.setattr(harness, "open", lambda path: io.StringIO(next(lines)), raising=False)
    monkeypatch.setattr(harness.os, "cpu_count", lambda: 2)
    assert harness.busy_cores(seconds=0.0) == pytest.approx(2 / 3, abs=1e-12)
    monkeypatch.setattr(harness, "open", lambda path: (_ for _ in ()).throw(OSError("no /proc")), raising=False)
    assert harness.busy_cores(seconds=0.0) is None


def test_the_report_calls_a_machine_quiet_or_shared_from_the_busy_cores_before_the_run():
    m = {"loadavg_at_start": [1.83, 1.7, 1.2], "usable_cores": 2}
    # the load average lags a job that ended a minute ago; the busy cores in the second before the run do not
    assert report._load_line({**m, "busy_cores_at_start": 0.04}) == (
        "- Quiet machine: other work kept 0.04 cores busy in the second before the run (load average 1.8, 1.7, 1.2 "
        "on 2 cores).")
    shared = report._load_line({**m, "busy_cores_at_start": 0.9})
    assert shared.startswith("- Shared machine: other work kept 0.90 cores busy") and "waiting for a core" in shared
    # older results without the busy cores: from the 1-minute load average
    assert report._load_line(m).startswith("- Shared machine: load average 1.8, 1.7, 1.2 on 2 cores when the run")
    assert report._load_line({**m, "loadavg_at_start": [0.2, 0.5, 0.9]}) == (
        "- Quiet machine: load average 0.2, 0.5, 0.9 on 2 cores when the run started.")
