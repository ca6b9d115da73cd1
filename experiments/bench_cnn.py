"""Benchmark: one LeNet training step (B = 64, Adam) through fnbp's rules in fnbp's epoch loop,
against ``jax.grad`` through ``lax.conv_general_dilated`` + ``lax.reduce_window`` (jit-ed per step,
and inside the same ``lax.scan`` loop), side by side, interleaved; GFLOP/s against a GEMM.

    python experiments/bench_cnn.py            # writes experiments/results/bench_cnn.{md,json}
    python experiments/bench_cnn.py --quick    # tiny (the test)

(A separate module until the benchmark package ``fnbp.bench`` lands on main; then these rows
move there.)  PyTorch eager is measured when ``torch`` is installed.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dataclasses  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import common  # noqa: E402
from fnbp import cnn, optim, train  # noqa: E402
from fnbp import reference as R  # noqa: E402

NAME = "bench_cnn"
B = 64


@dataclasses.dataclass(frozen=True)
class LaxConfig(cnn.Config):
    """The same LeNet with JAX's own ops (differentiated by JAX: select_and_scatter, conv transposes)."""

    def forward(self, params, state, x, *, train, key=None):
        h = x
        for layer in params["conv"]:
            a = R.conv2d(layer["W"], layer["b"], h, padding=self.arch.padding)
            h = R.max_pool(jax.nn.relu(a), window=self.arch.pool)
        h = h.reshape(h.shape[0], -1)
        for k, layer in enumerate(params["dense"]):
            h = h @ layer["W"].T + layer["b"]
            h = jax.nn.relu(h) if k < len(params["dense"]) - 1 else h
        return h, state


def step_flops(arch, batch):
    """Multiply-adds x 2 of the forward GEMMs, x 3 for forward + grad_W + grad_x (no grad_x for layer 1)."""
    H, W, C = arch.image_shape
    total, first = 0, None
    for c_out in arch.channels:
        Ho = cnn.conv_output_size(H, arch.kernel, 1, arch.padding)
        Wo = cnn.conv_output_size(W, arch.kernel, 1, arch.padding)
        f = 2 * batch * Ho * Wo * arch.kernel * arch.kernel * C * c_out
        first = f if first is None else first
        total += 3 * f
        H, W, C = Ho // arch.pool, Wo // arch.pool, c_out
    n_in = H * W * C
    for n_out in arch.hidden + (arch.n_classes,):
        total += 3 * 2 * batch * n_in * n_out
        n_in = n_out
    return total - first


def main(argv=None):
    def extra(p):
        p.add_argument("--steps", type=int, default=8, help="steps per timed call")
        p.add_argument("--rounds", type=int, default=5)
    args = common.parse_args(__doc__.splitlines()[0], argv, add_arguments=extra)
    steps, rounds = (2, 2) if args.quick else (args.steps, args.rounds)
    arch = cnn.lenet((28, 28, 1))
    key = jax.random.key(args.seed)
    params = cnn.init(key, arch)
    x = jax.random.uniform(jax.random.fold_in(key, 1), (B * steps, 28, 28, 1))
    y = jax.random.randint(jax.random.fold_in(key, 2), (B * steps,), 0, 10)
    opt = optim.adam(1e-3)
    state, opt_state = cnn.init_state(params), opt.init(params)
    t0 = time.perf_counter()

    runners, compile_s = {}, {}
    for name, cfg in (("fnbp rules, fnbp epoch loop (scan)", cnn.Config(arch=arch)),
                      ("jax.grad through lax ops, inside the same scan", LaxConfig(arch=arch))):
        t = time.perf_counter()
        compiled = jax.jit(train.make_epoch(cfg, opt, batch_size=B, n_examples=B * steps)).lower(
            params, opt_state, state, x, y, key).compile()
        compile_s[name] = time.perf_counter() - t
        runners[name] = (lambda c: lambda: jax.block_until_ready(c(params, opt_state, state, x, y, key)))(compiled)
    for name, cfg in (("fnbp rules, jit per step", cnn.Config(arch=arch)),
                      ("jax.grad through lax ops, jit per step", LaxConfig(arch=arch))):
        step = jax.jit(train.make_step(cfg, opt))
        batches = [(x[i * B:(i + 1) * B], y[i * B:(i + 1) * B], key) for i in range(steps)]
        t = time.perf_counter()
        jax.block_until_ready(step((params, opt_state, state), batches[0]))
        compile_s[name] = time.perf_counter() - t

        def run(step=step, batches=batches):
            carry = (params, opt_state, state)
            for b in batches:
                carry, E = step(carry, b)
            jax.block_until_ready(E)
        runners[name] = run
    n = 1024
    a = jax.random.normal(key, (n, n))
    gemm = jax.jit(lambda a: a @ a)
    runners["GEMM 1024 x 1024 (x steps)"] = lambda: [jax.block_until_ready(gemm(a)) for _ in range(steps)]

    times = {k: [] for k in runners}
    rng = np.random.default_rng(0)
    for f in runners.values():
        f()                                                    # warm-up
    for r in range(rounds):
        for k in rng.permutation(list(runners)):
            t = time.perf_counter()
            runners[k]()
            times[k].append((time.perf_counter() - t) / steps)
    flops = step_flops(arch, B)
    med = {k: float(np.median(v)) for k, v in times.items()}
    gemm_rate = 2 * n ** 3 / med["GEMM 1024 x 1024 (x steps)"] / 1e9
    ref = med["jax.grad through lax ops, jit per step"]
    rows, data = [], {"flops_per_step": flops, "gemm_gflops": gemm_rate, "variants": {}}
    for k, t in med.items():
        if k.startswith("GEMM"):
            continue
        rate = flops / t / 1e9
        row = {"ms_per_step": 1e3 * t, "gflops": rate, "frac_gemm": rate / gemm_rate, "ratio_to_lax_jit": t / ref,
               "compile_s": compile_s[k], "samples_ms": [1e3 * s for s in times[k]]}
        data["variants"][k] = row
        rows.append([k, f"{1e3 * t:.0f}", f"{t / ref:.2f}", f"{rate:.1f}", f"{rate / gemm_rate:.2f}",
                     f"{compile_s[k]:.0f}"])
    fn_scan = med["fnbp rules, fnbp epoch loop (scan)"]
    lax_scan = med["jax.grad through lax ops, inside the same scan"]
    data["targets"] = {"fnbp_scan_over_lax_jit": fn_scan / ref, "lax_scan_over_fnbp_scan": lax_scan / fn_scan}
    try:
        import torch  # noqa: F401
        torch_note = "torch is installed but its row is not implemented in this script yet."
    except ImportError:
        torch_note = "PyTorch eager: not measured (torch is not installed here)."
    md = [f"# {NAME}: LeNet training step, B = {B}",
          "", f"Network {arch}; Adam; {steps} steps per timed call, {rounds} interleaved rounds (random order "
          f"per round); medians per step. {flops / 1e9:.2f} GFLOP per step (forward, grad_W, grad_x GEMMs). "
          f"GEMM 1024: {gemm_rate:.1f} GFLOP/s, measured in the same rounds.",
          "", common.md_table(["variant", "ms / step", "× lax jit-per-step", "GFLOP/s", "fraction of GEMM rate",
                               "compile s"], rows),
          "", f"Targets (issue #13): fnbp in its scan loop ≤ 0.6× the jit-per-step autodiff reference: "
          f"**{fn_scan / ref:.2f}×**; the reference inside scan ≥ 5× slower than fnbp's loop: "
          f"**{lax_scan / fn_scan:.1f}×**.",
          "", torch_note,
          "", "The CPU is shared with other jobs: absolute times vary from run to run; the ratios are from "
          "interleaved runs."]
    common.write_results(args.out, NAME, "\n".join(md), data, args=args, seconds=time.perf_counter() - t0)
    common.log("\n".join(md))
    return data


if __name__ == "__main__":
    main()
