"""Bench case ``text_run``: ``fnbp train --data shakespeare --model lstm`` against a plain PyTorch ``nn.LSTM``
loop trained with the same recipe for the same training time (issue #26): both validation losses at equal
training time (``same_time``: when the first side finished its run, and on a grid), each side's final one, their
curves, and the ratio of characters per second.

fnbp: the CLI's own code -- the arguments of ``fnbp train --data shakespeare --model lstm --time-budget SECONDS
--sample-length 0`` (plus ``--text-train-flags``) parsed and defaulted by the CLI's parser, its initialisation and
optimizer (``fnbp._cli_text.build``: ``fnbp.charlm.init`` from the run's key, clip by global norm then Adam with
``--lr-schedule``'s decay), and its epoch loop ``fnbp._cli_text.train`` (``fnbp.text.sequential_batches`` from a
random offset per epoch, ``fnbp.charlm.make_train_step``'s stateful truncated BPTT, ``fnbp.charlm.evaluate`` over
the whole validation stream after every epoch).  With the CLI's defaults: embedding 64 -> LSTM H = 384 -> dense V
on every step with dropout 0.25 on the LSTM's outputs, B = 64 rows of T = 64 characters, clip 1.0, Adam 2e-3
decayed by exp(-3e-4 k), 12 epochs, the 90 / 10 split of ``fnbp.text.load_shakespeare()``.  The sample the CLI prints after each epoch is off (it is not training).

PyTorch: ``fnbp/bench/_torch_text_run.py``, run by a Python that has torch (``FNBP_TORCH_PYTHON``, else this Python
when it can import torch; skipped otherwise), from fnbp's initial weights, on the same token ids, reading each
epoch from the offset fnbp's epoch drew (so both see the same chunks in the same order), with
``clip_grad_norm_`` and ``torch.optim.Adam`` at the same per-step learning rate and the same validation pass; its
dropout (``F.dropout`` at the same place and probability) draws PyTorch's own masks.

Each side stops once its cumulative training time (the steps of its epochs, the evaluation excluded: fnbp's
``--time-budget``) reaches ``seconds``, or after ``--epochs`` epochs (the CLI's default 12), whichever comes
first; the epoch in progress ends there and is evaluated.  The two alternate epoch by epoch (fnbp's epoch e,
then PyTorch's epoch e), so a shared machine's drift hits both alike; when one side has stopped, the other goes
on alone.  Before training, both evaluate the initial weights: the same validation loss (to float32 rounding)
shows that the two are the same model on the same data.

Memory: this process keeps freed memory for reuse (``fnbp._malloc``), as ``fnbp train`` does for its own; the
PyTorch child runs with glibc's defaults, as a plain PyTorch loop does, unless ``--torch-malloc same``.
"""
import math
import shlex
import time
from pathlib import Path

import numpy as np

from .lenet_run import TorchChild, malloc_line, torch_python
from .registry import register

CHILD = Path(__file__).with_name("_torch_text_run.py")
DEFAULT_SECONDS = 600.0
QUICK_SECONDS = 5.0
QUICK_TRAIN_FLAGS = "--hidden 16 --embed 8 --steps-per-epoch 4 --epochs 2"
SCHEDULES = ("constant", "inverse", "exponential")      # what the PyTorch loop implements (all of the CLI's)


def cli_args(flags=()):
    """The arguments of ``fnbp train --data shakespeare --model lstm *flags`` as the CLI parses, checks and
    defaults them (``fnbp.cli_train``); ValueError naming ``fnbp.bench.text_run`` for flags the PyTorch loop
    does not reproduce (another model or optimizer)."""
    from .. import _cli_text, cli, cli_train
    flags = list(flags)
    args = cli.build_parser().parse_args(["train", "--data", "shakespeare", "--model", "lstm", *flags])
    if args.model != "lstm" or args.optimizer != "adam":
        raise ValueError(f"fnbp.bench.text_run: the PyTorch loop is nn.LSTM with torch.optim.Adam; the flags "
                         f"{' '.join(flags)!r} ask for --model {args.model} --optimizer {args.optimizer}")
    _cli_text.check_flags(args, cli_train.UsageError)
    cli_train._check_options(args)                       # the model-dependent defaults (TEXT_DEFAULTS)
    if args.lr_schedule not in SCHEDULES:
        raise ValueError(f"fnbp.bench.text_run: --lr-schedule must be one of {SCHEDULES}, got {args.lr_schedule!r}")
    return args


def epoch_offsets(key, epochs, seq_len):
    """The offset of the training stream at each epoch e < ``epochs``: what ``fnbp.text.sequential_batches`` draws
    from ``fold_in(key, e)`` in ``fnbp._cli_text.train``."""
    import jax
    from .. import text
    return np.asarray([text._offset(jax.random.fold_in(key, e), seq_len) for e in range(epochs)], np.int64)


class TorchTextRun(TorchChild):
    """The text model's PyTorch loop (``_torch_text_run.py``).  ``epoch()``: {"epoch", "seconds", "eval_seconds",
    "loss", "valid_loss", "steps", "grad_norm", "learning_rate", "chars_per_s", "stopped"}; ``evaluate()``:
    {"valid_loss"} of the current weights, nats/char over the whole validation stream."""

    def __init__(self, python, corpus, params, args, offsets, seconds, threads=None, malloc="default"):
        from .._cli_text import EVAL_ROWS
        recipe = {"batch_size": args.batch_size, "seq_len": args.seq_len, "eval_rows": EVAL_ROWS, "lr": args.lr,
                  "lr_schedule": args.lr_schedule, "lr_decay": args.lr_decay, "clip": args.clip,
                  "steps_per_epoch": args.steps_per_epoch, "seconds": seconds, "dropout": args.dropout,
                  "seed": args.seed}
        super().__init__("text_run", python, CHILD, dict(
            train=np.asarray(corpus.train, np.int32), validation=np.asarray(corpus.validation, np.int32),
            offsets=np.asarray(offsets, np.int64), **{k: np.asarray(v) for k, v in recipe.items()},
            **{k: np.asarray(v, np.float32) for k, v in params.items()}), threads, malloc)


def initial_state(args, corpus):
    """(params, opt, opt_state, schedule, k_train) of a fresh ``fnbp train`` text run (``_train_text_run``'s
    first lines: the keys split from ``--seed``, ``fnbp._cli_text.build``)."""
    import jax
    from .. import _cli_text, cli_train
    k_init, k_train = jax.random.split(jax.random.PRNGKey(args.seed))
    schedule = cli_train._learning_rate(args)
    params, opt, _ = _cli_text.build(args, k_init, corpus, schedule)
    return params, opt, opt.init(params), schedule, k_train


def _side(epochs, B, T):
    """The report row of one side from its epoch records."""
    cum = np.cumsum([e["seconds"] for e in epochs]).tolist()
    steps = sum(e["steps"] for e in epochs)
    train_s = cum[-1] if cum else 0.0
    return {"epochs": epochs, "curve": [[s, e["valid_loss"]] for s, e in zip(cum, epochs)],
            "train_seconds": train_s, "steps": steps, "chars": steps * B * T,
            "chars_per_s": steps * B * T / train_s if train_s else None,
            "final_valid_loss": epochs[-1]["valid_loss"] if epochs else None,
            "final_valid_bits": epochs[-1]["valid_loss"] / math.log(2) if epochs else None}


def valid_at(curve, t, initial):
    """A side's validation loss at training time ``t``: linear between its epoch ends ``curve`` ([seconds,
    validation] pairs, cumulative training seconds) with (0, ``initial``) before the first; at or past its last
    epoch end, its final value (the run is over: the model a user holds is the final one)."""
    points = [(0.0, initial), *((float(s), float(v)) for s, v in curve)]
    if t >= points[-1][0]:
        return points[-1][1]
    for (s0, v0), (s1, v1) in zip(points, points[1:]):
        if t <= s1:
            return v0 + (v1 - v0) * (t - s0) / (s1 - s0)


def same_time(sec, step=60.0):
    """Both validation losses at equal training time (``valid_at``): at the moment the first side finished its
    run (its last epoch's end), with ``diff`` = fnbp's − PyTorch's (<= 0: fnbp no worse), and every ``step``
    seconds up to the later end."""
    f, t, init = sec["fnbp"], sec["torch"], sec["initial_valid_loss"]
    first = min(f["train_seconds"], t["train_seconds"])
    at = lambda s: {"seconds": s, "fnbp": valid_at(f["curve"], s, init["fnbp"]),          # noqa: E731
                    "torch": valid_at(t["curve"], s, init["torch"])}
    grid = [at(step * k) for k in range(1, int(max(f["train_seconds"], t["train_seconds"]) // step) + 1)]
    at_first = at(first)
    return {"first_done": "fnbp" if f["train_seconds"] <= t["train_seconds"] else "torch", **at_first,
            "diff": at_first["fnbp"] - at_first["torch"], "grid": grid}


def bench_text_run(seconds=DEFAULT_SECONDS, *, flags=(), corpus=None, python=None, threads=None, skip_reason=None,
                   torch_malloc="default", log=lambda msg: None):
    """Train ``fnbp train --data shakespeare --model lstm *flags`` for ``seconds`` of training time, each epoch
    followed by one of the PyTorch loop (``python``: a Python with torch; None: fnbp alone); returns the report
    section.  ``corpus``: a ``fnbp.text.CharCorpus`` (default: the CLI's, ``load_shakespeare()``)."""
    from .. import _cli_text, charlm, cli_train
    from .harness import paired_ratio
    if not (isinstance(seconds, (int, float)) and seconds > 0):
        raise ValueError(f"fnbp.bench.text_run: seconds must be > 0, got {seconds!r}")
    args = cli_args(flags)
    args.time_budget, args.sample_length = float(seconds), 0
    corpus = _cli_text.load(args) if corpus is None else corpus
    _cli_text.check_batching(args, corpus, cli_train.UsageError)
    B, T = args.batch_size, args.seq_len
    params, opt, opt_state, schedule, k_train = initial_state(args, corpus)
    initial = {"fnbp": charlm.evaluate(params, corpus.validation, _cli_text.EVAL_ROWS, T, args.model)}
    peer = (TorchTextRun(python, corpus, params, args, epoch_offsets(k_train, args.epochs, T), seconds, threads,
                         torch_malloc) if python else None)
    fnbp_epochs, torch_epochs = [], []

    def torch_epoch():
        torch_epochs.append(peer.epoch())
        e = torch_epochs[-1]
        log(f"  torch epoch {e['epoch']}: {e['steps']} steps in {e['seconds']:.2f} s, validation "
            f"{e['valid_loss']:.4f} nats/char")

    def torch_going():
        return peer is not None and len(torch_epochs) < args.epochs and not (torch_epochs and
                                                                             torch_epochs[-1]["stopped"])
    try:
        if peer is not None:
            initial["torch"] = peer.evaluate()["valid_loss"]

        def on_epoch(result):
            h = {k: v for k, v in result.history[-1].items() if k != "sample"}
            fnbp_epochs.append(dict(h, stopped=result.stopped is not None))
            log(f"  fnbp epoch {h['epoch']}: {h['steps']} steps in {h['seconds']:.2f} s, validation "
                f"{h['valid_loss']:.4f} nats/char")
            if torch_going():
                torch_epoch()

        res = _cli_text.train(args, corpus, params, opt, opt_state, k_train, start_epoch=0, start_step=0,
                              schedule=schedule, on_epoch=on_epoch, progress=False)
        while torch_going():                                   # fnbp stopped first: PyTorch goes on alone
            torch_epoch()
    finally:
        if peer is not None:
            peer.close()
    recipe = {k: getattr(args, k) for k in ("hidden", "embed", "batch_size", "seq_len", "lr", "lr_schedule",
                                            "lr_decay", "clip", "dropout", "optimizer", "epochs", "steps_per_epoch",
                                            "seed")}
    sec = {"command": "fnbp train --data shakespeare --model lstm " + " ".join([*flags, "--time-budget",
                                                                                f"{seconds:g}", "--sample-length",
                                                                                "0"]),
           "recipe": recipe, "seconds": float(seconds), "data": corpus.name, "n_train": int(len(corpus.train)),
           "n_valid": int(len(corpus.validation)), "vocab_size": len(corpus.vocab), "compile_s": res.compile_seconds,
           "initial_valid_loss": initial, "ln_V": math.log(len(corpus.vocab)), "fnbp": _side(fnbp_epochs, B, T)}
    if peer is None:
        sec["torch"] = {"skipped": skip_reason or "no torch python"}
        return sec
    sec["torch"] = _side(torch_epochs, B, T)
    sec["torch_malloc"] = torch_malloc
    sec["initial_valid_rel_diff"] = abs(initial["torch"] - initial["fnbp"]) / abs(initial["fnbp"])
    f, t = sec["fnbp"], sec["torch"]
    sec["chars_per_s_ratio"] = f["chars_per_s"] / t["chars_per_s"]
    sec["valid_loss_diff"] = f["final_valid_loss"] - t["final_valid_loss"]      # <= 0: fnbp no worse
    sec["same_time"] = same_time(sec)
    # per epoch, epochs 2.. that both ran whole: seconds per character, PyTorch's / fnbp's = fnbp chars/s / PyTorch's
    rounds = [i for i in range(1, min(len(fnbp_epochs), len(torch_epochs)))
              if not fnbp_epochs[i]["stopped"] and not torch_epochs[i]["stopped"]]
    if rounds:
        per_char = lambda eps: {"wall": [eps[i]["seconds"] / (eps[i]["steps"] * B * T) for i in rounds],  # noqa
                                "round": rounds}
        sec["speed_ratio_paired"] = paired_ratio(per_char(torch_epochs), per_char(fnbp_epochs))
    return sec


def render(sec, result=None):
    """Markdown lines of the section."""
    rc = sec["recipe"]
    L = ["## Whole run: `fnbp train --data shakespeare --model lstm` vs PyTorch's `nn.LSTM` (issue #26)", "",
         f"{sec['data']}: {sec['n_train']:,} training / {sec['n_valid']:,} validation characters, {sec['vocab_size']} "
         f"symbols. Embedding {rc['embed']} → LSTM H = {rc['hidden']} → dense, B = {rc['batch_size']} rows of "
         f"T = {rc['seq_len']}, state carried across chunks (gradient cut)"
         + (f", dropout {rc['dropout']:g} on the LSTM's outputs (each side draws its own masks)"
            if rc.get("dropout") else "") + f", clip {rc['clip']:g}, Adam "
         f"{rc['lr']:g} ({rc['lr_schedule']}, decay {rc['lr_decay']:g}/step), at most {rc['epochs']} epochs; each "
         f"side stops when its training time (steps only) reaches {sec['seconds']:g} s. Epochs alternate fnbp, "
         f"PyTorch. fnbp's side is `{sec['command']}`.", ""]
    init = sec["initial_valid_loss"]
    line = f"Initial validation loss (same weights): fnbp {init['fnbp']:.6f}"
    if "torch" in init:
        line += f", PyTorch {init['torch']:.6f} (relative difference {sec['initial_valid_rel_diff']:.1e})"
    L += [line + f"; ln V = {sec['ln_V']:.4f}.", "",
          "| run | epochs | steps | training s | chars/s | final validation nats/char | bits/char |",
          "|---|---|---|---|---|---|---|"]
    for name, label in (("fnbp", "fnbp train (the CLI's loop)"), ("torch", "PyTorch nn.LSTM (eager)")):
        row = sec[name]
        if "skipped" in row:
            L.append(f"| {label} | skipped: {row['skipped']} | | | | | |")
            continue
        L.append(f"| {label} | {len(row['epochs'])} | {row['steps']} | {row['train_seconds']:.1f} | "
                 f"{row['chars_per_s']:,.0f} | {row['final_valid_loss']:.4f} | {row['final_valid_bits']:.4f} |")
    if "chars_per_s_ratio" in sec:
        L += ["", f"fnbp chars/s / PyTorch chars/s over the whole run: {sec['chars_per_s_ratio']:.3g}"
              + (f"; paired by epoch (epochs 2.. run whole by both): {sec['speed_ratio_paired']['median']:.3g} "
                 f"[{sec['speed_ratio_paired']['q1']:.3g}–{sec['speed_ratio_paired']['q3']:.3g}] over "
                 f"{sec['speed_ratio_paired']['rounds']} epochs" if "speed_ratio_paired" in sec else "")
              + f". fnbp − PyTorch final validation loss: {sec['valid_loss_diff']:+.4f} nats/char."]
    if "same_time" in sec:
        st, who = sec["same_time"], {"fnbp": "fnbp", "torch": "PyTorch"}
        L += ["", f"At equal training time, {st['seconds']:.1f} s, when {who[st['first_done']]} finished its run: "
                  f"fnbp {st['fnbp']:.4f}, PyTorch {st['torch']:.4f} nats/char, fnbp − PyTorch {st['diff']:+.4f} "
                  f"(target ≤ 0; the side still training read linearly between its epoch ends).", "",
              "| training s | fnbp validation | PyTorch validation | fnbp − PyTorch |", "|---|---|---|---|"]
        L += [f"| {g['seconds']:.0f} | {g['fnbp']:.4f} | {g['torch']:.4f} | {g['fnbp'] - g['torch']:+.4f} |"
              for g in st["grid"]]
        L += ["", "(Between epoch ends each side's value is read linearly; past its last epoch a side keeps its "
                  "final value.)"]
    if malloc_line(sec, result):
        L += ["", malloc_line(sec, result)]
    sides = [n for n in ("fnbp", "torch") if "skipped" not in sec[n]]
    L += ["", "Validation loss (nats/char) against cumulative training seconds:", "",
          "| epoch | " + " | ".join(f"{n} s | {n} validation" for n in sides) + " |",
          "|---|" + "---|---|" * len(sides)]
    for i in range(max(len(sec[n]["curve"]) for n in sides)):
        cells = [(f"{sec[n]['curve'][i][0]:.1f} | {sec[n]['curve'][i][1]:.4f}" if i < len(sec[n]["curve"])
                  else " | ") for n in sides]
        L.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return L + [""]


def summary(sec):
    f = sec["fnbp"]
    out = [f"text_run: fnbp {f['final_valid_loss']:.4f} nats/char after {f['train_seconds']:.0f} s "
           f"({f['chars_per_s']:,.0f} chars/s)"]
    if "chars_per_s_ratio" in sec:
        t = sec["torch"]
        out[0] += (f", PyTorch {t['final_valid_loss']:.4f} after {t['train_seconds']:.0f} s "
                   f"({t['chars_per_s']:,.0f} chars/s), chars/s fnbp / PyTorch {sec['chars_per_s_ratio']:.3g}")
        if "same_time" in sec:
            st = sec["same_time"]
            out[0] += (f"; at equal training time ({st['seconds']:.0f} s) fnbp {st['fnbp']:.4f}, PyTorch "
                       f"{st['torch']:.4f}")
    return out


def _run(ctx):
    python, why = torch_python(ctx.no_torch)
    seconds = ctx.text_seconds if ctx.text_seconds is not None else (QUICK_SECONDS if ctx.quick
                                                                      else DEFAULT_SECONDS)
    given = ctx.text_train_flags
    flags = ["--seed", str(ctx.seed)] + shlex.split(given if given is not None else
                                                    (QUICK_TRAIN_FLAGS if ctx.quick else ""))
    try:
        args = cli_args(flags)
    except SystemExit:
        raise ValueError(f"fnbp bench: --text-train-flags {given!r}: not flags of fnbp train (see the message "
                         f"above)") from None
    ctx.log(f"text run: fnbp train --data shakespeare --model lstm {' '.join(flags)} for {seconds:g} s of "
            f"training (at most {args.epochs} epochs), then {'PyTorch' if python else 'no PyTorch'} ...")
    return bench_text_run(seconds, flags=flags, python=python, threads=ctx.cores, skip_reason=why,
                          torch_malloc=ctx.torch_malloc, log=ctx.log)


register("text_run", run=_run, render=render, summary=summary,
         help="fnbp train --data shakespeare --model lstm vs PyTorch's nn.LSTM, same recipe and training time")
