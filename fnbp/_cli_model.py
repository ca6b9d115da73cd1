"""``fnbp train --model mlp|lenet``: the model's flags, its data layout and its parameters and ``Config``."""
import math

from ._cli_args import _int_arg

MODELS = ("mlp", "lenet")
DEFAULT_LAYERS = [64, 32, 10]          # --layers of an MLP when not given


def add_arguments(t):
    """Register --model and --augment on the ``fnbp train`` parser ``t``."""
    t.add_argument("--model", choices=MODELS, default="mlp",
                   help="mlp: dense layers (--layers); lenet: convolutions and max-pooling on the images "
                        "(fnbp.cnn.lenet: 8x8x1 digits, 28x28x1 mnist)")
    t.add_argument("--augment", type=_int_arg("--augment", 0), default=0,
                   help="lenet: largest random shift of each training image, in pixels (0 = none)")


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
