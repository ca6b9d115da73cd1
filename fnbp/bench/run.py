"""The ``fnbp bench`` command line (also ``python -m fnbp.bench`` and ``experiments/bench.py``)."""
import argparse
import json
import os
import sys
import time
from pathlib import Path

from .registry import Context, load_cases, select
from .steps import FLOP_FORMULA, LEARNING_RATE, torch_available, weight_counts

DEFAULT_SIZES = (784, 512, 512, 10)
DEFAULT_BATCH_SIZES = (32, 128, 512, 2048)
QUICK_BATCH_SIZES = (32, 512)
DEFAULT_GEMM_SIZES = (256, 512, 1024, 2048)
QUICK_GEMM_SIZES = (256, 512)


def _ints(text):
    try:
        vals = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _names(text):
    return tuple(v for v in text.replace(" ", "").split(",") if v)


def build_parser(prog="fnbp bench", results_dir=None):
    where = (f"{results_dir}/bench.json" if results_dir else "none")
    p = argparse.ArgumentParser(prog=prog, description="Benchmark: fnbp's hand-written rules vs JAX autodiff vs "
                                "PyTorch vs the machine's GEMM rate (see the fnbp.bench module docstring).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"short run: >= 0.1 s of samples per variant, batch sizes {QUICK_BATCH_SIZES}, "
                        f"GEMM sizes {QUICK_GEMM_SIZES} (unless given explicitly)")
    p.add_argument("--batch-sizes", type=_ints, default=None,
                   help=f"comma-separated batch sizes (default {DEFAULT_BATCH_SIZES}, quick {QUICK_BATCH_SIZES})")
    p.add_argument("--sizes", type=_ints, default=DEFAULT_SIZES, help="network layer widths n_0,...,n_L")
    p.add_argument("--gemm-sizes", type=_ints, default=None,
                   help=f"square GEMM sizes for the limit (default {DEFAULT_GEMM_SIZES}, quick {QUICK_GEMM_SIZES})")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds of samples per variant (default 1.0, quick 0.1)")
    p.add_argument("--cases", type=_names, default=None,
                   help="comma-separated cases to run (default: all; a case's requirements are added): "
                        + ", ".join(load_cases()))
    p.add_argument("--per-example-batch", type=int, default=128, help="batch size of the per-example gradients")
    p.add_argument("--simulated-devices", type=int, default=8,
                   help="N simulated CPU devices for the data-parallel row (0: skip)")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch even when it is installed")
    p.add_argument("--torch-malloc", choices=("default", "same"), default="default",
                   help="glibc malloc of the PyTorch child process of lenet_run and text_run: 'default' (glibc's "
                        "defaults, as a plain PyTorch loop runs) or 'same' (the settings fnbp train and this "
                        "process use, fnbp._malloc)")
    p.add_argument("--run-epochs", type=int, default=3,
                   help="epochs of the lenet_run case (whole-run throughput; the first is a warm-up), >= 2")
    p.add_argument("--text-seconds", type=float, default=None,
                   help="training seconds of each side of the text_run case (fnbp train --data shakespeare --model "
                        "lstm vs PyTorch's nn.LSTM) (default: 600; quick 5)")
    p.add_argument("--text-train-flags", default=None, metavar="'FLAGS'",
                   help="extra fnbp train flags of the text_run case, one quoted string, e.g. "
                        "--text-train-flags='--hidden 512' (default: none, the CLI's defaults; quick "
                        "'--hidden 16 --embed 8 --steps-per-epoch 4 --epochs 2')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None,
                   help=f"write the JSON report here (full run default: {where}; none for --quick)")
    p.add_argument("--md", type=Path, default=None,
                   help="write the markdown report here (full run default: "
                        f"{f'{results_dir}/bench.md' if results_dir else 'none'}; none for --quick)")
    p.add_argument("--_simulated-devices", dest="child_devices", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None, *, prog="fnbp bench", results_dir=None):
    """Run the benchmark; ``results_dir``: where a full (not --quick) run writes bench.{json,md}
    when --json/--md are not given (None: nowhere). Returns the exit status."""
    from . import report
    from .cases import targets
    from .._malloc import describe, keep_freed_memory
    from .simulated import simulated_child

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog, results_dir)
    args = parser.parse_args(argv)
    quick = args.quick
    batch_sizes = args.batch_sizes or (QUICK_BATCH_SIZES if quick else DEFAULT_BATCH_SIZES)
    gemm_sizes = args.gemm_sizes or (QUICK_GEMM_SIZES if quick else DEFAULT_GEMM_SIZES)
    min_time = args.min_time if args.min_time is not None else (0.1 if quick else 1.0)
    sizes = args.sizes
    if len(sizes) < 2:
        parser.error("--sizes needs at least an input width and one layer width")
    if not min_time > 0:
        parser.error(f"--min-time must be > 0, got {min_time}")
    try:
        cases = select(args.cases)
    except ValueError as e:
        parser.error(str(e).removeprefix("fnbp bench: "))

    if args.child_devices is not None:                # inside the simulated-devices subprocess
        rows = simulated_child(args.child_devices, sizes, batch_sizes, min_time, args.seed)
        print("@@SIMULATED@@" + json.dumps(rows), flush=True)
        return 0

    t_start = time.perf_counter()
    # for every variant alike (see its docstring), as fnbp train does; the PyTorch child process of lenet_run and
    # text_run gets glibc's defaults unless --torch-malloc same
    malloc = keep_freed_memory()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.1f} s] {msg}", file=sys.stderr, flush=True)

    # PyTorch's OpenMP threads otherwise spin-wait after every parallel region, stealing the
    # cores from the JAX step that runs next (and, on a shared machine, from everyone): set
    # before torch is first imported (libgomp reads it when it loads).
    omp_policy_set = "OMP_WAIT_POLICY" not in os.environ
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import jax
    from .harness import busy_cores, machine_description
    if jax.config.jax_enable_x64:
        log("note: jax_enable_x64 is on; the benchmark uses float32 arrays explicitly")
    machine = machine_description()
    machine["busy_cores_at_start"] = busy_cores()              # other work, over 1 s before the first timing
    use_torch = torch_available() and not args.no_torch
    cores = machine["usable_cores"]
    threads = cores if use_torch else None
    P, P1 = weight_counts(sizes)
    log(f"machine: {machine['cpu_model']}, {machine['usable_cores']} cores, jax {machine['versions']['jax']}, "
        f"torch {machine['versions']['torch']}")
    result = {
        "schema": 1, "quick": quick, "command": f"{prog} " + " ".join(argv),
        "machine": machine, "min_time_s": min_time, "torch_threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") if use_torch else None,
        "malloc": malloc,
        "torch_skipped": None if use_torch else ("--no-torch given" if args.no_torch else "torch is not installed"),
        "network": {"sizes": list(sizes), "P": P, "P1": P1, "flop_formula": FLOP_FORMULA,
                    "activation": "relu", "loss": "softmax cross-entropy (mean)", "dtype": "float32",
                    "learning_rate": LEARNING_RATE},
    }
    ctx = Context(sizes=sizes, batch_sizes=batch_sizes, gemm_sizes=gemm_sizes, min_time=min_time, seed=args.seed,
                  quick=quick, cores=cores, use_torch=use_torch, threads=threads,
                  torch_skip_reason="--no-torch" if args.no_torch else "torch not installed",
                  per_example_batch=args.per_example_batch, simulated_devices=args.simulated_devices,
                  no_torch=args.no_torch, torch_malloc=args.torch_malloc, run_epochs=args.run_epochs,
                  text_seconds=args.text_seconds, text_train_flags=args.text_train_flags,
                  machine=machine, results=result, log=log)
    for case in cases:
        result[case.name] = case.run(ctx)
    notes = []
    if use_torch:
        notes.append(f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
                     + (" (set by the benchmark: with libgomp's default spin-waiting, PyTorch's idle threads "
                        "took the cores from the interleaved JAX steps and from the other jobs on this shared "
                        "machine, and PyTorch itself ran several times slower)" if omp_policy_set else
                        " (from the environment)"))
    elif any(case.name in report.MLP_CASES + ("lenet",) for case in cases):
        notes.append("PyTorch rows skipped: " + ("--no-torch given." if args.no_torch else "torch is not installed."))
    notes.append(describe(malloc) + (": each call of a compiled program, and each PyTorch step, reuses it instead "
                                     "of page-faulting fresh temporaries in (FNBP_MALLOC=default: glibc's "
                                     "defaults)" if malloc else ""))
    result["notes"] = notes
    result["targets"] = targets(result) if "train_step" in result else []
    result["seconds"] = time.perf_counter() - t_start
    report.print_table(result)
    default_dir = None if quick or results_dir is None else Path(results_dir)
    json_path = args.json if args.json is not None else (default_dir and default_dir / "bench.json")
    md_path = args.md if args.md is not None else (default_dir and default_dir / "bench.md")
    for path, text, what in ((json_path, lambda: json.dumps(result, indent=1) + "\n", "JSON"),
                             (md_path, lambda: report.render_markdown(result), "markdown")):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text())
            log(f"wrote {path} ({what})")
    return 0
