"""Tests of experiments/bench.py: the FLOP count, the command line, and the report's fields.

The benchmark itself runs once, in a subprocess (the test process has float64 enabled by
conftest; the benchmark must see JAX's defaults), in --quick mode on a tiny network and
batch, writing JSON and markdown to a temporary directory.  Nothing here asserts speed:
only that every field is present and sane (positive times, finite ratios).
"""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments import bench  # noqa: E402  (imports no JAX at module level)

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


def test_parser_and_main_entry_point():
    assert callable(bench.main)
    args = bench.build_parser().parse_args(["--quick", "--batch-sizes", "8,16", "--sizes", "16,8,4",
                                            "--json", "x.json", "--md", "x.md"])
    assert args.quick and args.batch_sizes == (8, 16) and args.sizes == (16, 8, 4)
    assert args.json == Path("x.json") and args.md == Path("x.md")
    defaults = bench.build_parser().parse_args([])
    assert defaults.sizes == (784, 512, 512, 10) and defaults.batch_sizes is None
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--batch-sizes", "0"])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "experiments.bench", "--quick", "--batch-sizes", str(TINY_B),
           "--sizes", ",".join(map(str, TINY)), "--gemm-sizes", "32,64", "--min-time", "0.01",
           "--per-example-batch", "4", "--simulated-devices", str(N_SIM), "--no-torch",
           "--json", str(out / "b.json"), "--md", str(out / "b.md")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "b.json").read_text()), (out / "b.md").read_text(), proc.stdout


def _pos(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


TIMED = ("ms_median", "ms_q1", "ms_q3", "ms_min", "ms_max", "cpu_ms_median", "n_samples")


def test_report_header_machine_network(report):
    r, _, _ = report
    assert r["schema"] == 1 and r["quick"] is True
    m = r["machine"]
    for key in ("cpu_model", "usable_cores", "logical_cores", "versions", "jax_backend", "jax_devices", "gpu"):
        assert key in m
    assert m["usable_cores"] >= 1
    for mod in ("jax", "jaxlib", "optax", "numpy", "torch"):
        assert mod in m["versions"]
    assert m["versions"]["jax"]
    net = r["network"]
    assert net["sizes"] == list(TINY)
    assert (net["P"], net["P1"]) == (16 * 8 + 8 * 8 + 8 * 4, 16 * 8)
    assert "2*B*P" in net["flop_formula"]
    g = r["gemm"]
    assert set(g["sizes"]) == {"32", "64"} and g["best_size"] in (32, 64)
    assert _pos(g["rate_gflops"]) and _pos(g["rate_gflop_per_cpu_s"])


def test_report_train_step_rows(report):
    r, _, _ = report
    assert [s["batch_size"] for s in r["train_step"]] == [TINY_B]
    s = r["train_step"][0]
    assert s["flops"] == hand_flops(TINY, TINY_B)
    assert _pos(s["gemm_gflops_concurrent"])
    v = s["variants"]
    for name in ("fnbp_autodiff", "fnbp_backprop", "peer_jax"):
        row = v[name]
        for key in TIMED + ("examples_per_s", "gflops", "frac_gemm", "frac_gemm_cpu", "ratio_to_peer",
                            "ratio_to_peer_cpu", "compile_s"):
            assert _pos(row[key]), (name, key, row.get(key))
        assert row["ms_min"] <= row["ms_q1"] <= row["ms_median"] <= row["ms_q3"] <= row["ms_max"]
        for key in ("ratio_to_peer_paired", "ratio_to_peer_cpu_paired"):
            assert all(_pos(row[key][q]) for q in ("median", "q1", "q3"))
        assert row["temp_bytes"] is None or (isinstance(row["temp_bytes"], int) and row["temp_bytes"] >= 0)
        assert row["hlo_dots"]["n_dots"] >= 1
        assert math.isfinite(row["final_loss"])
        assert row["examples_per_s"] == pytest.approx(TINY_B / (row["ms_median"] / 1e3))
        assert row["gflops"] == pytest.approx(s["flops"] / (row["ms_median"] / 1e3) / 1e9)
    assert v["peer_jax"]["ratio_to_peer"] == pytest.approx(1.0)
    for name in ("fnbp_autodiff", "fnbp_backprop"):
        assert "temp_ratio_to_peer" in v[name]
    assert v["torch_eager"]["skipped"] == "--no-torch"     # torch has its own test below
    assert _pos(v["gemm"]["gflops"]) and _pos(v["gemm"]["ms_median"])
    d = s["diagnostics"]
    assert _pos(d["gemms_only"]["cpu_ms_median"]) and _pos(d["adam_only"]["cpu_ms_median"])
    assert d["autodiff_and_backprop_same_program"] in (True, False)


def test_report_targets_optimizer_per_example(report):
    r, _, _ = report
    names = {t["target"] for t in r["targets"]}
    assert any("step time" in n for n in names) and any("temp memory" in n for n in names)
    assert all(isinstance(t["met"], bool) and math.isfinite(t["value"]) for t in r["targets"])
    lay = r["grad_w_layouts"]
    (row,) = lay["rows"]                                  # --quick: the last layer only
    assert (row["n_out"], row["n_in"], row["batch_size"]) == (TINY[-1], TINY[-2], TINY_B)
    assert row["chosen"] == ("materialized_T" if TINY[-1] <= lay["narrow_grad_w"] else "in_place")
    assert _pos(row["speedup_materialized"]) and _pos(row["speedup_materialized_cpu"])
    assert all(_pos(row[k]["gflops"]) for k in ("in_place", "materialized_T"))
    o = r["optimizer"]
    assert o["n_params"] == 16 * 8 + 8 + 8 * 8 + 8 + 8 * 4 + 4
    for name in ("fnbp_adam", "optax_adam"):
        assert all(_pos(o["variants"][name][k]) for k in TIMED)
    assert _pos(o["ratio_fnbp_to_optax"]) and _pos(o["ratio_fnbp_to_optax_cpu"])
    p = r["per_example"]
    assert p["batch_size"] == 4
    for name in ("fnbp_rules", "peer_autodiff"):
        assert _pos(p["variants"][name]["examples_per_s"])
    assert _pos(p["ratio_fnbp_to_peer"])
    assert p["max_rel_diff"] < 1e-4                     # the two per-example gradients agree (float32)


def test_report_simulated_devices(report):
    r, _, _ = report
    sim = r["simulated_devices"]
    assert sim["n_devices"] == N_SIM and f"simulated ({N_SIM} CPU devices" in sim["label"]
    if importlib.util.find_spec("fnbp.parallel") is None:
        assert sim["status"] == "not run: fnbp.parallel missing"
        return
    assert sim["status"] == "ok", sim["status"]
    (row,) = sim["rows"]
    assert row["batch_size"] == TINY_B
    for n in ("data_parallel", "one_device"):
        assert _pos(row[n]["ms_median"]) and _pos(row[n]["examples_per_s"])
    assert row["data_parallel"]["all_reduces"] >= 1 and row["one_device"]["all_reduces"] == 0
    assert _pos(row["ratio_dp_to_one_device"])


def test_torch_step_runs_and_learns():
    """The PyTorch variant on a tiny network (skipped when torch is not installed: it is optional)."""
    pytest.importorskip("torch")
    import numpy as np
    rng = np.random.default_rng(0)
    params = [{"W": rng.standard_normal((n_out, n_in)).astype(np.float32) * 0.3,
               "b": np.zeros(n_out, np.float32)} for n_in, n_out in zip(TINY[:-1], TINY[1:])]
    x, y = bench.make_data(TINY, TINY_B, 1)
    step = bench.TorchStep(params, x, y, threads=1)
    step()
    first = float(step.last_loss)
    for _ in range(30):
        step()
    assert math.isfinite(first) and float(step.last_loss) < first


def test_report_markdown_and_stdout(report):
    r, md, stdout = report
    assert md.startswith("# Benchmark")
    assert "Quick mode" in md
    if not r["machine"]["gpu"]:
        assert "No GPU" in md
    for fragment in ("## Machine", "## One training step", "### Targets", "## Optimizer update alone",
                     "## Per-example gradients", "## Data parallel", r["machine"]["versions"]["jax"]):
        assert fragment in md, fragment
    assert "fnbp autodiff" in stdout and "peer (jax+optax)" in stdout
