"""The experiment scripts worked_examples, activations, optimizers and batch_size.

Each script's ``--quick`` mode runs here (in-process, writing to a temporary ``--out`` so the committed
results in experiments/results/ are never touched), so the scripts cannot rot; the worked examples are
checked number by number against the notes / the published example and an independent computation.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow          # runs the experiment scripts (--quick)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from experiments import activations, batch_size, common, optimizers, worked_examples  # noqa: E402


def _load(out, name):
    return json.loads((out / f"{name}.json").read_text())


# ----------------------------------------------------------------------------- worked examples
@pytest.fixture(scope="module")
def worked():
    checks, extra = worked_examples.compute()
    return checks.rows(), extra


def test_worked_examples_every_row_matches(worked):
    rows, _ = worked
    bad = [(r["section"], r["quantity"], r["match"]) for r in rows if not r["ok"]]
    assert not bad
    assert len(rows) >= 70


def _row(rows, section_part, quantity):
    hits = [r for r in rows if section_part in r["section"] and r["quantity"] == quantity]
    assert len(hits) == 1, (section_part, quantity, [r["quantity"] for r in rows if section_part in r["section"]])
    return hits[0]


@pytest.mark.parametrize("section, quantity, printed", [
    ("Softmax", "CLoss(p, y) = −Σ y ln p", "0.1328"),
    ("Softmax", "J(u, 1) = −u₁ + ln Σ e^u", "0.1328"),
    ("Softmax", "p = softmax(u) (slide's Python output)", "0.00589975, 0.8756006, 0.11849965"),
    ("Squared error", "E = ½[(1−0.8)² + (0−0.5)²]", "0.145"),
    ("Forward propagation", "A = σ(W_XA·X)", "0.76, 0.60, 0.65"),
    ("Forward propagation", "O = σ(W_AO·A)", "0.72, 0.70, 0.77"),
    ("Parameter count", "parameters of 1600-100-100-100-10 (num_params)", "181310"),
    ("Perceptron learning rule", "new (w₀, w₁, w₂)", "-2, -1.5, -0.7"),
    ("logical OR", "final weights (w₀, w₁, w₂)", "0, 1, 1"),
    ("Mazur", "E_total (initial error)", "0.298371109"),
    ("Mazur", "updated w5", "0.35891648"),
    ("Mazur", "updated w6", "0.408666186"),
    ("Mazur", "updated w7", "0.511301270"),
    ("Mazur", "updated w8", "0.561370121"),
    ("Mazur", "updated w1", "0.149780716"),
    ("Mazur", "updated w2", "0.19956143"),
    ("Mazur", "updated w3", "0.24975114"),
    ("Mazur", "updated w4", "0.29950229"),
])
def test_worked_examples_published_numbers(worked, section, quantity, printed):
    rows, _ = worked
    r = _row(rows, section, quantity)
    assert r["printed"] == printed
    assert r["ok"], r
    for v_ind, v_fn, s in zip(r["independent"], r["fnbp"], printed.split(", ")):
        assert worked_examples.printed_agreement(v_ind, s) is not None
        assert worked_examples.printed_agreement(v_fn, s) is not None
        assert math.isclose(v_ind, v_fn, rel_tol=1e-10, abs_tol=1e-12)


def test_worked_examples_or_table_all_ten_steps(worked):
    rows, _ = worked
    steps = [r for r in rows if "logical OR" in r["section"] and r["quantity"].startswith("step ")]
    assert [r["quantity"] for r in steps] == [f"step {k}" for k in range(1, 11)]
    assert all(r["ok"] and r["independent"] == r["fnbp"] for r in steps)


def test_worked_examples_sigmoid_exercise_by_hand(worked):
    """The notes-001 exercise recomputed here once more, directly, against fnbp's numbers in the table."""
    rows, _ = worked
    s = lambda t: 1 / (1 + math.exp(-t))  # noqa: E731
    o3, o4 = s(0.2 + 0.1 + 0.3), s(-0.3 - 0.2 + 0.4)
    u5 = s(0.4 + 0.5 * o3 - 0.4 * o4)
    d5 = (0 - u5) * u5 * (1 - u5)
    assert math.isclose(_row(rows, "Sigmoid network", "output u₅")["fnbp"][0], u5, rel_tol=1e-12)
    assert math.isclose(_row(rows, "Sigmoid network", "δ₅ = (y − u₅)u₅(1 − u₅)")["fnbp"][0], d5, rel_tol=1e-12)
    assert math.isclose(_row(rows, "Sigmoid network", "new w(3, 5) (was 0.5)")["fnbp"][0], 0.5 + d5 * o3,
                        rel_tol=1e-12)


def test_printed_agreement():
    pa = worked_examples.printed_agreement
    assert pa(0.13284523, "0.1328") == "rounded"
    assert pa(0.0058997, "0.0058") == "truncated"
    assert pa(0.7263, "0.72") == "truncated"
    assert pa(0.7263, "0.74") is None
    assert pa(0.145, "0.145") == "exact"
    assert pa(181310, "181310") == "exact"


def test_worked_examples_script_writes_results(tmp_path):
    assert worked_examples.main(["--out", str(tmp_path)]) == 0
    data = _load(tmp_path, "worked_examples")
    assert data["n_ok"] == data["n_rows"] == len(data["rows"])
    md = (tmp_path / "worked_examples.md").read_text()
    assert "| quantity | notes/published | independent | fnbp | match |" in md
    assert "NO (" not in md


# ----------------------------------------------------------------------------- quick runs of the others
def test_activations_quick(tmp_path):
    assert activations.main(["--quick", "--out", str(tmp_path)]) == 0
    data = _load(tmp_path, "activations")
    assert data["meta"]["quick"] is True
    res = data["results"]
    assert "sign" in res and "relu" in res
    for name in ("sign", "step"):
        if name in res:
            g = np.asarray(res[name]["grad_norm_W"])
            assert g.shape == (data["epochs"] + 1, 3)
            assert np.all(g[:, :2] == 0.0) and np.all(g[:, 2] > 0)         # only the output layer learns
            assert res[name]["max_abs_weight_change"][:2] == [0.0, 0.0]
    assert np.all(np.asarray(res["relu"]["grad_norm_W"])[0] > 0)
    assert (tmp_path / "activations_grad_norms.png").stat().st_size > 10_000


def test_optimizers_quick(tmp_path):
    assert optimizers.main(["--quick", "--out", str(tmp_path)]) == 0
    data = _load(tmp_path, "optimizers")
    runs = data["surfaces"]["runs"]
    assert set(runs) == set(optimizers.SURFACES)
    for surf, by_opt in runs.items():
        assert set(by_opt) == set(optimizers.OPTIMIZERS)
        start = optimizers.SURFACES[surf][2]
        for r in by_opt.values():
            assert r["trajectory"][0] == pytest.approx(list(start), abs=1e-6)
            assert math.isfinite(r["final_loss"])
    for surf in optimizers.SURFACES:
        assert (tmp_path / f"optimizers_{surf}.png").exists()
    assert (tmp_path / "optimizers_digits.png").exists() and (tmp_path / "optimizers_schedules.png").exists()
    sched = data["schedules"]["runs"]
    assert {r["schedule"] for r in sched.values()} == {"constant", "inverse", "exponential"}
    for r in sched.values():                                            # each schedule ends at η₀ or η₀/10
        expected = r["eta0"] if r["schedule"] == "constant" else r["eta0"] / 10
        assert r["history"][-1]["learning_rate"] == pytest.approx(expected, rel=1e-4)


def test_optimizers_surface_nesterov_uses_lookahead():
    """The 2-D loop takes nesterov's gradient at the look-ahead point: its path differs from momentum's
    (same η, β), which takes the gradient at θ."""
    res = optimizers.surface_runs(("nesterov", "momentum"), [1e-3], 20)
    traj_n, traj_m = res["nesterov"]["valley"][0][0], res["momentum"]["valley"][0][0]
    assert np.allclose(traj_n[:2], traj_m[:2])            # v_0 = 0: the first step is the same
    assert not np.allclose(traj_n[-1], traj_m[-1], rtol=0, atol=1e-6)


def test_batch_size_quick(tmp_path):
    assert batch_size.main(["--quick", "--out", str(tmp_path)]) == 0
    data = _load(tmp_path, "batch_size")
    runs = data["runs"]
    assert runs["full batch"]["batch_size"] == data["n_train"] and runs["full batch"]["steps"] == data["epochs"]
    assert runs["SGD (batch 1)"]["steps"] == data["epochs"] * data["n_train"]
    for r in runs.values():
        assert r["lr"] in data["lr_grid"]
        tuning = {lr: float(v) for lr, v in r["tuning_score"].items()}     # "inf" for diverged runs
        assert tuning[str(r["lr"])] == min(tuning.values())
        assert len(r["train_loss_per_epoch"]) == data["epochs"] + 1
    for kind in ("epochs", "time"):
        assert (tmp_path / f"batch_size_loss_vs_{kind}.png").exists()


# ----------------------------------------------------------------------------- entry points
@pytest.mark.parametrize("form", ["path", "module"])
def test_entry_points(form, tmp_path):
    """``python experiments/NAME.py`` works from any directory, ``python -m experiments.NAME`` from the root:
    each runs the worked examples for real (every row asserted by the script) into ``--out``."""
    out = tmp_path / "results"
    script = [str(ROOT / "experiments" / "worked_examples.py")] if form == "path" else ["-m", "experiments.worked_examples"]
    proc = subprocess.run([sys.executable, *script, "--out", str(out)], cwd=tmp_path if form == "path" else ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = _load(out, "worked_examples")
    assert result["n_ok"] == result["n_rows"] >= 70
    assert result["headline"] in proc.stdout and "[FAIL]" not in proc.stdout
    assert (out / "worked_examples.md").read_text().count("\n|") >= 70       # the table of every row


def test_common_helpers(tmp_path):
    assert common.md_table(["a", "b"], [[1, "x|y"]]).splitlines() == ["| a | b |", "|---|---|", "| 1 | x\\|y |"]
    assert common.fmt(0.0) == "0" and common.fmt(181310) == "181,310" and common.fmt(None) == "—"
    md, js = common.write_results(tmp_path, "demo", "# demo", {"x": np.float32(1.5), "v": np.arange(3)})
    assert json.loads(js.read_text())["x"] == 1.5 and json.loads(js.read_text())["v"] == [0, 1, 2]
    assert "Do not edit by hand" in md.read_text()


def test_the_header_command_reproduces_every_option_given(tmp_path):
    def add(p):
        p.add_argument("--hidden", type=int, default=256)
        p.add_argument("--no-flax", action="store_true")
        p.add_argument("--sizes", type=int, nargs="+", default=[8])
    args = common.parse_args("demo", ["--hidden", "384", "--no-flax", "--seed", "2", "--out", str(tmp_path),
                                      "--sizes", "4", "5"], add_arguments=add)
    assert common.command_line("demo", args) == "python experiments/demo.py --seed 2 --hidden 384 --no-flax --sizes 4 5"
    md, _ = common.write_results(tmp_path, "demo", "# demo", {}, args=args)
    assert "Generated by `python experiments/demo.py --seed 2 --hidden 384 --no-flax --sizes 4 5`" in md.read_text()
    # defaults are left out (and --out, which does not change the numbers)
    plain = common.parse_args("demo", ["--out", str(tmp_path), "--hidden", "256"], add_arguments=add)
    assert common.command_line("demo", plain) == "python experiments/demo.py"


# ----------------------------------------------------------------------------- the benchmark scripts' memory line
def test_bench_scripts_keep_freed_memory_and_say_so(tmp_path, monkeypatch):
    """bench_cnn and bench_per_example time every variant with freed memory kept (``fnbp._malloc``, as ``fnbp
    train`` does) and record it: the settings in the JSON and a "Memory:" line in the report; with
    FNBP_MALLOC=default the line says the platform's defaults."""
    from experiments import bench_cnn, bench_per_example
    from fnbp import _malloc
    bench_cnn.main(["--quick", "--no-torch", "--out", str(tmp_path)])
    bench_per_example.main(["--quick", "--sizes", "16,8,8,4", "--batch", "8", "--lenet-batch", "0", "--out",
                            str(tmp_path)])
    for name in ("bench_cnn", "bench_per_example"):
        malloc = _load(tmp_path, name)["malloc"]
        md = (tmp_path / f"{name}.md").read_text()
        if malloc:                                        # Linux with glibc: what mallopt accepted
            assert malloc == {k: v for k, v in _malloc.SETTINGS.items() if k in malloc}
            assert "Memory: glibc malloc keeps freed memory for reuse (mallopt M_" in md
        else:
            assert "Memory: malloc: the platform's defaults" in md
    monkeypatch.setenv("FNBP_MALLOC", "default")                 # glibc's defaults asked for: none set, and said so
    bench_per_example.main(["--quick", "--sizes", "16,8,8,4", "--batch", "8", "--lenet-batch", "0", "--out",
                            str(tmp_path)])
    assert _load(tmp_path, "bench_per_example")["malloc"] == {}
    assert "Memory: malloc: the platform's defaults" in (tmp_path / "bench_per_example.md").read_text()
    assert common.malloc_line({}).strip() == ("Memory: malloc: the platform's defaults (FNBP_MALLOC=default, or not "
                                              "glibc).")
    assert common.malloc_line({"M_TOP_PAD": 7}).strip() == ("Memory: glibc malloc keeps freed memory for reuse "
                                                            "(mallopt M_TOP_PAD 7), for every variant alike, as "
                                                            "`fnbp train` does.")
