"""The ``fnbp`` command line: ``fnbp train``, ``fnbp check``, ``fnbp bench``.

``python -m fnbp ...`` is the same program.
"""
import argparse
import sys
from pathlib import Path

from . import cli_train
from .cli_train import OutputError, UsageError


# --- fnbp check ------------------------------------------------------------------
def _cmd_check(args):
    from .crosscheck import check_all, format_table
    results = check_all()
    print(format_table(results))
    bad = [r.name for r in results if not r.ok]
    print(f"\n{len(results) - len(bad)}/{len(results)} rules agree with autodiff of the reference "
          f"(rel <= 1e-10) and finite differences (rel <= 1e-6) in float64.")
    if bad:
        print("disagree: " + ", ".join(bad))
    return 1 if bad else 0


# --- fnbp bench -------------------------------------------------------------------
def _cmd_bench(args):
    root = Path(__file__).resolve().parents[1]
    if (root / "experiments" / "bench.py").exists() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        from experiments import bench
    except ImportError as e:
        raise UsageError(f"fnbp bench: the benchmark lives in experiments/bench.py of a source checkout ({e})")
    return bench.main(args.bench_args)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="fnbp", description="fnbp -- functional backprop: neural networks whose gradients are the "
                                 "hand-derived backprop rules of the lecture notes, in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,check,bench}")

    cli_train.add_parser(sub)

    c = sub.add_parser("check", help="cross-check every rule against autodiff and finite differences",
                       description="Cross-check every hand-written backward rule against jax.vjp of its plain "
                                   "reference and against central finite differences, in float64; prints one "
                                   "table row per rule and exits 1 if any disagrees.")
    c.set_defaults(func=_cmd_check)

    b = sub.add_parser("bench", help="benchmark fnbp vs jax.grad+optax vs PyTorch vs the GEMM rate",
                       description="Run experiments/bench.py (source checkout); arguments after 'bench' go to it "
                                   "(try: fnbp bench --help, fnbp bench --quick).", add_help=False)
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for experiments/bench.py")
    b.set_defaults(func=_cmd_bench)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:                  # everything after 'bench' (options too) goes to the benchmark
        argv = ["bench", "--", *argv[1:]] if len(argv) > 1 else argv
    args = build_parser().parse_args(argv)
    if getattr(args, "bench_args", None) and args.bench_args[:1] == ["--"]:
        args.bench_args = args.bench_args[1:]
    try:
        return args.func(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OutputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
