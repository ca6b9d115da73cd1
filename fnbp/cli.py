"""The ``fnbp`` command line: ``fnbp train``, ``fnbp sample``, ``fnbp check``, ``fnbp bench``.

``python -m fnbp ...`` is the same program.
"""
import argparse
import sys
from pathlib import Path

from . import _cli_text, cli_train
from .cli_train import OutputError, UsageError

COORDINATOR_EXIT = 3        # fnbp train: the coordinator of a multi-process run was not reached in time


# --- fnbp check ------------------------------------------------------------------
def _cmd_check(args):
    from . import checklist
    from .crosscheck import AUTODIFF_RTOL, FD_TOL
    rules = None if not args.rule else [r for spec in args.rule for r in spec.split(",") if r]
    unknown = sorted(set(rules or ()) - set(checklist.case_names()))
    if unknown:
        raise UsageError(f"fnbp check: --rule {','.join(unknown)}: no such rule; the rules are "
                         f"{', '.join(checklist.case_names())}")
    print(checklist.TABLE_HEADER, flush=True)
    results = checklist.check_all(rules=rules, on_result=lambda r: print(checklist.format_row(r), flush=True))
    bad = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(bad)}/{len(results)} rules agree with autodiff of the reference "
          f"(rel <= {AUTODIFF_RTOL:g}) and finite differences (rel <= {FD_TOL:g}) in float64.")
    for r in bad:
        print(str(r))
    return 1 if bad else 0


# --- fnbp bench -------------------------------------------------------------------
def _cmd_bench(args):
    from .bench import main as bench_main
    return bench_main(args.bench_args, prog="fnbp bench")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="fnbp", description="fnbp -- functional backprop: neural networks whose gradients are the "
                                 "hand-derived backprop rules of the lecture notes, in JAX.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"fnbp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,sample,check,bench}")

    cli_train.add_parser(sub)
    _cli_text.add_sample_parser(sub).set_defaults(func=lambda args: _cli_text.cmd_sample(args, UsageError))

    c = sub.add_parser("check", help="cross-check every rule against autodiff and finite differences",
                       description="Cross-check every hand-written backward rule against jax.vjp of its plain "
                                   "reference and against central finite differences, in float64; prints one "
                                   "table row per rule as it finishes and exits 1 if any disagrees (naming the "
                                   "argument, index and both values of the worst disagreement).")
    c.add_argument("--rule", action="append", metavar="NAME",
                   help="check only this rule (repeat, or comma-separate; e.g. --rule relu,dense)")
    c.set_defaults(func=_cmd_check)

    b = sub.add_parser("bench", help="benchmark fnbp vs jax.grad+optax vs PyTorch vs the GEMM rate",
                       description="Run the benchmark (fnbp.bench); arguments after 'bench' go to it "
                                   "(try: fnbp bench --help, fnbp bench --quick).", add_help=False)
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for the benchmark (fnbp.bench)")
    b.set_defaults(func=_cmd_bench)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:                  # everything after 'bench' (options too) goes to the benchmark
        argv = ["bench", "--", *argv[1:]] if len(argv) > 1 else argv
    args = build_parser().parse_args(argv)
    if getattr(args, "bench_args", None) and args.bench_args[:1] == ["--"]:
        args.bench_args = args.bench_args[1:]
    from .parallel import CoordinatorError
    try:
        return args.func(args)
    except KeyboardInterrupt:                 # Ctrl-C outside training (fnbp train handles it during training)
        print("interrupted", file=sys.stderr)
        return cli_train.INTERRUPTED
    except CoordinatorError as e:
        print(f"error: {e}", file=sys.stderr)
        return COORDINATOR_EXIT
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
