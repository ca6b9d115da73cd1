"""What ``fnbp.curvature`` buys, in three parts (``--parts``, default all three):

overhead -> curvature.md/.json
    Each ``fnbp.curvature`` / ``fnbp.per_example`` quantity's time relative to one ordinary backward of the same
    model (BackPACK's overhead figure's layout), side by side and interleaved (each round times every variant
    once; the median over rounds, divided by the plain backward's median).  Every variant is jit-compiled and
    warmed up once before the rounds.  The plain backward is the explicit walker's gradient of the mean softmax
    cross-entropy (``fnbp.graph.value_and_grad`` on the model's graph).  784-512-512-10 at B = 128, the LeNet
    (28 x 28) at B = 64.
laplace -> curvature_laplace.md/.json/.png
    A diagonal Laplace approximation of the digits MLP (64-128-10 ReLU, sklearn digits): the MAP of the mean
    cross-entropy plus a Gaussian prior, the posterior N(theta_MAP, diag(1 / (GGN_diag + tau))) with GGN_diag
    = ``fnbp.curvature.diag_ggn`` of the summed loss over the training images, the prior precision tau chosen
    on held-out training images by the Laplace predictive's NLL, and the predictive p(y | x) ~ 1/S sum_s
    softmax f(x; theta_s), theta_s drawn from the posterior (the sampled "NN predictive").  Confidence
    (mean max-probability), predictive entropy and accuracy on the test digits, on the test digits rotated by
    0..180 degrees, and on uniform-noise images; AUROC of telling test digits from each other set by the
    max-probability.
kfac -> curvature_kfac.md/.json/.png
    ``fnbp.optim.kfac`` (sampled factors ``fnbp.curvature.kfac`` every step) against Adam and SGD on the MNIST MLP
    (784-512-512-10 ReLU, mini-batches of 128, the same initialisation and batches): test accuracy against
    steps and against the training steps' wall time (evaluation excluded).

    python -m experiments.curvature                     # all three at full size
    python -m experiments.curvature --parts laplace     # one part
    python -m experiments.curvature --quick             # tiny models, few rounds/steps: a smoke run
"""
import functools
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import fnbp  # noqa: E402
from experiments import common  # noqa: E402
from fnbp import curvature, graph, losses, nn, per_example  # noqa: E402
from fnbp.objective import objective  # noqa: E402

LOSS = losses.softmax_cross_entropy


def variants(model, params, x, d, key):
    def backward(p):
        net = objective(model.graph(p, train=True), LOSS)
        return graph.value_and_grad(net, p, {"x": x, "d": d})[1]

    kw = dict(model=model, loss=LOSS)
    return {
        "backward (baseline)": backward,
        "batch_l2": lambda p: per_example.batch_l2(p, x, d, **kw),
        "sum_grad_squared": lambda p: per_example.sum_grad_squared(p, x, d, **kw),
        "variance": lambda p: per_example.variance(p, x, d, **kw),
        "diag_ggn_mc": lambda p: curvature.diag_ggn_mc(p, x, d, key=key, **kw),
        "kfac": lambda p: curvature.kfac(p, x, d, key=key, **kw),
        "kflr": lambda p: curvature.kflr(p, x, d, **kw),
        "diag_ggn": lambda p: curvature.diag_ggn(p, x, d, **kw),
        "diag_hessian": lambda p: curvature.diag_hessian(p, x, d, **kw),
    }


def measure(model, input_shape, batch, rounds, seed):
    key = jax.random.key(seed)
    params, _ = model.init(key, input_shape)
    x = jax.random.normal(jax.random.fold_in(key, 1), (batch,) + tuple(input_shape))
    d = jax.random.randint(jax.random.fold_in(key, 2), (batch,), 0, 10)
    fns = {name: jax.jit(fn) for name, fn in variants(model, params, x, d, jax.random.fold_in(key, 3)).items()}
    for fn in fns.values():
        jax.block_until_ready(fn(params))
    times = {name: [] for name in fns}
    for _ in range(rounds):                      # interleaved: every variant once per round
        for name, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(params))
            times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    base = med["backward (baseline)"]
    return {name: {"median_ms": 1e3 * m, "ratio": m / base} for name, m in med.items()}



PARTS = ("overhead", "laplace", "kfac")


def overhead_part(args):
    rounds = min(args.rounds, 5) if args.quick else args.rounds
    if args.quick:
        cases = {"MLP 64-32-32-10, B = 32": (nn.mlp([64, 32, 32, 10]), (64,), 32),
                 "LeNet 8x8 (4, 6 channels), B = 16": (nn.lenet((8, 8, 1), channels=(4, 6), hidden=(16,)),
                                                       (8, 8, 1), 16)}
    else:
        cases = {"MLP 784-512-512-10, B = 128": (nn.mlp([784, 512, 512, 10]), (784,), 128),
                 "LeNet 28x28, B = 64": (nn.lenet((28, 28, 1)), (28, 28, 1), 64)}
    t0 = time.perf_counter()
    res, md = {}, ["# Curvature quantities: overhead vs one ordinary backward", "",
                   f"Median of {rounds} interleaved rounds per variant (jit-compiled, warmed up)."
                   + (" --quick: tiny models, a loaded machine: smoke figures only." if args.quick else ""), ""]
    for title, (model, shape, batch) in cases.items():
        res[title] = r = measure(model, shape, batch, rounds, args.seed)
        md += [f"## {title}", "", common.md_table(["quantity", "median ms", "x backward"],
                                                  [[k, common.fmt(v["median_ms"]), common.fmt(v["ratio"], 3)]
                                                   for k, v in r.items()]), ""]
    text = "\n".join(md)
    common.write_results(args.out, "curvature", text, res, args=args, seconds=time.perf_counter() - t0)
    print(text)
    return res


# --- Laplace approximation of the digits MLP ------------------------------------------------------------------
def _train_map(model, params, x, d, *, prior, steps, batch, lr, seed):
    """MAP of E(theta) = mean_n CE_n + prior / (2 N) ||theta||^2 (the Gaussian prior N(0, 1/prior) of the summed
    loss, over N) by Adam on shuffled mini-batches."""
    N = x.shape[0]
    opt = fnbp.optim.adam(lr)

    @jax.jit
    def step(p, state, xb, db):
        net = objective(model.graph(p, train=True), LOSS)
        g = graph.value_and_grad(net, p, {"x": xb, "d": db})[1]
        g = jax.tree_util.tree_map(lambda gi, pi: gi + prior / N * pi, g, p)
        updates, state = opt.update(g, state, p)
        return fnbp.optim.apply_updates(p, updates), state

    rng, state = np.random.default_rng(seed), opt.init(params)
    order = np.empty(0, int)
    for _ in range(steps):
        if order.size < batch:
            order = np.concatenate([order, rng.permutation(N)])
        idx, order = order[:batch], order[batch:]
        params, state = step(params, state, x[idx], d[idx])
    return params


def _entropy(p):
    return -np.sum(p * np.log(np.clip(p, 1e-30, None)), axis=-1)


def _auroc(in_scores, out_scores):
    """P(score of an in-distribution input > an out-of-distribution one's), ties counted half (Mann-Whitney)."""
    a, b = np.asarray(in_scores)[:, None], np.asarray(out_scores)[None, :]
    return float(np.mean((a > b) + 0.5 * (a == b)))


def _rotate(x, angle):
    """8 x 8 digits (n, 64) rotated by ``angle`` degrees about the centre (bilinear, zeros outside)."""
    from scipy import ndimage         # scikit-learn's own dependency
    imgs = x.reshape(-1, 8, 8)
    out = ndimage.rotate(imgs, angle, axes=(1, 2), reshape=False, order=1, mode="constant", cval=0.0)
    return np.clip(out, 0.0, 1.0).reshape(x.shape).astype(x.dtype)


def laplace_part(args):
    t0 = time.perf_counter()
    quick = args.quick
    ds = fnbp.data.load_digits(seed=args.seed)
    fit, val = fnbp.data.stratified_split(ds.y_train, 0.2, args.seed)      # tau is chosen on val, never on test
    x_fit, d_fit = jnp.asarray(ds.x_train[fit]), jnp.asarray(ds.y_train[fit])
    x_val, d_val = jnp.asarray(ds.x_train[val]), np.asarray(ds.y_train[val])
    x_te, d_te = np.asarray(ds.x_test), np.asarray(ds.y_test)
    hidden = 32 if quick else 128
    model = nn.mlp([64, hidden, 10])
    params, _ = model.init(jax.random.key(args.seed), (64,))
    prior_map = 1.0
    params = _train_map(model, params, x_fit, d_fit, prior=prior_map, steps=200 if quick else 3000, batch=64,
                        lr=3e-3, seed=args.seed)
    N = x_fit.shape[0]
    ggn = curvature.diag_ggn(params, x_fit, d_fit, model=model,
                             loss=functools.partial(LOSS, reduction="sum"))         # sum_n diag(J_n^T H_n J_n)
    samples = 10 if quick else 50
    key = jax.random.key(args.seed + 1)
    eps = [jax.random.normal(k, (samples,) + p.shape, p.dtype)
           for k, p in zip(jax.random.split(key, len(jax.tree_util.tree_leaves(params))),
                           jax.tree_util.tree_leaves(params))]
    treedef = jax.tree_util.tree_structure(params)
    eps = jax.tree_util.tree_unflatten(treedef, eps)                  # the same draws for every tau and input set
    forward = jax.jit(lambda p, x: jax.nn.softmax(model(p, x), axis=-1))

    @jax.jit
    def predictive(tau, x):
        def one(e):
            theta = jax.tree_util.tree_map(lambda m, g, z: m + z / jnp.sqrt(g + tau), params, ggn, e)
            return jax.nn.softmax(model(theta, x), axis=-1)
        return jnp.mean(jax.lax.map(one, eps), axis=0)

    def jacobians(x):
        """Per-example Jacobians d f(x_n) / d theta, params' structure with leading (n, C) axes (reverse mode
        through the rules, vmapped over examples, in chunks)."""
        jac = jax.jit(jax.vmap(lambda xi: jax.jacrev(lambda p: model(p, xi[None])[0])(params)))
        parts = [jac(x[i:i + 128]) for i in range(0, x.shape[0], 128)]
        return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *parts)

    z = jax.random.normal(jax.random.fold_in(key, 1), (100, 10))        # the same draws for every input

    @jax.jit
    def linearised(tau, f, J):
        """The GLM predictive: f_lin ~ N(f(x; theta_MAP), J diag(sigma^2) J^T), sigma^2 = 1 / (GGN_diag + tau),
        E softmax by 100 draws of the logits per input."""
        cov = sum(jnp.einsum("nc...,nd...,...->ncd", Jl, Jl, 1.0 / (g + tau))
                  for Jl, g in zip(jax.tree_util.tree_leaves(J), jax.tree_util.tree_leaves(ggn)))
        L = jnp.linalg.cholesky(cov + 1e-9 * jnp.eye(10, dtype=cov.dtype))
        logits = f[None] + jnp.einsum("ncd,sd->snc", L, z)
        return jnp.mean(jax.nn.softmax(logits, axis=-1), axis=0)

    def nll(p, d):
        return float(-np.mean(np.log(np.clip(p[np.arange(len(d)), d], 1e-30, None))))

    # tau by the Laplace evidence at theta_MAP (MacKay; the prior N(0, I / tau) on all P parameters):
    # log Z(tau) = -L(theta_MAP) - tau/2 ||theta_MAP||^2 + P/2 log tau - 1/2 sum_k log(GGN_k + tau) (+ const)
    leaves, ggn_leaves = jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ggn)
    P, sq = sum(v.size for v in leaves), float(sum(jnp.sum(v ** 2) for v in leaves))
    taus = [float(t) for t in np.logspace(-2, 4, 61)]
    log_evidence = {t: float(-t / 2 * sq + P / 2 * np.log(t) - 0.5 * sum(jnp.sum(jnp.log(g + t)) for g in ggn_leaves))
                    for t in taus}
    tau_ev = max(log_evidence, key=log_evidence.get)
    f_val, J_val = model(params, x_val), jacobians(x_val)
    val_taus = taus[::6]
    val_nll = {t: nll(np.asarray(linearised(t, f_val, J_val)), d_val) for t in val_taus}
    tau_val = min(val_nll, key=val_nll.get)
    methods = {"Laplace linearised (tau: evidence)": lambda x, f, J: linearised(tau_ev, f, J),
               "Laplace sampled (tau: evidence)": lambda x, f, J: predictive(tau_ev, x),
               "Laplace linearised (tau: held-out NLL)": lambda x, f, J: linearised(tau_val, f, J)}
    map_val_nll = nll(np.asarray(forward(params, x_val)), d_val)

    rng = np.random.default_rng(args.seed)
    angles = [0, 15, 30, 45, 60, 90, 120, 180] if not quick else [0, 45, 90]
    sets = {f"test rotated {a}°": (_rotate(x_te, a) if a else x_te, d_te) for a in angles}
    sets["uniform noise"] = (rng.uniform(0, 1, x_te.shape).astype(x_te.dtype), None)
    probs = {}
    for name, (x, _) in sets.items():
        f, J = model(params, jnp.asarray(x)), jacobians(jnp.asarray(x))
        probs[name] = {"MAP": np.asarray(forward(params, x))}
        probs[name].update({m: np.asarray(fn(x, f, J)) for m, fn in methods.items()})
    METHODS = list(probs["uniform noise"])
    rows, table = {}, []
    for name, (x, d) in sets.items():
        row = {}
        for method, p in probs[name].items():
            conf = p.max(-1)
            row[method] = {"confidence": float(conf.mean()), "entropy": float(_entropy(p).mean()),
                           "accuracy": None if d is None else float(np.mean(p.argmax(-1) == d)),
                           "nll": None if d is None else nll(p, d),
                           "auroc_vs_test": (None if name == "test rotated 0°" else
                                             _auroc(probs["test rotated 0°"][method].max(-1), conf))}
            table.append([name, method] + [common.fmt(row[method][k], 3) for k in ("accuracy", "nll", "confidence",
                                                                                   "entropy", "auroc_vs_test")])
        rows[name] = row
    res = {"model": f"64-{hidden}-10 ReLU", "n_fit": int(N), "n_val": int(len(val)), "prior_map": prior_map,
           "samples": samples, "tau_evidence": tau_ev, "tau_heldout_nll": tau_val,
           "log_evidence": {str(t): v for t, v in log_evidence.items()},
           "heldout_nll_linearised": {str(t): v for t, v in val_nll.items()},
           "map_val_nll": map_val_nll, "sets": rows}
    md = ["# Diagonal Laplace approximation of the digits MLP", "",
          f"64-{hidden}-10 ReLU on the sklearn digits: MAP by Adam on {N} training images (mean cross-entropy plus "
          f"the prior {prior_map} / (2N) ||theta||^2).  Posterior N(theta_MAP, diag(1 / (GGN_diag + tau))), "
          "GGN_diag = `fnbp.curvature.diag_ggn` of the summed loss over those images.  Two predictives: "
          f"*sampled* (the mean softmax of the network at {samples} posterior draws of theta) and *linearised* "
          "(the GLM predictive: logits ~ N(f(x; theta_MAP), J diag(sigma^2) J^T), J from reverse mode through "
          "the rules, the mean softmax over 100 draws of the logits).  The prior precision tau: by the Laplace "
          f"evidence at theta_MAP (over {common.fmt(taus[0])}..{common.fmt(taus[-1])}): tau = {common.fmt(tau_ev, 3)}; "
          f"or by the linearised predictive's NLL on {len(val)} held-out training images: tau = "
          f"{common.fmt(tau_val, 3)} (NLL {common.fmt(val_nll[tau_val], 4)}; MAP's {common.fmt(map_val_nll, 4)}).",
          "",
          common.md_table(["inputs", "predictive", "accuracy", "NLL", "confidence", "entropy", "AUROC vs test"],
                          table), "",
          "confidence: mean max-probability; entropy: mean predictive entropy (nats; ln 10 = 2.303 is uniform); "
          "AUROC: telling the (unrotated) test digits from that set by the max-probability (0.5: chance)."]
    fig, (ax1, ax2) = common.plt.subplots(1, 2, figsize=(11, 4))
    rot = [(a, f"test rotated {a}°") for a in angles]
    shown = METHODS[:3]          # MAP, linearised and sampled at the evidence's tau (the held-out tau ~ MAP)
    for method, color in zip(shown, ("C0", "C1", "C2")):
        ax1.plot([a for a, _ in rot], [rows[n][method]["confidence"] for _, n in rot], "o-", color=color,
                 label=f"confidence, {method}")
    ax1.plot([a for a, _ in rot], [rows[n]["MAP"]["accuracy"] for _, n in rot], "s:", color="k",
             label="accuracy (MAP)")
    ax1.set(xlabel="rotation of the test digits (degrees)", ylabel="mean max-probability / accuracy",
            title="confidence against accuracy, rotated digits")
    ax1.legend(fontsize=7, loc="upper right")
    bins = np.linspace(0.1, 1.0, 31)
    for method, color in zip(shown, ("C0", "C1", "C2")):
        for name, ls in (("test rotated 0°", "-"), ("uniform noise", "--")):
            ax2.hist(probs[name][method].max(-1), bins=bins, histtype="step", color=color, ls=ls, density=True,
                     label=f"{method}: {'test digits' if name.startswith('test') else 'noise'}")
    ax2.set(xlabel="max-probability", ylabel="density", title="test digits (solid) vs noise images (dashed)")
    ax2.legend(fontsize=7, loc="upper center")
    common.save_figure(fig, args.out, "curvature_laplace.png")
    md += ["", "![confidence and accuracy](curvature_laplace.png)"]
    text = "\n".join(md)
    common.write_results(args.out, "curvature_laplace", text, res, args=args, seconds=time.perf_counter() - t0)
    print(text)
    return res


# --- K-FAC vs Adam vs SGD on the MNIST MLP ---------------------------------------------------------------------
def _make_step(model, opt, use_factors):
    def step(p, state, x, d, key):
        net = objective(model.graph(p, train=True), LOSS)
        (E, _), g = graph.value_and_grad(net, p, {"x": x, "d": d})
        extra = {"factors": curvature.kfac(p, x, d, key=key, model=model, loss=LOSS)} if use_factors else {}
        updates, state = opt.update(g, state, p, **extra)
        return fnbp.optim.apply_updates(p, updates), state, E
    return jax.jit(step)


def kfac_part(args):
    t0 = time.perf_counter()
    quick = args.quick
    ds, split = common.load_dataset("mnist", seed=args.seed, data_dir=args.data_dir, n_train=1024 if quick else None)
    sizes = [784, 32, 10] if quick else [784, 512, 512, 10]
    steps, every, batch = (30, 10, 64) if quick else (args.kfac_steps, 25, 128)
    model = nn.mlp(sizes)
    params0, _ = model.init(jax.random.key(args.seed), (784,))
    x_tr, d_tr = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    x_te, d_te = jnp.asarray(ds.x_test), np.asarray(ds.y_test)
    predict = jax.jit(lambda p: jnp.argmax(model(p, x_te), axis=-1))
    rng = np.random.default_rng(args.seed)
    N = x_tr.shape[0]
    batches = np.concatenate([rng.permutation(N) for _ in range(steps * batch // N + 1)])[:steps * batch]
    batches = batches.reshape(steps, batch)                     # the same batches for every optimizer
    optimizers = {"SGD": (fnbp.optim.sgd(args.sgd_lr), f"SGD, rate {args.sgd_lr}"),
                  "Adam": (fnbp.optim.adam(args.adam_lr), f"Adam, rate {args.adam_lr}"),
                  "K-FAC": (fnbp.optim.kfac(args.kfac_lr, damping=args.kfac_damping, inverse_every=10),
                           f"K-FAC, rate {args.kfac_lr}, damping {args.kfac_damping}, decay 0.95, "
                           "inverses every 10 steps")}
    curves = {}
    for name, (opt, label) in optimizers.items():
        step = _make_step(model, opt, name == "K-FAC")
        p, state = common.fresh_copy(params0), opt.init(params0)
        jax.block_until_ready(step(p, state, x_tr[batches[0]], d_tr[batches[0]], jax.random.key(0)))   # compile
        keys = jax.random.split(jax.random.key(args.seed + 2), steps)
        acc = float(np.mean(np.asarray(predict(p)) == d_te))
        curve = {"label": label, "step": [0], "seconds": [0.0], "test_accuracy": [acc], "loss": []}
        clock = 0.0
        for k in range(steps):
            t = time.perf_counter()
            p, state, E = step(p, state, x_tr[batches[k]], d_tr[batches[k]], keys[k])
            jax.block_until_ready(p)
            clock += time.perf_counter() - t
            curve["loss"].append(float(E))
            if (k + 1) % every == 0 or k + 1 == steps:
                curve["step"].append(k + 1)
                curve["seconds"].append(clock)
                curve["test_accuracy"].append(float(np.mean(np.asarray(predict(p)) == d_te)))
        curves[name] = curve
        common.log(f"{label}: test accuracy {curve['test_accuracy'][-1]:.4f} after {steps} steps, {clock:.1f} s")
    target = curves["Adam"]["test_accuracy"][-1]

    def first_reaching(c):
        hit = [i for i, a in enumerate(c["test_accuracy"]) if a >= target]
        return (c["step"][hit[0]], c["seconds"][hit[0]]) if hit else (None, None)

    table = []
    for name, c in curves.items():
        s_hit, t_hit = first_reaching(c)
        c["reaches_adam_final"] = {"step": s_hit, "seconds": t_hit}
        table.append([c["label"], common.fmt(c["test_accuracy"][-1], 4), common.fmt(max(c["test_accuracy"]), 4),
                      common.fmt(s_hit), common.fmt(t_hit, 3), common.fmt(1e3 * c["seconds"][-1] / steps, 3)])
    res = {"model": "-".join(map(str, sizes)) + " ReLU", "split": split, "batch": batch, "steps": steps,
           "adam_final_accuracy": target, "curves": curves}
    md = ["# K-FAC vs Adam vs SGD on the MNIST MLP", "",
          f"{res['model']}, softmax cross-entropy, {split}; mini-batches of {batch}, the same initialisation and "
          f"batches for each optimizer, {steps} steps; test accuracy every {every} steps.  K-FAC's factors are "
          "`fnbp.curvature.kfac` (one sampled column per example) of each step's batch.  Wall time: the training "
          "steps only (jit-compiled, compilation and evaluation excluded), on a shared CPU.  Rates: SGD's and Adam's "
          "are those `experiments/mnist_mlp.py`'s validation search chose for this network (constant); K-FAC's "
          "were not searched.", "",
          common.md_table(["optimizer", "final test acc", "best test acc", "first step >= Adam's final",
                           "seconds to it", "ms / step"], table), "",
          "![test accuracy against steps and wall time](curvature_kfac.png)"]
    fig, (ax1, ax2) = common.plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, c in curves.items():
        ax1.plot(c["step"], c["test_accuracy"], label=name)
        ax2.plot(c["seconds"], c["test_accuracy"], label=name)
    for ax in (ax1, ax2):
        ax.axhline(target, color="grey", lw=0.7, ls=":")
        ax.set_ylim(max(0.0, min(min(c["test_accuracy"][1:] or [0]) for c in curves.values()) - 0.02), 1.0)
    ax1.set(xlabel="step", ylabel="test accuracy", title="against steps (dotted: Adam's final)")
    ax2.set(xlabel="wall time of the steps (s)", title="against wall time")
    ax1.legend(fontsize=8, loc="lower right")
    common.save_figure(fig, args.out, "curvature_kfac.png")
    text = "\n".join(md)
    common.write_results(args.out, "curvature_kfac", text, res, args=args, seconds=time.perf_counter() - t0)
    print(text)
    return res


def main(argv=None):
    def add(p):
        p.add_argument("--parts", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS))
        p.add_argument("--rounds", type=int, default=30, help="overhead: timing rounds")
        p.add_argument("--data-dir", type=Path, default=None, help="kfac: the MNIST IDX files (default: "
                       "$FNBP_MNIST_DIR, else ../shared/data/mnist from the repository root)")
        p.add_argument("--kfac-steps", type=int, default=600, help="kfac: training steps per optimizer")
        p.add_argument("--sgd-lr", type=float, default=0.3)
        p.add_argument("--adam-lr", type=float, default=0.003)
        p.add_argument("--kfac-lr", type=float, default=0.1)
        p.add_argument("--kfac-damping", type=float, default=0.01)
    args = common.parse_args("curvature quantities: overhead, a Laplace approximation, K-FAC", argv,
                             add_arguments=add)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    if not parts or any(s not in PARTS for s in parts):
        raise SystemExit(f"experiments/curvature.py: --parts must be a comma-separated list of {list(PARTS)}, got "
                         f"{args.parts!r}")
    run = {"overhead": overhead_part, "laplace": laplace_part, "kfac": kfac_part}
    return {part: run[part](args) for part in parts}


if __name__ == "__main__":
    main()
