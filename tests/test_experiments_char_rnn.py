"""experiments/char_rnn.py and experiments/bench_lstm.py in --quick mode (into a temporary --out, so the committed
results are never touched): they run, write their files, and their numbers say what the scripts claim."""
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from experiments import bench_lstm, char_rnn, common  # noqa: E402


@pytest.mark.slow
def test_char_rnn_quick(tmp_path):
    results = char_rnn.main(["--quick", "--out", str(tmp_path), "--cells", "elman,lstm"])
    data = json.loads((tmp_path / "char_rnn.json").read_text())
    assert set(data["results"]) == {"elman", "lstm"} and (tmp_path / "char_rnn_curves.png").is_file()
    for cell, r in results.items():
        assert abs(r["first_loss"] - math.log(67)) <= 0.03 * math.log(67)        # a fresh model: ~ ln V
        assert r["final_valid"] < r["curve"][0]["valid"] - 0.3                   # it learned something
        assert r["sample"].startswith("ROMEO:\n") and len(r["sample"]) == len("ROMEO:\n") + 60
        assert len(r["grad_norms_through_time"]["trained"]) == 16
    # the vanishing gradient: the last character's loss reaches the first input of the chunk far more weakly
    # through the tanh cell than through the LSTM's cell path
    ratio = {c: r["grad_norms_through_time"]["trained"][0] / r["grad_norms_through_time"]["trained"][-1]
             for c, r in results.items()}
    assert ratio["elman"] < ratio["lstm"], ratio


@pytest.mark.slow
def test_bench_lstm_quick(tmp_path):
    summary, ratios = bench_lstm.main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench_lstm.json").read_text())
    # (and "torch eager" where torch is installed)
    assert set(summary) - {"torch eager"} == {"fnbp step", "autodiff step", "fnbp scan", "autodiff scan"}
    assert data["gradient_agreement"] <= 1e-4 and ratios["step"]["median"] > 0
    assert "measured on a " in (tmp_path / "bench_lstm.md").read_text()      # quiet or loaded: from busy_cores()


def test_bench_lstm_label_comes_from_the_load_before_its_own_work():
    assert common.load_label(0.12) == "measured on a quiet machine: load average 0.12 at the start"
    assert common.load_label(2.5) == "measured on a loaded machine: load average 2.50 at the start"
    # with the cores other work kept busy just before the start (busy_cores), the label says that instead
    assert common.load_label(2.21, 0.04) == ("measured on a quiet machine: other work kept 0.04 cores busy in the "
                                             "second before the start (1-minute load average 2.21, which lags)")
    assert common.load_label(0.1, 1.5).startswith("measured on a loaded machine: other work kept 1.50 cores busy")


def test_bench_lstm_per_step_times_divide_only_the_scan_variants():
    # a "... scan" call runs --steps optimizer steps; every other variant (torch eager included) runs one
    assert [bench_lstm.steps_per_call(n, 4) for n in ("fnbp scan", "autodiff scan")] == [4, 4]
    assert [bench_lstm.steps_per_call(n, 4) for n in ("fnbp step", "autodiff step", "torch eager")] == [1, 1, 1]


def test_bench_lstm_has_no_flax_rows_without_flax(monkeypatch):
    monkeypatch.setitem(sys.modules, "flax.linen", None)          # import flax.linen raises ImportError
    assert bench_lstm.flax_model(None, 67, 8, 16, 2, 4) is None


@pytest.mark.slow
def test_bench_lstm_times_flax_where_it_is_installed(tmp_path):
    pytest.importorskip("flax")
    summary, ratios = bench_lstm.main(["--quick", "--no-torch", "--out", str(tmp_path)])
    assert {"flax step", "flax scan"} <= set(summary)
    assert ratios["step vs flax"]["median"] > 0 and ratios["scan vs flax"]["median"] > 0
    assert json.loads((tmp_path / "bench_lstm.json").read_text())["flax"]
