"""Full batch vs SGD (batch 1) vs mini-batches on digits: loss per epoch, loss per second, throughput.

The notes (001, 000): batch gradient descent takes one step per epoch on the whole training set, SGD one
step per example, mini-batch one step per n examples.  Here the baseline network (64-32-10 ReLU, glorot,
L2 λ = 1e-3, digits standardised) is trained with plain SGD, Δθ = −η∇J, for the same number of epochs
in every mode, from the same initial parameters with the same shuffling key.

Learning rate rule (the same for every mode): η is tuned per mode on the grid ``LR_GRID`` -- every grid
value is trained for the full epoch budget at once (``jax.vmap`` over η of the ``fnbp.train.make_epoch``
scan) and the η with the lowest mean log10 *training* loss over the epochs (area under the log-loss
curve: fast and steady) is kept; the test set plays no part in the choice.
The reported run is then ``fnbp.train.train`` with that η, which also measures the wall time per epoch
(compile time excluded).

    python experiments/batch_size.py [--quick] [--seed 0] [--out DIR]
"""
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import common  # noqa: E402

NAME = "batch_size"
SIZES = (64, 32, 10)
LR_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
L2 = 1e-3


def modes(n_train, quick):
    """(label, batch size) pairs; None = full batch."""
    if quick:
        return [("full batch", None), ("SGD (batch 1)", 1)]
    return [("full batch", None), ("mini-batch 128", 128), ("mini-batch 32", 32), ("mini-batch 8", 8),
            ("SGD (batch 1)", 1)]


def tune_lr(cfg, params0, ds, key, batch_size, epochs, lrs):
    """For every η in ``lrs`` (one jit, vmapped over η): the training-set data loss after each epoch.

    Returns (score, final loss) per η; score = mean over the epochs of log10(loss), the area under the
    log-loss curve (rewards fast *and* steady progress; inf for a run that produced a NaN/inf).
    """
    from fnbp import mlp, optim
    from fnbp.train import evaluate, make_epoch

    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    n = x.shape[0]
    B = n if batch_size is None else batch_size

    def run(lr):
        opt = optim.sgd(lr)
        epoch = make_epoch(cfg, opt, batch_size=B, n_examples=n)

        def body(carry, e):
            p, s, st = carry
            p, s, st, _ = epoch(p, s, st, x, y, jax.random.fold_in(key, e))   # the same keys as fnbp.train
            return (p, s, st), evaluate(cfg, p, st, x, y)[0]

        _, losses = jax.lax.scan(body, (params0, opt.init(params0), mlp.init_state(params0)), jnp.arange(epochs))
        return losses

    losses = np.asarray(jax.jit(jax.vmap(run))(jnp.asarray(lrs, jnp.float32)))
    ok = np.all(np.isfinite(losses), axis=1)
    score = np.where(ok, np.mean(np.log10(np.where(ok[:, None], losses, 1.0)), axis=1), np.inf)
    return score, np.where(np.isfinite(losses[:, -1]), losses[:, -1], np.inf)


def run(args):
    from fnbp import data, mlp, optim
    from fnbp.train import Config, evaluate, train

    epochs = 2 if args.quick else 30
    lrs = (0.03, 0.3) if args.quick else LR_GRID
    ds = data.load_digits(seed=args.seed, standardize=True)
    k_init, k_train = jax.random.split(jax.random.PRNGKey(args.seed))
    params0 = mlp.init(k_init, SIZES, init="glorot")
    cfg = Config(l2=L2)
    x_tr, y_tr = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    train_loss_fn = jax.jit(lambda p, st: evaluate(cfg, p, st, x_tr, y_tr)[0])
    out = {}
    for label, B in modes(len(ds.y_train), args.quick):
        with common.Timer() as t_tune:
            score, tuned = tune_lr(cfg, params0, ds, k_train, B, epochs, lrs)
        i = int(np.argmin(score))
        lr = float(lrs[i])
        init_loss = float(train_loss_fn(params0, mlp.init_state(params0)))
        curve = [init_loss]

        def on_epoch(result, curve=curve):
            curve.append(float(train_loss_fn(result.params, result.state)))

        res = train(common.fresh_copy(params0), optim.sgd(lr), ds, key=k_train, epochs=epochs, batch_size=B,
                    cfg=cfg, record_learning_rate=lr, progress=False, on_epoch=on_epoch)
        hist = res.history
        seconds = float(sum(h["seconds"] for h in hist))
        n_steps = res.step
        out[label] = {
            "batch_size": len(ds.y_train) if B is None else B, "lr": lr,
            "tuning_score": dict(zip(map(str, lrs), score.tolist())),
            "tuning_final_train_loss": dict(zip(map(str, lrs), tuned.tolist())),
            "train_loss_per_epoch": curve,                 # data loss on the whole training set, epoch 0 = init
            "seconds_per_epoch": [h["seconds"] for h in hist],
            "test_accuracy_per_epoch": [h["test_accuracy"] for h in hist],
            "final_train_loss": curve[-1], "test_accuracy": hist[-1]["test_accuracy"],
            "train_accuracy": hist[-1]["train_accuracy"], "seconds": seconds, "steps": n_steps,
            "examples_per_s": n_steps * (len(ds.y_train) if B is None else B) / seconds,
            "steps_per_s": n_steps / seconds, "compile_seconds": res.compile_seconds,
            "tuning_seconds": t_tune.seconds,
        }
        r = out[label]
        common.log(f"{label:16s} B={r['batch_size']:<5d} η={lr:<5g} train loss {r['final_train_loss']:.4f}  "
                   f"test acc {r['test_accuracy']:.4f}  {seconds:.2f} s  {r['examples_per_s']:,.0f} ex/s  "
                   f"(tuning {t_tune.seconds:.1f} s)")
        assert np.isfinite(r["final_train_loss"])
    return {"epochs": epochs, "lr_grid": list(lrs), "n_train": len(ds.y_train), "runs": out}


def plot(out, data):
    plt = common.plt
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(data["runs"])))
    paths = []
    for kind in ("epochs", "time"):
        fig, ax = plt.subplots(figsize=(7.5, 4.6))
        for c, (label, r) in zip(colors, data["runs"].items()):
            loss = np.asarray(r["train_loss_per_epoch"])
            if kind == "epochs":
                xs = np.arange(len(loss))
            else:
                xs = np.concatenate([[0.0], np.cumsum(r["seconds_per_epoch"])])
            ax.plot(xs, loss, "-o", ms=2.5, color=c, lw=1.6,
                    label=f"{label} (η={r['lr']:g}; test acc {r['test_accuracy']:.3f})")
        ax.set_yscale("log")
        if kind == "time":
            ax.set_xlabel("training wall time, s (compile excluded)")
            ax.set_xlim(left=0)
        else:
            ax.set_xlabel("epoch")
        ax.set_ylabel("training loss on the whole training set")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"SGD on digits (64-32-10 ReLU), loss vs {'epochs' if kind == 'epochs' else 'wall time'}; "
                     f"η tuned per mode", fontsize=10)
        paths.append(common.save_figure(fig, out, f"{NAME}_loss_vs_{kind}.png"))
    return paths


def main(argv=None):
    args = common.parse_args("Full batch vs SGD vs mini-batch on digits: loss vs epochs and vs wall time, "
                             "throughput.", argv)
    with common.Timer() as timer:
        data = run(args)
    png_epochs, png_time = plot(args.out, data)
    runs = data["runs"]
    full, sgd1 = runs.get("full batch"), runs.get("SGD (batch 1)")
    headline = (f"after {data['epochs']} epochs: " + ", ".join(f"{k} {r['test_accuracy']:.4f}" for k, r in runs.items())
                + f" test accuracy; throughput {full['examples_per_s']:,.0f} examples/s (full batch) vs "
                f"{sgd1['examples_per_s']:,.0f} (batch 1)")
    rows = [[k, r["batch_size"], r["steps"] // data["epochs"], f"{r['lr']:g}",
             ", ".join(f"{float(lr):g}: {common.fmt(float(v), 3)}" for lr, v in r["tuning_score"].items()),
             f"{r['final_train_loss']:.4f}", f"{r['train_accuracy']:.4f}", f"{r['test_accuracy']:.4f}",
             f"{r['seconds']:.2f}", f"{1e3 * float(np.median(r['seconds_per_epoch'])):.2f}",
             f"{r['examples_per_s']:,.0f}", f"{r['steps_per_s']:,.0f}"]
            for k, r in runs.items()]
    md = f"""# Batch size: full batch vs SGD vs mini-batch

**{headline}.**

Plain SGD (Δθ = −η∇J, the notes' rule for all three modes) on the baseline network (64-32-10 ReLU,
glorot, L2 λ = {L2:g}, softmax cross-entropy, digits standardised, {data['n_train']} training examples),
{data['epochs']} epochs in every mode, same initial parameters and shuffling.  Each epoch cuts a fresh
permutation into n // B batches (the n mod B examples left over are skipped that epoch).  **Learning-rate
rule**: η is tuned per mode on the grid {data['lr_grid']} -- all grid values trained for the full budget
(`jax.vmap` over η) and the one with the lowest mean log10 training loss over the epochs kept (area under
the log-loss curve: fast and steady progress; the "tuning" column shows that score per grid value, inf =
diverged; the test set plays no part).  "train loss" is the data loss (cross-entropy, no L2 term) on the
whole training set, evaluated after each epoch.  "seconds" is the training wall time of
the {data['epochs']} epochs measured by `fnbp.train.train` (compile excluded; the first epoch of a run also
pays a one-off warm-up of the compiled program, visible at the start of the wall-time plot), on this
machine ({common.environment()['backend']}, {os.cpu_count()} cores, shared with other jobs); the examples/s
are per optimizer step × batch size.

{common.md_table(["mode", "B", "steps/epoch", "η", "tuning: mean log10 train loss per η", "final train loss",
                  "train acc", "test acc", "seconds", "median ms/epoch", "examples/s", "steps/s"], rows)}

Per epoch, small batches make the most progress (many steps per pass); per step, large batches use the
hardware far better (one matrix product for the whole batch instead of thousands of tiny ones: compare
the steps/s and examples/s columns).  On this tiny problem an epoch of a large batch is so short that the
fixed cost of one `fnbp.train` epoch (a jitted call, a device sync, the loss check) is a large part of
it, so the full-batch examples/s understates what the hardware does; the timings are also sensitive to
other load on the machine.  Mini-batches sit in between on both axes.

![loss vs epochs]({png_epochs.name})

![loss vs wall time]({png_time.name})
"""
    common.write_results(args.out, NAME, md, {"headline": headline, **data}, args=args, seconds=timer.seconds)
    print(headline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
