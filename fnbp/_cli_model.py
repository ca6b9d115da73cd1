"""``fnbp train --model mlp|lenet``: the model's flags, its data layout and its parameters and ``Config``."""
import math

from ._cli_args import _int_arg

MODELS = ("mlp", "lenet")
DEFAULT_LAYERS = [64, 32, 10]          # --layers of an MLP when not given

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
    shown = {True: "on", False: "off"}
    digits = DATA_DEFAULTS["lenet", "digits"].get(name)
    return (f" (default: mlp {shown.get(mlp, mlp)}, lenet {shown.get(lenet, lenet)}"
            + (f"; lenet on digits {digits})" if digits is not None else ")"))


def fill_defaults(args):
    """Give every model-dependent flag left unset (``UNSET``) the model's default, in place."""
    defaults = {**MODEL_DEFAULTS[args.model], **DATA_DEFAULTS.get((args.model, args.data), {})}
    for name, value in defaults.items():
        if getattr(args, name) is UNSET:
            setattr(args, name, value)
    return args


def add_arguments(t):
    """Register --model and --augment on the ``fnbp train`` parser ``t``."""
    t.add_argument("--model", choices=MODELS, default="mlp",
                   help="mlp: dense layers (--layers); lenet: convolutions and max-pooling on the images "
                        "(fnbp.cnn.lenet: 8x8x1 digits, 28x28x1 mnist)")
    t.add_argument("--augment", type=_int_arg("--augment", 0), default=UNSET,
                   help="lenet: largest random shift of each training image, in pixels (0 = none; default: "
                        f"{MODEL_DEFAULTS['lenet']['augment']} on mnist, {DATA_DEFAULTS['lenet', 'digits']['augment']} on digits)")


def prepare(args, ds, check_layers, usage_error):
    """Check the model's flags against the data; return the dataset in the model's layout.
    An MLP gets ``args.layers`` (default 64,32,10) checked; a LeNet gets images (N, H, W, 1)."""
    if args.model == "mlp":
        if args.augment:
            raise usage_error("fnbp train: --augment applies to --model lenet only (shifts of images)")
        args.layers = list(DEFAULT_LAYERS) if args.layers is None else args.layers
        check_layers(args.layers, ds)
        return ds
    if args.layers is not None:
        raise usage_error("fnbp train: --layers sets an MLP's widths; --model lenet has its own architecture "
                          "(fnbp.cnn.lenet), drop --layers")
    if args.dp_clip:
        raise usage_error("fnbp train: --dp-clip (DP-SGD) runs on --model mlp only")
    if args.data not in ("digits", "mnist"):
        raise usage_error(f"fnbp train: --model lenet needs images (--data digits or mnist), got --data {args.data}")
    side = math.isqrt(ds.x_train.shape[1])
    if side * side != ds.x_train.shape[1]:
        raise usage_error(f"fnbp train: --model lenet: {ds.x_train.shape[1]} features are not a square image")
    return ds._replace(x_train=ds.x_train.reshape(-1, side, side, 1), x_test=ds.x_test.reshape(-1, side, side, 1))


def build(args, key, ds, activation, training):
    """(params, cfg): initial parameters and the ``train.Config`` (or ``cnn.Config``) of the run."""
    common = dict(l2=args.l2, grad=args.grad, dropout=args.dropout)
    if args.model == "mlp":
        from . import mlp
        params = mlp.init(key, args.layers, init=args.init, batch_norm=args.batch_norm,
                          prelu_alpha=0.25 if args.activation == "prelu" else None)
        return params, training.Config(activation=activation, dp_clip=args.dp_clip, dp_noise=args.dp_noise, **common)
    from . import cnn
    arch = cnn.lenet(ds.x_train.shape[1:], n_classes=ds.n_classes, batch_norm=args.batch_norm)
    return cnn.init(key, arch), cnn.Config(arch=arch, augment=args.augment, **common)
