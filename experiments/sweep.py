"""Many models in one program: a seeds x learning-rates sweep as ONE jit-compiled, ``vmap``-ed program.

    python experiments/sweep.py                       # writes experiments/results/sweep.*
    python -m experiments.sweep --quick --out /tmp/x  # 2 seeds x 3 rates, 2 epochs (the test)

A 64-32-10 ReLU network on scikit-learn's digits (standardised with the training split's statistics,
stratified 1438/359 split with ``--seed``), plain mini-batch SGD (``fnbp.optim.sgd``), batches of 32.
8 seeds x 6 learning rates = 48 models.  One model's whole training -- every epoch (``lax.scan`` over
``fnbp.train.make_epoch``, itself a ``lax.scan`` over the steps), then the test evaluation -- is a pure
function ``run(params, key, lr)``; the sweep is ``jax.jit(jax.vmap(run))`` over the 48 (params, key,
lr) triples, the learning rate being a traced scalar.

Its time is compared with the same 48 runs one after another through ``jax.jit(run)`` (compiled once,
rate and key traced, so no recompilation); compile times are reported separately and excluded, and
each compiled program gets one untimed warm-up call (the first call of an executable pays one-time
costs of ~0.3 s here, as much as the whole vmapped sweep in quick mode).  The
vmapped and the sequential results are checked equal (final parameters to 1e-5, test accuracies).
"""
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import common  # noqa: E402
from fnbp import data as fdata  # noqa: E402
from fnbp import mlp, optim  # noqa: E402
from fnbp import train as ftrain  # noqa: E402

NAME = "sweep"
SIZES = (64, 32, 10)
BATCH = 32
LRS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
N_SEEDS = 8
EPOCHS = 30
QUICK = {"lrs": (0.01, 0.1, 1.0), "n_seeds": 2, "epochs": 2}
TOL = 1e-5
REPEATS = 5          # each timing is the fastest of this many repetitions (shared, noisy machine)
STD_DDOF = 1


def add_arguments(parser):
    parser.add_argument("--sequential", type=int, default=None,
                        help="time only this many of the runs one after another and extrapolate "
                             "(default: all of them)")


def make_run(x, y, x_test, y_test, epochs, cfg=ftrain.Config()):
    """``run(params, key, lr) -> (final params, per-epoch training loss, test loss, test accuracy)``."""
    n = x.shape[0]

    def run(params, key, lr):
        opt = optim.sgd(lr)
        epoch = ftrain.make_epoch(cfg, opt, batch_size=BATCH, n_examples=n)

        def body(carry, e):
            params, opt_state, state = carry
            params, opt_state, state, losses = epoch(params, opt_state, state, x, y, jax.random.fold_in(key, e))
            return (params, opt_state, state), jnp.mean(losses)

        carry = (params, opt.init(params), mlp.init_state(params))
        (params, _, state), curve = jax.lax.scan(body, carry, jnp.arange(epochs))
        test_loss, test_acc = ftrain.evaluate(cfg, params, state, x_test, y_test)
        return params, curve, test_loss, test_acc

    return run


def main(argv=None):
    args = common.parse_args("A seeds x learning-rates sweep of 48 small MLPs as one vmapped jit program, "
                             "timed against the same runs one after another.", argv, add_arguments=add_arguments)
    lrs = QUICK["lrs"] if args.quick else LRS
    n_seeds = QUICK["n_seeds"] if args.quick else N_SEEDS
    epochs = QUICK["epochs"] if args.quick else EPOCHS
    seeds = [args.seed + i for i in range(n_seeds)]
    timer = common.Timer().__enter__()

    ds = fdata.load_digits(seed=args.seed, standardize=True)
    x, y, x_test, y_test = map(jnp.asarray, (ds.x_train, ds.y_train, ds.x_test, ds.y_test))
    run = make_run(x, y, x_test, y_test, epochs)

    # the grid, flattened seed-major: model m = (seed s, rate j) with m = s * len(lrs) + j
    S, J = len(seeds), len(lrs)
    init_keys = jnp.stack([jax.random.fold_in(jax.random.key(s), 0) for s in seeds for _ in lrs])
    keys = jnp.stack([jax.random.fold_in(jax.random.key(s), 1) for s in seeds for _ in lrs])
    lr_grid = jnp.asarray([lr for _ in seeds for lr in lrs], jnp.float32)
    params = jax.vmap(lambda k: mlp.init(k, SIZES))(init_keys)
    n_models = S * J
    common.log(f"[sweep] {n_models} models ({S} seeds x {J} rates) of {'-'.join(map(str, SIZES))} on digits "
               f"({x.shape[0]} train / {x_test.shape[0]} test), {epochs} epochs of batches of {BATCH}")

    # one vmapped program ------------------------------------------------------------------
    vmapped = jax.jit(jax.vmap(run))
    with common.Timer() as t:
        vmapped_c = vmapped.lower(params, keys, lr_grid).compile()
    compile_vmapped = t.seconds
    jax.block_until_ready(vmapped_c(params, keys, lr_grid))           # warm-up call (first-run overheads)
    times_vmapped = []
    for _ in range(REPEATS):
        with common.Timer() as t:
            v_params, v_curves, v_loss, v_acc = jax.block_until_ready(vmapped_c(params, keys, lr_grid))
        times_vmapped.append(t.seconds)
    seconds_vmapped = min(times_vmapped)
    common.log(f"[sweep] vmapped: compile {compile_vmapped:.2f} s, run {seconds_vmapped:.2f} s")

    # the same runs one after another ----------------------------------------------------------
    single = jax.jit(run)
    slice_m = lambda tree, m: jax.tree_util.tree_map(lambda a: a[m], tree)      # noqa: E731
    with common.Timer() as t:
        single_c = single.lower(slice_m(params, 0), keys[0], lr_grid[0]).compile()
    compile_single = t.seconds
    n_seq = n_models if args.sequential is None else max(1, min(args.sequential, n_models))
    # which models to run sequentially: all, or an even spread over the grid
    seq_models = list(range(n_models)) if n_seq == n_models else \
        sorted({int(round(i)) for i in np.linspace(0, n_models - 1, n_seq)})
    n_seq = len(seq_models)
    jax.block_until_ready(single_c(slice_m(params, 0), keys[0], lr_grid[0]))   # warm-up call
    seq_out, times_seq = {}, []
    for _ in range(REPEATS):
        with common.Timer() as t:
            for m in seq_models:
                seq_out[m] = jax.block_until_ready(single_c(slice_m(params, m), keys[m], lr_grid[m]))
        times_seq.append(t.seconds)
    seconds_seq_measured = min(times_seq)
    seconds_sequential = seconds_seq_measured * n_models / n_seq
    ratio = seconds_sequential / seconds_vmapped
    # arithmetic of the dense layers: ~2 flops per weight per example forward, ~4 backward
    steps = ftrain.batch_plan(x.shape[0], BATCH)[1]
    gflop_per_model = 6 * sum(a * b for a, b in zip(SIZES[:-1], SIZES[1:])) * steps * BATCH * epochs / 1e9
    common.log(f"[sweep] sequential: compile {compile_single:.2f} s, {n_seq} runs {seconds_seq_measured:.2f} s"
               f"{'' if n_seq == n_models else f' -> {seconds_sequential:.2f} s for {n_models} (extrapolated)'}; "
               f"ratio sequential / vmapped = {ratio:.1f}")

    # equality of the two ----------------------------------------------------------------------
    checks = []
    for m in seq_models:
        p_seq, c_seq, l_seq, a_seq = seq_out[m]
        diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                   zip(jax.tree_util.tree_leaves(p_seq), jax.tree_util.tree_leaves(slice_m(v_params, m))))
        checks.append({"seed": seeds[m // J], "lr": lrs[m % J], "max_abs_param_diff": diff,
                       "max_abs_curve_diff": float(jnp.max(jnp.abs(c_seq - v_curves[m]))),
                       "test_accuracy_vmapped": float(v_acc[m]), "test_accuracy_sequential": float(a_seq),
                       "finite": bool(np.isfinite(diff))})
    finite = [c for c in checks if c["finite"]]
    assert finite, "no finite (seed, lr) pair to compare"
    pair = finite[0]                                  # the first finite pair (first seed, smallest rate)
    assert pair["max_abs_param_diff"] <= TOL, f"vmapped != sequential for {pair}"
    assert pair["test_accuracy_vmapped"] == pair["test_accuracy_sequential"], pair
    n_equal = sum(c["finite"] and c["max_abs_param_diff"] <= TOL for c in checks)
    n_acc_equal = sum(c["test_accuracy_vmapped"] == c["test_accuracy_sequential"] for c in checks)
    max_diff_finite = max(c["max_abs_param_diff"] for c in finite)
    by_lr = []
    for lr in lrs:
        cs = [c for c in checks if c["lr"] == lr]
        fin = [c["max_abs_param_diff"] for c in cs if c["finite"]]
        by_lr.append({"lr": lr, "pairs": len(cs), "pairs_non_finite": len(cs) - len(fin),
                      "max_abs_param_diff": max(fin) if fin else float("nan"),
                      "pairs_within_tol": sum(d <= TOL for d in fin),
                      "pairs_test_accuracy_equal": sum(c["test_accuracy_vmapped"] == c["test_accuracy_sequential"]
                                                       for c in cs)})

    # tables and figures ----------------------------------------------------------------------------
    acc = np.asarray(v_acc).reshape(S, J)                 # seeds x rates
    test_loss = np.asarray(v_loss).reshape(S, J)
    curves = np.asarray(v_curves).reshape(S, J, epochs)
    per_lr = []
    for j, lr in enumerate(lrs):
        col = acc[:, j]
        per_lr.append({"lr": lr, "test_accuracy": col.tolist(), "mean": float(col.mean()),
                       "std": float(col.std(ddof=STD_DDOF)) if S > 1 else 0.0,
                       "min": float(col.min()), "max": float(col.max()),
                       "final_train_loss_mean": (float(np.nanmean(curves[:, j, -1]))
                                                 if np.isfinite(curves[:, j, -1]).any() else float("nan")),
                       "diverged": int((~np.isfinite(curves[:, j, -1])).sum())})
    best = max(per_lr, key=lambda r: r["mean"])
    timer.__exit__(None, None, None)
    figures = plot(args.out, acc, seeds, lrs, curves)
    timing = {"vmapped_seconds": seconds_vmapped, "vmapped_compile_seconds": compile_vmapped,
              "sequential_seconds": seconds_sequential, "sequential_measured_seconds": seconds_seq_measured,
              "sequential_runs_measured": n_seq, "sequential_extrapolated": n_seq != n_models,
              "sequential_compile_seconds": compile_single, "ratio_sequential_over_vmapped": ratio,
              "gflop_per_model_estimate": gflop_per_model,
              "vmapped_gflop_per_s": gflop_per_model * n_models / seconds_vmapped,
              "sequential_gflop_per_s": gflop_per_model * n_models / seconds_sequential,
              "repeats": REPEATS, "vmapped_seconds_all": times_vmapped, "sequential_measured_seconds_all": times_seq}
    equality = {"tolerance": TOL, "asserted_pair": pair, "pairs_compared": len(checks),
                "pairs_params_within_tol": n_equal, "pairs_test_accuracy_equal": n_acc_equal,
                "max_abs_param_diff_finite": max_diff_finite, "by_lr": by_lr, "checks": checks}
    md = markdown(args, ds, seeds, lrs, epochs, per_lr, best, acc, timing, equality, n_models)
    common.write_results(args.out, NAME, md, {
        "sizes": SIZES, "optimizer": "sgd", "batch_size": BATCH, "epochs": epochs, "seeds": seeds,
        "learning_rates": list(lrs), "n_models": n_models, "std_ddof": STD_DDOF,
        "test_accuracy": acc.tolist(), "test_loss": test_loss.tolist(), "per_lr": per_lr,
        "best_lr": best["lr"], "best": best, "timing": timing, "equality": equality, "figures": figures,
    }, args=args, seconds=timer.seconds)
    common.log(f"[sweep] best lr {best['lr']:g}: {100 * best['mean']:.2f} ± {100 * best['std']:.2f} %; "
               f"vmapped {seconds_vmapped:.2f} s vs sequential {seconds_sequential:.2f} s (x{ratio:.1f})")
    return {"best_lr": best["lr"], "ratio": ratio}


def plot(out, acc, seeds, lrs, curves):
    """Heat map of the test accuracies (diverged models grey) and the training-loss curves per rate."""
    plt = common.plt
    diverged = ~np.isfinite(curves[:, :, -1])                     # seeds x rates
    ok = acc[~diverged]
    lo = 100 * (np.floor(20 * ok.min()) / 20 if ok.size else 0.0)   # colour scale from the non-diverged models
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(seeds) + 3.2),
                             gridspec_kw={"width_ratios": [1.1, 1], "wspace": 0.35})
    ax = axes[0]
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("lightgrey")
    im = ax.imshow(np.ma.masked_array(100 * acc, diverged), cmap=cmap, aspect="auto", vmin=lo, vmax=100)
    ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    ax.set_yticks(range(len(seeds)), [str(s) for s in seeds])
    ax.set(xlabel="learning rate (SGD)", ylabel="seed",
           title="test accuracy (%) of each model" + (" (grey: diverged)" if diverged.any() else ""))
    for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            v = 100 * acc[i, j]
            text = f"diverged\n{v:.1f}" if diverged[i, j] else f"{v:.1f}"
            dark = not diverged[i, j] and v < lo + 0.6 * (100 - lo)
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    fig.colorbar(im, ax=ax, label="test accuracy (%)")
    ax = axes[1]
    colors = plt.get_cmap("viridis")
    ep = np.arange(1, curves.shape[2] + 1)
    finite_curves = curves[~diverged]
    for j, lr in enumerate(lrs):
        c = curves[:, j, :]
        color = colors(j / max(len(lrs) - 1, 1))
        n_div = int(diverged[:, j].sum())
        label = f"lr {lr:g}" + (f" ({n_div}/{len(seeds)} diverged{', off the scale' if n_div == len(seeds) else ''})"
                                if n_div else "")
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)        # all-NaN columns of diverged runs
            ax.plot(ep, np.nanmean(c, 0), color=color, label=label, marker="." if len(ep) < 4 else None)
            ax.fill_between(ep, np.nanmin(c, 0), np.nanmax(c, 0), color=color, alpha=0.15)
    ax.set(yscale="log", xlabel="epoch", ylabel="training loss (mean over the epoch)",
           title="training loss: mean of the seeds, band = min–max")
    if finite_curves.size:
        ax.set_ylim(0.5 * np.nanmin(finite_curves), 2 * np.nanmax(finite_curves))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"{acc.size} models of 64-32-10 on digits trained by one vmapped jit program")
    f = f"{NAME}_heatmap.png"
    common.save_figure(fig, out, f)
    return [f]


def markdown(args, ds, seeds, lrs, epochs, per_lr, best, acc, timing, equality, n_models):
    t, e = timing, equality
    seq = (f"{t['sequential_seconds']:.2f} s" if not t["sequential_extrapolated"] else
           f"{t['sequential_seconds']:.2f} s (extrapolated from {t['sequential_runs_measured']} of the {n_models} "
           f"runs timed one after another: {t['sequential_measured_seconds']:.2f} s)")
    p = e["asserted_pair"]
    lines = [
        "# A learning-rate x seed sweep as one vmapped program",
        "",
        f"**Best learning rate {best['lr']:g}: test accuracy {100 * best['mean']:.2f} ± {100 * best['std']:.2f} %** "
        f"(mean ± sample std over {len(seeds)} seeds).  **{n_models} models in one vmapped jit program: "
        f"{t['vmapped_seconds']:.2f} s; the same runs one after another: {seq}; "
        f"ratio {t['ratio_sequential_over_vmapped']:.1f}x.**",
        "",
        f"Setup: 64-32-10 ReLU network (Glorot init), softmax cross-entropy, plain SGD (`fnbp.optim.sgd`), "
        f"batches of {BATCH}, {epochs} epochs, on scikit-learn's digits standardised with the training split's "
        f"statistics ({ds.x_train.shape[0]} train / {ds.x_test.shape[0]} test, stratified, seed {args.seed}).  "
        f"Seeds {seeds[0]}–{seeds[-1]} set the initialisation and the shuffling.  One model's whole training "
        "(all epochs as a `lax.scan` over `fnbp.train.make_epoch`, then the test evaluation) is a pure function "
        "`run(params, key, lr)`; the sweep is `jax.jit(jax.vmap(run))` over the (params, key, lr) of every model, "
        "the learning rate a traced scalar.",
        "",
        "## Test accuracy per learning rate",
        "",
        common.md_table(["learning rate", "test accuracy (%)", "min – max (%)", "final training loss (mean)",
                         "diverged (non-finite loss)"],
                        [[("**" + f"{r['lr']:g}" + "**") if r is best else f"{r['lr']:g}",
                          f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}",
                          f"{100 * r['min']:.2f} – {100 * r['max']:.2f}",
                          common.fmt(r["final_train_loss_mean"], 3), f"{r['diverged']}/{len(seeds)}"] for r in per_lr]),
        "",
        f"![heat map]({NAME}_heatmap.png)",
        "",
        "## Time",
        "",
        common.md_table(["", "compile (s)", "run (s)"],
                        [[f"one vmapped program ({n_models} models)", f"{t['vmapped_compile_seconds']:.2f}",
                          f"{t['vmapped_seconds']:.2f}"],
                         [f"one jitted single-model program, called {n_models} times",
                          f"{t['sequential_compile_seconds']:.2f}",
                          f"{t['sequential_seconds']:.2f}" + (" (extrapolated)" if t["sequential_extrapolated"] else "")]]),
        "",
        f"Ratio sequential / vmapped: **{t['ratio_sequential_over_vmapped']:.1f}x** (compile times and one "
        "untimed warm-up call of each compiled program excluded from both; the single-model program is "
        f"compiled once, the rate and key being traced, so the loop does not recompile); each time is the "
        f"fastest of {REPEATS} repetitions (vmapped: {', '.join(f'{x:.2f}' for x in t['vmapped_seconds_all'])} s; "
        f"sequential: {', '.join(f'{x:.2f}' for x in t['sequential_measured_seconds_all'])} s)"
        ".  Wall-clock times on a shared 2-core CPU machine, noisy.",
        "",
        f"Why `vmap` {'gains little' if t['ratio_sequential_over_vmapped'] >= 1 else 'is no faster'} here: "
        f"the dense layers alone are about {t['gflop_per_model_estimate']:.2f} GFLOP "
        f"per model (6 flops per weight per example, forward and backward), so the vmapped program ran at "
        f"≈{t['vmapped_gflop_per_s']:.0f} GFLOP/s and the sequential loop at ≈{t['sequential_gflop_per_s']:.0f} "
        "GFLOP/s: similar rates (compare the spread of the repetitions above), both set by the arithmetic "
        "on this 2-core CPU.  What `vmap` removes -- the per-step overhead of small kernels, one dispatch per "
        "model -- is a small part of a 64-32-10 step on batches of 32 here, and batching the 48 small matrix "
        "products does not make the arithmetic itself cheaper.  "
        "The gain grows with that overhead (smaller models or batches, an accelerator that one small model "
        "leaves idle); that is not measured here.",
        "",
        "## vmapped = sequential",
        "",
        f"Asserted: seed {p['seed']}, lr {p['lr']:g}: final parameters equal to within {e['tolerance']:g} "
        f"(max |difference| {p['max_abs_param_diff']:.2g}) and the same test accuracy.  Over all "
        f"{e['pairs_compared']} pairs compared: {e['pairs_params_within_tol']} have every parameter within "
        f"{e['tolerance']:g} (max |difference| among finite runs {e['max_abs_param_diff_finite']:.2g}), "
        f"{e['pairs_test_accuracy_equal']} the same test accuracy.  The batched and the single-model matrix "
        "products may round differently; training amplifies those last-bit differences, the more the larger "
        "the rate (at the edge of stability they grow to visible size):",
        "",
        common.md_table(["learning rate", "pairs", f"params within {e['tolerance']:g}", "max |difference| (finite)",
                         "same test accuracy", "non-finite (both diverged)"],
                        [[f"{r['lr']:g}", r["pairs"], r["pairs_within_tol"],
                          "—" if not np.isfinite(r["max_abs_param_diff"]) else f"{r['max_abs_param_diff']:.2g}",
                          r["pairs_test_accuracy_equal"], r["pairs_non_finite"]] for r in e["by_lr"]]),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
