"""The ``fnbp`` command line: ``fnbp train``, ``fnbp check``, ``fnbp bench``.

``python -m fnbp ...`` is the same program.
"""
import argparse
import functools
import json
import sys
import time
from pathlib import Path

OPTIMIZERS = ("sgd", "momentum", "ema_momentum", "nesterov", "simplified_nesterov", "adagrad", "rmsprop",
              "adadelta", "adam", "delta_bar_delta")
ACTIVATIONS = ("relu", "sigmoid", "tanh", "leaky_relu", "prelu", "identity", "step", "sign")
LOSSES = ("softmax_cross_entropy", "half_sse", "sse", "mse", "mae")
DATASETS = ("digits", "mnist", "xor", "or", "and", "a_and_not_b")


class UsageError(ValueError):
    """Bad command-line input: reported before training starts."""


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


# --- fnbp train ------------------------------------------------------------------
def _layers(text):
    try:
        widths = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers must be comma-separated integers like 64,32,10, got {text!r}")
    if len(widths) < 2 or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"--layers needs the input width and at least one layer width, "
                                         f"all >= 1, got {text!r}")
    return widths


def _batch_size(text):
    if text in ("full", "0"):
        return None
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"--batch-size must be >= 1 or 'full', got {text}")
    return n


def _load_data(args):
    from . import data
    if args.data == "digits":
        return data.load_digits(seed=args.seed, standardize=args.standardize)
    if args.data == "mnist":
        return data.load_mnist(args.data_dir, seed=args.seed, standardize=args.standardize)
    return data.load(args.data)


def _check_layers(layers, ds):
    n_features, n_classes = ds.x_train.shape[1], ds.n_classes
    problems = []
    if layers[0] != n_features:
        problems.append(f"the first width (input) is {layers[0]} but the {ds.name} data has {n_features} "
                        f"features per example")
    if layers[-1] != n_classes:
        problems.append(f"the last width (output) is {layers[-1]} but the {ds.name} data has {n_classes} classes")
    if problems:
        fix = ",".join(str(w) for w in [n_features] + list(layers[1:-1]) + [n_classes])
        raise UsageError("fnbp train: --layers " + ",".join(map(str, layers)) + " does not fit the data: "
                         + "; ".join(problems) + f" (try --layers {fix})")


def _learning_rate(args):
    from . import optim
    if args.lr_schedule == "constant":
        return args.lr
    if args.lr_schedule == "inverse":
        return optim.inverse_decay(args.lr, args.lr_decay)
    return optim.exponential_decay(args.lr, args.lr_decay)


def _optimizer(args, lr):
    from . import optim
    if args.optimizer == "adadelta":
        return optim.adadelta(lr)
    return getattr(optim, args.optimizer)(lr)


def _activation(name, slope):
    from . import activations
    if name == "leaky_relu":
        return functools.partial(activations.leaky_relu, slope=slope)
    return activations.ACTIVATIONS[name]


def _plot(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["loss"] for h in history], label="training loss")
    ax1.plot(epochs, [h["test_loss"] for h in history], label="test loss")
    ax1.set_xlabel("epoch"), ax1.set_ylabel("loss"), ax1.set_yscale("log"), ax1.legend()
    ax2.plot(epochs, [h["train_accuracy"] for h in history], label="training accuracy")
    ax2.plot(epochs, [h["test_accuracy"] for h in history], label="test accuracy")
    ax2.set_xlabel("epoch"), ax2.set_ylabel("accuracy"), ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cmd_train(args):
    import jax
    from . import checkpoint, dp, mlp, train as training

    ds = _load_data(args)
    _check_layers(args.layers, ds)
    if args.grad == "backprop" and (args.dropout or args.batch_norm):
        raise UsageError("fnbp train: --grad backprop covers dense layers and activations only; "
                         "drop --dropout/--batch-norm or use --grad autodiff")
    mesh = None
    if args.devices < 0:
        raise UsageError(f"fnbp train: --devices must be >= 0 (0 = all visible devices), got {args.devices}")
    n_devices = jax.device_count() if args.devices == 0 else args.devices
    if n_devices > 1:
        from . import parallel
        mesh = parallel.make_mesh(n_devices)

    key = jax.random.PRNGKey(args.seed)
    k_init, k_train = jax.random.split(key)
    params = mlp.init(k_init, args.layers, init=args.init, batch_norm=args.batch_norm,
                      prelu_alpha=0.25 if args.activation == "prelu" else None)
    lr = _learning_rate(args)
    opt = _optimizer(args, lr)
    if args.dp_clip < 0 or args.dp_noise < 0 or (args.dp_noise and not args.dp_clip):
        raise UsageError(f"fnbp train: --dp-clip and --dp-noise must be >= 0 and --dp-noise needs --dp-clip > 0, "
                         f"got --dp-clip {args.dp_clip} --dp-noise {args.dp_noise}")
    if not 0 < args.dp_delta < 1:
        raise UsageError(f"fnbp train: --dp-delta must be in (0, 1), got {args.dp_delta}")
    if args.dp_clip and args.batch_norm:
        raise UsageError("fnbp train: --dp-clip: batch norm couples the examples of a batch, so they have no "
                         "per-example gradients to clip; drop --batch-norm")
    cfg = training.Config(activation=_activation(args.activation, args.slope), l2=args.l2, grad=args.grad,
                          dropout=args.dropout, dp_clip=args.dp_clip, dp_noise=args.dp_noise)
    opt_state, state = opt.init(params), mlp.init_state(params)
    out = Path(args.out)
    ckpt = out / "checkpoint.npz"
    start_epoch = start_step = 0
    history = []
    if args.resume:
        if not ckpt.exists():
            raise UsageError(f"fnbp train: --resume: no checkpoint at {ckpt}")
        loaded = checkpoint.load(ckpt, params_like=params, opt_state_like=(opt_state, state))
        params, (opt_state, state) = loaded["params"], loaded["opt_state"]
        start_epoch, start_step, k_train = loaded["epoch"], loaded["step"], loaded["key"]
        history = list(loaded["extra"].get("history", []))
        if loaded["extra"].get("args", {}).get("layers") not in (None, args.layers):
            raise UsageError(f"fnbp train: --resume: the checkpoint was trained with --layers "
                             f"{loaded['extra']['args']['layers']}, not {args.layers}")
        print(f"resuming from {ckpt} at epoch {start_epoch} (step {start_step})")
    if start_epoch >= args.epochs:
        raise UsageError(f"fnbp train: the checkpoint already has {start_epoch} epochs; ask for --epochs > {start_epoch}")
    out.mkdir(parents=True, exist_ok=True)
    run_args = {k: v for k, v in vars(args).items() if k != "func"}

    def on_epoch(result):
        if args.dp_clip:                       # privacy spent so far (fnbp.dp.epsilon, dp-accounting)
            B = len(ds.y_train) if args.batch_size is None else args.batch_size
            result.history[-1]["epsilon"] = dp.epsilon(noise_multiplier=args.dp_noise, steps=result.step,
                                                       sample_rate=B / len(ds.y_train), delta=args.dp_delta)
        checkpoint.save(ckpt, params=result.params, opt_state=(result.opt_state, result.state), step=result.step,
                        epoch=result.epoch, key=k_train, extra={"args": run_args, "history": history + result.history})

    t0 = time.perf_counter()
    try:
        result = training.train(params, opt, ds, key=k_train, epochs=args.epochs, batch_size=args.batch_size,
                                cfg=cfg, opt_state=opt_state, state=state, accumulate=args.accumulate,
                                start_epoch=start_epoch, start_step=start_step, learning_rate=lr,
                                progress=False if args.quiet else None, on_epoch=on_epoch, mesh=mesh)
    except training.NonFiniteLossError as e:
        print(f"error: {e}\nthe last good checkpoint is {ckpt if ckpt.exists() else '(none written)'}",
              file=sys.stderr)
        return 1
    seconds = time.perf_counter() - t0
    history = history + result.history
    (out / "history.json").write_text(json.dumps({"args": run_args, "history": history,
                                                   "compile_seconds": result.compile_seconds,
                                                   "train_seconds": seconds}, indent=1))
    _plot(history, out / "curves.png")
    last = history[-1]
    if not args.quiet:
        for h in result.history:
            print(f"epoch {h['epoch']:3d}  loss {h['loss']:.4f}  test loss {h['test_loss']:.4f}  "
                  f"test accuracy {h['test_accuracy']:.4f}  {h['examples_per_s']:,.0f} examples/s"
                  + (f"  epsilon {h['epsilon']:.3f} (delta {args.dp_delta:g})" if "epsilon" in h else ""))
    print(f"final test accuracy {last['test_accuracy']:.4f} ({ds.name}, {len(ds.y_test)} test examples) "
          f"after {last['epoch']} epochs in {seconds:.1f} s (compile {result.compile_seconds:.1f} s); "
          f"wrote {out / 'history.json'}, {out / 'curves.png'}, {ckpt}")
    return 0


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
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,check,bench}")

    t = sub.add_parser("train", help="train a network (default: 64-32-10 ReLU on scikit-learn's digits)",
                       description="Train a dense network with fnbp's hand-written rules and optimizers. Writes "
                                   "OUT/history.json, OUT/curves.png and OUT/checkpoint.npz (after every epoch, "
                                   "atomically); --resume continues from that checkpoint bit-identically.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--data", choices=DATASETS, default="digits",
                   help="dataset: digits (bundled with scikit-learn), mnist (IDX files, see --data-dir), or a toy set")
    t.add_argument("--data-dir", default=None,
                   help="MNIST directory (default: $FNBP_MNIST_DIR, then ../shared/data/mnist)")
    t.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=True,
                   help="standardise features with the training split's mean and std (digits, mnist)")
    t.add_argument("--layers", type=_layers, default=[64, 32, 10],
                   help="widths, input first and classes last, e.g. 64,32,10")
    t.add_argument("--activation", choices=ACTIVATIONS, default="relu", help="hidden activation")
    t.add_argument("--slope", type=float, default=0.01, help="leaky_relu slope")
    t.add_argument("--init", choices=("glorot", "he", "uniform"), default="glorot", help="weight initialiser")
    t.add_argument("--batch-norm", action="store_true", help="batch norm before each hidden activation")
    t.add_argument("--dropout", type=float, default=0.0, help="dropout probability between hidden layers")
    t.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="fnbp.optim optimizer")
    t.add_argument("--lr", type=float, default=3e-3, help="learning rate eta_0")
    t.add_argument("--lr-schedule", choices=("constant", "inverse", "exponential"), default="exponential",
                   help="eta_k = eta_0, eta_0/(1 + k decay) or eta_0 exp(-k decay), k = step")
    t.add_argument("--lr-decay", type=float, default=3e-4, help="decay of the schedule")
    t.add_argument("--l2", type=float, default=1e-4, help="L2 penalty lambda on the weights")
    t.add_argument("--epochs", type=int, default=40, help="total epochs (with --resume: up to this many)")
    t.add_argument("--batch-size", type=_batch_size, default=16, help="examples per step; 1 = SGD, 'full' = full batch")
    t.add_argument("--accumulate", type=int, default=1, help="micro-batches per step (gradient accumulation)")
    t.add_argument("--grad", choices=("autodiff", "backprop"), default="autodiff",
                   help="jax.value_and_grad through the custom_vjp layers, or the explicit fnbp.backprop loop")
    t.add_argument("--devices", type=int, default=0,
                   help="data-parallel over N devices (0 = all visible devices when more than one, 1 = one device)")
    t.add_argument("--dp-clip", type=float, default=0.0, metavar="C",
                   help="DP-SGD: clip each example's gradient to L2 norm C (0 = off); prints epsilon per epoch")
    t.add_argument("--dp-noise", type=float, default=0.0, metavar="SIGMA",
                   help="DP-SGD: Gaussian noise multiplier sigma (noise std sigma*C on the summed gradient)")
    t.add_argument("--dp-delta", type=float, default=1e-5, help="DP-SGD: the delta of the reported (epsilon, delta)")
    t.add_argument("--seed", type=int, default=0, help="seed of the data split, initialisation and shuffling")
    t.add_argument("--out", default="runs/digits", help="output directory")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.npz")
    t.add_argument("--quiet", action="store_true", help="no progress bar and no per-epoch lines")
    t.set_defaults(func=_cmd_train)

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
    try:
        return args.func(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
