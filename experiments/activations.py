"""Why is ReLU preferable to sign?  (notes 000)  Per-layer gradient norms and accuracy per activation.

The same network (64-32-32-10 on scikit-learn's digits, glorot init from one seed, the same shuffling)
is trained with each hidden activation -- sign, step, sigmoid, tanh, ReLU, leaky ReLU -- and the
Frobenius norm of the data-loss gradient of every weight matrix, ‖∇W_k E‖, is measured on the whole
training set at initialisation and after every epoch.

sign and step have g'(a) = 0 almost everywhere, so δ_k = ∇_{h_k}E ⊙ g'(a_k) = 0 in every hidden layer:
‖∇W_1‖ = ‖∇W_2‖ = 0 *exactly*, the hidden weights never move, and only the output layer learns (a
linear classifier on random ±1 / 0-1 features).  The script asserts this (zero gradients at init and
at every epoch, hidden weights bit-for-bit unchanged after training).

Training: Adam with η_k = 1e-2·exp(−1e-3·k), batch 64, no L2 penalty (so that a zero data gradient
means no update at all), softmax cross-entropy.

    python experiments/activations.py [--quick] [--seed 0] [--out DIR]
"""
import functools
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import common  # noqa: E402

NAME = "activations"
SIZES = (64, 32, 32, 10)
ZERO_GRAD = ("sign", "step")


def activation_table():
    import fnbp
    return {"sign": fnbp.sign, "step": fnbp.step, "sigmoid": fnbp.sigmoid, "tanh": fnbp.tanh,
            "relu": fnbp.relu, "leaky_relu": functools.partial(fnbp.leaky_relu, slope=0.01)}


def make_grad_norms(act, x, y):
    """A jitted function params -> (‖∇W_1‖, ..., ‖∇W_L‖, ‖∇b_1‖, ...) of the mean softmax cross-entropy."""
    import fnbp

    def loss(params):
        return fnbp.losses.softmax_cross_entropy(fnbp.mlp.apply(params, x, activation=act), y)

    @jax.jit
    def norms(params):
        g = jax.grad(loss)(params)
        return (jnp.stack([jnp.linalg.norm(layer["W"]) for layer in g]),
                jnp.stack([jnp.linalg.norm(layer["b"]) for layer in g]))

    return norms


def run(args):
    import fnbp
    from fnbp import data, mlp, optim
    from fnbp.train import Config, train

    epochs = 2 if args.quick else 40
    names = list(activation_table()) if not args.quick else ["sign", "relu"]
    ds = data.load_digits(seed=args.seed, standardize=True)
    k_init, k_train = jax.random.split(jax.random.PRNGKey(args.seed))
    params0 = mlp.init(k_init, SIZES, init="glorot")
    x_tr, y_tr = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    lr = optim.exponential_decay(1e-2, 1e-3)
    results = {}
    for name in names:
        act = activation_table()[name]
        norms_fn = make_grad_norms(act, x_tr, y_tr)
        gW0, gb0 = (np.asarray(v) for v in norms_fn(params0))
        # The explicit backprop loop must give the same gradient as jax.grad at initialisation.
        bp_norms = np.asarray(jax.jit(lambda p: jnp.stack([jnp.linalg.norm(layer["W"]) for layer in fnbp.backprop(
            p, x_tr, y_tr, activation=act, loss=fnbp.losses.softmax_cross_entropy)[1]]))(params0))
        assert np.allclose(bp_norms, gW0, rtol=1e-5, atol=0), (name, bp_norms, gW0)
        per_epoch_W, per_epoch_b = [gW0], [gb0]

        def on_epoch(result, norms_fn=norms_fn, per_epoch_W=per_epoch_W, per_epoch_b=per_epoch_b):
            gW, gb = norms_fn(result.params)
            per_epoch_W.append(np.asarray(gW))
            per_epoch_b.append(np.asarray(gb))

        with common.Timer() as t:
            res = train(common.fresh_copy(params0), optim.adam(lr), ds, key=k_train, epochs=epochs, batch_size=64,
                        cfg=Config(activation=act, l2=0.0), record_learning_rate=lr, progress=False, on_epoch=on_epoch)
        moved = [float(jnp.max(jnp.abs(a["W"] - b["W"]))) for a, b in zip(res.params, params0)]
        gW, gb = np.stack(per_epoch_W), np.stack(per_epoch_b)
        h = res.history[-1]
        results[name] = {
            "grad_norm_W": gW.tolist(), "grad_norm_b": gb.tolist(),      # rows: epoch 0 (init) .. epochs
            "max_abs_weight_change": moved,
            "test_accuracy": h["test_accuracy"], "train_accuracy": h["train_accuracy"],
            "final_loss": h["loss"], "test_accuracy_per_epoch": [r["test_accuracy"] for r in res.history],
            "seconds": t.seconds, "compile_seconds": res.compile_seconds,
        }
        common.log(f"{name:10s} ‖∇W‖ init {np.array2string(gW[0], precision=3)}  last "
                   f"{np.array2string(gW[-1], precision=3)}  max|ΔW| {np.round(moved, 4)}  "
                   f"test acc {h['test_accuracy']:.4f}  ({t.seconds:.1f} s)")
        hidden = slice(0, len(SIZES) - 2)
        if name in ZERO_GRAD:
            assert np.all(gW[:, hidden] == 0.0) and np.all(gb[:, hidden] == 0.0), \
                f"{name}: hidden layers received a non-zero gradient"
            assert np.all(gW[:, -1] > 0), f"{name}: the output layer should learn"
            assert all(m == 0.0 for m in moved[hidden]), f"{name}: hidden weights moved: {moved}"
            assert moved[-1] > 0
        else:
            assert np.all(gW[0] > 0), f"{name}: every layer should receive a gradient at initialisation"
    return {"epochs": epochs, "sizes": SIZES, "activations": names, "results": results}


def plot(out, data):
    plt = common.plt
    names, res = data["activations"], data["results"]
    n_layers = len(SIZES) - 1
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    axes = axes.ravel()
    colors = dict(zip(["sign", "step", "sigmoid", "tanh", "relu", "leaky_relu"], plt.cm.tab10.colors))
    styles = {"sign": (0, (4, 2)), "step": (0, (1, 1))}
    for k in range(n_layers):
        ax = axes[k]
        for name in names:
            g = np.asarray(res[name]["grad_norm_W"])[:, k]
            ax.plot(np.arange(len(g)), g, color=colors[name], ls=styles.get(name, "-"), lw=1.8, label=name)
        ax.set_yscale("symlog", linthresh=1e-5)
        ax.set_ylim(bottom=-3e-6)                     # so that the exact zeros of sign/step are visible
        ax.set_title(f"‖∇W{k + 1}‖ ({'hidden' if k < n_layers - 1 else 'output'} layer {k + 1}: "
                     f"{SIZES[k]}→{SIZES[k + 1]})", fontsize=10)
        ax.set_xlabel("epoch (0 = initialisation)")
        ax.grid(alpha=0.3)
        if k < n_layers - 1:
            ax.text(0.5, 0.02, "sign, step: exactly 0", transform=ax.transAxes, ha="center", va="bottom",
                    fontsize=9, color="0.3")
    for ax in axes[:n_layers]:
        ax.set_ylabel("‖∇W‖ on the training set (symlog)")
    ax = axes[-1]
    for name in names:
        acc = res[name]["test_accuracy_per_epoch"]
        ax.plot(np.arange(1, len(acc) + 1), acc, color=colors[name], ls=styles.get(name, "-"), lw=1.8, label=name)
    ax.set_title("test accuracy", fontsize=10)
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    fig.suptitle("Same 64-32-32-10 network on digits, different hidden activations", fontsize=11)
    fig.tight_layout()
    return common.save_figure(fig, out, f"{NAME}_grad_norms.png")


def main(argv=None):
    args = common.parse_args("Why is ReLU preferable to sign? Per-layer gradient norms and accuracy for sign, "
                             "step, sigmoid, tanh, ReLU and leaky ReLU on digits.", argv)
    with common.Timer() as timer:
        data = run(args)
    png = plot(args.out, data)
    res, names = data["results"], data["activations"]
    best = max(names, key=lambda n: res[n]["test_accuracy"])
    zero = [n for n in names if n in ZERO_GRAD]
    relu = res.get("relu")
    headline = ("sign/step: ‖∇W1‖ = ‖∇W2‖ = 0 exactly at init and at every epoch (hidden weights never move); "
                "test accuracy " + ", ".join(f"{n} {res[n]['test_accuracy']:.4f}" for n in zero)
                + (f" vs ReLU {relu['test_accuracy']:.4f}" if relu else "")
                + f"; best {best} {res[best]['test_accuracy']:.4f}")
    headers = ["activation", "‖∇W1‖ init", "‖∇W2‖ init", "‖∇W3‖ init", "‖∇W1‖ end", "‖∇W2‖ end", "‖∇W3‖ end",
               "max |ΔW1|, |ΔW2| (hidden)", "max |ΔW3| (output)", "final train loss", "train acc", "test acc"]
    rows = []
    for n in names:
        r = res[n]
        g = np.asarray(r["grad_norm_W"])
        mv = r["max_abs_weight_change"]
        rows.append([n, *(common.fmt(v, 3) for v in g[0]), *(common.fmt(v, 3) for v in g[-1]),
                     f"{common.fmt(mv[0], 3)}, {common.fmt(mv[1], 3)}", common.fmt(mv[2], 3),
                     common.fmt(r["final_loss"], 3), f"{r['train_accuracy']:.4f}", f"{r['test_accuracy']:.4f}"])
    md = f"""# Why is ReLU preferable to sign?

Question of notes 000.  The same 64-32-32-10 network (glorot init from seed {args.seed}, same shuffling) is
trained on scikit-learn's digits ({data['epochs']} epochs, Adam η_k = 1e-2·exp(−1e-3·k), batch 64, softmax
cross-entropy, **no L2 penalty**, so that a zero data gradient means no update at all) with each hidden
activation.  ‖∇W_k‖ is the Frobenius norm of the gradient of the mean training loss with respect to
W_k, on the whole training set, at initialisation ("init") and after the last epoch ("end").  At
initialisation `fnbp.backprop` and `jax.grad` through `fnbp.mlp.apply` give the same norms (asserted).

**{headline}.**

{common.md_table(headers, rows)}

Why: the backward rule of a hidden layer is δ_k = ∇_{{h_k}}E ⊙ g'(a_k).  sign and step are piecewise
constant, g'(a) = 0 wherever it exists, so δ_k = 0 and ∇W_k = δ_k h_{{k−1}}ᵀ = 0 in every hidden layer, at
every step: gradient descent cannot train the layers below a sign/step unit (asserted: zero norms at
init and at every epoch, hidden weights bit-for-bit unchanged).  Only the output layer learns, a linear
classifier on fixed random ±1 (sign) or 0/1 (step) features.  ReLU has g'(a) = 1 on the whole positive
half-line, so the gradient flows through the active units without shrinking; sigmoid and tanh pass a
gradient too but scale it by g'(a) ≤ 1/4 (sigmoid) or ≤ 1 (tanh) per layer.

![gradient norms]({png.name})
"""
    common.write_results(args.out, NAME, md, {"headline": headline, **data}, args=args, seconds=timer.seconds)
    print(headline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
