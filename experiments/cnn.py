"""A LeNet-style CNN built from fnbp's hand-written rules on MNIST (notes 000: train a CNN).

    python experiments/cnn.py                       # writes experiments/results/cnn.*
    python -m experiments.cnn --quick --out /tmp/x  # digits 8x8, tiny network, 1 epoch (the test)

Network (``fnbp.cnn.lenet((28, 28, 1))``): 28x28x1 -> conv 5x5x32 -> ReLU -> 2x2 max-pool ->
conv 5x5x64 -> ReLU -> pool -> dense 128 -> ReLU -> dense 10 (VALID convolutions, 1024 features),
He initialisation (fan-in C_in k k), softmax cross-entropy, Adam 1e-3, mini-batches of 64, trained
by ``fnbp.train.make_epoch`` (one jit-compiled ``lax.scan`` per epoch: the library's own loop).

Data: ``fnbp.data.load_mnist(flatten=False)``: with only the t10k files (the default
``../shared/data/mnist``) the 10,000 images split 8000 train / 2000 test, stratified, seed 0.

Runs: the main configuration (random shifts of up to 2 pixels + dropout 0.25 before the dense
layers) with 3 seeds (initialisation, shuffling, dropout and shifts); one seed each of the plain
network, batch norm, dropout only and shifts only; and the notes' 784-512-512-10 MLP (Adam 1e-3,
same batches) for comparison.  Pictures: the test-accuracy curves, the 32 learned first-layer
filters and the feature maps of one test digit.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dataclasses  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import common  # noqa: E402
from fnbp import cnn, mlp, optim  # noqa: E402
from fnbp import data as fdata  # noqa: E402
from fnbp import train as ftrain  # noqa: E402

NAME = "cnn"
BATCH = 64
LR = 1e-3
MAIN = dict(augment=2, dropout=0.25)
VARIANTS = {                       # name -> (Config options, LeNet options)
    "plain": ({}, {}),
    "batch norm": ({}, {"batch_norm": True}),
    "dropout 0.25": ({"dropout": 0.25}, {}),
    "shifts ±2": ({"augment": 2}, {}),
}


def add_arguments(p):
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3, help="seeds of the main configuration")
    p.add_argument("--data-dir", default=None, help="MNIST directory (default: fnbp.data.load_mnist's search)")


def lenet_run(arch, *, augment=0, dropout=0.0):
    """(recipe, model) of a LeNet run: shifts are the recipe's, dropout the model's (``fnbp.cnn.Network``)."""
    return ftrain.Config(augment=augment), cnn.Network(arch, dropout=dropout)


def run(cfg, params, data, *, epochs, key, state=None, model=None):
    """Train with fnbp's epoch loop; returns (params, state, history)."""
    opt = optim.adam(LR)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    xt, yt = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    state = (cnn.init_state(params) if isinstance(params, dict) else mlp.init_state(params)) if state is None else state
    opt_state = opt.init(params)
    epoch = jax.jit(ftrain.make_epoch(cfg, opt, model=model, batch_size=BATCH, n_examples=x.shape[0]),
                    donate_argnums=(0, 1, 2))
    evaluate = jax.jit(lambda p, s, a, b: ftrain.evaluate(cfg, p, s, a, b, model=model))
    history, t0 = [], time.perf_counter()
    for e in range(epochs):
        t = time.perf_counter()
        params, opt_state, state, losses = epoch(params, opt_state, state, x, y, jax.random.fold_in(key, e))
        loss = float(np.mean(np.asarray(losses)))
        seconds = time.perf_counter() - t
        test_loss, test_acc = evaluate(params, state, xt, yt)
        history.append({"epoch": e + 1, "loss": loss, "test_loss": float(test_loss),
                        "test_accuracy": float(test_acc), "seconds": seconds})
        common.log(f"  epoch {e + 1}: loss {loss:.4f}, test accuracy {float(test_acc):.4f} ({seconds:.1f} s)")
    return params, state, history, time.perf_counter() - t0


def images(data):
    """NHWC images from a Dataset whose x are (n, H, W) or (n, H*W)."""
    def nhwc(x):
        x = np.asarray(x, np.float32)
        if x.ndim == 2:
            side = int(round(np.sqrt(x.shape[1])))
            x = x.reshape(-1, side, side)
        return x[..., None]
    return data._replace(x_train=nhwc(data.x_train), x_test=nhwc(data.x_test))


def load(quick, seed, data_dir=None):
    if quick:
        return images(fdata.load_digits(seed=seed))            # pixels already in [0, 1]
    return images(fdata.load_mnist(data_dir, flatten=False))


def main(argv=None):
    args = common.parse_args(__doc__.splitlines()[0], argv, add_arguments=add_arguments)
    t_start = time.perf_counter()
    data = load(args.quick, 0, args.data_dir)
    epochs, n_seeds = (1, 1) if args.quick else (args.epochs, args.seeds)
    shape = data.x_train.shape[1:]
    arch_options = dict(channels=(4, 8), hidden=(16,)) if args.quick else {}
    variants = dict(list(VARIANTS.items())[:1]) if args.quick else VARIANTS
    common.log(f"data: {data.x_train.shape[0]} train / {data.x_test.shape[0]} test images of shape {shape}")

    results, curves = {}, {}
    main_arch = cnn.lenet(shape, **arch_options)
    main_cfg, main_model = lenet_run(main_arch, **MAIN)
    finals, seconds = [], []
    for s in range(n_seeds):
        seed = args.seed + s
        common.log(f"main ({MAIN}), seed {seed}")
        params, state, hist, secs = run(main_cfg, cnn.init(jax.random.key(seed), main_arch), data, epochs=epochs,
                                        key=jax.random.key(1000 + seed), model=main_model)
        finals.append(hist[-1]["test_accuracy"])
        seconds.append(secs)
        curves[f"main, seed {seed}"] = hist
        if s == 0:
            main_params = params
        results["main: shifts ±2 + dropout 0.25"] = {
            "seeds": len(finals), "accuracies": finals, "mean": float(np.mean(finals)),
            "std": float(np.std(finals, ddof=1)) if len(finals) > 1 else None,
            "seconds_per_run": float(np.mean(seconds))}
        report(args, data, epochs, main_arch, main_params, results, curves, t_start)
    for name, (cfg_opts, arch_opts) in variants.items():
        common.log(f"{name}, seed {args.seed}")
        arch = cnn.lenet(shape, **arch_options, **arch_opts)
        cfg, model = lenet_run(arch, **cfg_opts)
        _, _, hist, secs = run(cfg, cnn.init(jax.random.key(args.seed), arch), data,
                               epochs=epochs, key=jax.random.key(1000 + args.seed), model=model)
        curves[name] = hist
        results[name] = {"seeds": 1, "accuracies": [hist[-1]["test_accuracy"]], "mean": hist[-1]["test_accuracy"],
                         "std": None, "seconds_per_run": secs}
        report(args, data, epochs, main_arch, main_params, results, curves, t_start)
    common.log(f"MLP, seed {args.seed}")
    n_in = int(np.prod(shape))
    flat = data._replace(x_train=data.x_train.reshape(-1, n_in), x_test=data.x_test.reshape(-1, n_in))
    sizes = (n_in, 16, 10) if args.quick else (n_in, 512, 512, 10)
    _, _, hist, secs = run(ftrain.Config(), mlp.init(jax.random.key(args.seed), sizes), flat, epochs=epochs,
                           key=jax.random.key(1000 + args.seed))
    curves["MLP " + "-".join(map(str, sizes))] = hist
    results["MLP " + "-".join(map(str, sizes))] = {"seeds": 1, "accuracies": [hist[-1]["test_accuracy"]],
                                                   "mean": hist[-1]["test_accuracy"], "std": None,
                                                   "seconds_per_run": secs}
    report(args, data, epochs, main_arch, main_params, results, curves, t_start)
    return results


def report(args, data, epochs, main_arch, main_params, results, curves, t_start):
    """Write the table, the curves and the pictures (after every run, so a long run leaves results)."""
    cols = 8
    plt = common.plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, hist in curves.items():
        ax.plot([h["epoch"] for h in hist], [100 * h["test_accuracy"] for h in hist], marker=".", label=name)
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="LeNet (fnbp rules) vs MLP")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    common.save_figure(fig, args.out, f"{NAME}_curves.png")

    W1 = np.asarray(main_params["conv"][0]["W"])[:, 0]          # (32, k, k)
    fig, axes = plt.subplots(-(-W1.shape[0] // cols), cols, figsize=(cols, 1.1 * -(-W1.shape[0] // cols)))
    for k, ax in enumerate(np.ravel(axes)):
        ax.axis("off")
        if k < W1.shape[0]:
            ax.imshow(W1[k], cmap="RdBu_r", vmin=-np.abs(W1).max(), vmax=np.abs(W1).max())
    fig.suptitle("learned first-layer filters (red +, blue -)")
    common.save_figure(fig, args.out, f"{NAME}_filters.png")

    digit = jnp.asarray(data.x_test[:1])
    layer = main_params["conv"][0]
    maps = np.asarray(jax.nn.relu(cnn.conv2d(layer["W"], layer["b"], digit, padding=main_arch.padding)))[0]
    fig, axes = plt.subplots(-(-maps.shape[-1] // cols), cols + 1, figsize=(cols + 1, 1.1 * -(-maps.shape[-1] // cols)))
    axes = np.atleast_2d(axes)
    for r in range(axes.shape[0]):
        for c in range(axes.shape[1]):
            ax = axes[r, c]
            ax.axis("off")
            k = r * cols + (c - 1)
            if c == 0 and r == 0:
                ax.imshow(np.asarray(digit)[0, ..., 0], cmap="gray_r")
                ax.set_title(f"digit {int(data.y_test[0])}", fontsize=7)
            elif c > 0 and k < maps.shape[-1]:
                ax.imshow(maps[..., k], cmap="viridis")
    fig.suptitle("one test digit and its 32 first-layer feature maps (after ReLU)")
    common.save_figure(fig, args.out, f"{NAME}_feature_maps.png")

    # --- tables --------------------------------------------------------------------------------
    rows = [[name, r["seeds"], " / ".join(f"{100 * a:.2f}" for a in r["accuracies"]),
             f"{100 * r['mean']:.2f}" + (f" ± {100 * r['std']:.2f}" if r["std"] is not None else ""),
             f"{r['seconds_per_run']:.0f}"] for name, r in results.items()]
    md = [f"# {NAME}: LeNet from fnbp's rules on MNIST",
          "", f"{data.x_train.shape[0]} train / {data.x_test.shape[0]} test images; {epochs} epochs, Adam {LR}, "
          f"batch {BATCH}; network {main_arch}.",
          "", common.md_table(["configuration", "seeds", "test accuracy per seed (%)", "mean ± std (%)",
                               "seconds per run"], rows),
          "", "Times are wall-clock on a 2-core CPU shared with other jobs (compile included, evaluation "
          "after every epoch included).",
          "", f"![curves]({NAME}_curves.png)", "", f"![filters]({NAME}_filters.png)", "",
          f"![feature maps]({NAME}_feature_maps.png)"]
    common.write_results(args.out, NAME, "\n".join(md), {"results": results, "curves": curves,
                                                         "arch": dataclasses.asdict(main_arch), "epochs": epochs},
                         args=args, seconds=time.perf_counter() - t_start)


if __name__ == "__main__":
    main()
