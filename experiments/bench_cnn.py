"""The LeNet training step, fnbp rules vs jax.grad through lax conv/reduce_window (jit per step and
inside scan) vs PyTorch eager, GFLOP/s against the GEMM rate: the ``lenet`` case of ``fnbp.bench``
run alone (what it measures and how: ``fnbp/bench/lenet.py``).

    python -m experiments.bench_cnn                 # writes experiments/results/bench_cnn.{md,json}
    python -m experiments.bench_cnn --quick --out /tmp/x

(``fnbp bench --cases lenet`` runs the same case inside the full benchmark's report, with the GEMM
size of its sweep.)
"""
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import common  # noqa: E402
from fnbp._malloc import keep_freed_memory  # noqa: E402
from fnbp.bench import lenet  # noqa: E402


def main(argv=None):
    def add(p):
        p.add_argument("--batch", type=int, default=64)
        p.add_argument("--steps", type=int, default=8, help="optimizer steps per timed call")
        p.add_argument("--min-time", type=float, default=5.0, help="seconds of samples per variant")
        p.add_argument("--gemm-size", type=int, default=1024, help="square GEMM timed in the same rounds")
        p.add_argument("--no-torch", action="store_true", help="skip PyTorch even when it is installed")
    args = common.parse_args("LeNet step: fnbp rules vs jax.grad through lax conv (jit, scan) vs torch",
                             argv, add_arguments=add)
    malloc = keep_freed_memory()                              # for every variant alike, as fnbp train does
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")      # before torch loads (see fnbp.bench.run)
    from fnbp import cnn
    from fnbp.bench.harness import machine_description
    from fnbp.bench.steps import torch_available
    if args.quick:
        arch, batch, steps, min_time, gemm = cnn.lenet(**lenet.QUICK_ARCH), 8, 2, 0.05, 256
    else:
        arch, batch, steps = cnn.lenet((28, 28, 1)), args.batch, args.steps
        min_time, gemm = args.min_time, args.gemm_size
    use_torch = torch_available() and not args.no_torch
    cores = machine_description()["usable_cores"]
    t0 = time.perf_counter()
    res = lenet.bench_lenet(arch, batch, steps, min_time=min_time, seed=args.seed, gemm_size=gemm,
                            use_torch=use_torch, threads=cores if use_torch else None, cores=cores,
                            torch_skip_reason="--no-torch" if args.no_torch else "torch not installed",
                            log=common.log)
    res["malloc"] = malloc
    md = "\n".join(lenet.render(res) + [common.malloc_line(malloc)]).replace("## LeNet", "# LeNet", 1)
    common.write_results(args.out, "bench_cnn", md, res, args=args, seconds=time.perf_counter() - t0)
    print(md)
    return res


if __name__ == "__main__":
    main()
