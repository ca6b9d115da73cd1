"""Alternative feedback: backprop vs feedback alignment vs sign with/without the straight-through estimator.

Questions (notes: why does ReLU beat sign?): (1) does a network learn when the error is sent down
through a FIXED random matrix B_k instead of W_k^T (feedback alignment, Lillicrap et al. 2016)?
Its updates are not the gradient: measure the angle between the feedback-alignment update and the
true gradient during training -- it should fall below 90 degrees ("alignment").  (2) A sign network
passes no gradient (g' = 0): only its output layer learns.  With the straight-through estimator
(``fnbp.feedback.sign_ste``: g' := [|a| <= 1]) every layer learns.

Setup, per dataset (digits: 64-128-128-10; MNIST, t10k split 8000 / 2000: 784-512-512-10), softmax
cross-entropy, SGD with momentum 0.9, the same initial weights and batches for every method.  Updates
from the explicit walker: ``fnbp.backprop`` (backprop, sign, sign+STE) and ``fnbp.feedback.backprop``
(feedback alignment).  Angles, for the feedback-alignment run, per hidden layer and over all hidden
layers together (the output layer's update is the true gradient's by construction): (a) at every step,
between the update taken and the true gradient of the same mini-batch; (b) after every epoch, on a
fixed set of training examples (all of digits' 1438, the first ``--angle-examples`` of MNIST).  Each
method's largest change of the hidden weights is recorded too (exactly 0 for sign without STE).

    python experiments/feedback.py                 # writes experiments/results/feedback.{md,json,png}
    python experiments/feedback.py --datasets digits --quick --out /tmp/x
"""
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import fnbp  # noqa: E402
from experiments import common  # noqa: E402
from fnbp import feedback as fb  # noqa: E402

CE = fnbp.losses.softmax_cross_entropy
METHODS = {   # name: (hidden activation, feedback alignment?)
    "backprop (relu)": (fnbp.relu, False),
    "feedback alignment (relu)": (fnbp.relu, True),
    "sign + STE": (fb.sign_ste, False),
    "sign, no STE": (fnbp.sign, False),
}
FA = "feedback alignment (relu)"
SETTINGS = {   # dataset -> hidden widths, batch, SGD rate (momentum 0.9), epochs, seeds, examples for the epoch angle
    "digits": {"hidden": (128, 128), "batch": 32, "lr": 0.05, "epochs": 30, "seeds": 2, "angle_examples": None},
    "mnist": {"hidden": (512, 512), "batch": 32, "lr": 0.02, "epochs": 8, "seeds": 1, "angle_examples": 2000},
}
QUICK = {"digits": {"hidden": (32, 32), "epochs": 2, "seeds": 1},
         "mnist": {"hidden": (64, 64), "epochs": 1, "seeds": 1, "n_train": 1024, "angle_examples": 256}}


def gradient_fn(activation, use_fa):
    if use_fa:
        return lambda p, B, x, y: fb.backprop(p, B, x, y, activation=activation, loss=CE)[1]
    return lambda p, B, x, y: fnbp.backprop(p, x, y, activation=activation, loss=CE)[1]


def angles(fa_update, true_grad):
    """Angles (degrees) per hidden layer, then over all hidden layers together."""
    n_hidden = len(true_grad) - 1
    return jnp.stack([fb.angle(fa_update[k], true_grad[k]) for k in range(n_hidden)]
                     + [fb.angle(fa_update[:-1], true_grad[:-1])])


def train(data, name, *, sizes, epochs, batch, lr, seed, angle_examples):
    activation, use_fa = METHODS[name]
    key = jax.random.key(seed)
    params = fnbp.mlp.init(jax.random.fold_in(key, 0), sizes)            # same start for every method
    feedback = fb.init_feedback(jax.random.fold_in(key, 1), params)
    opt = optax.sgd(lr, momentum=0.9)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    xt, yt = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    xa, ya = x[:angle_examples], y[:angle_examples]
    n_steps = x.shape[0] // batch
    grad = gradient_fn(activation, use_fa)

    @jax.jit
    def epoch(params, opt_state, e):
        order = jax.random.permutation(jax.random.fold_in(key, 100 + e), x.shape[0])[: n_steps * batch]

        def step(carry, idx):
            p, s = carry
            g = grad(p, feedback, x[idx], y[idx])
            if use_fa:      # the update taken vs the true gradient of the same mini-batch
                a = angles(g, fnbp.backprop(p, x[idx], y[idx], activation=activation, loss=CE)[1])
            else:
                a = jnp.zeros((len(sizes) - 1,))
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), a

        (params, opt_state), step_angles = jax.lax.scan(step, (params, opt_state), order.reshape(n_steps, batch))
        return params, opt_state, step_angles

    @jax.jit
    def measure(params):
        acc = jnp.mean(jnp.argmax(fnbp.mlp.apply(params, xt, activation=activation), -1) == yt)
        if not use_fa:
            return acc, jnp.full((len(params),), jnp.nan)
        _, true = fnbp.backprop(params, xa, ya, activation=activation, loss=CE)
        _, fa = fb.backprop(params, feedback, xa, ya, activation=activation, loss=CE)
        return acc, angles(fa, true)

    params0 = common.fresh_copy(params)
    opt_state = opt.init(params)
    acc0, angle0 = measure(params)
    history = [{"epoch": 0, "test_accuracy": float(acc0), "angles": [float(a) for a in angle0]}]
    step_angles = []
    t0 = time.perf_counter()
    for e in range(epochs):
        params, opt_state, a = epoch(params, opt_state, e)
        acc, angle = measure(params)
        if not np.isfinite(float(acc)) or not all(bool(jnp.all(jnp.isfinite(v)))
                                                  for v in jax.tree_util.tree_leaves(params)):
            raise FloatingPointError(f"feedback: {name} seed {seed}: non-finite parameters after epoch {e + 1}")
        history.append({"epoch": e + 1, "test_accuracy": float(acc), "angles": [float(v) for v in angle]})
        if use_fa:
            step_angles += np.asarray(a).tolist()
    change = [float(jnp.max(jnp.abs(p1["W"] - p0["W"]))) for p0, p1 in zip(params0, params)]
    return {"method": name, "seed": seed, "history": history, "seconds": time.perf_counter() - t0,
            "steps_per_epoch": n_steps, "step_angles": step_angles, "max_abs_weight_change": change}


def run_dataset(name, args):
    cfg = dict(SETTINGS[name])
    for k in ("epochs", "seeds"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    if name == "mnist" and args.mnist_hidden:
        cfg["hidden"] = tuple(int(v) for v in args.mnist_hidden.split(","))
    if args.quick:
        cfg.update(QUICK[name])
    data, split = common.load_dataset(name, seed=args.seed, data_dir=args.data_dir, n_train=cfg.get("n_train"))
    sizes = (data.x_train.shape[1], *cfg["hidden"], 10)
    n_angle = min(cfg["angle_examples"] or data.x_train.shape[0], data.x_train.shape[0])
    seeds = list(range(args.seed, args.seed + cfg["seeds"]))
    common.log(f"[feedback] {name}: {split}; MLP {'-'.join(map(str, sizes))}, batch {cfg['batch']}, lr {cfg['lr']}, "
               f"{cfg['epochs']} epochs, seeds {seeds}")
    runs = {}
    for m in METHODS:
        runs[m] = [train(data, m, sizes=sizes, epochs=cfg["epochs"], batch=cfg["batch"], lr=cfg["lr"], seed=s,
                         angle_examples=n_angle) for s in seeds]
        finals = [round(r["history"][-1]["test_accuracy"], 4) for r in runs[m]]
        common.log(f"[feedback] {name} {m}: final test acc {finals} ({runs[m][0]['seconds']:.1f} s)")
    summary = {}
    for m, rs in runs.items():
        finals = [r["history"][-1]["test_accuracy"] for r in rs]
        summary[m] = {"final_accuracy_mean": float(np.mean(finals)),
                      "final_accuracy_std": float(np.std(finals, ddof=1)) if len(finals) > 1 else 0.0,
                      "final_accuracies": finals,
                      "hidden_weights_moved": [bool(any(c > 0 for c in r["max_abs_weight_change"][:-1])) for r in rs]}
    return {"dataset": name, "split": split, "sizes": list(sizes), "n_train": int(data.x_train.shape[0]),
            "n_test": int(data.x_test.shape[0]), "angle_examples": n_angle, "seeds": seeds,
            **{k: cfg[k] for k in ("batch", "lr", "epochs")}, "summary": summary, "runs": runs}


def render(res):
    f = common.fmt
    ms = len(res["seeds"]) > 1
    n_hidden = len(res["sizes"]) - 2
    L = [f"## {res['dataset']}", "",
         f"{res['split']}. MLP {'-'.join(map(str, res['sizes']))}, softmax cross-entropy, SGD lr {res['lr']} "
         f"momentum 0.9, batch {res['batch']}, {res['epochs']} epochs, seeds {res['seeds']}; the same initial "
         "weights and batches for every method.", "",
         common.md_table(["method", "final test accuracy" + (" (mean ± std)" if ms else ""), "per seed",
                          "hidden weights moved", "s (seed 0)"],
                         [[m, f(s["final_accuracy_mean"]) + (f" ± {f(s['final_accuracy_std'])}" if ms else ""),
                           ", ".join(f(a) for a in s["final_accuracies"]),
                           ", ".join("yes" if v else "no (exactly 0)" for v in s["hidden_weights_moved"]),
                           f(res["runs"][m][0]["seconds"])] for m, s in res["summary"].items()]),
         "", f"### Angle between the feedback-alignment update and the true gradient (degrees, seed {res['seeds'][0]})",
         "", f"After each epoch, on {res['angle_examples']} training examples (full-batch update vs full-batch "
         "gradient); and the mean over the epoch's steps of the angle between the mini-batch update taken and that "
         "mini-batch's true gradient. The output layer's update equals the gradient's by construction. \"All hidden\" "
         "is the angle between the concatenated hidden-layer vectors: it also reflects how the update's norm is "
         "shared between the layers, so it can lie outside the per-layer angles.", ""]
    fa = res["runs"][FA][0]
    ep = res["epochs"]
    shown = sorted({0, 1, 2, max(ep // 4, 1), max(ep // 2, 1), ep})
    spe = fa["steps_per_epoch"]
    rows = []
    for h in fa["history"]:
        if h["epoch"] not in shown:
            continue
        e = h["epoch"]
        step_mean = (np.mean(np.asarray(fa["step_angles"][(e - 1) * spe: e * spe])[:, -1]) if e > 0 else None)
        rows.append([str(e)] + [f(a) for a in h["angles"]] + [f(step_mean)])
    L.append(common.md_table(["epoch"] + [f"hidden layer {k + 1}" for k in range(n_hidden)]
                             + ["all hidden", "all hidden, mini-batch steps of the epoch (mean)"], rows))
    final = fa["history"][-1]["angles"][-1]
    L += ["", f"Final angle over all hidden layers: {f(final)} degrees "
          f"({'below' if final < 90 else 'NOT below'} 90: "
          f"{'the forward weights came to align with the feedback' if final < 90 else 'no alignment'}).", ""]
    return L


def plot(results, out):
    fig, axes = common.plt.subplots(len(results), 2, figsize=(11, 4 * len(results)), squeeze=False)
    for (ax1, ax2), res in zip(axes, results):
        for m in METHODS:
            r = res["runs"][m][0]
            ax1.plot([h["epoch"] for h in r["history"]], [h["test_accuracy"] for h in r["history"]], label=m)
        ax1.set_xlabel("epoch")
        ax1.set_ylabel("test accuracy")
        ax1.set_title(f"{res['dataset']} {'-'.join(map(str, res['sizes']))} (seed {res['seeds'][0]})")
        ax1.legend(fontsize=8)
        fa = res["runs"][FA][0]
        n_hidden = len(res["sizes"]) - 2
        steps = np.asarray(fa["step_angles"])
        t = np.arange(1, steps.shape[0] + 1) / fa["steps_per_epoch"]
        ax2.plot(t, steps[:, -1], color="lightgray", lw=0.6, label="all hidden, each mini-batch step")
        for k in range(n_hidden + 1):
            ax2.plot([h["epoch"] for h in fa["history"]], [h["angles"][k] for h in fa["history"]], "o-", ms=3,
                     label=f"hidden layer {k + 1}" if k < n_hidden else f"all hidden ({res['angle_examples']} ex.)")
        ax2.axhline(90, color="gray", ls="--")
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("angle(FA update, gradient) [deg]")
        ax2.set_title(f"{res['dataset']}: feedback alignment vs the true gradient")
        ax2.legend(fontsize=8)
    fig.tight_layout()
    return common.save_figure(fig, out, "feedback_accuracy_and_angle.png")


def main(argv=None):
    def add(p):
        common.add_dataset_arguments(p)
        p.add_argument("--epochs", type=int, default=None, help="epochs for every dataset (default: digits 30, "
                       "MNIST 8; quick: 2 / 1)")
        p.add_argument("--seeds", type=int, default=None, help="number of seeds per method (default: digits 2, "
                       "MNIST 1)")
        p.add_argument("--mnist-hidden", default=None, help="MNIST hidden widths, e.g. 256,256 (default 512,512)")
    args = common.parse_args("backprop vs feedback alignment vs sign with/without STE, on digits and MNIST", argv,
                             add_arguments=add)
    names = common.datasets_from_args(args, "feedback")
    t_start = time.perf_counter()
    results = [run_dataset(name, args) for name in names]
    L = ["# Alternative feedback: backprop, feedback alignment, sign with and without STE", ""]
    for res in results:
        L += render(res)
    md = "\n".join(L)
    plot(results, args.out)
    common.write_results(args.out, "feedback", md, {"datasets": results}, args=args,
                         seconds=time.perf_counter() - t_start)
    print(md)
    return results


if __name__ == "__main__":
    main()
