"""``fnbp train``: the command's arguments, checks, resume rules and output files (``fnbp.cli`` registers it)."""
import argparse
import contextlib
import functools
import json
import os
import sys
import time
from pathlib import Path

from . import _cli_model, activations as _activations, data as _data
from ._cli_args import _batch_size, _float_arg, _int_arg, _layers

OPTIMIZERS = ("sgd", "momentum", "ema_momentum", "nesterov", "simplified_nesterov", "adagrad", "rmsprop",
              "adadelta", "adam", "delta_bar_delta")
ACTIVATIONS = tuple(n for n in _activations.ACTIVATIONS if n != "softmax")   # hidden-layer choices
DATASETS = _data.DATASET_NAMES


class UsageError(ValueError):
    """Bad command-line input: reported before training starts."""


# --- fnbp train ------------------------------------------------------------------
MODEL = "mlp"                     # the default --model; --out defaults to runs/<data>-<model>
SEED_LIMIT = 2 ** 32
# Settings a resumed run may change freely, settings that --allow-changed may override, and the rest
# (which define the data, the network or the optimizer state and can never change on resume).
FREE_ON_RESUME = ("epochs", "quiet", "resume", "out", "data_dir", "devices", "allow_changed",
                  "coordinator", "num_processes", "process_id", "distributed")   # where it runs, not what
OVERRIDABLE = ("lr", "lr_schedule", "lr_decay", "l2", "dropout", "batch_size", "accumulate", "grad", "slope")
# Run arguments that checkpoints of older fnbp versions lack, read on --resume as what those versions did
# (they had no such flag); their batch-norm statistics are read by fnbp.checkpoint.load.
LEGACY_DEFAULTS = {"model": "mlp", "augment": 0, "dp_clip": 0.0, "dp_noise": 0.0, "dp_delta": 1e-5}


class OutputError(Exception):
    """A file under --out could not be written (the path, the cause)."""

    def __init__(self, path, cause):
        why = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
        super().__init__(f"cannot write {path}: {why}")


@contextlib.contextmanager
def _writing(path):
    """``with _writing(path):`` turns an OSError while writing ``path`` into an OutputError naming it."""
    try:
        yield
    except OSError as e:
        raise OutputError(getattr(e, "filename", None) or path, e) from e


def _flag(name):
    return "--" + name.replace("_", "-")   # a run-argument name as its command-line flag


def _allow_changed(text):
    names = [w.strip().lstrip("-").replace("-", "_") for w in text.split(",") if w.strip()]
    bad = [n for n in names if n not in OVERRIDABLE]
    if bad:
        raise argparse.ArgumentTypeError(
            f"--allow-changed takes a comma-separated list of {', '.join(_flag(n)[2:] for n in OVERRIDABLE)}; "
            f"{', '.join(bad)} cannot be changed on resume")
    return names


def _load_data(args):
    from . import data
    if args.data == "digits":
        return data.load_digits(seed=args.seed, standardize=args.standardize)
    if args.data == "mnist":
        ds = data.load_mnist(args.data_dir, seed=args.seed, standardize=args.standardize)
        if len(ds.y_train) + len(ds.y_test) <= 10000 and not args.quiet:     # only the t10k files were found
            print(f"mnist: only the t10k files were found; split its {len(ds.y_train) + len(ds.y_test)} examples "
                  f"{len(ds.y_train)}/{len(ds.y_test)} into train/test (stratified, --seed {args.seed})", flush=True)
        return ds
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


def _check_batching(args, n_train):
    B = n_train if args.batch_size is None else args.batch_size
    if B > n_train:
        raise UsageError(f"fnbp train: --batch-size {B} exceeds the {n_train} training examples of {args.data} "
                         f"(use at most {n_train}, or 'full')")
    if B % args.accumulate:
        raise UsageError(f"fnbp train: --accumulate {args.accumulate} must divide the batch size {B} "
                         f"(micro-batches are equal)")
    if args.batch_norm and B // args.accumulate < 2:
        raise UsageError(f"fnbp train: --batch-norm needs at least 2 examples per (micro-)batch, got --batch-size "
                         f"{args.batch_size} with --accumulate {args.accumulate} (batch norm of one example outputs "
                         f"beta whatever the input)")


def _learning_rate(args):
    from . import optim
    if args.lr_schedule == "constant":
        return args.lr
    if args.lr_schedule == "inverse":
        return optim.inverse_decay(args.lr, args.lr_decay)
    return optim.exponential_decay(args.lr, args.lr_decay)


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
    try:
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def _settings(run_args):
    """The run arguments that define the training (what a resume compares)."""
    return {k: v for k, v in run_args.items() if k not in FREE_ON_RESUME}


def _check_resume(ckpt, meta, run_args, allowed):
    """Validate the stored run record (checkpoint metadata); refuse changed settings.
    Returns (history, settings segments)."""
    extra, epoch = meta["extra"], meta["epoch"]
    stored = extra.get("args") if isinstance(extra, dict) else None
    history = extra.get("history") if isinstance(extra, dict) else None
    segments = extra.get("settings") if isinstance(extra, dict) else None
    if not isinstance(stored, dict):
        raise UsageError(f"fnbp train: --resume: {ckpt} holds no run arguments (not written by fnbp train, or "
                         f"tampered): cannot check that the settings match")
    missing = [k for k in LEGACY_DEFAULTS if k not in stored]
    if missing:
        stored = {**{k: LEGACY_DEFAULTS[k] for k in missing}, **stored}
        print(f"{ckpt} was written by an older fnbp without " + ", ".join(_flag(k) for k in missing) + ": read as "
              + " ".join(f"{_flag(k)} {LEGACY_DEFAULTS[k]}" for k in missing), flush=True)
    if (not isinstance(history, list) or len(history) != epoch
            or any(not isinstance(h, dict) or h.get("epoch") != i + 1 for i, h in enumerate(history))):
        raise UsageError(f"fnbp train: --resume: {ckpt}: the stored history is not one record per epoch 1..{epoch} "
                         f"(tampered or corrupt checkpoint)")
    if segments is None:
        segments = [{"from_epoch": 1, "args": _settings(stored)}]
    if not isinstance(segments, list) or not all(isinstance(g, dict) for g in segments):
        raise UsageError(f"fnbp train: --resume: {ckpt}: the stored settings record is not a list of dicts")
    now, then = _settings(run_args), _settings(stored)
    fixed, needs_flag, changed = [], [], []
    for k in sorted(set(now) | set(then)):
        if now.get(k) != then.get(k):
            was = repr(then[k]) if k in then else "(not recorded)"
            text = f"{_flag(k)} {was} -> {now.get(k)!r}"
            (fixed if k not in OVERRIDABLE else changed if k in allowed else needs_flag).append((k, text))
    parts = []
    if fixed:
        parts.append("cannot change on resume (they define the data, the network or the optimizer state): "
                     + "; ".join(t for _, t in fixed))
    if needs_flag:
        parts.append(f"changed (pass --allow-changed {','.join(_flag(k)[2:] for k, _ in needs_flag)} to continue "
                     f"with the new values): " + "; ".join(t for _, t in needs_flag))
    if parts:
        raise UsageError(f"fnbp train: --resume: the settings differ from those stored in {ckpt}: " + "; ".join(parts))
    if changed:
        segments = segments + [{"from_epoch": epoch + 1, "args": now}]
    return history, segments


def _cmd_train(args):
    import jax
    from . import checkpoint, dp, optim, parallel, train as training

    process, n_processes = parallel.initialize_from_args(args, UsageError)   # before anything uses a device
    writer = process == 0                   # only process 0 writes the checkpoint, history and plot
    _cli_model.fill_defaults(args)
    if args.epochs < 1:
        raise UsageError(f"fnbp train: --epochs must be >= 1, got {args.epochs}")
    out = Path(args.out if args.out is not None else f"runs/{args.data}-{_cli_model.out_name(args.model)}")
    ds = _cli_model.prepare(args, _load_data(args), _check_layers, UsageError)
    _check_batching(args, len(ds.y_train))
    if args.allow_changed and not args.resume:
        raise UsageError("fnbp train: --allow-changed only applies with --resume")
    if out.exists() and not out.is_dir():
        raise OutputError(out, "it exists and is not a directory (--out must name a directory)")
    mesh = parallel.mesh_for_cli(args.devices, UsageError)      # None on one device

    key = jax.random.PRNGKey(args.seed)
    k_init, k_train = jax.random.split(key)
    params, cfg, model = _cli_model.build(args, k_init, ds, _activation(args.activation, args.slope), training,
                                          UsageError)
    lr = _learning_rate(args)
    opt = getattr(optim, args.optimizer)(lr)
    opt_state, state = opt.init(params), training.resolve_model(cfg, model).init_state(params)
    ckpt = out / "checkpoint.npz"
    run_args = {k: v for k, v in vars(args).items() if k != "func"}
    run_args["out"] = str(out)
    start_epoch = start_step = 0
    history, segments = [], [{"from_epoch": 1, "args": _settings(run_args)}]
    if args.resume:
        if not ckpt.exists():
            raise UsageError(f"fnbp train: --resume: no checkpoint at {ckpt}")
        history, segments = _check_resume(ckpt, checkpoint.read_metadata(ckpt), run_args, args.allow_changed or [])
        loaded = checkpoint.load(ckpt, params_like=params, opt_state_like=opt_state, batch_stats_like=state)
        params, opt_state, state = loaded["params"], loaded["opt_state"], loaded["batch_stats"]
        start_epoch, start_step, k_train = loaded["epoch"], loaded["step"], loaded["key"]
        if start_epoch >= args.epochs:
            raise UsageError(f"fnbp train: the checkpoint {ckpt} already has {start_epoch} epochs; ask for "
                             f"--epochs > {start_epoch}")
        print(f"resuming from {ckpt} at epoch {start_epoch} (step {start_step})", flush=True)
    if writer:
        with _writing(out):
            out.mkdir(parents=True, exist_ok=True)
            if not os.access(out, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied (the directory is not writable)", str(out))
        for stale in checkpoint.clean_stale_temp_files(ckpt):
            print(f"removed {stale} (a temporary file left by an interrupted save)", flush=True)
    lines = writer and not args.quiet and not sys.stderr.isatty()   # no progress bar: one line per epoch instead

    B = len(ds.y_train) if args.batch_size is None else args.batch_size

    def on_epoch(result):
        if args.dp_clip:                       # privacy spent so far (fnbp.dp.epsilon, dp-accounting)
            result.history[-1]["epsilon"] = dp.epsilon(noise_multiplier=args.dp_noise, steps=result.step,
                                                       sample_rate=B / len(ds.y_train), delta=args.dp_delta)
        with _writing(ckpt):
            checkpoint.save(ckpt, params=result.params, opt_state=result.opt_state, batch_stats=result.state,
                            step=result.step, epoch=result.epoch, key=k_train,
                            extra={"args": run_args, "settings": segments, "optimizer": args.optimizer,
                                   "model": _cli_model.describe(model, args, ds.x_train.shape[1:]),
                                   "history": history + result.history})
        if lines:
            h = result.history[-1]
            print(f"epoch {h['epoch']:3d}  loss {h['loss']:.4f}  test loss {h['test_loss']:.4f}  "
                  f"test accuracy {h['test_accuracy']:.4f}  {h['examples_per_s']:,.0f} examples/s"
                  + (f"  epsilon {h['epsilon']:.3f} at delta {args.dp_delta:g}" if "epsilon" in h else ""), flush=True)

    if not args.quiet:
        print(f"compiling... (one epoch = {len(ds.y_train) // B} steps of {B} examples; {ds.name}, "
              f"{len(ds.y_train)} training examples)", flush=True)
    t0 = time.perf_counter()
    try:
        result = training.train(params, opt, ds, key=k_train, epochs=args.epochs, batch_size=args.batch_size,
                                cfg=cfg, model=model, opt_state=opt_state, state=state, accumulate=args.accumulate,
                                start_epoch=start_epoch, start_step=start_step, record_learning_rate=lr,
                                progress=False if args.quiet else None, on_epoch=on_epoch if writer else None,
                                mesh=mesh)
    except training.NonFiniteInputError as e:
        where = f"the checkpoint {ckpt} holds non-finite values" if args.resume else "non-finite input"
        raise UsageError(f"{where}: {e}") from e
    except (training.NonFiniteError, OutputError) as e:
        print(f"error: {e}\nthe last good checkpoint is {ckpt if ckpt.exists() else '(none written)'}",
              file=sys.stderr)
        return 1
    seconds = time.perf_counter() - t0
    history = history + result.history
    if not writer:
        print(f"process {process} of {n_processes}: trained {result.epoch} epochs; process 0 writes {out}")
        return 0
    try:
        with _writing(out / "history.json"):
            (out / "history.json").write_text(json.dumps({"settings": segments, "history": history,
                                                          "compile_seconds": result.compile_seconds,
                                                          "train_seconds": seconds}, indent=1))
        with _writing(out / "curves.png"):
            _plot(history, out / "curves.png")
    except OutputError as e:
        print(f"error: {e}\nthe checkpoint {ckpt} (epoch {result.epoch}) is complete", file=sys.stderr)
        return 1
    last = history[-1]
    print(f"final test accuracy {last['test_accuracy']:.4f} ({ds.name}, {len(ds.y_test)} test examples) "
          f"after {last['epoch']} epochs in {seconds:.1f} s (compile {result.compile_seconds:.1f} s); "
          f"wrote {out / 'history.json'}, {out / 'curves.png'}, {ckpt}")
    return 0


class _HelpFormatter(argparse.HelpFormatter):
    """Show a default once, only where it says something (not None/False, not already in the help)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.option_strings and action.default is not None and action.default is not False
                and action.default != argparse.SUPPRESS
                and "%(default)" not in text and "default:" not in text):
            text += " (default: %(default)s)"
        return text


def add_parser(sub):
    """Register ``train`` on the subparsers ``sub`` of the ``fnbp`` parser."""
    t = sub.add_parser("train", help="train a network (default: 64-32-10 ReLU on scikit-learn's digits)",
                       description="Train a dense network (or a LeNet, --model lenet) with fnbp's hand-written rules and optimizers. Writes "
                                   "OUT/history.json, OUT/curves.png and OUT/checkpoint.npz (after every epoch, "
                                   "atomically); --resume continues from that checkpoint bit-identically.",
                       formatter_class=_HelpFormatter)
    t.add_argument("--data", choices=DATASETS, default="digits",
                   help="dataset: digits (bundled with scikit-learn), mnist (IDX files, see --data-dir), or a toy set")
    t.add_argument("--data-dir", default=None,
                   help="MNIST directory (default: $FNBP_MNIST_DIR, then ../shared/data/mnist)")
    t.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=_cli_model.UNSET,
                   help="standardise features with the training split's mean and std (digits, mnist)"
                        + _cli_model.default_help("standardize"))
    t.add_argument("--layers", type=_layers, default=None,
                   help="--model mlp: widths, input first and classes last (default: 64,32,10)")
    _cli_model.add_arguments(t)
    t.add_argument("--activation", choices=ACTIVATIONS, default="relu", help="hidden activation")
    t.add_argument("--slope", type=_float_arg("--slope"), default=0.01, help="leaky_relu slope")
    t.add_argument("--init", choices=("glorot", "he", "uniform"), default="glorot", help="weight initialiser")
    t.add_argument("--batch-norm", action="store_true", help="batch norm before each hidden activation")
    t.add_argument("--dropout", type=_float_arg("--dropout", 0.0, 1.0), default=_cli_model.UNSET,
                   help="dropout probability in [0, 1): mlp between hidden layers, lenet on each dense layer's input"
                        + _cli_model.default_help("dropout"))
    t.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="fnbp.optim optimizer")
    t.add_argument("--lr", type=_float_arg("--lr", 0.0, lo_open=True), default=_cli_model.UNSET,
                   help="learning rate eta_0" + _cli_model.default_help("lr"))
    t.add_argument("--lr-schedule", choices=("constant", "inverse", "exponential"), default=_cli_model.UNSET,
                   help="eta_k = eta_0, eta_0/(1 + k decay) or eta_0 exp(-k decay), k = step"
                        + _cli_model.default_help("lr_schedule"))
    t.add_argument("--lr-decay", type=_float_arg("--lr-decay", 0.0), default=3e-4, help="decay of the schedule")
    t.add_argument("--l2", type=_float_arg("--l2", 0.0), default=_cli_model.UNSET,
                   help="L2 penalty lambda on the weights (>= 0)" + _cli_model.default_help("l2"))
    t.add_argument("--epochs", type=_int_arg("--epochs", 1), default=_cli_model.UNSET,
                   help="total epochs (with --resume: up to this many)" + _cli_model.default_help("epochs"))
    t.add_argument("--batch-size", type=_batch_size, default=_cli_model.UNSET,
                   help="examples per step: 1 = SGD, 'full' = full batch" + _cli_model.default_help("batch_size"))
    t.add_argument("--accumulate", type=_int_arg("--accumulate", 1), default=1,
                   help="micro-batches per step (gradient accumulation)")
    t.add_argument("--grad", choices=("autodiff", "backprop"), default="autodiff",
                   help="jax.value_and_grad through the custom_vjp layers, or the explicit fnbp.backprop loop")
    t.add_argument("--devices", type=_int_arg("--devices", 0), default=0,
                   help="data-parallel over N devices (0 = all visible devices when more than one, 1 = one device)")
    t.add_argument("--dp-clip", type=_float_arg("--dp-clip", 0.0), default=0.0, help="DP-SGD: clip norm C (0 = off)")
    t.add_argument("--dp-noise", type=_float_arg("--dp-noise", 0.0), default=0.0, help="DP-SGD: noise multiplier")
    t.add_argument("--dp-delta", type=_float_arg("--dp-delta", 0, 1, lo_open=True), default=1e-5, help="DP-SGD: delta")
    t.add_argument("--seed", type=_int_arg("--seed", 0, SEED_LIMIT, "2**32"), default=0,
                   help="seed of the data split, initialisation and shuffling")
    t.add_argument("--out", default=None, help=f"output directory (default: runs/<data>-<model>: runs/<data>-{MODEL}, "
                                               f"runs/<data>-lenet)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.npz (same settings)")
    t.add_argument("--allow-changed", type=_allow_changed, default=None, metavar="FLAGS",
                   help="with --resume: comma-separated settings that may differ from the checkpoint's run, "
                        "from " + ",".join(_flag(n)[2:] for n in OVERRIDABLE) + " (--epochs always may)")
    t.add_argument("--quiet", action="store_true", help="no progress bar and no per-epoch lines")
    __import__("fnbp.parallel").parallel.add_cli_arguments(t)   # --coordinator, --num-processes, --process-id
    t.set_defaults(func=_cmd_train)
    return t
