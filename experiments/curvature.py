"""Overhead of each ``fnbp.curvature`` / ``fnbp.per_example`` quantity relative to one ordinary backward of the same
model (BackPACK's overhead figure's layout), side by side and interleaved (each round times every variant once;
the median over rounds is reported, then divided by the plain backward's median).

    python -m experiments.curvature                 # 784-512-512-10 at B = 128, LeNet (28 x 28) at B = 64
    python -m experiments.curvature --quick         # tiny models, a few rounds: a smoke run, not headline figures

Every variant is jit-compiled and warmed up once before the rounds.  The plain backward is the explicit walker's
gradient of the mean softmax cross-entropy (``fnbp.graph.value_and_grad`` on the model's graph).
"""
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

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


def main(argv=None):
    def add(p):
        p.add_argument("--rounds", type=int, default=30)
    args = common.parse_args("curvature quantities: overhead vs one ordinary backward", argv, add_arguments=add)
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


if __name__ == "__main__":
    main()
