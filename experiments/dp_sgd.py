"""DP-SGD (Abadi et al. 2016) with the explicit rules: test accuracy against the privacy budget epsilon.

Question: what accuracy does differentially private training reach at a given epsilon (delta = 1e-5),
and what does computing it from one backward pass (``fnbp.dp``: per-example norms from
||delta_n||^2 ||h_n||^2, the clipped sum as delta^T diag(c) H) save against the usual JAX way,
``vmap(grad)`` + clip + sum, which materialises every per-example gradient?

Setup: digits (default; ``--dataset mnist`` for the local MNIST files), an MLP with ReLU and softmax
cross-entropy, batches of B drawn by shuffling, clip C, noise multiplier sigma in a sweep, SGD with
momentum chained after ``fnbp.dp.gaussian_noise`` (optax style).  epsilon after every epoch from
``fnbp.dp.epsilon`` (dp-accounting's RDP accountant, sampling rate q = B / N, Poisson-sampling bound
as is usual for shuffled batches).  One setting is also run the vmap(grad) way with the same noise
key: same accuracy (up to float rounding), and its time per epoch and XLA temp memory are compared.

    python experiments/dp_sgd.py                 # writes experiments/results/dp_sgd.{md,json,png}
    python -m experiments.dp_sgd --quick --out /tmp/x
"""
import functools
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
from fnbp.bench.harness import temp_bytes  # noqa: E402

CE = fnbp.losses.softmax_cross_entropy
DELTA = 1e-5


def vmap_clipped_sum(params, x, d, clip):
    """The usual JAX way: per-example gradients by vmap(grad) of a plain-jnp loss, then clip, then sum."""
    def loss(p, x_n, d_n):
        h = x_n
        for k, layer in enumerate(p):
            a = h @ layer["W"].T + layer["b"]
            h = jax.nn.relu(a) if k < len(p) - 1 else a
        return -jax.nn.log_softmax(h)[d_n]
    g = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, x, d)
    norms = jnp.sqrt(sum(jnp.sum(v.reshape(v.shape[0], -1) ** 2, 1) for v in jax.tree_util.tree_leaves(g)))
    c = 1.0 / jnp.maximum(1.0, norms / clip)
    return jax.tree_util.tree_map(lambda v: jnp.tensordot(c, v, axes=1), g), norms


def fnbp_clipped_sum(params, x, d, clip):
    return fnbp.dp.clipped_grad_sum(params, x, d, clip=clip, loss=CE)


def make_epoch(way, tx, clip, n, B):
    clipped_sum = fnbp_clipped_sum if way == "fnbp" else vmap_clipped_sum
    n_steps = n // B

    def epoch(params, opt_state, x, y, key):
        order = jax.random.permutation(key, n)[: n_steps * B].reshape(n_steps, B)

        def step(carry, idx):
            p, s = carry
            sums, norms = clipped_sum(p, x[idx], y[idx], clip)
            updates, s = tx.update(sums, s, p)
            return (optax.apply_updates(p, updates), s), jnp.mean(norms > clip)

        (params, opt_state), clipped = jax.lax.scan(step, (params, opt_state), order)
        return params, opt_state, jnp.mean(clipped)

    return epoch


def train(data, *, way, sigma, clip, B, lr, epochs, sizes, seed):
    key = jax.random.key(seed)
    params = fnbp.mlp.init(jax.random.fold_in(key, 0), sizes)
    tx = optax.chain(fnbp.dp.gaussian_noise(clip, sigma, B, jax.random.fold_in(key, 1)),
                     optax.sgd(lr, momentum=0.9))
    opt_state = tx.init(params)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    xt, yt = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    n = x.shape[0]
    t0 = time.perf_counter()
    compiled = jax.jit(make_epoch(way, tx, clip, n, B)).lower(params, opt_state, x, y, key).compile()
    compile_s = time.perf_counter() - t0
    step_fn = jax.jit(lambda p, s, xb, yb: tx.update((fnbp_clipped_sum if way == "fnbp" else vmap_clipped_sum)(
        p, xb, yb, clip)[0], s, p)).lower(params, opt_state, x[:B], y[:B]).compile()
    acc_fn = jax.jit(lambda p: jnp.mean(jnp.argmax(fnbp.mlp.apply(p, xt), -1) == yt))
    history, seconds = [], []
    for e in range(epochs):
        t = time.perf_counter()
        params, opt_state, frac = compiled(params, opt_state, x, y, jax.random.fold_in(key, 100 + e))
        jax.block_until_ready(params)
        seconds.append(time.perf_counter() - t)
        eps = fnbp.dp.epsilon(noise_multiplier=sigma, sample_rate=B / n, steps=(e + 1) * (n // B), delta=DELTA)
        history.append({"epoch": e + 1, "epsilon": eps, "test_accuracy": float(acc_fn(params)),
                        "clipped_fraction": float(frac)})
    return {"way": way, "sigma": sigma, "history": history, "epoch_s_median": float(np.median(seconds)),
            "compile_s": compile_s, "step_temp_bytes": temp_bytes(step_fn), "params": params}


def main(argv=None):
    def add(p):
        p.add_argument("--dataset", default="digits", choices=("digits", "mnist"))
        p.add_argument("--sigmas", default="0.6,1.0,2.0", help="noise multipliers of the sweep")
        p.add_argument("--clip", type=float, default=1.0)
        p.add_argument("--batch", type=int, default=64)
        p.add_argument("--lr", type=float, default=0.1)
        p.add_argument("--epochs", type=int, default=30)
    args = common.parse_args("DP-SGD on digits/MNIST: accuracy vs epsilon; fnbp rules vs vmap(grad)", argv,
                             add_arguments=add)
    t_start = time.perf_counter()
    if args.dataset == "digits":
        data, sizes = fnbp.data.load_digits(seed=args.seed), (64, 128, 128, 10)
    else:
        data, sizes = fnbp.data.load_mnist(seed=args.seed), (784, 256, 256, 10)
    sigmas = [float(s) for s in args.sigmas.split(",")]
    epochs = args.epochs
    if args.quick:
        sigmas, epochs = sigmas[:1], 2
    kw = dict(clip=args.clip, B=args.batch, lr=args.lr, epochs=epochs, sizes=sizes, seed=args.seed)
    runs = [train(data, way="fnbp", sigma=s, **kw) for s in sigmas]
    baseline = train(data, way="fnbp", sigma=0.0, **kw)             # clipping only: epsilon = inf
    peer = train(data, way="vmap", sigma=sigmas[len(sigmas) // 2], **kw)
    ref = runs[len(sigmas) // 2]
    same = max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree_util.tree_leaves(ref["params"]), jax.tree_util.tree_leaves(peer["params"])))
    n = data.x_train.shape[0]

    L = [f"# DP-SGD on {args.dataset}: accuracy vs epsilon (delta = {DELTA:g})", "",
         f"MLP {'-'.join(map(str, sizes))} (ReLU, softmax cross-entropy), N = {n} training examples, B = {args.batch} "
         f"(q = {args.batch / n:.4f}), clip C = {args.clip}, SGD lr {args.lr} momentum 0.9 after "
         f"`fnbp.dp.gaussian_noise`, {epochs} epochs, seed {args.seed}. epsilon: `fnbp.dp.epsilon` (dp-accounting "
         "RDP, Poisson-sampling bound).", ""]
    rows = [[common.fmt(r["sigma"]), common.fmt(h["epoch"]), common.fmt(h["epsilon"]), common.fmt(h["test_accuracy"]),
             common.fmt(h["clipped_fraction"])]
            for r in runs + [baseline] for h in r["history"] if h["epoch"] in {1, epochs // 4, epochs // 2, epochs}]
    L.append(common.md_table(["sigma", "epoch", "epsilon", "test accuracy", "fraction clipped"], rows))
    L += ["", f"## Same run, sigma = {ref['sigma']}, two ways", "",
          common.md_table(["way", "final test accuracy", "s / epoch (median)", "compile s", "step temp MB"],
                          [[w["way"] + (" (fnbp.dp: one backward, delta^T diag(c) H)" if w["way"] == "fnbp"
                                        else " (vmap(grad) + clip + sum)"),
                            common.fmt(w["history"][-1]["test_accuracy"]), common.fmt(w["epoch_s_median"]),
                            common.fmt(w["compile_s"]), common.fmt((w["step_temp_bytes"] or 0) / 2 ** 20)]
                           for w in (ref, peer)]),
          "", f"Largest parameter difference between the two ways after training: {common.fmt(same)} "
          "(same keys; float32 rounding only).",
          f"Time ratio fnbp / vmap per epoch: {common.fmt(ref['epoch_s_median'] / peer['epoch_s_median'])}; "
          f"temp memory ratio of one step: "
          f"{common.fmt((ref['step_temp_bytes'] or 0) / max(peer['step_temp_bytes'] or 1, 1))}.", ""]
    md = "\n".join(L)
    strip = lambda r: {k: v for k, v in r.items() if k != "params"}   # noqa: E731
    result = {"dataset": args.dataset, "sizes": list(sizes), "runs": [strip(r) for r in runs],
              "clip_only": strip(baseline), "vmap_way": strip(peer), "max_param_difference": same}

    fig, ax = common.plt.subplots(figsize=(6, 4))
    for r in runs:
        ax.plot([h["epsilon"] for h in r["history"]], [h["test_accuracy"] for h in r["history"]], "o-",
                ms=3, label=f"sigma = {r['sigma']}")
    ax.axhline(baseline["history"][-1]["test_accuracy"], color="gray", ls="--", label="clipping only (eps = inf)")
    ax.set_xscale("log")
    ax.set_xlabel(f"epsilon (delta = {DELTA:g})")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"DP-SGD on {args.dataset} (one point per epoch)")
    ax.legend()
    common.save_figure(fig, args.out, "dp_sgd_accuracy_vs_epsilon.png")
    common.write_results(args.out, "dp_sgd", md, result, args=args, seconds=time.perf_counter() - t_start)
    print(md)
    return result


if __name__ == "__main__":
    main()
