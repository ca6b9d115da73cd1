"""The MNIST-optimizers and the vmapped-sweep experiments run end to end in --quick mode.

Each script runs once per module in a fresh interpreter (float32, as a user runs it: the test
session's conftest turns x64 on, which the scripts must not inherit), writing to a temporary
directory, so the committed ``experiments/results/`` are never touched.  The checks read the
JSON back: fields present, the mean and std recomputed from the per-seed numbers, the choices
(best rate, best optimizer) consistent with the numbers, the figures written.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow          # runs the MNIST experiments (subprocess)

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _mnist_available():
    if os.environ.get("FNBP_MNIST_DIR"):
        d = Path(os.environ["FNBP_MNIST_DIR"])
    else:
        d = ROOT.parent / "shared" / "data" / "mnist"
    return all(any((d / (base + ext)).is_file() for ext in ("", ".gz"))
               for base in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))


def _run(args, out):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_ENABLE_X64",)}
    env["MPLBACKEND"] = "Agg"
    proc = subprocess.run([sys.executable, *args, "--quick", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (f"{' '.join(args)} failed:\nstdout:\n{proc.stdout[-3000:]}\n"
                                  f"stderr:\n{proc.stderr[-5000:]}")
    return proc


def _check_png(path):
    assert path.is_file(), path
    data = path.read_bytes()
    assert len(data) > 5000, f"{path} is suspiciously small ({len(data)} bytes)"
    assert data[:8] == PNG_MAGIC, path


def _check_mean_std(values, mean, std, ddof):
    v = np.asarray(values, dtype=float)
    assert math.isclose(mean, v.mean(), rel_tol=0, abs_tol=1e-9)
    assert math.isclose(std, v.std(ddof=ddof) if v.size > 1 else 0.0, rel_tol=0, abs_tol=1e-9)


# ----------------------------------------------------------------------------- mnist_mlp
@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    if not _mnist_available():
        pytest.skip("MNIST t10k files not found (../shared/data/mnist or FNBP_MNIST_DIR)")
    out = tmp_path_factory.mktemp("mnist_mlp")
    _run(["experiments/mnist_mlp.py"], out)                 # the `python experiments/NAME.py` form
    return out, json.loads((out / "mnist_mlp.json").read_text())


def test_mnist_outputs_written(mnist):
    out, res = mnist
    assert res["meta"]["quick"] is True
    assert res["meta"]["script"] == "experiments/mnist_mlp.py"
    md = (out / "mnist_mlp.md").read_text()
    assert "Quick mode" in md and "Dropout and batch norm" in md
    assert sorted(res["figures"]) == ["mnist_mlp_loss_curves.png", "mnist_mlp_regularisation.png"]
    for f in res["figures"]:
        _check_png(out / f)
        assert f in md


def test_mnist_summary_consistent(mnist):
    _, res = mnist
    seeds, ddof, epochs = res["seeds"], res["std_ddof"], res["epochs"]
    assert len(seeds) >= 2 and epochs == 1
    assert set(res["optimizers"]) == {"sgd", "adam"}
    for name, r in res["optimizers"].items():
        assert len(r["test_accuracy"]) == len(seeds)
        assert all(0.0 <= a <= 1.0 for a in r["test_accuracy"])
        _check_mean_std(r["test_accuracy"], r["test_accuracy_mean"], r["test_accuracy_std"], ddof)
        for key in ("train_loss", "test_loss", "test_accuracy"):
            curves = r["curves"][key]
            assert len(curves) == len(seeds) and all(len(c) == epochs for c in curves)
        # the last point of each test-accuracy curve is the reported per-seed accuracy
        assert [c[-1] for c in r["curves"]["test_accuracy"]] == r["test_accuracy"]
        t = res["tuning"][name]
        assert t["chosen_lr"] == t["grid"][int(np.nanargmax(t["val_accuracy"]))] == r["learning_rate"]
    best = res["best_optimizer"]
    assert best == max(res["optimizers"], key=lambda n: res["optimizers"][n]["test_accuracy_mean"])
    h = res["headline"]
    assert h["optimizer"] == best
    assert h["test_accuracy_mean"] == res["optimizers"][best]["test_accuracy_mean"]
    assert h["test_accuracy_std"] == res["optimizers"][best]["test_accuracy_std"]


def test_mnist_regularisation_consistent(mnist):
    _, res = mnist
    reg = res["regularisation"]
    assert "plain" in reg and "dropout 0.2 + batch norm" in reg
    assert reg["plain"]["test_accuracy"] == res["optimizers"][res["best_optimizer"]]["test_accuracy"]
    both = reg["dropout 0.2 + batch norm"]
    assert both["dropout"] == 0.2 and both["batch_norm"] is True
    _check_mean_std(both["test_accuracy"], both["test_accuracy_mean"], both["test_accuracy_std"], res["std_ddof"])


# ----------------------------------------------------------------------------- sweep
@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    _run(["-m", "experiments.sweep"], out)                   # the `python -m experiments.NAME` form
    return out, json.loads((out / "sweep.json").read_text())


def test_sweep_outputs_written(sweep):
    out, res = sweep
    assert res["meta"]["quick"] is True
    md = (out / "sweep.md").read_text()
    assert "vmapped = sequential" in md and "Quick mode" in md
    assert res["figures"] == ["sweep_heatmap.png"]
    _check_png(out / "sweep_heatmap.png")


def test_sweep_table_consistent(sweep):
    _, res = sweep
    acc = np.asarray(res["test_accuracy"], dtype=float)           # seeds x rates
    assert acc.shape == (len(res["seeds"]), len(res["learning_rates"]))
    assert res["n_models"] == acc.size
    for j, row in enumerate(res["per_lr"]):
        assert row["lr"] == res["learning_rates"][j]
        assert row["test_accuracy"] == acc[:, j].tolist()
        _check_mean_std(acc[:, j], row["mean"], row["std"], res["std_ddof"])
    assert res["best_lr"] == res["learning_rates"][int(np.argmax(acc.mean(axis=0)))]


def test_sweep_timing_and_equality(sweep):
    _, res = sweep
    t = res["timing"]
    assert t["vmapped_seconds"] > 0 and t["sequential_seconds"] > 0
    assert math.isclose(t["ratio_sequential_over_vmapped"], t["sequential_seconds"] / t["vmapped_seconds"])
    e = res["equality"]
    pair = e["asserted_pair"]
    assert pair["max_abs_param_diff"] <= e["tolerance"] <= 1e-5
    assert pair["test_accuracy_vmapped"] == pair["test_accuracy_sequential"]
    assert e["pairs_compared"] == res["n_models"]                 # quick mode runs all of them sequentially
