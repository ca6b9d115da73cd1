"""``fnbp train --data shakespeare --model lstm`` (also elman, gru) and ``fnbp sample CHECKPOINT``.

The character-level language model of ``fnbp.charlm`` (embedding -> recurrent cell -> dense on every step),
trained by stateful truncated back-propagation through time: an epoch reads the training stream as
``--batch-size`` consecutive rows (``fnbp.text.sequential_batches``, a fresh random offset per epoch from the
run's key), in chunks of ``--seq-len`` characters; the final state (h, and c for the LSTM) of chunk k is the
initial state of chunk k+1 with its gradient cut (``fnbp.charlm.make_train_step``).  Each step clips the
gradient by its global norm (``fnbp.optim.clip_by_global_norm(--clip)``) and then applies ``--optimizer``
(Adam by default).  After every epoch: the validation loss E in nats per character over the whole validation
stream (read as ``EVAL_ROWS`` rows, state carried; E / ln 2 bits per character) and a short sample.

``fnbp.cli_train`` runs the command (the same --out, lock, checkpoint, history, plot, resume and Ctrl-C rules as
the other models); this module holds the text models' flags, their checks, the epoch loop and ``fnbp sample``.
"""
import argparse
import functools
import itertools
import math
import time
from pathlib import Path
from typing import NamedTuple

from ._cli_args import _float_arg, _int_arg
from ._cli_model import TEXT_MODELS, UNSET

TEXT_DATA = ("shakespeare",)
EVAL_ROWS = 64                     # the validation stream is read as 64 rows, in chunks of --seq-len
SAMPLE_PROMPT = "ROMEO:"           # the prompt of each epoch's sample
SAMPLE_TEMPERATURE = 0.8
SEED_LIMIT = 2 ** 32

# The text models' own flags: name -> default (given on other data, they are refused by name).
TEXT_FLAGS = {"hidden": 384, "embed": 64, "seq_len": 64, "clip": 1.0, "steps_per_epoch": 0, "time_budget": 0.0,
              "sample_length": 200}
# Flags of the image and MLP models that the text models do not use: name -> (is it left at its default?, why).
REFUSED = {
    "layers": (lambda v: v is None, "it sets an MLP's widths; the text model's sizes are --hidden and --embed"),
    "activation": (lambda v: v is None, "the recurrent cells have their own tanh and sigmoid gates"),
    "init": (lambda v: v is None, "the text models are initialised as PyTorch's (fnbp.charlm.init)"),
    "slope": (lambda v: v is None, "it is leaky_relu's slope"),
    "batch_norm": (lambda v: not v, "the text models have no batch norm"),
    "augment": (lambda v: v is UNSET, "it shifts images"),
    "standardize": (lambda v: v is UNSET, "it standardises image features"),
    "l2": (lambda v: v is UNSET, "the text models' step has no L2 penalty"),
    "accumulate": (lambda v: v == 1, "the text models take one chunk per step"),
    "grad": (lambda v: v == "autodiff", "the text models' gradient is jax.value_and_grad through fnbp's recurrent "
                                        "rules"),
    "dp_clip": (lambda v: not v, "DP-SGD is for the image and MLP models"),
    "dp_noise": (lambda v: v is None, "DP-SGD is for the image and MLP models"),
    "dp_delta": (lambda v: v is None, "DP-SGD is for the image and MLP models"),
    "data_dir": (lambda v: v is None, "it locates MNIST; the Shakespeare text ships inside fnbp"),
    "devices": (lambda v: v in (0, 1), "the text models train on one device"),
    "coordinator": (lambda v: v is None, "the text models train in one process"),
    "num_processes": (lambda v: v is None, "the text models train in one process"),
    "process_id": (lambda v: v is None, "the text models train in one process"),
    "distributed": (lambda v: not v, "the text models train in one process"),
}


def _flag(name):
    return "--" + name.replace("_", "-")


def is_text(args):
    return args.data in TEXT_DATA


def add_arguments(t):
    """Register the text models' flags on the ``fnbp train`` parser ``t``."""
    g = t.add_argument_group("text models (--data shakespeare --model elman, lstm or gru)")
    g.add_argument("--hidden", type=_int_arg("--hidden", 1), default=None,
                   help=f"width H of the recurrent state (default: {TEXT_FLAGS['hidden']})")
    g.add_argument("--embed", type=_int_arg("--embed", 1), default=None,
                   help=f"width d of the character embedding (default: {TEXT_FLAGS['embed']})")
    g.add_argument("--seq-len", type=_int_arg("--seq-len", 1), default=None,
                   help=f"characters per chunk T: the length of back-propagation through time; the state is "
                        f"carried from chunk to chunk with its gradient cut (default: {TEXT_FLAGS['seq_len']})")
    g.add_argument("--clip", type=_float_arg("--clip", 0.0), default=None,
                   help="clip the gradient to this global norm before the optimizer (0 = no clipping; default: "
                        f"{TEXT_FLAGS['clip']:g})")
    g.add_argument("--steps-per-epoch", type=_int_arg("--steps-per-epoch", 1), default=None,
                   help="end each epoch after this many chunks (default: one whole pass over the training text)")
    g.add_argument("--time-budget", type=_float_arg("--time-budget", 0.0, lo_open=True), default=None,
                   metavar="SECONDS",
                   help="stop once this many seconds of training (this run's, compile and evaluation excluded) "
                        "have passed; the epoch in progress ends there, is evaluated and checkpointed "
                        "(default: no limit)")
    g.add_argument("--sample-length", type=_int_arg("--sample-length", 0), default=None,
                   help=f"characters of the sample printed after each epoch, from {SAMPLE_PROMPT!r} at temperature "
                        f"{SAMPLE_TEMPERATURE} (0 = none; default: {TEXT_FLAGS['sample_length']})")


def check_flags(args, usage_error):
    """Resolve --model's default (lstm on text, mlp otherwise), match the model to the data and refuse, by name,
    the flags that do not apply; fill the text flags' defaults.  Returns the names of the flags that do not apply
    to this run (left out of its record)."""
    text = is_text(args)
    if args.model is None:
        args.model = "lstm" if text else "mlp"
    if args.model in TEXT_MODELS and not text:
        raise usage_error(f"fnbp train: --model {args.model} is a character-level language model: it needs --data "
                          f"{' or '.join(TEXT_DATA)}, got --data {args.data}")
    if text and args.model not in TEXT_MODELS:
        raise usage_error(f"fnbp train: --data {args.data} is text: it needs --model {', '.join(TEXT_MODELS[:-1])} "
                          f"or {TEXT_MODELS[-1]}, got --model {args.model}")
    if not text:
        for name in TEXT_FLAGS:
            if getattr(args, name) is not None:
                raise usage_error(f"fnbp train: {_flag(name)} applies to the text models only (--data shakespeare "
                                  f"--model {', '.join(TEXT_MODELS)}), and this run has --data {args.data}: drop "
                                  f"{_flag(name)}")
        return set(TEXT_FLAGS)
    for name, (left_alone, why) in REFUSED.items():
        if not left_alone(getattr(args, name)):
            raise usage_error(f"fnbp train: {_flag(name)} does not apply to --data {args.data} --model {args.model} "
                              f"({why}): drop {_flag(name)}")
    if args.batch_size is None:
        raise usage_error("fnbp train: --batch-size full does not apply to --data shakespeare: the batch is the "
                          "number of rows of the text read side by side; give an integer")
    if args.optimizer == "nesterov":
        raise usage_error("fnbp train: --optimizer nesterov needs the gradient at the look-ahead point, which the "
                          "text models' step does not take: use simplified_nesterov (or adam, the default)")
    for name, default in TEXT_FLAGS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    return set(REFUSED)


def load(args):
    from . import text
    return text.load_shakespeare()


def check_batching(args, corpus, usage_error):
    """The training stream (at its largest random offset, --seq-len - 1) must hold at least one chunk of
    --batch-size x --seq-len, and the validation stream one of EVAL_ROWS x --seq-len."""
    from . import text
    B, T = args.batch_size, args.seq_len
    for part, ids, rows, offset in (("training", corpus.train, B, T - 1), ("validation", corpus.validation,
                                                                           EVAL_ROWS, 0)):
        if text.n_sequential_batches(len(ids), rows, T, offset) < 1:
            raise usage_error(f"fnbp train: --seq-len {T}{f' with --batch-size {B}' if part == 'training' else ''} "
                              f"does not fit the {len(ids)} {part} characters of {corpus.name}: {rows} rows of "
                              f"at least {T + 1} characters each (after an offset of up to {offset}) are needed")


def build(args, key, corpus, learning_rate):
    """(params, opt, the checkpoint's model record): ``fnbp.charlm.init`` and clip -> optimizer."""
    import optax
    from . import charlm, optim
    params = charlm.init(key, len(corpus.vocab), args.hidden, embed=args.embed, cell=args.model)
    base = getattr(optim, args.optimizer)(learning_rate)
    opt = optax.chain(optim.clip_by_global_norm(args.clip), base) if args.clip else base
    record = {"kind": "charlm", "cell": args.model, "vocab": corpus.vocab, "vocab_size": len(corpus.vocab),
              "hidden": args.hidden, "embed": args.embed, "data": corpus.name}
    return params, opt, record


class TextTrainResult(NamedTuple):
    """What ``train`` returns and hands to ``on_epoch`` (the fields ``fnbp.cli_train`` reads of
    ``fnbp.train.TrainResult``, plus ``stopped``: "time budget" when --time-budget ended the run)."""
    params: object
    opt_state: object
    state: object
    key: object
    epoch: int
    step: int
    history: list
    compile_seconds: float
    stopped: object = None


_SAMPLERS = {}


def generate(params, cell, vocab, prompt, length, temperature, key):
    """``prompt`` followed by ``length`` characters drawn from the model (``fnbp.charlm.sample``, jit-compiled
    once per length, temperature and cell)."""
    import jax
    from . import charlm, text
    ids = text.encode(prompt, vocab)
    fn = _SAMPLERS.get((length, temperature, cell))
    if fn is None:
        fn = _SAMPLERS[length, temperature, cell] = jax.jit(
            lambda p, k, i: charlm.sample(p, k, i, length, temperature=temperature, cell=cell))
    return prompt + text.decode(fn(params, key, ids), vocab)


def train(args, corpus, params, opt, opt_state, key, *, start_epoch, start_step, schedule, on_epoch, progress):
    """Epochs ``start_epoch .. --epochs - 1`` of stateful truncated BPTT; returns a :class:`TextTrainResult`.

    Epoch e reads ``sequential_batches(train, B, T, key=fold_in(key, e))`` from a zero state (at most
    --steps-per-epoch chunks); its sample is drawn with ``fold_in(fold_in(key, e), 1)``.  History entries: epoch,
    loss (mean training loss of the epoch's chunks, nats/char), valid_loss (nats/char), valid_bits (bits/char),
    steps, grad_norm (mean global norm before clipping), learning_rate (at the epoch's last step), seconds,
    chars_per_s, sample.  A NaN or inf loss or parameter raises ``fnbp.train``'s ``NonFiniteError`` before
    ``on_epoch``."""
    import jax
    import numpy as np
    from . import charlm, text, train as training
    cell, B, T = args.model, args.batch_size, args.seq_len
    t0 = time.perf_counter()
    state0 = charlm.zero_state(params, B, cell)
    chunk = np.zeros((B, T), np.int32)
    dropout = args.dropout or 0.0
    step_key = dropout_key(key, 0, 0) if dropout else None
    step_fn = charlm.make_train_step(opt, cell, dropout).lower(params, opt_state, state0, chunk, chunk,
                                                               step_key).compile()
    compile_seconds = time.perf_counter() - t0
    bar = training._progress_bar(progress, args.epochs - start_epoch)
    history, step, trained, stopped = [], start_step, 0.0, None
    result = TextTrainResult(params, opt_state, None, key, start_epoch, step, history, compile_seconds)
    for epoch in range(start_epoch, args.epochs):
        state = charlm.zero_state(params, B, cell)
        chunks = text.sequential_batches(corpus.train, B, T, key=jax.random.fold_in(key, epoch))
        losses, norms = [], []
        t = time.perf_counter()
        for i, (x, y) in enumerate(itertools.islice(chunks, args.steps_per_epoch or None)):
            step_key = dropout_key(key, epoch, i) if dropout else None
            params, opt_state, state, E, g = step_fn(params, opt_state, state, x, y, step_key)
            losses.append(E)
            norms.append(g)
            if args.time_budget:
                E.block_until_ready()
                if trained + time.perf_counter() - t >= args.time_budget:
                    stopped = "time budget"
                    break
        losses, norms = np.asarray(jax.device_get(losses)), np.asarray(jax.device_get(norms))
        seconds = time.perf_counter() - t
        trained += seconds
        finite = np.ones(len(losses), bool)
        finite[-1] = training._all_finite((params, opt_state))
        training._raise_if_not_finite(losses, finite, epoch, step, len(losses))
        step += len(losses)
        valid = charlm.evaluate(params, corpus.validation, EVAL_ROWS, T, cell)
        sample = (generate(params, cell, corpus.vocab, SAMPLE_PROMPT, args.sample_length, SAMPLE_TEMPERATURE,
                           jax.random.fold_in(jax.random.fold_in(key, epoch), 1)) if args.sample_length else "")
        history.append({"epoch": epoch + 1, "loss": float(losses.mean()), "valid_loss": valid,
                        "valid_bits": valid / math.log(2), "steps": len(losses), "grad_norm": float(norms.mean()),
                        "learning_rate": training._learning_rate(schedule, step - 1, opt_state), "seconds": seconds,
                        "chars_per_s": len(losses) * B * T / seconds, "sample": sample})
        result = TextTrainResult(params, opt_state, None, key, epoch + 1, step, history, compile_seconds, stopped)
        if bar is not None:
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", valid=f"{valid:.4f}")
            bar.update(1)
        if on_epoch is not None:
            on_epoch(result)
        if stopped:
            break
    if bar is not None:
        bar.close()
    return result


@functools.cache
def _dropout_key_program():
    import jax
    from . import keys
    return jax.jit(lambda run_key, epoch, i: keys.dropout(keys.step(keys.epoch(run_key, epoch), i), 0))


def dropout_key(run_key, epoch, i):
    """The dropout mask's key of step ``i`` of epoch ``epoch`` (``fnbp.keys``: the epoch's key, the step's, dropout
    layer 0), from one compiled program (a step's key costs one dispatch, not three)."""
    return _dropout_key_program()(run_key, epoch, i)


def epoch_lines(h):
    """The lines printed after an epoch: losses, speed, then the sample indented."""
    line = (f"epoch {h['epoch']:3d}  loss {h['loss']:.4f}  validation {h['valid_loss']:.4f} nats/char "
            f"({h['valid_bits']:.4f} bits/char)  {h['chars_per_s']:,.0f} chars/s")
    return line + "".join("\n    | " + s for s in h["sample"].split("\n")) if h["sample"] else line


def plot(history, path):
    """curves.png of a text run: training and validation loss in nats/char (left), validation bits/char (right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["loss"] for h in history], marker="o", label="training loss")
    ax1.plot(epochs, [h["valid_loss"] for h in history], marker="o", label="validation loss")
    ax1.set_xlabel("epoch"), ax1.set_ylabel("nats per character"), ax1.legend()
    ax2.plot(epochs, [h["valid_bits"] for h in history], marker="o", color="C1")
    ax2.set_xlabel("epoch"), ax2.set_ylabel("validation bits per character")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


# --- fnbp sample ---------------------------------------------------------------------
def add_sample_parser(sub):
    s = sub.add_parser("sample", help="sample text from a checkpoint of fnbp train --data shakespeare",
                       description="Print --prompt followed by --length characters drawn one at a time from a "
                                   "character-level model trained by fnbp train --data shakespeare (--model elman, "
                                   "lstm or gru), each from softmax(logits / --temperature); the same --seed gives "
                                   "the same text.")
    s.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="the checkpoint.npz of a text run, or its --out directory")
    s.add_argument("--prompt", default="\n", help="the text the sample continues (default: a newline)")
    s.add_argument("--length", type=_int_arg("--length", 1), default=500, help="characters to draw (default: 500)")
    s.add_argument("--temperature", type=_float_arg("--temperature", 0.0, lo_open=True), default=0.8,
                   help="divides the logits: < 1 sharper, > 1 flatter (default: 0.8)")
    s.add_argument("--seed", type=_int_arg("--seed", 0, SEED_LIMIT, "2**32"), default=0,
                   help="seed of the jax.random key of the draws (default: 0)")
    return s


def load_model(path, usage_error):
    """(params, model record) of a text run's checkpoint, or a usage error naming the file and what is wrong."""
    from . import checkpoint
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.npz"
    if not path.exists():
        raise usage_error(f"fnbp sample: no checkpoint at {path}")
    try:
        loaded = checkpoint.load(path)
    except (ValueError, OSError) as e:
        raise usage_error(f"fnbp sample: {path} is not a readable fnbp checkpoint: {e}") from None
    extra = loaded["extra"] if isinstance(loaded["extra"], dict) else {}
    model = extra.get("model") if isinstance(extra.get("model"), dict) else {}
    if model.get("kind") != "charlm":
        args = loaded["args"] or {}
        what = (f"a --data {args.get('data')} --model {args.get('model', 'mlp')} run" if args
                else "no fnbp train run")
        raise usage_error(f"fnbp sample: {path} holds {what}, not a character-level text model (write one with "
                          f"fnbp train --data shakespeare --model lstm)")
    params = loaded["params"]
    if (model.get("cell") not in TEXT_MODELS or not isinstance(model.get("vocab"), str) or not isinstance(params, dict)
            or "E" not in params or params["E"].shape[0] != len(model["vocab"])):
        raise usage_error(f"fnbp sample: {path}: the model record (cell, vocabulary) does not match the stored "
                          f"parameters (tampered or corrupt checkpoint)")
    return params, model


def cmd_sample(args, usage_error):
    import jax
    params, model = load_model(args.checkpoint, usage_error)
    missing = sorted(set(args.prompt) - set(model["vocab"]))
    if not args.prompt:
        raise usage_error("fnbp sample: --prompt must have at least one character")
    if missing:
        raise usage_error(f"fnbp sample: --prompt: the characters {''.join(missing)!r} are not in the model's "
                          f"vocabulary ({len(model['vocab'])} symbols: {model['vocab']!r})")
    print(generate(params, model["cell"], model["vocab"], args.prompt, args.length, args.temperature,
                   jax.random.PRNGKey(args.seed)))
    return 0
