"""The LSTM language-model training step: fnbp's hand-derived BPTT rule vs ``jax.grad`` through ``lax.scan`` of a
plain-jnp LSTM cell, side by side and interleaved (``fnbp.bench.harness.interleaved``).

Model and step (issue #26): embedding 64 -> LSTM H = 256 -> dense V = 67 on every step, batch B = 64 of T = 64
characters, softmax cross-entropy averaged over tokens, Adam (``fnbp.optim.adam``, the same for both variants, so
only the gradient differs), float32.  Variants:

* ``fnbp step``: ``fnbp.charlm.make_train_step`` (``fnbp.embedding``, ``fnbp.rnn.lstm``, ``fnbp.dense``,
  ``fnbp.losses.softmax_cross_entropy``: every backward hand-written), jit per step;
* ``autodiff step``: the same model written in plain jnp (``fnbp.reference_rnn.lstm``: the cell in a
  ``lax.scan``), differentiated by ``jax.grad``, jit per step;
* ``flax step`` / ``flax scan`` (when Flax is installed; not a dependency of fnbp): the same model as Flax users
  write it, ``nn.Embed`` -> ``nn.RNN(nn.OptimizedLSTMCell(H))`` -> ``nn.Dense``, differentiated by ``jax.grad``,
  with the same optimizer; Flax's own initialisation, so only the timings compare;
* ``... scan``: each, ``--steps`` optimizer steps inside one compiled ``lax.scan`` (the epoch loop's shape);
* ``torch eager``: PyTorch's ``nn.LSTM`` on the CPU, in this process, when torch is installed.

Reported: median ms per optimizer step, GFLOP/s (the step's matrix products, 3x the forward's), and the paired
ratio fnbp / autodiff (median over rounds).  Timings from a shared machine are labelled as such.

    python -m experiments.bench_lstm                  # writes experiments/results/bench_lstm.{md,json}
    python -m experiments.bench_lstm --quick --out /tmp/x
"""
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import common  # noqa: E402
from fnbp import charlm, losses, optim, reference, reference_rnn  # noqa: E402
from fnbp._malloc import keep_freed_memory  # noqa: E402
from fnbp.bench.harness import interleaved, machine_description, paired_ratio, summarize  # noqa: E402


def plain_loss(params, ids, targets, state):
    """The same model in plain jnp: what ``jax.grad`` differentiates for the autodiff variants."""
    x = params["E"][ids]
    hs, c_T = reference_rnn.lstm(params["W_x"], params["W_h"], params["b"], x, *state)
    logits = hs @ params["W_out"].T + params["b_out"]
    return reference.softmax_cross_entropy(logits, targets), (hs[:, -1], c_T)


def fnbp_loss(params, ids, targets, state):
    return charlm.loss(params, ids, targets, state, "lstm")


def flax_model(key, V, d, H, B, T):
    """(params, loss, initial state) of the model in Flax (``flax.linen``), or None where Flax is not installed:
    ``nn.Embed(V, d)`` -> ``nn.RNN(nn.OptimizedLSTMCell(H))`` (state carried in and out, Flax's (c, h)) ->
    ``nn.Dense(V)``, the mean token cross-entropy."""
    try:
        import flax.linen as nn
    except ImportError:
        return None

    class CharLSTM(nn.Module):
        @nn.compact
        def __call__(self, ids, carry):
            x = nn.Embed(V, d)(ids)
            carry, hs = nn.RNN(nn.OptimizedLSTMCell(H), return_carry=True)(x, initial_carry=carry)
            return nn.Dense(V)(hs), carry

    model = CharLSTM()
    state = (jnp.zeros((B, H), jnp.float32), jnp.zeros((B, H), jnp.float32))
    params = model.init(key, jnp.zeros((B, T), jnp.int32), state)

    def loss(params, ids, targets, state):
        logits, carry = model.apply(params, ids, state)
        return reference.softmax_cross_entropy(logits, targets), carry
    return params, loss, state


def make_step(loss_fn, opt):
    def step(params, opt_state, state, x, y):
        (E, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y, state)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optim.apply_updates(params, updates), opt_state, charlm.detach(new_state), E
    return step


def make_scan(step):
    def run(params, opt_state, state, xs, ys):
        def body(carry, xy):
            p, o, s = carry
            p, o, s, E = step(p, o, s, *xy)
            return (p, o, s), E
        (params, opt_state, state), Es = jax.lax.scan(body, (params, opt_state, state), (xs, ys))
        return params, opt_state, state, Es
    return jax.jit(run)


class TorchStep:
    """PyTorch eager on the CPU, the same model and step: nn.Embedding, nn.LSTM (batch_first), nn.Linear,
    F.cross_entropy (mean over tokens), torch.optim.Adam; float32, the same initial weights."""

    def __init__(self, params, x, y, threads):
        import torch
        torch.set_num_threads(threads)
        V, d = params["E"].shape
        H = params["W_h"].shape[1]
        self.torch, self.F = torch, torch.nn.functional
        self.emb, self.lstm = torch.nn.Embedding(V, d), torch.nn.LSTM(d, H, batch_first=True)
        self.out = torch.nn.Linear(H, V)
        with torch.no_grad():
            for p, v in [(self.emb.weight, params["E"]), (self.lstm.weight_ih_l0, params["W_x"]),
                         (self.lstm.weight_hh_l0, params["W_h"]), (self.lstm.bias_ih_l0, params["b"]),
                         (self.out.weight, params["W_out"]), (self.out.bias, params["b_out"])]:
                p.copy_(torch.from_numpy(np.array(v)))
            self.lstm.bias_hh_l0.zero_()
        self.params = [*self.emb.parameters(), *self.lstm.parameters(), *self.out.parameters()]
        self.opt = torch.optim.Adam(self.params, lr=2e-3)
        self.x, self.y = torch.from_numpy(np.array(x, np.int64)), torch.from_numpy(np.array(y, np.int64))

    def __call__(self):
        self.opt.zero_grad()
        hs, _ = self.lstm(self.emb(self.x))
        logits = self.out(hs)
        loss = self.F.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.y.reshape(-1))
        loss.backward()
        self.opt.step()
        return float(loss.detach())


def _flax_version():
    import flax
    return flax.__version__


def steps_per_call(variant, steps):
    """Optimizer steps one timed call of ``variant`` runs: ``steps`` for the "... scan" variants, 1 for the
    others ("... step" and "torch eager", which runs one step per call)."""
    return steps if variant.endswith(" scan") else 1


def step_flops(B, T, n_in, H, V):
    """Matrix-product FLOPs of one training step: forward 2 B T (4H (n_in + H) + V H), backward twice that."""
    return 3 * 2 * B * T * (4 * H * (n_in + H) + V * H)


def main(argv=None):
    def add(p):
        p.add_argument("--hidden", type=int, default=256)
        p.add_argument("--batch", type=int, default=64)
        p.add_argument("--seq-len", type=int, default=64)
        p.add_argument("--embed", type=int, default=64)
        p.add_argument("--steps", type=int, default=4, help="optimizer steps per call of the scan variants")
        p.add_argument("--min-time", type=float, default=5.0, help="seconds of samples per variant")
        p.add_argument("--no-torch", action="store_true", help="skip PyTorch even when it is installed")
        p.add_argument("--no-flax", action="store_true", help="skip Flax even when it is installed")
        p.add_argument("--torch-threads", type=int, default=2)
        p.add_argument("--label", default=None,
                       help="how the timings were taken (shown with them; default: from the 1-minute load average "
                            "when the script starts, before its own work)")
    args = common.parse_args("LSTM training step: fnbp's BPTT rule vs jax.grad through lax.scan", argv,
                             add_arguments=add)
    if args.label is None:
        args.label = common.load_label(os.getloadavg()[0], common.busy_cores())
    malloc = keep_freed_memory()                              # for every variant alike, as fnbp train does
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")      # before torch loads (see fnbp.bench.run)
    if args.quick:
        args.hidden, args.batch, args.seq_len, args.embed, args.steps, args.min_time = 32, 8, 16, 8, 2, 0.2
    V, B, T, H, d = 67, args.batch, args.seq_len, args.hidden, args.embed
    key = jax.random.key(args.seed)
    params = charlm.init(key, V, H, embed=d, cell="lstm")
    opt = optim.adam(2e-3)
    rng = np.random.default_rng(args.seed)
    xs = rng.integers(0, V, (args.steps, B, T)).astype(np.int32)
    ys = rng.integers(0, V, (args.steps, B, T)).astype(np.int32)
    state = charlm.zero_state(params, B)
    opt_state = opt.init(params)

    steps = {"fnbp": make_step(fnbp_loss, opt), "autodiff": make_step(plain_loss, opt)}
    jitted = {name: jax.jit(s) for name, s in steps.items()}
    scans = {name: make_scan(s) for name, s in steps.items()}

    # the two gradients agree (same model, same numbers up to float32 rounding)
    g_ours = jax.jit(jax.grad(lambda p: fnbp_loss(p, xs[0], ys[0], state)[0]))(params)
    g_ref = jax.jit(jax.grad(lambda p: plain_loss(p, xs[0], ys[0], state)[0]))(params)
    agree = max(float(jnp.max(jnp.abs(g_ours[k] - g_ref[k])) / jnp.max(jnp.abs(g_ref[k]))) for k in params)

    def call(fn, *a):
        return lambda: jax.block_until_ready(fn(*a))
    fns = {f"{n} step": call(jitted[n], params, opt_state, state, xs[0], ys[0]) for n in steps}
    fns.update({f"{n} scan": call(scans[n], params, opt_state, state, xs, ys) for n in steps})
    flax = None if args.no_flax else flax_model(jax.random.fold_in(key, 1), V, d, H, B, T)
    if flax is not None:
        flax_params, flax_loss, flax_state = flax
        flax_opt_state = opt.init(flax_params)
        flax_step = make_step(flax_loss, opt)
        fns["flax step"] = call(jax.jit(flax_step), flax_params, flax_opt_state, flax_state, xs[0], ys[0])
        fns["flax scan"] = call(make_scan(flax_step), flax_params, flax_opt_state, flax_state, xs, ys)
    from fnbp.bench.steps import torch_available
    if torch_available() and not args.no_torch:
        fns["torch eager"] = TorchStep(params, xs[0], ys[0], args.torch_threads)
    with common.Timer() as timer:
        samples = interleaved(fns, args.min_time, min_samples=3 if args.quick else 5, seed=args.seed)
    flops = step_flops(B, T, d, H, V)
    per_step = {n: steps_per_call(n, args.steps) for n in fns}
    rows, summary = [], {}
    for n in fns:
        s = {"wall": [t / per_step[n] for t in samples[n]["wall"]], "cpu": [t / per_step[n] for t in samples[n]["cpu"]],
             "round": samples[n]["round"]}
        samples[n] = s
        summary[n] = summarize(s, flops=flops)
        rows.append([n, f"{summary[n]['ms_median']:.1f}", f"{summary[n]['ms_q1']:.1f}-{summary[n]['ms_q3']:.1f}",
                     f"{summary[n]['gflops']:.1f}", summary[n]["n_samples"]])
    ratios = {kind: paired_ratio(samples[f"fnbp {kind}"], samples[f"autodiff {kind}"]) for kind in ("step", "scan")}
    if flax is not None:
        ratios["step vs flax"] = paired_ratio(samples["fnbp step"], samples["flax step"])
        ratios["scan vs flax"] = paired_ratio(samples["fnbp scan"], samples["flax scan"])
    if "torch eager" in fns:
        ratios["step vs torch"] = paired_ratio(samples["fnbp step"], samples["torch eager"])
        ratios["scan vs torch"] = paired_ratio(samples["fnbp scan"], samples["torch eager"])
    md = [f"# LSTM training step: fnbp's BPTT rule vs jax.grad through lax.scan ({args.label})", "",
          f"H = {H}, B = {B}, T = {T}, V = {V}, embedding {d}, Adam, float32; {flops / 1e9:.2f} GFLOP per step "
          f"(matrix products); scan variants: {args.steps} steps per call.  Gradients agree to {agree:.1e} "
          f"(max relative, float32)." + (f"  Flax {_flax_version()}: its own initialisation (same shapes), so its "
                                         f"row compares timings only." if flax is not None else ""), "",
          common.md_table(["variant", "ms / step (median)", "IQR", "GFLOP/s", "samples"], rows), "",
          "Paired ratios fnbp / autodiff (and fnbp / Flax, fnbp / torch eager when present; median over rounds, "
          "IQR): " + "; ".join(
              f"{k} {r['median']:.2f} ({r['q1']:.2f}-{r['q3']:.2f}, {r['rounds']} rounds)" for k, r in ratios.items()),
          "", f"Timings {args.label}: read the ratios, not the absolute times."]
    common.write_results(args.out, "bench_lstm", "\n".join(md),
                         {"settings": {"H": H, "B": B, "T": T, "V": V, "embed": d, "steps": args.steps,
                                       "label": args.label, "malloc": malloc},
                          "machine": machine_description(), "torch": "torch eager" in fns,
                          "flax": _flax_version() if flax is not None else None, "gradient_agreement": agree,
                          "summary": summary,
                          "ratios": ratios}, args=args, seconds=timer.seconds)
    print("\n".join(md))
    return summary, ratios


if __name__ == "__main__":
    main()
