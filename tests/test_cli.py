"""The fnbp command line, run as a user would (subprocess)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def fnbp(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "fnbp", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def _params(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files if k.startswith("params") or k.startswith("opt_state")}


def test_help_is_complete():
    top = fnbp("--help")
    assert top.returncode == 0 and all(c in top.stdout for c in ("train", "check", "bench"))
    train = fnbp("train", "--help")
    for opt in ["--data", "--layers", "--activation", "--optimizer", "--lr", "--epochs", "--batch-size",
                "--seed", "--out", "--resume", "--devices", "--accumulate", "--grad", "--dropout", "--batch-norm"]:
        assert opt in train.stdout, opt
    assert fnbp("check", "--help").returncode == 0


def test_resume_through_the_command_line_is_bit_identical(tmp_path):
    common = ["train", "--data", "digits", "--layers", "64,16,10", "--batch-size", "128", "--quiet", "--seed", "5"]
    straight = fnbp(*common, "--epochs", "2", "--out", str(tmp_path / "a"))
    assert straight.returncode == 0, straight.stderr
    first = fnbp(*common, "--epochs", "1", "--out", str(tmp_path / "b"))
    assert first.returncode == 0, first.stderr
    resumed = fnbp(*common, "--epochs", "2", "--out", str(tmp_path / "b"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    a, b = _params(tmp_path / "a" / "checkpoint.npz"), _params(tmp_path / "b" / "checkpoint.npz")
    assert a.keys() == b.keys() and a
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    hist = json.loads((tmp_path / "b" / "history.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == [1, 2]
    assert (tmp_path / "b" / "curves.png").stat().st_size > 1000
    assert "final test accuracy" in straight.stdout


def test_wrong_layers_fail_before_training(tmp_path):
    r = fnbp("train", "--layers", "63,32,11", "--out", str(tmp_path / "x"))
    assert r.returncode == 2
    assert "first width (input) is 63" in r.stderr and "64 features" in r.stderr
    assert "last width (output) is 11" in r.stderr and "10 classes" in r.stderr
    assert not (tmp_path / "x").exists()          # nothing was trained or written


def test_nan_loss_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    common = ["train", "--layers", "64,16,10", "--quiet", "--out", str(out), "--lr-schedule", "constant"]
    good = fnbp(*common, "--epochs", "1", "--lr", "1e-3")
    assert good.returncode == 0, good.stderr
    before = (out / "checkpoint.npz").read_bytes()
    bad = fnbp(*common, "--epochs", "3", "--lr", "1e30", "--resume")
    assert bad.returncode == 1
    assert "epoch 1 (0-based), step" in bad.stderr and "last good checkpoint" in bad.stderr
    assert (out / "checkpoint.npz").read_bytes() == before


def test_xor_trains_from_the_command_line(tmp_path):
    r = fnbp("train", "--data", "xor", "--layers", "2,8,2", "--batch-size", "full", "--lr", "0.05",
             "--lr-schedule", "constant", "--l2", "0", "--epochs", "300", "--quiet", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "final test accuracy 1.0000" in r.stdout
