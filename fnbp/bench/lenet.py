"""Bench case ``lenet``: one LeNet training step (issue #13), fnbp's rules against ``jax.grad``
through ``lax.conv_general_dilated`` + ``lax.reduce_window``, side by side, interleaved.

Network ``fnbp.cnn.lenet((28, 28, 1))`` (conv 5x5x32 -> 2x2 max-pool -> conv 5x5x64 -> pool ->
dense 128 -> 10, ReLU, softmax cross-entropy), float32, B = 64, ``fnbp.optim.adam``; with
``--quick`` a tiny LeNet (12x12x1, 3x3 convolutions of 4 and 8 channels, 16 hidden units), B = 8.
Each timed call runs ``steps`` optimizer steps (8; 2 with ``--quick``) of

* ``fnbp_scan``: fnbp's rules inside fnbp's own epoch loop (``fnbp.train.make_epoch``: one
  jit-compiled ``lax.scan`` over the steps); its convolutions are ``fnbp.conv.conv2d_xla`` (XLA's
  convolution as the forward and grad_x primitives inside the hand-written rule), LeNet's default;
* ``fnbp_im2col_scan``: the same with the readable ``fnbp.conv.conv2d`` (im2col + one GEMM each way);
* ``lax_scan``: the same network written with JAX's ops (``LaxNetwork``: ``fnbp.reference.conv2d``
  = ``lax.conv_general_dilated``, ``fnbp.reference.max_pool`` = ``lax.reduce_window``, plain
  ``h @ W.T + b``), differentiated by ``jax.grad`` (conv transposes, select_and_scatter), inside
  the same scan;
* ``fnbp_jit``, ``fnbp_im2col_jit``, ``lax_jit``: the same steps, ``jax.jit`` per step, called ``steps`` times;
* ``torch_eager``: PyTorch eager on CPU (``TorchLeNet``: ``nn.Conv2d``/``MaxPool2d``/``Linear``,
  same initial weights, ``torch.optim.Adam``) when torch is installed;
* ``gemm``: the machine's GEMM rate (the ``gemm`` case's best size), in the same rounds.

Reported per variant: median ms per step [IQR], GFLOP/s (``lenet_step_flops``), the fraction of
the GEMM rate, the ratio to ``lax_jit`` (of medians, and the median of per-round ratios),
compile time; and the issue's targets, from the medians: fnbp in its loop <= 0.6x the
jit-per-step autodiff reference, and the reference inside scan >= 5x slower than fnbp's loop.
"""
import dataclasses
import time

import jax
import numpy as np

from fnbp import cnn, conv, graph
from fnbp import reference as R

from .harness import interleaved, paired_ratio, summarize
from .registry import register
from .report import measured
from .steps import LEARNING_RATE, Gemm

VARIANTS = ("fnbp_scan", "fnbp_im2col_scan", "lax_scan", "fnbp_jit", "fnbp_im2col_jit", "lax_jit", "torch_eager")
JAX_VARIANTS = VARIANTS[:-1]
LABELS = {"fnbp_scan": "fnbp rules (conv2d_xla), fnbp's epoch loop (make_epoch: lax.scan)",
          "lax_scan": "jax.grad through lax.conv_general_dilated + reduce_window, inside the same scan",
          "fnbp_im2col_scan": "fnbp rules with the im2col conv2d, fnbp's epoch loop",
          "fnbp_jit": "fnbp rules (conv2d_xla), jit per step",
          "fnbp_im2col_jit": "fnbp rules with the im2col conv2d, jit per step",
          "lax_jit": "jax.grad through lax.conv_general_dilated + reduce_window, jit per step (the reference)",
          "torch_eager": "PyTorch eager (CPU) + torch.optim.Adam"}
TARGETS = (("fnbp_scan", "lax_jit", "<=", 0.6, "fnbp in its scan loop <= 0.6x the jit-per-step autodiff reference"),
           ("lax_scan", "fnbp_scan", ">=", 5.0, "the autodiff reference inside scan >= 5x slower than fnbp's loop"))
FLOP_FORMULA = ("FLOPs/step = 3 x the forward GEMMs' 2 x multiply-adds (forward, grad_W, grad_x) minus the first "
                "convolution's grad_x (its input is the data); a conv layer's forward is 2 B H_out W_out "
                "C_out k k C_in, a dense layer's 2 B n_in n_out. Not counted: biases, ReLU, pooling, the loss, Adam.")


def lenet_step_flops(arch, batch_size):
    """FLOPs of one LeNet training step's products (see FLOP_FORMULA); stride-1 convolutions."""
    H, W, C = arch.image_shape
    total, first = 0, None
    for c_out in arch.channels:
        Ho, Wo = (cnn.conv_output_size(n, arch.kernel, 1, arch.padding) for n in (H, W))
        f = 2 * batch_size * Ho * Wo * arch.kernel * arch.kernel * C * c_out
        first = f if first is None else first
        total += 3 * f
        H, W, C = Ho // arch.pool, Wo // arch.pool, c_out
    n_in = H * W * C
    for n_out in arch.hidden + (arch.n_classes,):
        total += 3 * 2 * batch_size * n_in * n_out
        n_in = n_out
    return total - first


@dataclasses.dataclass(frozen=True)
class LaxNetwork(cnn.Network):
    """The same LeNet written with JAX's own ops (no rule), differentiated by ``jax.grad`` (conv
    transposes, select_and_scatter): its ``graph`` -- what ``train.make_step`` runs -- is one
    plain-function node computing the logits (then the same loss node as fnbp's)."""

    def graph(self, params, *, train=False, running=True):
        return graph.make([graph.node("logits", R.lenet_logits, graph.Param(), graph.Input("x"), arch=self.arch)],
                          "logits")


@dataclasses.dataclass(frozen=True)
class Im2colConvNetwork(cnn.Network):
    """fnbp's LeNet with every ``conv2d_xla`` node running the readable ``fnbp.conv.conv2d`` (same options,
    same parameters)."""

    def graph(self, params, *, train=False, running=True):
        net = super().graph(params, train=train, running=running)
        return net._replace(nodes=tuple(n._replace(op=conv.conv2d) if n.op is conv.conv2d_xla else n
                                        for n in net.nodes))


def _data(arch, n, seed):
    """A key, n random images in [0, 1) and labels (numpy draws: no eager JAX op to compile)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n,) + arch.image_shape).astype(np.float32)
    y = rng.integers(0, arch.n_classes, size=n).astype(np.int32)
    return jax.random.key(seed), jax.numpy.asarray(x), jax.numpy.asarray(y)


class ScanEpoch:
    """``steps`` optimizer steps as one jit-compiled ``fnbp.train.make_epoch`` (``lax.scan``)."""

    def __init__(self, model, opt, params, x, y, key, batch_size):
        from fnbp import train
        state, opt_state = model.init_state(params), opt.init(params)
        self.args = (params, opt_state, state, x, y, key)
        t0 = time.perf_counter()
        self.compiled = jax.jit(train.make_epoch(train.Config(), opt, model=model, batch_size=batch_size,
                                                 n_examples=x.shape[0])).lower(
            *self.args).compile()
        self.compile_s = time.perf_counter() - t0
        self.hlo = self.compiled.as_text()
        self.last_loss = None

    def __call__(self):
        out = jax.block_until_ready(self.compiled(*self.args))
        self.last_loss = out[-1][-1]


class JitSteps:
    """``steps`` calls of the jit-compiled ``fnbp.train.make_step``, the carry passed on."""

    def __init__(self, model, opt, params, x, y, key, batch_size):
        from fnbp import train
        self.carry = (params, opt.init(params), model.init_state(params))
        self.batches = [(x[i:i + batch_size], y[i:i + batch_size], jax.random.fold_in(key, i))
                        for i in range(0, x.shape[0], batch_size)]
        t0 = time.perf_counter()
        self.compiled = jax.jit(train.make_step(train.Config(), opt, model=model)).lower(
            self.carry, self.batches[0]).compile()
        self.compile_s = time.perf_counter() - t0
        self.hlo = self.compiled.as_text()
        self.last_loss = None

    def __call__(self):
        carry = self.carry
        for b in self.batches:
            carry, E = self.compiled(carry, b)
        self.last_loss = jax.block_until_ready(E)


class TorchLeNet:
    """PyTorch eager: the same LeNet (nn.Conv2d on NCHW, MaxPool2d, flatten in fnbp's NHWC order,
    nn.Linear), same initial weights and data, F.cross_entropy, torch.optim.Adam; ``steps``
    optimizer steps per call.  (Not run where torch is not installed: it is optional.)"""

    def __init__(self, arch, params, x, y, batch_size, threads):
        import torch
        import torch.nn.functional as F
        if threads:
            torch.set_num_threads(threads)
        pad = arch.padding.lower() if isinstance(arch.padding, str) else arch.padding
        self.convs, self.linears = [], []
        for layer in params["conv"]:
            W = np.asarray(layer["W"])                          # (C_out, C_in, kh, kw): PyTorch's own layout
            conv = torch.nn.Conv2d(W.shape[1], W.shape[0], W.shape[2:], padding=pad)
            with torch.no_grad():
                conv.weight.copy_(torch.from_numpy(W.copy()))
                conv.bias.copy_(torch.from_numpy(np.asarray(layer["b"]).copy()))
            self.convs.append(conv)
        for layer in params["dense"]:
            W = np.asarray(layer["W"])
            lin = torch.nn.Linear(W.shape[1], W.shape[0])
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(W.copy()))
                lin.bias.copy_(torch.from_numpy(np.asarray(layer["b"]).copy()))
            self.linears.append(lin)
        modules = self.convs + self.linears
        self.opt = torch.optim.Adam([p for m in modules for p in m.parameters()], lr=LEARNING_RATE)
        x_nchw = torch.from_numpy(np.array(np.asarray(x).transpose(0, 3, 1, 2), order="C"))
        y_t = torch.from_numpy(np.asarray(y).astype(np.int64))
        self.batches = [(x_nchw[i:i + batch_size], y_t[i:i + batch_size])
                        for i in range(0, x_nchw.shape[0], batch_size)]
        self.pool, self.torch, self.F = arch.pool, torch, F
        self.last_loss = None

    def logits(self, x):
        F = self.F
        h = x
        for conv in self.convs:
            h = F.max_pool2d(F.relu(conv(h)), self.pool)
        h = h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)         # fnbp flattens NHWC
        for k, lin in enumerate(self.linears):
            h = lin(h)
            h = F.relu(h) if k < len(self.linears) - 1 else h
        return h

    def __call__(self):
        for xb, yb in self.batches:
            self.opt.zero_grad(set_to_none=True)
            loss = self.F.cross_entropy(self.logits(xb), yb)
            loss.backward()
            self.opt.step()
        self.last_loss = loss.detach()


def _per_step(samples, steps):
    return {"wall": [t / steps for t in samples["wall"]], "cpu": [t / steps for t in samples["cpu"]],
            "round": list(samples["round"])}


def lenet_targets(variants):
    """The issue's two targets from the variants' median step times (report only; never asserted)."""
    rows = []
    for num, den, op, bound, text in TARGETS:
        if "ms_median" not in variants.get(num, {}) or "ms_median" not in variants.get(den, {}):
            continue
        value = variants[num]["ms_median"] / variants[den]["ms_median"]
        rows.append({"target": text, "ratio": f"{num} / {den}", "value": value, "bound": bound, "op": op,
                     "met": bool(value <= bound if op == "<=" else value >= bound)})
    return rows


def bench_lenet(arch, batch_size, steps, *, min_time, seed=0, gemm_size=1024, use_torch=False, threads=None,
                cores=None, torch_skip_reason="torch not installed", log=lambda msg: None):
    """Interleaved timing of the LeNet step variants; returns the report section."""
    from fnbp import optim
    key, x, y = _data(arch, batch_size * steps, seed)
    params = jax.jit(cnn.init, static_argnums=1)(key, arch)              # one compile, not one per eager op
    opt = optim.adam(LEARNING_RATE)
    configs = {"fnbp": cnn.Network(arch), "fnbp_im2col": Im2colConvNetwork(arch), "lax": LaxNetwork(arch)}
    runners = {}
    for name in JAX_VARIANTS:
        kind, loop = name.rsplit("_", 1)
        log(f"  compiling {name} ...")
        runners[name] = (ScanEpoch if loop == "scan" else JitSteps)(configs[kind], opt, params, x, y, key, batch_size)
    if use_torch:
        runners["torch_eager"] = TorchLeNet(arch, params, x, y, batch_size, threads)
    gemm = Gemm(gemm_size, seed)
    runners["gemm"] = gemm
    samples = interleaved(runners, min_time, min_samples=5, calibrate=("gemm",))
    gemm_row = summarize(samples["gemm"], flops=gemm.flops, cores=cores)
    flops = lenet_step_flops(arch, batch_size)
    ref = _per_step(samples["lax_jit"], steps)
    variants = {}
    for name, r in runners.items():
        if name == "gemm":
            continue
        per = _per_step(samples[name], steps)
        row = summarize(per, flops=flops, batch_size=batch_size, cores=cores)
        row.update(label=LABELS[name], frac_gemm=row["gflops"] / gemm_row["gflops"],
                   ratio_to_lax_jit_paired=paired_ratio(per, ref), compile_s=getattr(r, "compile_s", None),
                   final_loss=float(r.last_loss))
        variants[name] = row
    for row in variants.values():
        row["ratio_to_lax_jit"] = row["ms_median"] / variants["lax_jit"]["ms_median"]
    if not use_torch:
        variants["torch_eager"] = {"label": LABELS["torch_eager"], "skipped": torch_skip_reason}
    programs = {n: runners[n].hlo for n in JAX_VARIANTS}
    xla_over_im2col = {loop: paired_ratio(_per_step(samples[f"fnbp_{loop}"], steps),
                                          _per_step(samples[f"fnbp_im2col_{loop}"], steps)) for loop in ("scan", "jit")}
    return {"arch": dataclasses.asdict(arch), "batch_size": batch_size, "steps_per_call": steps,
            "flops": flops, "flop_formula": FLOP_FORMULA, "gemm_size": gemm_size,
            "gemm_gflops_concurrent": gemm_row["gflops"], "gemm": gemm_row, "variants": variants,
            "targets": lenet_targets(variants), "xla_over_im2col": xla_over_im2col,
            # the reference really runs XLA convolutions (conv_general_dilated and its transposes), so does fnbp's
            # conv2d_xla (inside its rule); the im2col conv2d does not
            "lax_uses_convolution": all(" convolution(" in programs[n] for n in ("lax_scan", "lax_jit")),
            "fnbp_uses_convolution": all(" convolution(" in programs[n] for n in ("fnbp_scan", "fnbp_jit")),
            "fnbp_im2col_uses_convolution": any(" convolution(" in programs[n]
                                                for n in ("fnbp_im2col_scan", "fnbp_im2col_jit"))}


def _f(x, digits=3):
    return "—" if x is None else f"{x:.{digits}g}"


def render(sec, result=None):
    """Markdown lines of the section."""
    a = sec["arch"]
    L = [f"## LeNet training step (issue #13), B = {sec['batch_size']}\n",
         f"LeNet {'x'.join(map(str, a['image_shape']))} -> conv {a['kernel']}x{a['kernel']} ({a['padding']}) "
         f"{' -> '.join(map(str, a['channels']))} channels, {a['pool']}x{a['pool']} max-pool, dense "
         f"{', '.join(map(str, a['hidden']))} -> {a['n_classes']}; ReLU, softmax cross-entropy, Adam, float32. "
         f"Each timed call runs {sec['steps_per_call']} steps; the variants and the GEMM (n = {sec['gemm_size']}, "
         f"{_f(sec['gemm_gflops_concurrent'])} GFLOP/s) run interleaved in the same rounds; per-step medians. "
         f"{sec['flops'] / 1e9:.3g} GFLOP per step: {sec['flop_formula']}\n",
         "| variant | ms/step median [IQR] | GFLOP/s | fraction of GEMM rate | × lax jit-per-step (paired [IQR]) "
         "| CPU ms/step | compile s |", "|---|---|---|---|---|---|---|"]
    for name, r in measured(sec["variants"], VARIANTS):
        if "skipped" in r:
            L.append(f"| {r['label']} | skipped: {r['skipped']} | | | | | |")
            continue
        p = r["ratio_to_lax_jit_paired"]
        L.append(f"| {r['label']} | {_f(r['ms_median'])} [{_f(r['ms_q1'])}–{_f(r['ms_q3'])}] | {_f(r['gflops'])} | "
                 f"{r['frac_gemm']:.2f} | {r['ratio_to_lax_jit']:.2f} ({p['median']:.2f} [{p['q1']:.2f}–"
                 f"{p['q3']:.2f}]) | {_f(r.get('cpu_ms_median'))} | {_f(r['compile_s'])} |")
    L += ["", "| target (issue #13; report only, never asserted) | ratio of medians | value | met |",
          "|---|---|---|---|"]
    L += [f"| {t['target']} | {t['ratio']} | {t['value']:.2f}× (bound {t['op']} {t['bound']:g}) | "
          f"{'yes' if t['met'] else '**no**'} |" for t in sec["targets"]]
    L.append(f"\nThe reference's compiled programs contain XLA convolutions: "
             f"{'yes' if sec['lax_uses_convolution'] else '**no**'}; fnbp's (conv2d_xla) do: "
             f"{'yes' if sec['fnbp_uses_convolution'] else '**no**'}"
             + (f"; with the im2col conv2d: {'**yes**' if sec['fnbp_im2col_uses_convolution'] else 'no'}"
                if "fnbp_im2col_uses_convolution" in sec else "") + ".\n")
    if sec.get("xla_over_im2col"):
        L.append("conv2d_xla / conv2d (paired per-round ratio of the same network's step, median [IQR]): " + "; ".join(
            f"{loop} {p['median']:.2f} [{p['q1']:.2f}–{p['q3']:.2f}] over {p['rounds']} rounds"
            for loop, p in sec["xla_over_im2col"].items()) + ".\n")
    return L


def summary(sec):
    """Stdout lines: one per variant, then the targets."""
    L = [f"\nLeNet step, B = {sec['batch_size']} (GEMM {sec['gemm_gflops_concurrent']:.1f} GFLOP/s):"]
    for name in VARIANTS:
        r = sec["variants"].get(name, {})
        if "ms_median" in r:
            L.append(f"  {name:<12} {r['ms_median']:>9.2f} ms/step {r['gflops']:>7.1f} GFLOP/s "
                     f"{100 * r['frac_gemm']:>4.0f}% GEMM  x{r['ratio_to_lax_jit']:.2f} lax jit")
        elif "skipped" in r:
            L.append(f"  {name:<12} skipped: {r['skipped']}")
    L += [f"  target {t['ratio']} {t['op']} {t['bound']:g}: {t['value']:.2f} ({'met' if t['met'] else 'NOT met'})"
          for t in sec["targets"]]
    return L


QUICK_ARCH = dict(image_shape=(12, 12, 1), channels=(4, 8), hidden=(16,))


def _run(ctx):
    if ctx.quick:
        arch, B, steps = cnn.lenet(**QUICK_ARCH), 8, 2
    else:
        arch, B, steps = cnn.lenet((28, 28, 1)), 64, 8
    ctx.log(f"LeNet step (B = {B}, {steps} steps per call) ...")
    return bench_lenet(arch, B, steps, min_time=ctx.min_time, seed=ctx.seed,
                       gemm_size=ctx.results["gemm"]["best_size"], use_torch=ctx.use_torch, threads=ctx.threads,
                       cores=ctx.cores, torch_skip_reason=ctx.torch_skip_reason, log=ctx.log)


register("lenet", run=_run, render=render, summary=summary, requires=("gemm",),
         help="LeNet step B=64: fnbp rules in fnbp's scan loop vs jax.grad through lax conv/reduce_window "
              "(jit per step, in scan) vs torch eager")
