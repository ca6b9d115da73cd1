"""The notes' 784-512-512-10 ReLU network on real MNIST: every optimizer of ``fnbp.optim``, and the
effect of dropout and batch norm.

    python experiments/mnist_mlp.py                      # writes experiments/results/mnist_mlp.*
    python experiments/mnist_mlp.py --data-dir DIR       # DIR with the four IDX files: official 60k/10k
    python -m experiments.mnist_mlp --quick --out /tmp/x # tiny subset, 1 epoch, 2 optimizers (the test)

Data: ``fnbp.data.load_mnist``.  Where only the t10k files exist (``../shared/data/mnist`` from the
repository root, the default) the 10,000 test images are split 8000 train / 2000 test, stratified,
with ``--seed``; with all four files (``--data-dir`` or ``FNBP_MNIST_DIR``) the official 60k/10k split.
Pixels in [0, 1], Glorot-uniform initialisation (``fnbp.mlp.init``'s default), softmax cross-entropy.

Protocol (one jit-compiled program per optimizer and configuration, ``vmap``-ed over models):

1. Learning-rate search: for each optimizer, 3 candidate rates (a grid around its usual value)
   trained together -- the rate is a traced scalar, so one compiled program ``vmap``s over the
   3 models -- for a few epochs on 80 % of the training images, scored by accuracy on the held-out
   20 % (stratified; the test images are never looked at).  The best validation accuracy wins.
2. Comparison: each optimizer with its chosen rate (constant, no schedule), 3 seeds (initialisation
   and shuffling), the 3 seeds ``vmap``-ed in one program, on the full training split; test
   accuracy mean ± sample std (ddof = 1) over the seeds, training/test loss curves.
   Mini-batches of 128 for all but delta-bar-delta, which is meant for full-batch gradient descent
   (``fnbp.optim.delta_bar_delta``'s docstring): it runs full batch, so each epoch is ONE step;
   it gets the same number of epochs (passes over the data) as the others.
3. Regularisation: the best optimizer (highest mean test accuracy in 2) with its rate, plain (the
   run of 2), dropout 0.2 between hidden layers, batch norm before each hidden ReLU, and both.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import common  # noqa: E402
from fnbp import data as fdata  # noqa: E402
from fnbp import mlp, optim  # noqa: E402
from fnbp import train as ftrain  # noqa: E402

NAME = "mnist_mlp"
SIZES = (784, 512, 512, 10)
BATCH = 128
STD_DDOF = 1

# optimizer name -> (factory lr -> GradientTransformation, learning-rate grid, batch size)
OPTIMIZERS = {
    "sgd": (optim.sgd, (0.03, 0.1, 0.3), BATCH),
    "momentum": (functools.partial(optim.momentum, beta=0.9), (0.01, 0.03, 0.1), BATCH),
    "ema_momentum": (functools.partial(optim.ema_momentum, beta=0.9), (0.1, 0.3, 1.0), BATCH),
    "nesterov": (functools.partial(optim.nesterov, beta=0.9), (0.01, 0.03, 0.1), BATCH),
    "simplified_nesterov": (functools.partial(optim.simplified_nesterov, beta=0.9), (0.01, 0.03, 0.1), BATCH),
    "adagrad": (optim.adagrad, (0.003, 0.01, 0.03), BATCH),
    "rmsprop": (optim.rmsprop, (1e-4, 3e-4, 1e-3), BATCH),
    "adadelta": (optim.adadelta, (0.3, 1.0, 3.0), BATCH),
    "adam": (optim.adam, (3e-4, 1e-3, 3e-3), BATCH),
    "delta_bar_delta": (optim.delta_bar_delta, (0.1, 0.3, 1.0), None),     # full batch (its documented setting)
}
QUICK_OPTIMIZERS = ("sgd", "adam")
REGULARISATION = {                                  # variant -> (dropout, batch norm)
    "plain": (0.0, False),
    "dropout 0.2": (0.2, False),
    "batch norm": (0.0, True),
    "dropout 0.2 + batch norm": (0.2, True),
}
QUICK_REGULARISATION = ("plain", "dropout 0.2 + batch norm")     # both code paths, one compile


def add_arguments(parser):
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="directory with the MNIST IDX files (default: $FNBP_MNIST_DIR, else "
                             "../shared/data/mnist from the repository root)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of the comparison (default 15; quick 1)")
    parser.add_argument("--tune-epochs", type=int, default=None, help="epochs of the rate search (default 3; quick 1)")


mnist_dir = common.mnist_dir     # --data-dir, else FNBP_MNIST_DIR, else ../shared/data/mnist


def load(args):
    ds = fdata.load_mnist(mnist_dir(args.data_dir), seed=args.seed)
    official = ds.x_train.shape[0] + ds.x_test.shape[0] > 10_000
    split = ("official train/test files" if official else
             f"t10k images, stratified split (seed {args.seed}), 8000 train / 2000 test")
    if args.quick:                                  # a tiny stratified subset (the test of the script)
        tr, _ = fdata.stratified_split(ds.y_train, 1 - 512 / ds.x_train.shape[0], args.seed)
        te, _ = fdata.stratified_split(ds.y_test, 1 - 256 / ds.x_test.shape[0], args.seed)
        ds = ds._replace(x_train=ds.x_train[tr], y_train=ds.y_train[tr], x_test=ds.x_test[te], y_test=ds.y_test[te])
        split += "; quick: stratified subset 512 train / 256 test"
    return ds, split


# ----------------------------------------------------------------------------- one vmapped program
class Program:
    """Train M models at once (leading model axis on params, optimizer and batch-norm state, a traced
    learning rate and a shuffling key per model), one jit-compiled ``vmap``-ed epoch at a time."""

    def __init__(self, make_opt, cfg, batch_size, n_train):
        self.make_opt, self.cfg = make_opt, cfg
        self.batch, self.steps = ftrain.batch_plan(n_train, batch_size)

        def epoch(params, opt_state, state, lr, x, y, key):
            run = ftrain.make_epoch(cfg, make_opt(lr), batch_size=self.batch, n_examples=n_train)
            params, opt_state, state, losses = run(params, opt_state, state, x, y, key)
            return params, opt_state, state, jnp.mean(losses)

        self.epoch = jax.jit(jax.vmap(epoch, in_axes=(0, 0, 0, 0, None, None, 0)), donate_argnums=(0, 1, 2))
        self.evaluate = jax.jit(jax.vmap(functools.partial(ftrain.evaluate, cfg), in_axes=(0, 0, None, None)))
        self.init_opt = jax.jit(jax.vmap(lambda p, lr: make_opt(lr).init(p)))

    def run(self, params, lrs, keys, x, y, x_eval, y_eval, epochs, *, curves=True):
        """Train; returns a dict of per-model arrays (curves: epochs x models)."""
        lrs = jnp.asarray(lrs, jnp.float32)
        opt_state = self.init_opt(params, lrs)
        state = jax.vmap(mlp.init_state)(params)
        x, y, x_eval, y_eval = map(jnp.asarray, (x, y, x_eval, y_eval))
        with common.Timer() as t_compile:
            compiled = self.epoch.lower(params, opt_state, state, lrs, x, y, keys).compile()
        out = {"loss": [], "eval_loss": [], "eval_accuracy": []}
        with common.Timer() as t_run:
            for e in range(epochs):
                params, opt_state, state, loss = compiled(params, opt_state, state, lrs, x, y,
                                                          jax.vmap(jax.random.fold_in, (0, None))(keys, e))
                if curves or e == epochs - 1:
                    eval_loss, eval_acc = self.evaluate(params, state, x_eval, y_eval)
                    out["eval_loss"].append(np.asarray(eval_loss))
                    out["eval_accuracy"].append(np.asarray(eval_acc))
                out["loss"].append(np.asarray(loss))
            _, train_acc = self.evaluate(params, state, x, y)
            train_acc = np.asarray(train_acc)
        res = {k: np.stack(v) for k, v in out.items()}
        res.update(train_accuracy=train_acc, compile_seconds=t_compile.seconds, run_seconds=t_run.seconds,
                   seconds_per_epoch_per_model=t_run.seconds / (epochs * len(lrs)))
        return res


def init_params(seeds, batch_norm=False):
    keys = jnp.stack([jax.random.fold_in(jax.random.key(s), 0) for s in seeds])
    return jax.vmap(lambda k: mlp.init(k, SIZES, batch_norm=batch_norm))(keys)


def shuffle_keys(seeds):
    return jnp.stack([jax.random.fold_in(jax.random.key(s), 1) for s in seeds])


def mean_std(values):
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=STD_DDOF)) if v.size > 1 else 0.0


def pm(mean, std, scale=100, digits=2):
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def pm_of(r):
    """'mean ± std' of a result's test accuracy, in percent."""
    return pm(r["test_accuracy_mean"], r["test_accuracy_std"])


# ----------------------------------------------------------------------------- the experiment
def main(argv=None):
    args = common.parse_args("784-512-512-10 ReLU MLP on MNIST: every fnbp optimizer (tuned rate, 3 seeds), "
                             "with/without dropout and batch norm.", argv, add_arguments=add_arguments)
    quick = args.quick
    epochs = args.epochs or (1 if quick else 15)
    tune_epochs = args.tune_epochs or (1 if quick else 3)
    names = QUICK_OPTIMIZERS if quick else tuple(OPTIMIZERS)
    seeds = [args.seed + i for i in range(2 if quick else 3)]
    timer = common.Timer().__enter__()

    ds, split = load(args)
    n_train = ds.x_train.shape[0]
    common.log(f"[mnist_mlp] {split}: train {ds.x_train.shape}, test {ds.x_test.shape}; epochs {epochs}, "
               f"rate search {tune_epochs} epochs, seeds {seeds}, optimizers {', '.join(names)}")
    # validation split for the rate search, carved from the training images only
    fit, val = fdata.stratified_split(ds.y_train, 0.2, args.seed)
    x_fit, y_fit, x_val, y_val = ds.x_train[fit], ds.y_train[fit], ds.x_train[val], ds.y_train[val]
    plain = ftrain.Config()

    # 1. learning-rate search ------------------------------------------------------------------
    tuning = {}
    for name in names:
        make_opt, grid, batch = OPTIMIZERS[name]
        grid = grid[1:] if quick else grid
        prog = Program(make_opt, plain, batch, len(y_fit))
        r = prog.run(init_params([args.seed] * len(grid)), grid, shuffle_keys([args.seed] * len(grid)),
                     x_fit, y_fit, x_val, y_val, tune_epochs, curves=False)
        val_acc = [float(a) if np.isfinite(l) else float("nan") for a, l in zip(r["eval_accuracy"][-1], r["loss"][-1])]
        best = int(np.nanargmax(val_acc))
        tuning[name] = {"grid": list(grid), "val_accuracy": val_acc, "final_train_loss": r["loss"][-1].tolist(),
                        "chosen_lr": grid[best], "batch_size": batch,
                        "seconds": r["compile_seconds"] + r["run_seconds"]}
        common.log(f"[mnist_mlp] tune {name:20s} lr {list(grid)} -> val acc {np.round(val_acc, 4).tolist()} "
                   f"chose {grid[best]:g} ({tuning[name]['seconds']:.1f} s)")

    # 2. comparison, 3 seeds vmapped ----------------------------------------------------------
    results = {}
    for name in names:
        make_opt, _, batch = OPTIMIZERS[name]
        lr = tuning[name]["chosen_lr"]
        prog = Program(make_opt, plain, batch, n_train)
        r = prog.run(init_params(seeds), [lr] * len(seeds), shuffle_keys(seeds), ds.x_train, ds.y_train,
                     ds.x_test, ds.y_test, epochs)
        results[name] = summarise(r, lr, batch, prog.steps)
        common.log(f"[mnist_mlp] {name:20s} lr {lr:<8g} test acc {pm_of(results[name])} %"
                   f"  ({r['compile_seconds']:.1f} s compile, {r['run_seconds']:.1f} s run)")
    best = max(names, key=lambda n: results[n]["test_accuracy_mean"])

    # 3. regularisation for the best optimizer ------------------------------------------------
    make_opt, _, batch = OPTIMIZERS[best]
    lr = tuning[best]["chosen_lr"]
    regularisation = {}
    variants = QUICK_REGULARISATION if quick else tuple(REGULARISATION)
    for variant in variants:
        p_drop, bn = REGULARISATION[variant]
        if variant == "plain":
            regularisation[variant] = results[best]
            continue
        cfg = ftrain.Config(dropout=p_drop)
        prog = Program(make_opt, cfg, batch, n_train)
        r = prog.run(init_params(seeds, batch_norm=bn), [lr] * len(seeds), shuffle_keys(seeds), ds.x_train,
                     ds.y_train, ds.x_test, ds.y_test, epochs)
        regularisation[variant] = summarise(r, lr, batch, prog.steps)
        regularisation[variant].update(dropout=p_drop, batch_norm=bn)
        common.log(f"[mnist_mlp] {best} + {variant:25s} test acc "
                   f"{pm_of(regularisation[variant])} %")
    regularisation["plain"] = dict(results[best], dropout=0.0, batch_norm=False)

    # outputs ----------------------------------------------------------------------------------
    timer.__exit__(None, None, None)
    headline = {"optimizer": best, "learning_rate": tuning[best]["chosen_lr"],
                "test_accuracy_mean": results[best]["test_accuracy_mean"],
                "test_accuracy_std": results[best]["test_accuracy_std"],
                "split": split, "target": 0.965,
                "meets_target": bool(results[best]["test_accuracy_mean"] >= 0.965)}
    figures = plot(args.out, names, results, regularisation, best, epochs)
    md = markdown(args, split, names, seeds, epochs, tune_epochs, tuning, results, regularisation, best, headline,
                  n_train, int(ds.x_test.shape[0]))
    common.write_results(args.out, NAME, md, {
        "headline": headline, "split": split, "sizes": SIZES, "init": "glorot", "epochs": epochs,
        "tune_epochs": tune_epochs, "seeds": seeds, "std_ddof": STD_DDOF, "n_train": n_train,
        "n_test": int(ds.x_test.shape[0]), "tuning": tuning, "optimizers": results,
        "best_optimizer": best, "regularisation": regularisation, "figures": figures,
    }, args=args, seconds=timer.seconds)
    common.log(f"[mnist_mlp] best {best}: {pm(headline['test_accuracy_mean'], headline['test_accuracy_std'])} % "
               f"({timer.seconds:.0f} s)")
    return headline


def summarise(r, lr, batch, steps):
    acc = r["eval_accuracy"][-1]
    m, s = mean_std(acc)
    return {"learning_rate": lr, "batch_size": batch if batch is not None else "full", "steps_per_epoch": steps,
            "test_accuracy": acc.tolist(), "test_accuracy_mean": m, "test_accuracy_std": s,
            "test_loss": r["eval_loss"][-1].tolist(), "train_accuracy": r["train_accuracy"].tolist(),
            "curves": {"train_loss": r["loss"].T.tolist(), "test_loss": r["eval_loss"].T.tolist(),
                       "test_accuracy": r["eval_accuracy"].T.tolist()},
            "compile_seconds": r["compile_seconds"], "run_seconds": r["run_seconds"],
            "seconds_per_epoch_per_model": r["seconds_per_epoch_per_model"]}


def plot(out, names, results, regularisation, best, epochs):
    plt = common.plt
    ep = np.arange(1, epochs + 1)
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    for i, name in enumerate(names):
        r = results[name]
        label = f"{name} (lr {r['learning_rate']:g}{', full batch' if r['batch_size'] == 'full' else ''})"
        for ax, key in zip(axes, ("train_loss", "test_loss", "test_accuracy")):
            c = np.asarray(r["curves"][key], dtype=float)          # seeds x epochs
            ls = "--" if r["batch_size"] == "full" else "-"
            ax.plot(ep, c.mean(0), ls, color=colors(i % 10), label=label, marker="." if epochs < 4 else None)
            ax.fill_between(ep, c.min(0), c.max(0), color=colors(i % 10), alpha=0.15)
    axes[0].set(title="training loss (mean over the epoch's steps)", xlabel="epoch", ylabel="cross-entropy",
                yscale="log")
    axes[1].set(title="test loss", xlabel="epoch", ylabel="cross-entropy", yscale="log")
    axes[2].set(title="test accuracy", xlabel="epoch", ylabel="accuracy")
    lo = min(min(np.asarray(results[n]["curves"]["test_accuracy"]).mean(0).max() for n in names) - 0.03, 0.9)
    axes[2].set_ylim(max(lo, 0.0), 1.0)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8, loc="lower right")
    fig.suptitle("784-512-512-10 ReLU on MNIST: line = mean of the seeds, band = min–max")
    f1 = f"{NAME}_loss_curves.png"
    common.save_figure(fig, out, f1)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for i, (variant, r) in enumerate(regularisation.items()):
        for ax, key in zip(axes, ("test_loss", "test_accuracy")):
            c = np.asarray(r["curves"][key], dtype=float)
            ax.plot(ep, c.mean(0), color=colors(i), label=f"{variant}: {pm_of(r)} %",
                    marker="." if epochs < 4 else None)
            ax.fill_between(ep, c.min(0), c.max(0), color=colors(i), alpha=0.15)
    axes[0].set(title="test loss", xlabel="epoch", ylabel="cross-entropy", yscale="log")
    axes[1].set(title="test accuracy", xlabel="epoch", ylabel="accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=9, loc="lower right")
    fig.suptitle(f"{best} (lr {regularisation['plain']['learning_rate']:g}): dropout and batch norm")
    f2 = f"{NAME}_regularisation.png"
    common.save_figure(fig, out, f2)
    return [f1, f2]


def observations(names, tuning, results):
    """Generated remarks: rates chosen at the edge of their grid, optimizers with identical results."""
    notes = []
    top = [n for n in names if tuning[n]["chosen_lr"] == max(tuning[n]["grid"])]
    bottom = [n for n in names if tuning[n]["chosen_lr"] == min(tuning[n]["grid"])]
    if top:
        notes.append("Rate at the top of its grid (the short search may favour a rate too large for the full run): "
                     + ", ".join(top) + ".")
    if bottom:
        notes.append("Rate at the bottom of its grid: " + ", ".join(bottom) + ".")
    same = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
            if results[a]["test_accuracy"] == results[b]["test_accuracy"]]
    for a, b in same:
        extra = (" -- as expected: ema_momentum at rate η is momentum at rate η(1 − β), the same trajectory "
                 "up to rounding" if {a, b} == {"momentum", "ema_momentum"} else "")
        notes.append(f"{a} and {b} give identical per-seed test accuracies{extra}.")
    return " ".join(notes)


def markdown(args, split, names, seeds, epochs, tune_epochs, tuning, results, regularisation, best, headline,
             n_train, n_test):
    h = headline
    lines = [
        "# The 784-512-512-10 ReLU network on MNIST: optimizers, dropout, batch norm",
        "",
        f"**Best optimizer: {best} (lr {h['learning_rate']:g}), test accuracy "
        f"{pm(h['test_accuracy_mean'], h['test_accuracy_std'])} %** (mean ± sample std over {len(seeds)} seeds; "
        + (f"target ≥ 96.5 % on the 8000/2000 split: {'met' if h['meets_target'] else 'NOT met'})."
           if n_train == 8000 and not args.quick else "no target for this data)."),
        "",
        f"Data: {split}; pixels in [0, 1].  Network 784-512-512-10, ReLU hidden layers, softmax "
        f"cross-entropy, Glorot-uniform initialisation, float32.  {epochs} epochs, mini-batches of {BATCH} "
        f"(the remainder of each epoch's permutation is skipped), constant learning rate (no schedule).  "
        f"Seeds {seeds} (initialisation and shuffling); the seeds of one configuration train together "
        f"in one jit-compiled `vmap`-ed program.  ± is the sample standard deviation (ddof = 1) over the seeds.",
        "",
        "## Learning-rate search",
        "",
        f"A short search, not a thorough one: each optimizer's {len(tuning[names[0]]['grid'])} candidate rates "
        f"trained for {tune_epochs} "
        f"epoch(s) on a stratified 80 % of the {n_train} training images (seed {args.seed}), scored by accuracy "
        "on the other 20 % (validation); the test images are not used.  The rates are one `vmap`-ed program "
        "(the rate is a traced scalar).  A short search favours rates that learn fast.",
        "",
        common.md_table(["optimizer", "batch", "rates tried", "validation accuracy (%)", "chosen"],
                        [[n, tuning[n]["batch_size"] or "full", ", ".join(f"{g:g}" for g in tuning[n]["grid"]),
                          ", ".join("nan" if not np.isfinite(a) else f"{100 * a:.2f}"
                                    for a in tuning[n]["val_accuracy"]),
                          f"{tuning[n]['chosen_lr']:g}"] for n in names]),
        "",
        "## Optimizers",
        "",
        common.md_table(
            ["optimizer", "lr", "batch", "steps/epoch", "test accuracy (%)", "per seed (%)", "train accuracy (%)",
             "final training loss", "s/epoch/model"],
            [[("**" + n + "**") if n == best else n, f"{r['learning_rate']:g}",
              "full (8000; its documented setting)" if r["batch_size"] == "full" and n_train == 8000 else
              ("full (its documented setting)" if r["batch_size"] == "full" else r["batch_size"]),
              r["steps_per_epoch"], pm(r["test_accuracy_mean"], r["test_accuracy_std"]),
              ", ".join(f"{100 * a:.2f}" for a in r["test_accuracy"]),
              pm(*mean_std(r["train_accuracy"])),
              common.fmt(float(np.mean([c[-1] for c in r["curves"]["train_loss"]])), 3),
              f"{r['seconds_per_epoch_per_model']:.2f}"] for n, r in ((n, results[n]) for n in names)]),
        "",
        observations(names, tuning, results),
        "",
        "Momentum-type optimizers use β = 0.9; adagrad δ = 1e-7 (r₀ = 0, δ outside the root, the notes); "
        "rmsprop ρ = 0.9; adadelta ρ = 0.9, δ = 1e-6, with a rate η multiplying its step (η = 1 is the notes' "
        "rate-free AdaDelta); adam β₁ = 0.9, β₂ = 0.999; nesterov evaluates the gradient at the look-ahead "
        "point θ + βv (`fnbp.optim.lookahead_params`, done by `fnbp.train.make_step`).",
        "",
        (f"Delta-bar-delta runs **full batch** (one step per epoch, {epochs} steps in all) as its docstring "
        "prescribes (mini-batch noise flips the gradient signs and shrinks its per-parameter rates); with "
        f"the same number of passes over the data it takes {n_train // BATCH}x fewer steps than the mini-batch "
        "optimizers, so its row measures equal data passes (equal gradient computation), not equal steps "
        "(κ = 0.05, φ = 0.3, θ = 0.7, the defaults)." if "delta_bar_delta" in names else ""),
        "",
        f"![loss curves]({NAME}_loss_curves.png)",
        "",
        f"## Dropout and batch norm ({best}, lr {h['learning_rate']:g})",
        "",
        "Dropout: drop probability 0.2 after each hidden ReLU (inverted dropout, training only).  Batch norm: "
        "before each hidden ReLU, batch statistics in training, running averages (momentum 0.1) at test time.  "
        "Same rate as the plain run (tuned without them); 'plain' is the run of the table above.",
        "",
        common.md_table(["variant", "test accuracy (%)", "per seed (%)", "Δ vs plain (points)", "train accuracy (%)",
                         "final test loss"],
                        [[v, pm(r["test_accuracy_mean"], r["test_accuracy_std"]),
                          ", ".join(f"{100 * a:.2f}" for a in r["test_accuracy"]),
                          f"{100 * (r['test_accuracy_mean'] - regularisation['plain']['test_accuracy_mean']):+.2f}",
                          pm(*mean_std(r["train_accuracy"])), common.fmt(float(np.mean(r["test_loss"])), 3)]
                         for v, r in regularisation.items()]),
        "",
        f"![dropout and batch norm]({NAME}_regularisation.png)",
        "",
        f"Caveats: the best optimizer is picked by mean *test* accuracy over {len(seeds)} seeds (the headline is "
        "therefore "
        f"slightly optimistic); with {n_test} test images one image is {100 / n_test:.2g} points and the binomial "
        f"standard error of an accuracy near 96.5 % is about {100 * (0.965 * 0.035 / n_test) ** 0.5:.1f} points "
        "(the same test images for every run, so this is the uncertainty of each number as an estimate of "
        "accuracy on new digits, not of the differences between rows, which share it).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
