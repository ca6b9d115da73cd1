"""DP-SGD (Abadi et al. 2016) with the explicit rules: test accuracy against the privacy budget epsilon.

Question: what accuracy does differentially private training reach at a given epsilon (delta = 1e-5)
on digits and MNIST, and what does computing it from one backward pass (``fnbp.dp``: per-example norms
from ||delta_n||^2 ||h_n||^2, the clipped sum as delta^T diag(c) H) save against the usual JAX way,
``vmap(grad)`` + clip + sum, which materialises every per-example gradient?

Setup, per dataset: an MLP with ReLU and softmax cross-entropy, batches of B drawn by shuffling, clip
C, noise multiplier sigma in a sweep (and sigma = 0, clipping only, epsilon = inf), SGD with momentum
0.9 chained after ``fnbp.dp.gaussian_noise`` (optax style).  epsilon after every epoch from
``fnbp.dp.epsilon`` (dp-accounting's RDP accountant, sampling rate q = B / N, the Poisson-sampling
bound as is usual for shuffled batches).  Digits: sklearn's 8x8 digits, 64-128-128-10.  MNIST: the
t10k images split 8000 / 2000 (``fnbp.data.load_mnist``'s fallback; the official split with the four
IDX files), the notes' 784-512-512-10 (``--mnist-hidden``).

The middle sigma is also run the vmap(grad) way (``fnbp.bench.per_example_rules.vmap_grads``, the
bench's plain-jnp peer) with the same keys: same accuracy up to float32 rounding.  One step of each
way (and an ordinary non-private step) is timed side by side, interleaved
(``fnbp.bench.harness.interleaved``), and XLA's temp memory of each compiled step is compared
(``fnbp.bench.harness.temp_bytes``).

    python experiments/dp_sgd.py                 # writes experiments/results/dp_sgd.{md,json} and dp_sgd_*.png
    python experiments/dp_sgd.py --datasets digits --quick --out /tmp/x
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
from fnbp.bench.harness import interleaved, paired_ratio, temp_bytes  # noqa: E402
from fnbp.bench.per_example_rules import vmap_grads  # noqa: E402

CE = fnbp.losses.softmax_cross_entropy
DELTA = 1e-5
SETTINGS = {   # dataset -> hidden widths, batch B, SGD rate (momentum 0.9), epochs, epochs of the vmap(grad) run
    "digits": {"hidden": (128, 128), "batch": 64, "lr": 0.05, "epochs": 20, "vmap_epochs": None},   # None: all
    "mnist": {"hidden": (512, 512), "batch": 256, "lr": 0.05, "epochs": 15, "vmap_epochs": 1},
}
QUICK = {"digits": {"hidden": (32,), "epochs": 2}, "mnist": {"hidden": (64,), "epochs": 1, "n_train": 1024}}


def vmap_clipped_sum(params, x, d, clip):
    """The usual JAX way: per-example gradients by ``vmap(grad)`` of the plain-jnp loss (the bench's
    ``vmap_grads``: a B x |theta| pytree), their norms, clip, then sum."""
    g = vmap_grads(params, x, d)
    norms = jnp.sqrt(sum(jnp.sum(v.reshape(v.shape[0], -1) ** 2, 1) for v in jax.tree_util.tree_leaves(g)))
    c = 1.0 / jnp.maximum(1.0, norms / clip)
    return jax.tree_util.tree_map(lambda v: jnp.tensordot(c, v, axes=1), g), norms


def fnbp_clipped_sum(params, x, d, clip):
    """fnbp.dp: norms from one backward pass, the clipped sum as delta^T diag(c) H."""
    return fnbp.dp.clipped_grad_sum(params, x, d, clip=clip, loss=CE)


CLIPPED_SUM = {"fnbp": fnbp_clipped_sum, "vmap": vmap_clipped_sum}


def make_optimizer(sigma, clip, B, lr, key):
    return optax.chain(fnbp.dp.gaussian_noise(clip, sigma, B, key), optax.sgd(lr, momentum=0.9))


def make_step(way, tx, clip):
    clipped_sum = CLIPPED_SUM[way]

    def step(params, opt_state, xb, yb):
        sums, norms = clipped_sum(params, xb, yb, clip)
        updates, opt_state = tx.update(sums, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, norms

    return step


def make_epoch(step, n, B):
    n_steps = n // B

    def epoch(params, opt_state, x, y, key):
        order = jax.random.permutation(key, n)[: n_steps * B].reshape(n_steps, B)

        def body(carry, idx):
            p, s, norms = step(*carry, x[idx], y[idx])
            return (p, s), norms

        (params, opt_state), norms = jax.lax.scan(body, (params, opt_state), order)
        return params, opt_state, norms

    return epoch


def train(data, *, way, sigma, clip, B, lr, epochs, sizes, seed):
    """One DP-SGD run; history per epoch: epsilon, test accuracy, fraction of examples clipped."""
    key = jax.random.key(seed)
    params = fnbp.mlp.init(jax.random.fold_in(key, 0), sizes)
    tx = make_optimizer(sigma, clip, B, lr, jax.random.fold_in(key, 1))
    opt_state = tx.init(params)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    xt, yt = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    n = x.shape[0]
    t0 = time.perf_counter()
    epoch_fn = jax.jit(make_epoch(make_step(way, tx, clip), n, B)).lower(params, opt_state, x, y, key).compile()
    compile_s = time.perf_counter() - t0
    acc_fn = jax.jit(lambda p: jnp.mean(jnp.argmax(fnbp.mlp.apply(p, xt), -1) == yt))
    history, seconds = [], []
    for e in range(epochs):
        t = time.perf_counter()
        params, opt_state, norms = epoch_fn(params, opt_state, x, y, jax.random.fold_in(key, 100 + e))
        jax.block_until_ready(params)
        seconds.append(time.perf_counter() - t)
        if not all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree_util.tree_leaves(params)):
            raise FloatingPointError(f"dp_sgd: {way} run sigma={sigma} seed={seed}: non-finite parameters "
                                     f"after epoch {e + 1} (lower --lr?)")
        eps = fnbp.dp.epsilon(noise_multiplier=sigma, sample_rate=B / n, steps=(e + 1) * (n // B), delta=DELTA)
        history.append({"epoch": e + 1, "epsilon": eps, "test_accuracy": float(acc_fn(params)),
                        "clipped_fraction": float(jnp.mean(norms > clip)),
                        "median_norm": float(jnp.median(norms))})
    return {"way": way, "sigma": sigma, "seed": seed, "history": history,
            "epoch_s_median": float(np.median(seconds)), "compile_s": compile_s, "params": params}


def compare_steps(data, *, sigma, clip, B, lr, sizes, seed, min_time):
    """One DP step of each way and an ordinary step, compiled alone: temp memory, and times interleaved."""
    key = jax.random.key(seed)
    params = fnbp.mlp.init(jax.random.fold_in(key, 0), sizes)
    tx = make_optimizer(sigma, clip, B, lr, jax.random.fold_in(key, 1))
    opt_state = tx.init(params)
    xb, yb = jnp.asarray(data.x_train[:B]), jnp.asarray(data.y_train[:B])
    plain_tx = optax.sgd(lr, momentum=0.9)
    plain_state = plain_tx.init(params)

    def plain_step(p, s, x, y):
        u, s = plain_tx.update(fnbp.backprop(p, x, y, loss=CE)[1], s, p)
        return optax.apply_updates(p, u), s

    compiled = {way: jax.jit(make_step(way, tx, clip)).lower(params, opt_state, xb, yb).compile()
                for way in CLIPPED_SUM}
    compiled["plain"] = jax.jit(plain_step).lower(params, plain_state, xb, yb).compile()
    states = {"fnbp": opt_state, "vmap": opt_state, "plain": plain_state}
    fns = {w: (lambda c=c, s=states[w]: jax.block_until_ready(c(params, s, xb, yb))) for w, c in compiled.items()}
    samples = interleaved(fns, min_time)
    ms = {w: 1e3 * float(np.median(samples[w]["wall"])) for w in fns}
    temp = {w: temp_bytes(c) for w, c in compiled.items()}
    return {"ms_median": ms, "temp_bytes": temp, "rounds": len(samples["fnbp"]["wall"]),
            "time_ratio_fnbp_vmap": paired_ratio(samples["fnbp"], samples["vmap"]),
            "time_ratio_fnbp_plain": paired_ratio(samples["fnbp"], samples["plain"]),
            "temp_ratio_fnbp_vmap": (temp["fnbp"] / temp["vmap"]) if temp["fnbp"] is not None and temp["vmap"]
            else None}


def run_dataset(name, args, sigmas, seeds):
    cfg = dict(SETTINGS[name])
    if name == "mnist" and args.mnist_hidden:
        cfg["hidden"] = tuple(int(v) for v in args.mnist_hidden.split(","))
    if args.epochs is not None:
        cfg["epochs"] = args.epochs
    if args.quick:
        cfg.update(QUICK[name])
    data, split = common.load_dataset(name, seed=args.seed, data_dir=args.data_dir, n_train=cfg.get("n_train"))
    sizes = (data.x_train.shape[1], *cfg["hidden"], 10)
    B, epochs = cfg["batch"], cfg["epochs"]
    kw = dict(clip=args.clip, B=B, lr=cfg["lr"], epochs=epochs, sizes=sizes)
    common.log(f"[dp_sgd] {name}: {split}; MLP {'-'.join(map(str, sizes))}, B {B}, lr {cfg['lr']}, "
               f"{epochs} epochs, sigmas {sigmas}, seeds {seeds}")
    runs = {}
    for sigma in sigmas + [0.0]:
        runs[sigma] = [train(data, way="fnbp", sigma=sigma, seed=s, **kw) for s in seeds]
        r = runs[sigma]
        common.log(f"[dp_sgd] {name} sigma {sigma}: eps {r[0]['history'][-1]['epsilon']:.3g}, final acc "
                   f"{[round(x['history'][-1]['test_accuracy'], 4) for x in r]}, "
                   f"{r[0]['epoch_s_median']:.2f} s/epoch")
    sigma_ref = sigmas[len(sigmas) // 2]
    ref = runs[sigma_ref][0]
    vmap_epochs = min(args.vmap_epochs or cfg["vmap_epochs"] or epochs, epochs)
    if vmap_epochs < epochs:        # the reference: the same fnbp run (same keys) stopped after vmap_epochs
        ref = train(data, way="fnbp", sigma=sigma_ref, seed=seeds[0], **dict(kw, epochs=vmap_epochs))
    peer = train(data, way="vmap", sigma=sigma_ref, seed=seeds[0], **dict(kw, epochs=vmap_epochs))
    same = max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree_util.tree_leaves(ref["params"]), jax.tree_util.tree_leaves(peer["params"])))
    common.log(f"[dp_sgd] {name} vmap way sigma {sigma_ref}: acc {peer['history'][-1]['test_accuracy']:.4f}, "
               f"{peer['epoch_s_median']:.2f} s/epoch, max |param diff| {same:.3g}")
    steps = compare_steps(data, sigma=sigma_ref, clip=args.clip, B=B, lr=cfg["lr"], sizes=sizes, seed=seeds[0],
                          min_time=0.05 if args.quick else args.min_time)
    strip = lambda r: {k: v for k, v in r.items() if k != "params"}   # noqa: E731
    summary = []
    for sigma, rs in runs.items():
        finals = [r["history"][-1]["test_accuracy"] for r in rs]
        mean_curve = [float(np.mean([r["history"][e]["test_accuracy"] for r in rs])) for e in range(epochs)]
        summary.append({"sigma": sigma, "epsilon": rs[0]["history"][-1]["epsilon"],
                        "final_accuracy_mean": float(np.mean(finals)),
                        "final_accuracy_std": float(np.std(finals, ddof=1)) if len(finals) > 1 else 0.0,
                        "final_accuracies": finals, "mean_accuracy_per_epoch": mean_curve,
                        "epsilon_per_epoch": [h["epsilon"] for h in rs[0]["history"]]})
    return {"dataset": name, "split": split, "sizes": list(sizes), "n_train": int(data.x_train.shape[0]),
            "n_test": int(data.x_test.shape[0]), "batch": B, "lr": cfg["lr"], "epochs": epochs, "clip": args.clip,
            "seeds": list(seeds), "summary": summary,
            "runs": {str(s): [strip(r) for r in rs] for s, rs in runs.items()},
            "two_ways": {"sigma": sigma_ref, "seed": seeds[0], "epochs": vmap_epochs,
                         "fnbp": strip(ref), "vmap": strip(peer),
                         "max_param_difference": same, "steps": steps}}


def render(res):
    f = common.fmt
    n, B = res["n_train"], res["batch"]
    L = [f"## {res['dataset']}", "",
         f"{res['split']}. MLP {'-'.join(map(str, res['sizes']))} (ReLU, softmax cross-entropy), N = {n}, "
         f"B = {B} (q = {B / n:.4f}, {n // B} steps per epoch), clip C = {res['clip']}, SGD lr {res['lr']} "
         f"momentum 0.9 after `fnbp.dp.gaussian_noise`, {res['epochs']} epochs, seeds {res['seeds']}.", "",
         f"### Accuracy against epsilon (delta = {DELTA:g}), after the last epoch", ""]
    rows = [[f(s["sigma"]), f(s["epsilon"]),
             f(s["final_accuracy_mean"]) + (f" ± {f(s['final_accuracy_std'])}" if len(res["seeds"]) > 1 else ""),
             ", ".join(f(a) for a in s["final_accuracies"])] for s in res["summary"]]
    L += [common.md_table(["sigma", "epsilon", "test accuracy" + (" (mean ± std)" if len(res["seeds"]) > 1 else ""),
                           "per seed"], rows), "", "Per epoch (seed " + str(res["seeds"][0]) + "):", ""]
    ep = res["epochs"]
    shown = sorted({1, max(ep // 4, 1), max(ep // 2, 1), ep})
    rows = [[f(float(s)), f(h["epoch"]), f(h["epsilon"]), f(h["test_accuracy"]), f(h["clipped_fraction"]),
             f(h["median_norm"])]
            for s, rs in res["runs"].items() for h in rs[0]["history"] if h["epoch"] in shown]
    L += [common.md_table(["sigma", "epoch", "epsilon", "test accuracy", "fraction clipped (in the epoch)",
                           "median per-example norm"], rows)]
    tw, st = res["two_ways"], res["two_ways"]["steps"]
    mb = lambda b: f(b / 2 ** 20) if b is not None else "—"      # noqa: E731
    L += ["", f"### Same run (sigma = {tw['sigma']}, seed {tw['seed']}, {tw['epochs']} epoch"
          f"{'s' if tw['epochs'] > 1 else ''}), two ways", "",
          common.md_table(
              ["way", f"test accuracy after epoch {tw['epochs']}", "s / epoch (median, training)",
               "ms / step (interleaved)",
               "step temp MB", "compile s (epoch)"],
              [["fnbp.dp (one backward, δᵀ diag(c) H)", f(tw["fnbp"]["history"][-1]["test_accuracy"]),
                f(tw["fnbp"]["epoch_s_median"]), f(st["ms_median"]["fnbp"]), mb(st["temp_bytes"]["fnbp"]),
                f(tw["fnbp"]["compile_s"])],
               ["vmap(grad) + clip + sum", f(tw["vmap"]["history"][-1]["test_accuracy"]),
                f(tw["vmap"]["epoch_s_median"]), f(st["ms_median"]["vmap"]), mb(st["temp_bytes"]["vmap"]),
                f(tw["vmap"]["compile_s"])],
               ["ordinary step (fnbp.backprop, no clip/noise)", "—", "—", f(st["ms_median"]["plain"]),
                mb(st["temp_bytes"]["plain"]), "—"]]),
          "", f"Largest parameter difference between the two ways after training: {f(tw['max_param_difference'])} "
          "(same keys; float32 rounding only).",
          f"Step time fnbp / vmap (median of {st['time_ratio_fnbp_vmap']['rounds']} interleaved rounds): "
          f"{f(st['time_ratio_fnbp_vmap']['median'])} (IQR {f(st['time_ratio_fnbp_vmap']['q1'])}–"
          f"{f(st['time_ratio_fnbp_vmap']['q3'])}); per epoch in training "
          f"{f(tw['fnbp']['epoch_s_median'] / tw['vmap']['epoch_s_median'])}; "
          f"DP step / ordinary step {f(st['time_ratio_fnbp_plain']['median'])}; "
          f"step temp memory fnbp / vmap {f(st['temp_ratio_fnbp_vmap'])}.", ""]
    return L


def plot(results, out):
    fig, axes = common.plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results):
        for s in res["summary"]:
            if s["sigma"] == 0:
                ax.axhline(s["final_accuracy_mean"], color="gray", ls="--", label="clipping only (ε = ∞)")
            else:
                ax.plot(s["epsilon_per_epoch"], s["mean_accuracy_per_epoch"], "o-", ms=3,
                        label=f"σ = {s['sigma']:g}")
        ax.set_xscale("log")
        ax.set_xlabel(f"ε (δ = {DELTA:g}), one point per epoch")
        ax.set_ylabel("test accuracy" + (" (mean over seeds)" if len(res["seeds"]) > 1 else ""))
        ax.set_title(f"DP-SGD, {res['dataset']} {'-'.join(map(str, res['sizes']))}")
        ax.legend(fontsize=8)
    return common.save_figure(fig, out, "dp_sgd_accuracy_vs_epsilon.png")


def main(argv=None):
    def add(p):
        common.add_dataset_arguments(p)
        p.add_argument("--sigmas", default="0.6,1.0,2.0", help="noise multipliers of the sweep (sigma = 0, "
                       "clipping only, is always added)")
        p.add_argument("--clip", type=float, default=1.0)
        p.add_argument("--seeds", type=int, default=2, help="number of seeds (seed, seed + 1, ...) per setting")
        p.add_argument("--epochs", type=int, default=None,
                       help="epochs for every dataset (default: digits 20, MNIST 15; quick: 2 / 1)")
        p.add_argument("--mnist-hidden", default=None, help="MNIST hidden widths, e.g. 256,256 (default 512,512)")
        p.add_argument("--vmap-epochs", type=int, default=None,
                       help="epochs of the vmap(grad) run (default: digits all, MNIST 1: its step is ~30x slower)")
        p.add_argument("--min-time", type=float, default=3.0, help="seconds of interleaved step samples per way")
    args = common.parse_args("DP-SGD on digits and MNIST: accuracy vs epsilon; fnbp rules vs vmap(grad)", argv,
                             add_arguments=add)
    names = common.datasets_from_args(args, "dp_sgd")
    sigmas = [float(s) for s in args.sigmas.split(",")]
    if any(s <= 0 for s in sigmas):
        raise SystemExit(f"dp_sgd: --sigmas must be positive (sigma = 0 is always run), got {args.sigmas!r}")
    seeds = list(range(args.seed, args.seed + args.seeds))
    if args.quick:
        sigmas, seeds = sigmas[:1], seeds[:1]
    t_start = time.perf_counter()
    results = [run_dataset(name, args, sigmas, seeds) for name in names]
    L = [f"# DP-SGD: accuracy vs epsilon (delta = {DELTA:g}), explicit rules vs vmap(grad)", "",
         "epsilon: `fnbp.dp.epsilon` (dp-accounting RDP accountant, Poisson-sampling bound with q = B / N). "
         "The two ways use the same keys (init, batches, noise). Times on a shared 2-core CPU: compare the "
         "ratios, not absolute times.", ""]
    for res in results:
        L += render(res)
    md = "\n".join(L)
    plot(results, args.out)
    common.write_results(args.out, "dp_sgd", md, {"datasets": results}, args=args,
                         seconds=time.perf_counter() - t_start)
    print(md)
    return results


if __name__ == "__main__":
    main()
