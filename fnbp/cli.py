"""The ``fnbp`` command line."""
import argparse
import sys


def _cmd_check(args):
    from .crosscheck import check_all, format_table
    results = check_all()
    print(format_table(results))
    bad = [r.name for r in results if not r.ok]
    print(f"\n{len(results) - len(bad)}/{len(results)} rules agree with autodiff of the reference "
          f"(rel <= 1e-10) and finite differences (rel <= 1e-6) in float64.")
    return 1 if bad else 0


def build_parser():
    parser = argparse.ArgumentParser(prog="fnbp", description="functional backprop: hand-derived backprop rules in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="cross-check every rule against autodiff and finite differences",
                       description="Cross-check every hand-written backward rule against jax.vjp of its plain "
                                   "reference and against central finite differences, in float64; "
                                   "prints one table row per rule and exits 1 if any disagrees.")
    p.set_defaults(func=_cmd_check)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
