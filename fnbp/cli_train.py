"""``fnbp train``: the command's arguments, checks, resume rules and output files (``fnbp.cli`` registers it)."""
import argparse
import contextlib
import functools
import json
import os
import sys
import time
from pathlib import Path

from . import _cli_model, _cli_text, activations as _activations, data as _data
from ._cli_args import _batch_size, _float_arg, _int_arg, _layers

OPTIMIZERS = ("sgd", "momentum", "ema_momentum", "nesterov", "simplified_nesterov", "adagrad", "rmsprop",
              "adadelta", "adam", "delta_bar_delta")
ACTIVATIONS = tuple(n for n in _activations.ACTIVATIONS if n != "softmax")   # hidden-layer choices
DATASETS = _data.DATASET_NAMES + _cli_text.TEXT_DATA


class UsageError(ValueError):
    """Bad command-line input: reported before training starts."""


# --- fnbp train ------------------------------------------------------------------
MODEL = "mlp"                     # the default --model; --out defaults to runs/<data>-<model>
SEED_LIMIT = 2 ** 32
# Settings a resumed run may change freely, settings that --allow-changed may override, and the rest
# (which define the data, the network or the optimizer state and can never change on resume).
FREE_ON_RESUME = ("epochs", "quiet", "resume", "out", "data_dir", "devices", "allow_changed", "overwrite",   # where
                  "time_budget", "sample_length",                   # text runs: when to stop, what to print
                  "coordinator", "num_processes", "process_id", "distributed", "coordinator_timeout")  # it runs
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
    if history and "valid_loss" in history[0]:          # a text run (fnbp._cli_text)
        return _cli_text.plot(history, path)
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


def _check_resume(ckpt, meta, run_args, allowed, skipped=()):
    """Validate the stored run record (checkpoint metadata); refuse changed settings.  Flags that do not
    apply to the run (``skipped``; older fnbp recorded them all the same) are not compared.
    Returns (history, settings segments)."""
    extra, epoch = meta["extra"], meta["epoch"]
    stored = extra.get("args") if isinstance(extra, dict) else None
    history = extra.get("history") if isinstance(extra, dict) else None
    segments = extra.get("settings") if isinstance(extra, dict) else None
    if not isinstance(stored, dict):
        raise UsageError(f"fnbp train: --resume: {ckpt} holds no run arguments (not written by fnbp train, or "
                         f"tampered): cannot check that the settings match")
    missing = [k for k in LEGACY_DEFAULTS if k not in stored and k not in skipped]
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
    now = _settings(run_args)
    then = {k: v for k, v in _settings(stored).items() if k not in skipped}
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


# Flags that apply to some runs only: (default, applies(args), where it applies).  Given where it does not
# apply, the flag is refused by name; not given there, it is left out of the run record (checkpoint, history).
CONDITIONAL = {
    "activation": ("relu", lambda a: a.model == "mlp", "applies to --model mlp only (a LeNet or your own model has "
                                                        "its own activation layers)"),
    "init": ("glorot", lambda a: a.model == "mlp", "applies to --model mlp only (a LeNet or your own model "
                                                    "initialises its own layers)"),
    "slope": (0.01, lambda a: a.model == "mlp" and a.activation == "leaky_relu",
              "applies to --model mlp --activation leaky_relu only"),
    "lr_decay": (3e-4, lambda a: a.lr_schedule != "constant", "applies to --lr-schedule inverse or exponential only"),
    "dp_noise": (0.0, lambda a: bool(a.dp_clip), "needs --dp-clip > 0 (DP-SGD)"),
    "dp_delta": (1e-5, lambda a: bool(a.dp_clip), "needs --dp-clip > 0 (DP-SGD)"),
}
LOCK_NAME = ".fnbp-train.lock"          # under --out, held (flock) by the fnbp train writing there; holds its pid
RUN_FILES = ("checkpoint.npz", "history.json", "curves.png")
INTERRUPTED = 130                       # exit status after Ctrl-C (128 + SIGINT), as a shell reports it


def _inapplicable(args):
    """Refuse a flag given where it does not apply (naming it); give the others their defaults.
    Returns the names of the flags that do not apply to this run (left out of its record)."""
    skipped = set()
    for name, (default, applies, where) in CONDITIONAL.items():
        given = getattr(args, name) is not None
        if applies(args):
            if not given:
                setattr(args, name, default)
            continue
        if given:
            context = {"slope": f"--model {args.model} --activation {args.activation}",
                       "lr_decay": f"--lr-schedule {args.lr_schedule}",
                       "dp_noise": "no --dp-clip", "dp_delta": "no --dp-clip"}.get(name, f"--model {args.model}")
            raise UsageError(f"fnbp train: {_flag(name)} {where}, and this run has {context}: drop {_flag(name)} "
                             f"(it would do nothing)")
        setattr(args, name, default)        # what the code reads, never recorded
        skipped.add(name)
    return skipped


def _check_augment(args, ds):
    """--augment bounded by the images it shifts (fnbp.data.check_shift)."""
    if args.model != "mlp":                    # lenet, or a user's image model
        try:
            _data.check_shift(args.augment, ds.x_train.shape[1:], "--augment")
        except ValueError as e:
            raise UsageError(f"fnbp train: {e}") from None


def _lock(out):
    """Hold ``out/LOCK_NAME`` (an exclusive flock, released when the process ends, even by SIGKILL) and write
    this process's pid in it; a UsageError naming the holder's pid when another fnbp train holds it.
    Returns (fd, path) for :func:`_unlock`."""
    import fcntl
    import socket
    path = out / LOCK_NAME
    while True:
        with _writing(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip()
            os.close(fd)
            raise UsageError(f"fnbp train: --out {out} is in use by another fnbp train ({holder or 'pid unknown'}; "
                             f"lock file {path}): wait for it to finish, or choose another --out") from None
        except OSError as e:                # a filesystem without locks: say so rather than run unguarded
            os.close(fd)
            raise OutputError(path, e) from e
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino   # not a lock file its holder removed meanwhile
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return fd, path


def _unlock(lock):
    fd, path = lock
    with contextlib.suppress(FileNotFoundError):
        path.unlink()                      # while still holding it (see _lock's inode check)
    os.close(fd)


def _check_fresh_out(args, out, ckpt):
    """A run without --resume must not replace another run's files: refuse, or with --overwrite remove them."""
    existing = [out / n for n in RUN_FILES if (out / n).exists()]
    if args.resume or not existing:
        return
    if args.overwrite:
        for path in existing:
            with _writing(path):
                path.unlink()
            print(f"--overwrite: removed {path}", flush=True)
        return
    what = ", ".join(p.name for p in existing)
    with contextlib.suppress(Exception):
        from . import checkpoint
        meta = checkpoint.read_metadata(ckpt)
        stored = meta["extra"]["args"]
        what = (f"a checkpoint of epoch {meta['epoch']}: --data {stored.get('data')} --model "
                f"{stored.get('model', 'mlp')}")
    raise UsageError(f"fnbp train: --out {out} already holds another run ({what}); continue it with --resume, "
                     f"choose a new --out, or pass --overwrite to replace it")


def _write_atomic(path, write):
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over ``path`` (never half-written)."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")      # the suffix tells savefig the format
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(path, e) from e           # the file asked for, not the temporary one
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _write_results(out, segments, history, extra):
    """history.json and curves.png under ``out``, each atomically."""
    _write_atomic(out / "history.json", lambda tmp: tmp.write_text(json.dumps(
        {"settings": segments, "history": history, **extra}, indent=1)))
    _write_atomic(out / "curves.png", lambda tmp: _plot(history, tmp))


def _epsilon(args, B, n_train, steps):
    """Privacy spent so far (fnbp.dp.epsilon), None when it is infinite (clipping without noise)."""
    import math
    from . import dp
    if not args.dp_noise:
        return None
    eps = dp.epsilon(noise_multiplier=args.dp_noise, steps=steps, sample_rate=B / n_train, delta=args.dp_delta)
    return eps if math.isfinite(eps) else None


def _check_options(args):
    """Flag checks that need no data; returns (--out path, the flags that do not apply to this run)."""
    _cli_model.fill_defaults(args)
    skipped = _inapplicable(args)
    if args.epochs < 1:
        raise UsageError(f"fnbp train: --epochs must be >= 1, got {args.epochs}")
    if args.allow_changed and not args.resume:
        raise UsageError("fnbp train: --allow-changed only applies with --resume")
    if args.overwrite and args.resume:
        raise UsageError("fnbp train: --overwrite replaces the run in --out, --resume continues it: pass one")
    return Path(args.out if args.out is not None else f"runs/{args.data}-{_cli_model.out_name(args.model)}"), skipped


def _open_out(args, out, ckpt):
    """Process 0: create --out, lock it (see _lock) and check it holds no other run; returns the lock."""
    if args.resume and not ckpt.exists():
        raise UsageError(f"fnbp train: --resume: no checkpoint at {ckpt}")
    if ckpt.exists() and not ckpt.is_file():
        raise OutputError(ckpt, "it exists and is not a file (the checkpoint is written there after every epoch)")
    with _writing(out):
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied (the directory is not writable)", str(out))
    lock = _lock(out)
    try:
        _check_fresh_out(args, out, ckpt)
    except BaseException:
        _unlock(lock)
        raise
    return lock


def _cmd_train(args):
    from . import _malloc, parallel

    _malloc.keep_freed_memory()    # one compiled step per chunk otherwise page-faults its temporaries in every step

    not_text = _cli_text.check_flags(args, UsageError)       # --model's default; model and data; text-only flags
    process, n_processes = parallel.initialize_from_args(args, UsageError)   # before anything uses a device
    writer = process == 0                   # only process 0 writes the checkpoint, history and plot
    out, skipped = _check_options(args)
    skipped |= not_text
    if _cli_text.is_text(args):
        return _cmd_train_text(args, out, skipped)
    ds = _cli_model.prepare(args, _load_data(args), _check_layers, UsageError)
    _check_augment(args, ds)
    _check_batching(args, len(ds.y_train))
    if out.exists() and not out.is_dir():
        raise OutputError(out, "it exists and is not a directory (--out must name a directory)")
    ckpt = out / "checkpoint.npz"
    lock = _open_out(args, out, ckpt) if writer else None
    try:
        return _train_run(args, ds, out, ckpt, skipped, writer, process, n_processes)
    finally:
        if lock is not None:
            _unlock(lock)


def _cmd_train_text(args, out, skipped):
    """fnbp train --data shakespeare: the same --out, lock, checkpoint, history, plot, resume and Ctrl-C handling
    as the other models, around fnbp._cli_text's epoch loop (stateful truncated BPTT)."""
    corpus = _cli_text.load(args)
    _cli_text.check_batching(args, corpus, UsageError)
    if out.exists() and not out.is_dir():
        raise OutputError(out, "it exists and is not a directory (--out must name a directory)")
    ckpt = out / "checkpoint.npz"
    lock = _open_out(args, out, ckpt)
    try:
        return _train_text_run(args, corpus, out, ckpt, skipped)
    finally:
        _unlock(lock)


def _save_checkpoint(ckpt, result, key, run_args, segments, model_record, history, optimizer):
    from . import checkpoint
    with _writing(ckpt):
        checkpoint.save(ckpt, params=result.params, opt_state=result.opt_state, batch_stats=result.state,
                        step=result.step, epoch=result.epoch, key=key,
                        extra={"args": run_args, "settings": segments, "optimizer": optimizer,
                               "model": model_record, "history": history})


def _start_or_resume(args, out, ckpt, skipped, params, opt_state, state, k_train):
    """The run's settings (what its checkpoints record) and where it starts: epoch 0 from the given parameters,
    optimizer state, model state and key, or under --resume the checkpoint's, with its history and segments.
    Returns (run_args, params, opt_state, state, k_train, start_epoch, start_step, history, segments)."""
    run_args = {k: v for k, v in vars(args).items() if k != "func" and k not in skipped}
    run_args["out"] = str(out)
    if args.resume:
        return (run_args,) + tuple(_resume(args, ckpt, run_args, skipped, params, opt_state, state))
    return run_args, params, opt_state, state, k_train, 0, 0, [], [{"from_epoch": 1, "args": _settings(run_args)}]


def _train_text_run(args, corpus, out, ckpt, skipped):
    import jax
    from . import checkpoint, train as training

    k_init, k_train = jax.random.split(jax.random.PRNGKey(args.seed))
    lr = _learning_rate(args)
    params, opt, model_record = _cli_text.build(args, k_init, corpus, lr)
    opt_state = opt.init(params)
    (run_args, params, opt_state, _, k_train, start_epoch, start_step, history,
     segments) = _start_or_resume(args, out, ckpt, skipped, params, opt_state, None, k_train)
    for stale in checkpoint.clean_stale_temp_files(ckpt):
        print(f"removed {stale} (a temporary file left by an interrupted save)", flush=True)
    saved = {"epoch": start_epoch, "step": start_step, "history": history}     # the last checkpoint written

    def on_epoch(result):
        _save_checkpoint(ckpt, result, k_train, run_args, segments, model_record, history + result.history,
                         args.optimizer)
        saved.update(epoch=result.epoch, step=result.step, history=history + result.history)
        if not args.quiet:
            print(_cli_text.epoch_lines(result.history[-1]), flush=True)

    if not args.quiet:
        per_pass = len(corpus.train) // (args.batch_size * args.seq_len)
        steps = min(per_pass, args.steps_per_epoch) if args.steps_per_epoch else per_pass
        print(f"compiling... (one epoch = {steps} steps of {args.batch_size} x {args.seq_len} characters; "
              f"{corpus.name}, {len(corpus.train)} training and {len(corpus.validation)} validation characters, "
              f"{len(corpus.vocab)} symbols; --model {args.model}, --hidden {args.hidden})", flush=True)
    t0 = time.perf_counter()
    try:
        result = _cli_text.train(args, corpus, params, opt, opt_state, k_train, start_epoch=start_epoch,
                                 start_step=start_step, schedule=lr, on_epoch=on_epoch,
                                 progress=False if args.quiet else None)
    except KeyboardInterrupt:
        return _interrupted(out, ckpt, segments, saved, True)
    except training.NonFiniteInputError as e:
        raise UsageError(f"the checkpoint {ckpt} holds non-finite values: {e}") from e
    except (training.NonFiniteError, OutputError) as e:
        print(f"error: {e}\nthe last good checkpoint is {ckpt if ckpt.exists() else '(none written)'}",
              file=sys.stderr)
        return 1
    seconds = time.perf_counter() - t0
    history = history + result.history
    extra = {"compile_seconds": result.compile_seconds, "train_seconds": seconds}
    if result.stopped:
        extra["stopped"] = result.stopped
    try:
        _write_results(out, segments, history, extra)
    except OutputError as e:
        print(f"error: {e}\nthe checkpoint {ckpt} (epoch {result.epoch}) is complete", file=sys.stderr)
        return 1
    last = history[-1]
    why = f"; --time-budget {args.time_budget:g} s reached" if result.stopped else ""
    print(f"final validation loss {last['valid_loss']:.4f} nats/char ({last['valid_bits']:.4f} bits/char; "
          f"{corpus.name}, {len(corpus.validation)} validation characters) after {last['epoch']} epochs in "
          f"{seconds:.1f} s (compile {result.compile_seconds:.1f} s){why}; wrote {out / 'history.json'}, "
          f"{out / 'curves.png'}, {ckpt}")
    return 0


def _train_run(args, ds, out, ckpt, skipped, writer, process, n_processes):
    import jax
    from . import checkpoint, optim, parallel, train as training

    mesh = parallel.mesh_for_cli(args.devices, UsageError)      # None on one device
    k_init, k_train = jax.random.split(jax.random.PRNGKey(args.seed))
    activation = _activation(args.activation, args.slope) if args.model == "mlp" else None
    params, cfg, model = _cli_model.build(args, k_init, ds, activation, training, UsageError)
    lr = _learning_rate(args)
    opt = getattr(optim, args.optimizer)(lr)
    opt_state, state = opt.init(params), training.resolve_model(cfg, model).init_state(params)
    (run_args, params, opt_state, state, k_train, start_epoch, start_step, history,
     segments) = _start_or_resume(args, out, ckpt, skipped, params, opt_state, state, k_train)
    if writer:                              # under the lock of --out: no other fnbp train saves there
        for stale in checkpoint.clean_stale_temp_files(ckpt):
            print(f"removed {stale} (a temporary file left by an interrupted save)", flush=True)
    lines = writer and not args.quiet and not sys.stderr.isatty()   # no progress bar: one line per epoch instead
    B = len(ds.y_train) if args.batch_size is None else args.batch_size
    if args.dp_clip and not args.dp_noise:
        print(f"--dp-clip {args.dp_clip:g} without --dp-noise: per-example clipping only, no noise, so no privacy "
              f"guarantee (epsilon = infinity; recorded as null in the history)", flush=True)
    saved = {"epoch": start_epoch, "step": start_step, "history": history}     # the last checkpoint written

    def on_epoch(result):
        if args.dp_clip:
            result.history[-1]["epsilon"] = _epsilon(args, B, len(ds.y_train), result.step)
        _save_checkpoint(ckpt, result, k_train, run_args, segments,
                         _cli_model.describe(model, args, ds.x_train.shape[1:]), history + result.history,
                         args.optimizer)
        saved.update(epoch=result.epoch, step=result.step, history=history + result.history)
        if lines:
            h = result.history[-1]
            eps = ("" if "epsilon" not in h else f"  epsilon infinite (no noise)" if h["epsilon"] is None
                   else f"  epsilon {h['epsilon']:.3f} at delta {args.dp_delta:g}")
            print(f"epoch {h['epoch']:3d}  loss {h['loss']:.4f}  test loss {h['test_loss']:.4f}  "
                  f"test accuracy {h['test_accuracy']:.4f}  {h['examples_per_s']:,.0f} examples/s" + eps, flush=True)

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
    except KeyboardInterrupt:
        return _interrupted(out, ckpt, segments, saved, writer)
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
        _write_results(out, segments, history, {"compile_seconds": result.compile_seconds, "train_seconds": seconds})
    except OutputError as e:
        print(f"error: {e}\nthe checkpoint {ckpt} (epoch {result.epoch}) is complete", file=sys.stderr)
        return 1
    last = history[-1]
    print(f"final test accuracy {last['test_accuracy']:.4f} ({ds.name}, {len(ds.y_test)} test examples) "
          f"after {last['epoch']} epochs in {seconds:.1f} s (compile {result.compile_seconds:.1f} s); "
          f"wrote {out / 'history.json'}, {out / 'curves.png'}, {ckpt}")
    return 0


def _resume(args, ckpt, run_args, skipped, params, opt_state, state):
    """--resume: check the stored run against this one and load its state into the templates; returns
    (params, opt_state, state, key, epoch, step, history, settings segments)."""
    from . import checkpoint
    history, segments = _check_resume(ckpt, checkpoint.read_metadata(ckpt), run_args, args.allow_changed or [],
                                      skipped)
    loaded = checkpoint.load(ckpt, params_like=params, opt_state_like=opt_state, batch_stats_like=state)
    if loaded["epoch"] >= args.epochs:
        raise UsageError(f"fnbp train: the checkpoint {ckpt} already has {loaded['epoch']} epochs; ask for "
                         f"--epochs > {loaded['epoch']}")
    print(f"resuming from {ckpt} at epoch {loaded['epoch']} (step {loaded['step']})", flush=True)
    return (loaded["params"], loaded["opt_state"], loaded["batch_stats"], loaded["key"], loaded["epoch"],
            loaded["step"], history, segments)


def _interrupted(out, ckpt, segments, saved, writer):
    """Ctrl-C: write the history and curves of the epochs the last checkpoint holds, say where to resume."""
    import signal
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)     # a second Ctrl-C must not cut these writes short
    wrote = ""
    try:
        if writer and saved["history"]:
            _write_results(out, segments, saved["history"], {"interrupted": True})
            wrote = f"; wrote {out / 'history.json'}, {out / 'curves.png'}"
    except OutputError as e:
        wrote = f"; {e}"
    finally:
        signal.signal(signal.SIGINT, previous)
    last = (f"last checkpoint epoch {saved['epoch']} ({ckpt}); resume with --resume" if saved["epoch"]
            else "no checkpoint written yet; start again")
    print(f"interrupted at epoch {saved['epoch'] + 1}, step {saved['step']}; {last}{wrote}", file=sys.stderr,
          flush=True)
    return INTERRUPTED


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
                       description="Train a dense network (or a LeNet, --model lenet; or a character-level language "
                                   "model, --data shakespeare --model lstm, elman or gru) with fnbp's hand-written "
                                   "rules and optimizers. Writes OUT/history.json, OUT/curves.png and "
                                   "OUT/checkpoint.npz (after every epoch, atomically); --resume continues from that "
                                   "checkpoint bit-identically. An OUT holding another run is refused unless "
                                   "--resume or --overwrite; a lock file keeps two runs out of one OUT. Flags that do "
                                   "not apply to the run are refused. Ctrl-C writes the history and curves of the "
                                   "checkpointed epochs and exits with 130.",
                       formatter_class=_HelpFormatter)
    t.add_argument("--data", choices=DATASETS, default="digits",
                   help="dataset: digits (bundled with scikit-learn), mnist (IDX files, see --data-dir), a toy set, or "
                        "shakespeare (text shipped with fnbp, for --model elman, lstm or gru)")
    t.add_argument("--data-dir", default=None,
                   help="MNIST directory (default: $FNBP_MNIST_DIR, then ../shared/data/mnist)")
    t.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=_cli_model.UNSET,
                   help="standardise features with the training split's mean and std (digits, mnist)"
                        + _cli_model.default_help("standardize"))
    t.add_argument("--layers", type=_layers, default=None,
                   help="--model mlp: widths, input first and classes last (default: 64,32,10)")
    _cli_model.add_arguments(t)
    t.add_argument("--activation", choices=ACTIVATIONS, default=None,
                   help="--model mlp: hidden activation (default: relu)")
    t.add_argument("--slope", type=_float_arg("--slope"), default=None,
                   help="--activation leaky_relu: the slope for a < 0 (default: 0.01)")
    t.add_argument("--init", choices=("glorot", "he", "uniform"), default=None,
                   help="--model mlp: weight initialiser (default: glorot)")
    t.add_argument("--batch-norm", action="store_true", help="batch norm before each hidden activation")
    t.add_argument("--dropout", type=_float_arg("--dropout", 0.0, 1.0), default=_cli_model.UNSET,
                   help="dropout probability in [0, 1): mlp between hidden layers, lenet on each dense layer's input, "
                        "elman/lstm/gru on the cell's outputs"
                        + _cli_model.default_help("dropout"))
    t.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="fnbp.optim optimizer")
    t.add_argument("--lr", type=_float_arg("--lr", 0.0, lo_open=True), default=_cli_model.UNSET,
                   help="learning rate eta_0" + _cli_model.default_help("lr"))
    t.add_argument("--lr-schedule", choices=("constant", "inverse", "exponential"), default=_cli_model.UNSET,
                   help="eta_k = eta_0, eta_0/(1 + k decay) or eta_0 exp(-k decay), k = step"
                        + _cli_model.default_help("lr_schedule"))
    t.add_argument("--lr-decay", type=_float_arg("--lr-decay", 0.0), default=None,
                   help="decay of an inverse or exponential --lr-schedule (default: 0.0003)")
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
    t.add_argument("--dp-noise", type=_float_arg("--dp-noise", 0.0), default=None,
                   help="DP-SGD (with --dp-clip): noise multiplier (default: 0, clipping only: no privacy guarantee)")
    t.add_argument("--dp-delta", type=_float_arg("--dp-delta", 0, 1, lo_open=True), default=None,
                   help="DP-SGD (with --dp-clip): delta (default: 1e-05)")
    t.add_argument("--seed", type=_int_arg("--seed", 0, SEED_LIMIT, "2**32"), default=0,
                   help="seed of the data split, initialisation and shuffling")
    t.add_argument("--out", default=None, help=f"output directory (default: runs/<data>-<model>: runs/<data>-{MODEL}, "
                                               f"runs/<data>-lenet, runs/shakespeare-lstm)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.npz (same settings)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (without it, a run that is not --resume refuses an --out "
                        "holding another run's files)")
    t.add_argument("--allow-changed", type=_allow_changed, default=None, metavar="FLAGS",
                   help="with --resume: comma-separated settings that may differ from the checkpoint's run, "
                        "from " + ",".join(_flag(n)[2:] for n in OVERRIDABLE) + " (--epochs always may)")
    t.add_argument("--quiet", action="store_true", help="no progress bar and no per-epoch lines")
    _cli_text.add_arguments(t)                                  # --hidden, --embed, --seq-len, ...
    __import__("fnbp.parallel").parallel.add_cli_arguments(t)   # --coordinator, --num-processes, --process-id
    t.set_defaults(func=_cmd_train)
    return t
