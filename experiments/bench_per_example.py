"""Per-example norms and the DP-SGD step, fnbp rules vs vmap(grad): the ``per_example_rules`` case of
``fnbp.bench`` run alone (what it measures: ``fnbp/bench/per_example_rules.py``).

    python -m experiments.bench_per_example                  # writes experiments/results/bench_per_example.{md,json}
    python -m experiments.bench_per_example --quick --sizes 16,8,8,4 --batch 8 --lenet-batch 4 --out /tmp/x

The MLP rows (784-512-512-10, B = 256), then the LeNet rows (B = 64; ``--lenet-batch 0`` leaves them out).
(``fnbp bench --cases per_example_rules`` runs the same case inside the full benchmark's report.)
"""
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import common  # noqa: E402
import fnbp  # noqa: E402
from fnbp._malloc import keep_freed_memory  # noqa: E402
from fnbp.bench.per_example_rules import bench_per_example_lenet, bench_per_example_rules, render  # noqa: E402


def main(argv=None):
    def add(p):
        p.add_argument("--sizes", default="784,512,512,10")
        p.add_argument("--batch", type=int, default=256)
        p.add_argument("--min-time", type=float, default=5.0, help="seconds of samples per variant")
        p.add_argument("--max-time", type=float, default=150.0,
                       help="seconds of interleaved rounds per network at most, once every variant has 5 samples "
                            "(the vmap variants run 10-70x longer than the fast ones every round: without it the "
                            "fast variants' --min-time took ~24 min)")
        p.add_argument("--lenet-batch", type=int, default=64, help="B of the LeNet rows (0: no LeNet rows)")
    args = common.parse_args("per-example norms and DP-SGD step: fnbp rules vs vmap(grad)", argv, add_arguments=add)
    sizes = tuple(int(v) for v in args.sizes.split(","))
    min_time = min(args.min_time, 0.05) if args.quick else args.min_time
    malloc = keep_freed_memory()                              # for every variant alike, as fnbp train does
    t0 = time.perf_counter()
    max_time = None if args.quick else args.max_time
    res = bench_per_example_rules(sizes, args.batch, min_time=min_time, max_time=max_time, seed=args.seed)
    if args.lenet_batch:        # the LeNet of issue #13 (28 x 28 x 1); --quick: a tiny 8 x 8 one
        arch = (fnbp.cnn.LeNet(image_shape=(8, 8, 1), channels=(4, 6), kernel=3, padding="SAME", hidden=(8,))
                if args.quick else fnbp.cnn.lenet((28, 28, 1)))
        res["lenet"] = bench_per_example_lenet(arch, args.lenet_batch, min_time=min_time, max_time=max_time,
                                                seed=args.seed)
    res["malloc"] = malloc
    md = "\n".join(render(res) + [common.malloc_line(malloc)]).replace("## Per-example", "# Per-example", 1)
    common.write_results(args.out, "bench_per_example", md, res, args=args, seconds=time.perf_counter() - t0)
    print(md)
    return res


if __name__ == "__main__":
    main()
