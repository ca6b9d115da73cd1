"""Alternative feedback: backprop vs feedback alignment vs sign with/without the straight-through estimator.

Questions (notes: why does ReLU beat sign?): (1) does a network learn when the error is sent down
through a FIXED random matrix B_k instead of W_k^T (feedback alignment, Lillicrap et al. 2016)?
Its updates are not the gradient: measure the angle between the feedback-alignment update and the
true gradient during training -- it should fall below 90 degrees ("alignment").  (2) A sign network
passes no gradient (g' = 0): only its output layer learns.  With the straight-through estimator
(``fnbp.feedback.sign_ste``: g' := [|a| <= 1]) every layer learns.

Setup: digits (default; ``--dataset mnist`` for the local MNIST files), MLP, softmax cross-entropy,
SGD with momentum 0.9, same initial weights and batches for every method.  Gradients from the explicit
loop: ``fnbp.backprop`` (backprop, sign, sign+STE) and ``fnbp.feedback.backprop`` (feedback alignment).
The angle is measured on the whole training set after every epoch, per hidden layer and over all
hidden layers together (the output layer's update is the true gradient's by construction).

    python experiments/feedback.py                 # writes experiments/results/feedback.{md,json,png}
    python -m experiments.feedback --quick --out /tmp/x
"""
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
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


def gradient_fn(activation, use_fa):
    if use_fa:
        return lambda p, B, x, y: fb.backprop(p, B, x, y, activation=activation, loss=CE)[1]
    return lambda p, B, x, y: fnbp.backprop(p, x, y, activation=activation, loss=CE)[1]


def train(data, name, *, sizes, epochs, batch, lr, seed):
    activation, use_fa = METHODS[name]
    key = jax.random.key(seed)
    params = fnbp.mlp.init(jax.random.fold_in(key, 0), sizes)            # same start for every method
    feedback = fb.init_feedback(jax.random.fold_in(key, 1), params)
    opt = optax.sgd(lr, momentum=0.9)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    xt, yt = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    n_steps = x.shape[0] // batch
    grad = gradient_fn(activation, use_fa)

    @jax.jit
    def epoch(params, opt_state, e):
        order = jax.random.permutation(jax.random.fold_in(key, 100 + e), x.shape[0])[: n_steps * batch]

        def step(carry, idx):
            p, s = carry
            u, s = opt.update(grad(p, feedback, x[idx], y[idx]), s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(step, (params, opt_state), order.reshape(n_steps, batch))[0]

    @jax.jit
    def measure(params):
        acc = jnp.mean(jnp.argmax(fnbp.mlp.apply(params, xt, activation=activation), -1) == yt)
        if not use_fa:
            return acc, jnp.full((len(params),), jnp.nan)
        _, true = fnbp.backprop(params, x, y, activation=activation, loss=CE)
        _, fa = fb.backprop(params, feedback, x, y, activation=activation, loss=CE)
        per_layer = [fb.angle(fa[k], true[k]) for k in range(len(params) - 1)]
        return acc, jnp.stack(per_layer + [fb.angle(fa[:-1], true[:-1])])

    opt_state = opt.init(params)
    acc0, angle0 = measure(params)
    history = [{"epoch": 0, "test_accuracy": float(acc0), "angles": [float(a) for a in angle0]}]
    t0 = time.perf_counter()
    for e in range(epochs):
        params, opt_state = epoch(params, opt_state, e)
        acc, angles = measure(params)
        history.append({"epoch": e + 1, "test_accuracy": float(acc), "angles": [float(a) for a in angles]})
    return {"method": name, "history": history, "seconds": time.perf_counter() - t0}


def main(argv=None):
    def add(p):
        p.add_argument("--dataset", default="digits", choices=("digits", "mnist"))
        p.add_argument("--epochs", type=int, default=30)
        p.add_argument("--batch", type=int, default=32)
        p.add_argument("--lr", type=float, default=0.05)
    args = common.parse_args("backprop vs feedback alignment vs sign with/without STE", argv, add_arguments=add)
    t_start = time.perf_counter()
    if args.dataset == "digits":
        data, sizes = fnbp.data.load_digits(seed=args.seed), (64, 128, 128, 10)
    else:
        data, sizes = fnbp.data.load_mnist(seed=args.seed), (784, 256, 256, 10)
    epochs = 2 if args.quick else args.epochs
    runs = [train(data, name, sizes=sizes, epochs=epochs, batch=args.batch, lr=args.lr, seed=args.seed)
            for name in METHODS]
    fa = runs[1]
    n_hidden = len(sizes) - 2

    L = [f"# Alternative feedback on {args.dataset}", "",
         f"MLP {'-'.join(map(str, sizes))}, softmax cross-entropy, SGD lr {args.lr} momentum 0.9, batch {args.batch}, "
         f"{epochs} epochs, seed {args.seed}; the same initial weights and batches for every method.", "",
         common.md_table(["method", "test accuracy (final)", "best", "s"],
                         [[r["method"], common.fmt(r["history"][-1]["test_accuracy"]),
                           common.fmt(max(h["test_accuracy"] for h in r["history"])), common.fmt(r["seconds"])]
                          for r in runs]),
         "", "## Angle between the feedback-alignment update and the true gradient (degrees)", "",
         "Measured on the whole training set; the output layer's update equals the gradient's by construction.", ""]
    shown = sorted({0, 1, epochs // 4, epochs // 2, epochs})
    L.append(common.md_table(["epoch"] + [f"hidden layer {k + 1}" for k in range(n_hidden)] + ["all hidden"],
                             [[str(h["epoch"])] + [common.fmt(a) for a in h["angles"]]
                              for h in fa["history"] if h["epoch"] in shown]))
    final = fa["history"][-1]["angles"][-1]
    L += ["", f"Final angle over all hidden layers: {common.fmt(final)} degrees "
          f"({'below' if final < 90 else 'NOT below'} 90: the forward weights came to align with the feedback).", ""]
    md = "\n".join(L)

    fig, (ax1, ax2) = common.plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        ax1.plot([h["epoch"] for h in r["history"]], [h["test_accuracy"] for h in r["history"]], label=r["method"])
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("test accuracy")
    ax1.legend()
    for k in range(n_hidden + 1):
        ax2.plot([h["epoch"] for h in fa["history"]], [h["angles"][k] for h in fa["history"]],
                 label=f"hidden layer {k + 1}" if k < n_hidden else "all hidden")
    ax2.axhline(90, color="gray", ls="--")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("angle(FA update, gradient) [deg]")
    ax2.legend()
    common.save_figure(fig, args.out, "feedback_accuracy_and_angle.png")
    common.write_results(args.out, "feedback", md, {"dataset": args.dataset, "sizes": list(sizes), "runs": runs},
                         args=args, seconds=time.perf_counter() - t_start)
    print(md)
    return runs


if __name__ == "__main__":
    main()
