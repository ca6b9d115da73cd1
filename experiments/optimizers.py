"""Every optimizer of fnbp.optim: trajectories on 2-D surfaces, loss curves on digits, learning-rate schedules.

1. 2-D surfaces (Rosenbrock, Beale, a saddle point, a narrow rotated valley): each optimizer runs a fixed
   number of steps from the same start, with its learning rate picked from a log grid (``choose_lr``: the
   fastest of those that end nearest the minimum; all grid points run at once with ``jax.vmap`` over the
   learning rate, in one ``jit`` for every optimizer and surface).  Trajectories over contour plots (one PNG per
   surface) and a table of final losses.
2. Digits: the baseline network (64-32-10 ReLU, batch 64, L2 1e-3, glorot) trained with each optimizer at
   a fixed, documented learning rate (``DIGITS_LR``) -- loss curves PNG + table.
3. Learning-rate schedules on digits: constant, inverse decay η₀/(1 + kδ) and exponential decay
   η₀·exp(−kδ) for SGD and Adam (δ chosen so that both decays end at η₀/10) -- PNG + table.

Nesterov (look-ahead form) gets its gradient at ``fnbp.optim.lookahead_params(params, state)`` in the
2-D loop, as ``fnbp.train`` does for the digits runs.

    python experiments/optimizers.py [--quick] [--seed 0] [--out DIR]
"""
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import common  # noqa: E402

NAME = "optimizers"
OPTIMIZERS = ("sgd", "momentum", "ema_momentum", "nesterov", "simplified_nesterov", "adagrad", "rmsprop",
              "adadelta", "adam", "delta_bar_delta")


# ----------------------------------------------------------------------------- 2-D surfaces
def rosenbrock(p):
    x, y = p[0], p[1]
    return (1 - x) ** 2 + 100 * (y - x ** 2) ** 2


def beale(p):
    x, y = p[0], p[1]
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y ** 2) ** 2 + (2.625 - x + x * y ** 3) ** 2


def saddle(p):
    x, y = p[0], p[1]
    return x ** 2 + y ** 4 / 4 - y ** 2 / 2


def valley(p):
    x, y = p[0], p[1]
    return 0.005 * (x + y) ** 2 + 0.5 * (x - y) ** 2


SURFACES = {
    # name: (function, formula, start, minimiser, f*, plot window (x0, x1, y0, y1))
    "rosenbrock": (rosenbrock, "(1 − x)² + 100(y − x²)²", (-1.2, 1.0), (1.0, 1.0), 0.0, (-2.0, 2.0, -1.0, 3.0)),
    "beale": (beale, "(1.5 − x + xy)² + (2.25 − x + xy²)² + (2.625 − x + xy³)²", (1.0, 1.5), (3.0, 0.5), 0.0,
              (-1.0, 4.5, -1.5, 2.5)),
    "saddle": (saddle, "x² + y⁴/4 − y²/2 (saddle at 0, minima (0, ±1))", (1.5, 1e-3), (0.0, 1.0), -0.25,
               (-2.0, 2.0, -1.6, 1.6)),
    "valley": (valley, "0.005(x + y)² + 0.5(x − y)² (narrow valley along x = y, condition 100)", (-4.0, 0.0),
               (0.0, 0.0), 0.0, (-5.0, 2.0, -4.5, 2.0)),
}

# Line styles: ema_momentum (η = 10× momentum's) and simplified_nesterov retrace momentum's and nesterov's
# paths, so they are dotted and wider, to stay visible on top of their twins.
STYLE = {"sgd": ("-", 1.4), "momentum": ("-", 1.4), "ema_momentum": (":", 2.6), "nesterov": ("-", 1.4),
         "simplified_nesterov": (":", 2.6), "adagrad": ("--", 1.4), "rmsprop": ("--", 1.4), "adadelta": ("--", 1.4),
         "adam": ("--", 1.4), "delta_bar_delta": ("-.", 1.4)}

GAP_FLOOR = 1e-10       # log-gaps are floored here (float32 cannot resolve much less on these surfaces)
TOL = 1e-4              # "steps to reach f − f* ≤ TOL"


def make_optimizer(name, lr):
    from fnbp import optim
    return getattr(optim, name)(lr)


def surface_runs(names, lrs, steps):
    """Trajectories (n_lr, steps + 1, 2) and losses (n_lr, steps + 1) of every optimizer in ``names`` on every
    surface, as ``{name: {surface: (traj, losses)}}``: one jit for everything, vmapped over the learning rates."""
    from fnbp import optim

    def run_one(name, lr, f, start):
        opt = make_optimizer(name, lr)
        p0 = jnp.asarray(start, jnp.float32)

        def body(carry, _):
            p, s = carry
            g = jax.grad(f)(optim.lookahead_params(p, s))      # = p except for nesterov (look-ahead)
            u, s = opt.update(g, s, p)
            p = optim.apply_updates(p, u)
            return (p, s), p

        _, traj = jax.lax.scan(body, (p0, opt.init(p0)), None, length=steps)
        traj = jnp.concatenate([p0[None], traj])
        return traj, jax.vmap(f)(traj)

    @jax.jit
    def everything(lrs):
        return {name: {s: jax.vmap(lambda lr: run_one(name, lr, f, start))(lrs)
                       for s, (f, _, start, *_) in SURFACES.items()} for name in names}

    return jax.tree_util.tree_map(np.asarray, everything(jnp.asarray(lrs, jnp.float32)))


def score(losses, f_star):
    """Mean over the run of log10(max(f_k − f*, 1e-10)): rewards fast and deep convergence; inf if the run
    ever leaves the finite range (diverged)."""
    gap = np.maximum(losses - f_star, GAP_FLOOR)
    s = np.mean(np.log10(gap), axis=-1)
    return np.where(np.all(np.isfinite(losses), axis=-1), s, np.inf)


def end_quality(losses, f_star):
    """log10 of the worst gap over the last 10% of the run (floored at 1e-10): where the run ends up, robustly
    (a run that reaches the minimum and is thrown out again near the end scores badly); inf if diverged."""
    tail = losses[..., -max(1, losses.shape[-1] // 10):]
    q = np.log10(np.maximum(np.max(tail - f_star, axis=-1), GAP_FLOOR))
    return np.where(np.all(np.isfinite(losses), axis=-1), q, np.inf)


def choose_lr(losses, f_star):
    """Index of the chosen learning rate: among the runs that end within half a decade of the best end quality
    (``end_quality``), the one with the lowest ``score`` (the fastest)."""
    q, sc = end_quality(losses, f_star), score(losses, f_star)
    ok = q <= np.min(q) + 0.5
    return int(np.argmin(np.where(ok, sc, np.inf)))


def steps_to_tol(losses, f_star):
    hit = np.flatnonzero(losses - f_star <= TOL)
    return int(hit[0]) if hit.size else None


def run_surfaces(args):
    steps = 150 if args.quick else 2000
    lrs = np.logspace(-5, 1, 9 if args.quick else 25)
    with common.Timer() as t:
        res_all = surface_runs(OPTIMIZERS, lrs, steps)
    common.log(f"surfaces: {len(OPTIMIZERS)} optimizers x {len(SURFACES)} surfaces x {len(lrs)} learning rates x "
               f"{steps} steps in {t.seconds:.1f} s (one jit)")
    out = {}
    for name in OPTIMIZERS:
        for surf, (traj, losses) in res_all[name].items():
            f_star = SURFACES[surf][4]
            sc = score(losses, f_star)
            i = choose_lr(losses, f_star)
            out.setdefault(surf, {})[name] = {
                "lr": float(lrs[i]), "score": float(sc[i]), "final_loss": float(losses[i, -1]),
                "final_point": traj[i, -1].tolist(), "steps_to_tol": steps_to_tol(losses[i], f_star),
                "trajectory": traj[i].tolist(), "loss": losses[i].tolist(),
                "n_diverged": int(np.sum(~np.isfinite(sc))),
            }
        common.log(f"surfaces  {name:20s} " + "  ".join(
            f"{s}: lr {out[s][name]['lr']:.2g} f {out[s][name]['final_loss']:.3g}" for s in SURFACES))
    return {"steps": steps, "lr_grid": lrs.tolist(), "surfaces": out}


def plot_surface(out, surf, data):
    plt = common.plt
    f, formula, start, xmin, f_star, (x0, x1, y0, y1) = SURFACES[surf]
    X, Y = np.meshgrid(np.linspace(x0, x1, 300), np.linspace(y0, y1, 300))
    Z = np.asarray(jax.vmap(jax.vmap(lambda a, b: f(jnp.stack([a, b]))))(jnp.asarray(X), jnp.asarray(Y)))
    gap = np.maximum(Z - f_star, 1e-4)
    fig, ax = plt.subplots(figsize=(9.5, 6.2))
    levels = np.logspace(np.log10(gap.min()), np.log10(gap.max()), 30)
    ax.contour(X, Y, gap, levels=levels, norm=common.matplotlib.colors.LogNorm(), cmap="Greys", linewidths=0.6,
               alpha=0.8)
    runs = data["surfaces"][surf]
    colors = plt.cm.tab10.colors
    for k, name in enumerate(OPTIMIZERS):
        r = runs[name]
        tr = np.asarray(r["trajectory"])
        ls, lw = STYLE[name]
        ax.plot(tr[:, 0], tr[:, 1], ls, color=colors[k], lw=lw, alpha=0.9,
                label=f"{name} (η={r['lr']:.2g}): f−f*={max(r['final_loss'] - f_star, 0):.2g}")
        ax.plot(tr[-1, 0], tr[-1, 1], "o", color=colors[k], ms=4)
    ax.plot(*start, "ko", ms=7, label="start")
    ax.plot(*xmin, "*", color="gold", mec="k", ms=15, label="minimum")
    if surf == "saddle":
        ax.plot(0, -1, "*", color="gold", mec="k", ms=15)
        ax.plot(0, 0, "kx", ms=9, mew=2, label="saddle point")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(f"{surf}: f = {formula}\n{data['steps']} steps, η per optimizer = best of the grid", fontsize=10)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    return common.save_figure(fig, out, f"{NAME}_{surf}.png")


# ----------------------------------------------------------------------------- digits
# Learning rates for the digits comparison: the best final training loss of a preliminary 20-epoch sweep
# (seed 0) over the grids listed in the markdown (``DIGITS_LR_GRID``); momentum-type methods carry η inside
# the velocity (v <- βv − ηg), so their η is about (1 − β) times sgd's.
DIGITS_LR = {"sgd": 1.0, "momentum": 0.1, "ema_momentum": 1.0, "nesterov": 0.1, "simplified_nesterov": 0.1,
             "adagrad": 0.1, "rmsprop": 0.01, "adadelta": 3.0, "adam": 0.01, "delta_bar_delta": 3.0}
DIGITS_LR_GRID = {"sgd": [0.03, 0.1, 0.3, 1.0, 3.0], "momentum": [0.003, 0.01, 0.03, 0.1, 0.3],
                  "ema_momentum": [0.03, 0.1, 0.3, 1.0, 3.0], "nesterov": [0.003, 0.01, 0.03, 0.1, 0.3],
                  "simplified_nesterov": [0.003, 0.01, 0.03, 0.1, 0.3], "adagrad": [0.01, 0.03, 0.1, 0.3],
                  "rmsprop": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2], "adadelta": [0.3, 1.0, 3.0, 10.0],
                  "adam": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2], "delta_bar_delta": [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]}
SIZES = (64, 32, 10)


def _digits_setup(args):
    from fnbp import data, mlp
    ds = data.load_digits(seed=args.seed, standardize=True)
    k_init, k_train = jax.random.split(jax.random.PRNGKey(args.seed))
    return ds, mlp.init(k_init, SIZES, init="glorot"), k_train


def _train(opt, lr, ds, params0, key, epochs):
    from fnbp.train import Config, train
    res = train(common.fresh_copy(params0), opt, ds, key=key, epochs=epochs, batch_size=64, cfg=Config(l2=1e-3),
                record_learning_rate=lr, progress=False)
    return res.history


def run_digits(args):
    epochs = 2 if args.quick else 40
    names = ("nesterov", "adam") if args.quick else OPTIMIZERS      # quick: look-ahead path + one adaptive
    ds, params0, key = _digits_setup(args)
    out = {}
    for name in names:
        lr = DIGITS_LR[name]
        hist = _train(make_optimizer(name, lr), lr, ds, params0, key, epochs)
        out[name] = {"lr": lr, "history": hist}
        h = hist[-1]
        common.log(f"digits    {name:20s} η={lr:<6g} loss {h['loss']:.4f}  test acc {h['test_accuracy']:.4f}")
    return {"epochs": epochs, "runs": out}


SCHEDULE_ETA0 = (("sgd", DIGITS_LR["sgd"]), ("adam", DIGITS_LR["adam"]))     # the constant η of section 2


def schedule_settings(steps_total, quick=False):
    """(label, optimizer name, η₀, schedule kind, δ) of the schedule comparison: δ such that both decays
    end at η₀/10 at the last of ``steps_total`` steps."""
    last = steps_total - 1                     # k of the last update (k = 0 for the first)
    d_inv = 9.0 / last                         # η₀/(1 + kδ) = η₀/10 at the last step
    d_exp = math.log(10.0) / last              # η₀ exp(−kδ) = η₀/10 at the last step
    rows = []
    for opt_name, eta0 in SCHEDULE_ETA0[:1] if quick else SCHEDULE_ETA0:
        rows += [(f"{opt_name} constant", opt_name, eta0, "constant", 0.0),
                 (f"{opt_name} inverse", opt_name, eta0, "inverse", d_inv),
                 (f"{opt_name} exponential", opt_name, eta0, "exponential", d_exp)]
    return rows


def run_schedules(args):
    from fnbp import optim
    epochs = 2 if args.quick else 40
    ds, params0, key = _digits_setup(args)
    steps_total = epochs * (len(ds.y_train) // 64)
    out = {}
    for label, opt_name, eta0, kind, delta in schedule_settings(steps_total, args.quick):
        lr = {"constant": lambda: optim.constant(eta0), "inverse": lambda: optim.inverse_decay(eta0, delta),
              "exponential": lambda: optim.exponential_decay(eta0, delta)}[kind]()
        hist = _train(make_optimizer(opt_name, lr), lr, ds, params0, key, epochs)
        out[label] = {"optimizer": opt_name, "eta0": eta0, "schedule": kind, "decay": delta, "history": hist}
        h = hist[-1]
        common.log(f"schedule  {label:20s} δ={delta:<9.3g} final η {h['learning_rate']:.3g} loss {h['loss']:.4f}  "
                   f"test acc {h['test_accuracy']:.4f}")
    return {"epochs": epochs, "steps_total": steps_total, "runs": out}


def plot_digits(out, digits, filename, title, style_by_schedule=False):
    plt = common.plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    colors = plt.cm.tab10.colors
    for k, (label, r) in enumerate(digits["runs"].items()):
        hist = r["history"]
        ep = [h["epoch"] for h in hist]
        if style_by_schedule:
            color = colors[0] if r["optimizer"] == "sgd" else colors[3]
            ls = {"constant": "-", "inverse": "--", "exponential": ":"}[r["schedule"]]
            lab = label
        else:
            color, (ls, lw) = colors[k % 10], STYLE.get(label, ("-", 1.4))
            lab = f"{label} (η={r['lr']:g})"
        lw = 1.6 if style_by_schedule else lw
        ax1.plot(ep, [h["loss"] for h in hist], ls, color=color, lw=lw, label=lab)
        ax2.plot(ep, [h["test_accuracy"] for h in hist], ls, color=color, lw=lw, label=lab)
    ax1.set_yscale("log")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss (mean over the epoch's steps, incl. L2)")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("test accuracy")
    ax2.set_ylim(0.85, 1.0)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax2.legend(loc="lower right", fontsize=8, ncol=2)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return common.save_figure(fig, out, filename)


# ----------------------------------------------------------------------------- main
def _strip(surfaces):
    """The JSON keeps trajectories subsampled to at most 201 points per run."""
    out = {}
    for surf, runs in surfaces.items():
        out[surf] = {}
        for name, r in runs.items():
            n = len(r["trajectory"])
            idx = np.unique(np.linspace(0, n - 1, min(n, 201)).astype(int))
            out[surf][name] = {k: v for k, v in r.items() if k not in ("trajectory", "loss")}
            out[surf][name]["trajectory_steps"] = idx.tolist()
            out[surf][name]["trajectory"] = np.asarray(r["trajectory"])[idx].tolist()
            out[surf][name]["loss"] = np.asarray(r["loss"])[idx].tolist()
    return out


def main(argv=None):
    args = common.parse_args("Every fnbp.optim optimizer on 2-D surfaces and on digits, and learning-rate "
                             "schedules on digits.", argv)
    with common.Timer() as timer:
        surf = run_surfaces(args)
        digits = run_digits(args)
        sched = run_schedules(args)
    pngs = [plot_surface(args.out, s, surf) for s in SURFACES]
    png_digits = plot_digits(args.out, digits, f"{NAME}_digits.png",
                             f"Optimizers on digits (64-32-10 ReLU, batch 64, L2 1e-3, constant η, "
                             f"{digits['epochs']} epochs)")
    png_sched = plot_digits(args.out, sched, f"{NAME}_schedules.png",
                            f"Learning-rate schedules on digits (blue: SGD η₀ = {DIGITS_LR['sgd']:g}, "
                            f"red: Adam η₀ = {DIGITS_LR['adam']:g}; "
                            "solid constant, dashed inverse, dotted exponential)", style_by_schedule=True)

    # --- tables ---
    S = surf["surfaces"]
    surf_headers = ["optimizer"] + [f"{s}: f − f* (η)" for s in SURFACES] + [f"{s}: steps to f − f* ≤ {TOL:g}"
                                                                               for s in SURFACES]
    surf_rows = []
    for name in OPTIMIZERS:
        cells = [name]
        for s in SURFACES:
            r = S[s][name]
            cells.append(f"{common.fmt(max(r['final_loss'] - SURFACES[s][4], 0.0), 2)} ({r['lr']:.2g})")
        for s in SURFACES:
            st = S[s][name]["steps_to_tol"]
            cells.append("never" if st is None else str(st))
        surf_rows.append(cells)
    def winner(s):
        reached = [n for n in OPTIMIZERS if S[s][n]["steps_to_tol"] is not None]
        if reached:
            fastest = min(S[s][n]["steps_to_tol"] for n in reached)
            names = [n for n in reached if S[s][n]["steps_to_tol"] == fastest]       # ties: twins of section 1
            return f"{s} {' = '.join(names)} ({fastest} steps)"
        n = min(OPTIMIZERS, key=lambda n: S[s][n]["final_loss"])
        return f"{s} none in {surf['steps']} steps (lowest: {n})"

    dig_rows = []
    for name, r in digits["runs"].items():
        h = r["history"]
        best = max(x["test_accuracy"] for x in h)
        dig_rows.append([name, f"{r['lr']:g}", ", ".join(f"{v:g}" for v in DIGITS_LR_GRID[name]),
                         f"{h[min(4, len(h) - 1)]['loss']:.4f}", f"{h[-1]['loss']:.4f}",
                         f"{h[-1]['train_accuracy']:.4f}",
                         f"{h[-1]['test_accuracy']:.4f}", f"{best:.4f}"])
    dig_final = {n: r["history"][-1] for n, r in digits["runs"].items()}
    dig_acc = [h["test_accuracy"] for h in dig_final.values()]
    dig_lowest = min(dig_final, key=lambda n: dig_final[n]["loss"])
    sched_rows = []
    for label, r in sched["runs"].items():
        h = r["history"]
        sched_rows.append([label, f"{r['eta0']:g}", "—" if r["schedule"] == "constant" else f"{r['decay']:.3g}",
                           f"{h[-1]['learning_rate']:.3g}", f"{h[-1]['loss']:.4f}", f"{h[-1]['train_accuracy']:.4f}",
                           f"{h[-1]['test_accuracy']:.4f}"])
    sched_summary = "; ".join(
        f"{opt}: " + "/".join(f"{r['history'][-1]['loss']:.4f}" for r in sched["runs"].values()
                              if r["optimizer"] == opt)
        for opt in dict.fromkeys(r["optimizer"] for r in sched["runs"].values()))
    e = digits["epochs"]
    headline = (f"fastest to f − f* ≤ {TOL:g}: " + ", ".join(winner(s) for s in SURFACES)
                + f"; digits after {e} epochs: test accuracy {min(dig_acc):.4f}–{max(dig_acc):.4f} over "
                f"{len(dig_acc)} optimizers (lowest final loss: {dig_lowest} {dig_final[dig_lowest]['loss']:.4f})"
                + f"; schedules, final loss constant/inverse/exponential: {sched_summary}")
    md = f"""# Optimizers of fnbp.optim

**{headline}.**

## 1. Trajectories on 2-D surfaces

Each optimizer runs {surf['steps']} steps from the same start (float32).  Its learning rate η is the one of the
log grid {surf['lr_grid'][0]:g} … {surf['lr_grid'][-1]:g} ({len(surf['lr_grid'])} values) chosen in two steps: keep the
runs that *end* within half a decade of the best end (end = the worst gap f_k − f* over the last 10% of the
steps, floored at {GAP_FLOOR:g}; diverged runs are out), then take the fastest of them, the lowest mean over the
run of log10(max(f_k − f*, {GAP_FLOOR:g}));
all grid points run at once (`jax.vmap` over η; one `jit` for every optimizer and surface).  Other
hyperparameters are fnbp's
defaults (β = 0.9; RMSProp ρ = 0.9; AdaDelta ρ = 0.9, ε = 1e-6 and η = 1 is the notes' AdaDelta without a
learning rate; Adam 0.9/0.999; delta-bar-delta κ = 0.05, φ = 0.3, θ = 0.7).  Nesterov takes its gradient at
`fnbp.optim.lookahead_params`.  Two pairs retrace each other by construction: ema_momentum with η is momentum
with (1 − β)η = η/10 (one grid decade apart, so the same path is picked), and simplified_nesterov's iterates
are nesterov's look-ahead points θ + βv (the same path, shifted by βv); they are drawn dotted on top.

| surface | f | start | minimum |
|---|---|---|---|
""" + "\n".join(f"| {s} | {v[1]} | {v[2]} | {v[3]}, f* = {v[4]:g} |" for s, v in SURFACES.items()) + f"""

Final gap f − f* (chosen η in brackets) and the first step with f − f* ≤ {TOL:g}:

{common.md_table(surf_headers, surf_rows)}

""" + "\n".join(f"![{s}]({p.name})" for s, p in zip(SURFACES, pngs)) + f"""

## 2. Loss curves on digits

The baseline network (64-32-10 ReLU, glorot init, batch 64, L2 λ = 1e-3, softmax cross-entropy, digits
standardised, seed {args.seed}) trained for {e} epochs with each optimizer at a constant learning rate: the
value of its grid with the lowest final training loss in a preliminary 20-epoch sweep (seed 0).  Same
initial parameters and shuffling for every optimizer.  "loss" is the mean training loss over the epoch's
steps (L2 term included).

{common.md_table(["optimizer", "η", "sweep grid", "loss after 5 epochs", "final loss", "train acc", "test acc",
                  "best test acc (any epoch)"], dig_rows)}

![digits]({png_digits.name})

## 3. Learning-rate schedules on digits

Same network and data, {e} epochs = {sched['steps_total']} steps, k = step count (k = 0 at the first update).
Constant η₀; inverse decay η₀/(1 + kδ); exponential decay η₀·exp(−kδ); δ chosen so that both decays end at
η₀/10 at the last step.

{common.md_table(["run", "η₀", "δ", "η at the last step", "final loss", "train acc", "test acc"], sched_rows)}

![schedules]({png_sched.name})
"""
    data = {"headline": headline, "surfaces": {"steps": surf["steps"], "lr_grid": surf["lr_grid"],
                                               "runs": _strip(surf["surfaces"])},
            "surface_definitions": {s: {"formula": v[1], "start": v[2], "minimum": v[3], "f_star": v[4]}
                                    for s, v in SURFACES.items()},
            "digits": digits, "schedules": sched, "digits_lr_grid": DIGITS_LR_GRID}
    common.write_results(args.out, NAME, md, data, args=args, seconds=timer.seconds)
    print(headline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
