"""``fnbp train --model NAME``: one registry of models, their flags, data layout, parameters and recipe.

``--model`` takes a name of ``REGISTRY`` (mlp, lenet) or ``package.module:function`` for a user's own factory,
called as ``function(input_shape, n_classes)`` and returning an ``fnbp.nn`` model (images arrive as (H, W, 1)),
or one of ``TEXT_MODELS`` (elman, lstm, gru: ``fnbp.charlm``'s character models, ``--data shakespeare``; their
flags and loop are in ``fnbp._cli_text``).
"""
import importlib
import math
import re

from ._cli_args import _int_arg

DEFAULT_LAYERS = [64, 32, 10]          # --layers of an MLP when not given


def _lenet(input_shape, n_classes, args):
    from . import nn
    return nn.lenet(input_shape, n_classes=n_classes, batch_norm=args.batch_norm, dropout=args.dropout)


REGISTRY = {"mlp": None, "lenet": _lenet}
"""--model names -> factory(input_shape, n_classes, args) (mlp: fnbp.mlp's parameters and cfg's MLP)."""
MODELS = tuple(REGISTRY)
IMAGE_MODELS = ("lenet",)              # models that take images (N, H, W, 1); a user's factory does too
TEXT_MODELS = ("elman", "lstm", "gru")   # fnbp.charlm's cells (--data shakespeare)


def model_arg(text):
    """--model: a registry name or ``package.module:function``."""
    import argparse
    if text in REGISTRY or text in TEXT_MODELS or re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", text):
        return text
    raise argparse.ArgumentTypeError(f"--model: expected one of {', '.join(MODELS + TEXT_MODELS)} or "
                                     f"package.module:function "
                                     f"(your own factory), got {text!r}")


def is_user(name):
    return ":" in name


def user_factory(name, usage_error):
    """The function ``package.module:function`` names, or a named usage error."""
    module, fn = name.split(":", 1)
    try:
        factory = getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as e:
        raise usage_error(f"fnbp train: --model {name}: cannot import it ({type(e).__name__}: {e}); the module must "
                          f"be importable from the current directory or PYTHONPATH") from None
    if not callable(factory):
        raise usage_error(f"fnbp train: --model {name}: {fn} is not a function")
    return factory


def out_name(name):
    """The model's part of --out's default runs/<data>-<model>."""
    return re.sub(r"[^\w-]+", "-", name)

# Training flags whose default depends on the model: an MLP on standardised features with the
# notes' recipe, a LeNet on raw [0, 1] pixels (per-pixel standardisation would make the zeros that
# shifts bring in differ from the background) with Adam 1e-3, mini-batches of 64, +-2-pixel shifts
# and dropout 0.25 before the dense layers (the recipe of experiments/cnn.py); on 8x8 digits the
# shifts are 1 pixel.  An explicit flag always wins.
MODEL_DEFAULTS = {
    "mlp": dict(epochs=40, batch_size=16, lr=3e-3, lr_schedule="exponential", l2=1e-4, dropout=0.0,
                augment=0, standardize=True),
    "lenet": dict(epochs=10, batch_size=64, lr=1e-3, lr_schedule="constant", l2=0.0, dropout=0.25,
                  augment=2, standardize=False),
}
# The text models (elman, lstm, gru on --data shakespeare): embedding 64, H = 384 (fnbp._cli_text's --hidden), B = 64
# rows of T = 64 characters, global-norm clip 1, Adam 2e-3 with an exponential decay at --lr-decay's default 3e-4
# per step (12 epochs of 258 steps end at 0.40 eta_0), dropout 0.25 on the cell's outputs.  The plain-jnp
# baseline (H = 256, no dropout) overfits: its validation loss stops near 1.50 nats/char after ~20 epochs while the
# training loss falls to 1.24.  Wider and with dropout, the LSTM passes 1.50 at epoch 6 to 8 and ends at 1.4739,
# 1.4518, 1.4482 (seeds 0, 1, 2; H = 256 without dropout: 1.4987, 1.5011, 1.4913 after 20) in 382-418 s of training
# on 2 cores; it flattens there (seed 1, 16 epochs: 1.4557 after epoch 12, 1.4562 after 16).  augment, standardize
# and l2 do not apply to them (refused when given, fnbp._cli_text).
TEXT_DEFAULTS = dict(epochs=12, batch_size=64, lr=2e-3, lr_schedule="exponential", l2=0.0, dropout=0.25, augment=0,
                     standardize=False)
TEXT_SHOWN = ("epochs", "batch_size", "lr", "lr_schedule", "dropout")     # the text defaults the help shows
# ... except on scikit-learn's 8x8 digits (1,437 training images: 23 steps of 64 per epoch), where a
# LeNet gets more epochs and 1-pixel shifts
DATA_DEFAULTS = {("lenet", "digits"): dict(epochs=40, augment=1)}


class _Unset:
    """The argparse default of a model-dependent flag (``--batch-size full`` parses to None, so None
    cannot mean "not given")."""

    def __repr__(self):
        return "the model's default"


UNSET = _Unset()


def default_help(name):
    """' (default: mlp X, lenet Y)' for the help text of a model-dependent flag."""
    mlp, lenet = (MODEL_DEFAULTS[m][name] for m in MODELS)
    digits = DATA_DEFAULTS["lenet", "digits"].get(name)
    text = f"; elman/lstm/gru {_shown(TEXT_DEFAULTS[name])}" if name in TEXT_SHOWN else ""
    return (f" (default: mlp {_shown(mlp)}, lenet {_shown(lenet)}"
            + (f"; lenet on digits {digits}" if digits is not None else "") + text + ")")


def _shown(value):
    """A default as the help shows it: a switch on / off, a zero rate (dropout, l2) off, any other number as is
    (1 stays 1: a dict lookup would read it as True)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return "off" if value == 0 else value


def fill_defaults(args):
    """Give every model-dependent flag left unset (``UNSET``) the model's default, in place (a user's model
    gets the LeNet's recipe)."""
    kind = "lenet" if is_user(args.model) else args.model
    defaults = (dict(TEXT_DEFAULTS) if kind in TEXT_MODELS
                else {**MODEL_DEFAULTS[kind], **DATA_DEFAULTS.get((kind, args.data), {})})
    if is_user(args.model):
        defaults["dropout"] = 0.0                      # a user's model carries its own dropout layers
    for name, value in defaults.items():
        if getattr(args, name) is UNSET:
            setattr(args, name, value)
    return args


def add_arguments(t):
    """Register --model and --augment on the ``fnbp train`` parser ``t``."""
    t.add_argument("--model", type=model_arg, default=None,
                   help="mlp: dense layers (--layers); lenet: convolutions and max-pooling on the images "
                        "(fnbp.nn.lenet: 8x8x1 digits, 28x28x1 mnist); package.module:function: your own "
                        "fnbp.nn model, function(input_shape, n_classes) (images arrive as (H, W, 1)); elman, "
                        "lstm, gru: a character-level language model of --data shakespeare (fnbp.charlm) "
                        "(default: mlp; lstm on shakespeare)")
    t.add_argument("--augment", type=_int_arg("--augment", 0), default=UNSET,
                   help="lenet: largest random shift of each training image, in pixels (0 = none; default: "
                        f"{MODEL_DEFAULTS['lenet']['augment']} on mnist, {DATA_DEFAULTS['lenet', 'digits']['augment']} on digits)")


def _refuse(args, usage_error, flags):
    """Refuse, by name, flags set away from their defaults that the chosen model does not use."""
    defaults = {"batch_norm": False, "dropout": 0.0}
    for name in flags:
        if getattr(args, name) != defaults[name]:
            flag = "--" + name.replace("_", "-")
            raise usage_error(f"fnbp train: {flag} does not apply to --model {args.model} (it sets a built-in "
                              f"model's layers; your model carries its own); drop {flag}")


def prepare(args, ds, check_layers, usage_error):
    """Check the model's flags against the data; return the dataset in the model's layout.
    An MLP gets ``args.layers`` (default 64,32,10) checked; an image model gets images (N, H, W, 1)."""
    if args.model == "mlp":
        if args.augment:
            raise usage_error("fnbp train: --augment applies to image models (--model lenet or your own) only")
        args.layers = list(DEFAULT_LAYERS) if args.layers is None else args.layers
        check_layers(args.layers, ds)
        return ds
    if args.layers is not None:
        raise usage_error(f"fnbp train: --layers sets an MLP's widths; --model {args.model} has its own "
                          "architecture, drop --layers")
    if is_user(args.model):
        _refuse(args, usage_error, ("batch_norm", "dropout"))
    if args.data not in ("digits", "mnist"):
        raise usage_error(f"fnbp train: --model {args.model} needs images (--data digits or mnist), got --data "
                          f"{args.data}")
    side = math.isqrt(ds.x_train.shape[1])
    if side * side != ds.x_train.shape[1]:
        raise usage_error(f"fnbp train: --model {args.model}: {ds.x_train.shape[1]} features are not a square image")
    return ds._replace(x_train=ds.x_train.reshape(-1, side, side, 1), x_test=ds.x_test.reshape(-1, side, side, 1))


def build(args, key, ds, activation, training, usage_error=ValueError):
    """(params, cfg, model): initial parameters, the ``train.Config`` recipe and the model (None: cfg's MLP)."""
    recipe = dict(l2=args.l2, grad=args.grad, dp_clip=args.dp_clip, dp_noise=args.dp_noise)
    if args.model == "mlp":
        from . import mlp
        params = mlp.init(key, args.layers, init=args.init, batch_norm=args.batch_norm,
                          prelu_alpha=0.25 if args.activation == "prelu" else None)
        return params, training.Config(activation=activation, dropout=args.dropout, **recipe), None
    shape = tuple(ds.x_train.shape[1:])
    if is_user(args.model):
        model = user_factory(args.model, usage_error)(shape, ds.n_classes)
        if not (hasattr(model, "init") and hasattr(model, "graph")):
            raise usage_error(f"fnbp train: --model {args.model} returned {type(model).__name__}, not an fnbp.nn "
                              f"model (fnbp.nn.serial(...))")
    else:
        model = REGISTRY[args.model](shape, ds.n_classes, args)
    try:
        params, _ = model.init(key, shape)
    except (ValueError, TypeError) as e:
        raise usage_error(f"fnbp train: --model {args.model} on {args.data} images {shape}: {e}") from None
    return params, training.Config(augment=args.augment, **recipe), model


def describe(model, args, shape):
    """What a checkpoint records of the model: its description and input shape (``fnbp.checkpoint.load_model``)."""
    if model is None:
        return {"kind": "mlp", "layers": list(args.layers), "activation": args.activation, "slope": args.slope,
                "batch_norm": bool(args.batch_norm), "dropout": args.dropout}
    return {"kind": "nn", "name": args.model, "description": model.describe(), "input_shape": list(shape)}
