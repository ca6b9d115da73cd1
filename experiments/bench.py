"""The benchmark, run from a source checkout: ``python -m experiments.bench [options]``.

The benchmark itself is the package ``fnbp.bench`` (what it measures and how: its module
docstring; ``fnbp bench`` is the same program). This script only adds the default output of a
full run: ``experiments/results/bench.{json,md}``.

Usage::

    python -m experiments.bench                      # full run, writes experiments/results/bench.{md,json}
    python -m experiments.bench --quick --json /tmp/b.json --md /tmp/b.md
    fnbp bench --quick --batch-sizes 8 --sizes 16,8,8,4 --json /tmp/b.json
"""
import sys
from pathlib import Path

from fnbp.bench import main as bench_main

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "experiments" / "results"


def main(argv=None):
    return bench_main(argv, prog="python -m experiments.bench", results_dir=RESULTS_DIR)


if __name__ == "__main__":
    sys.exit(main())
