"""Bench case ``per_example_rules``: per-example norms and the DP-SGD step from the explicit rules
(``fnbp.per_example``, ``fnbp.dp``) vs ``jax.vmap(jax.grad)`` of a plain-jnp loss (issue #14).

784-512-512-10 ReLU network (``--sizes``), softmax cross-entropy, B = 256 (32 with ``--quick``),
float32, side by side, interleaved (one call of each variant per round, shuffled order):

* ``norms_fnbp``: ``fnbp.per_example.grad_norms`` -- one forward, one backward (reduction='sum'),
  ||g_n||^2 = sum_k ||delta_{k,n}||^2 (||h_{k-1,n}||^2 + 1), no per-example gradient formed;
* ``norms_vmap``: ``jit(vmap(grad))`` of the plain-jnp per-example loss, then the norms of the
  materialised B x |theta| gradients (what a JAX user writes);
* ``dp_fnbp``: one DP-SGD step, ``fnbp.dp.private_grad`` (norms, clip factors, the clipped sum as
  delta^T diag(c) H, Gaussian noise) + the SGD update;
* ``dp_vmap``: the same step with ``vmap(grad)`` + clip + sum (same noise function, same update);
* ``step_plain``: the ordinary (non-private) step ``fnbp.backprop`` + SGD, for scale;
* ``dp_clip``: ``dp_fnbp`` without the noise (norms, clip factors, clipped sum + the SGD update): the
  book-keeping part of the DP step;
* ``noise``: the noise alone, ``fnbp.dp.gaussian`` on a params-shaped tree (one N(0, 1) per parameter,
  ``fnbp.dp._normal``'s unrolled threefry + erf_inv): the part no clipping method removes.

Reported: median ms per call (IQR), the paired per-round ratios fnbp / vmap and DP step / ordinary step
(whole, clipping only, noise only), XLA's temp memory of each compiled program
(``memory_analysis().temp_size_in_bytes``) and the DP step's over the ordinary step's.  Targets of issue #14: norms
<= 0.1x the time, DP step >= 5x faster with temp memory <= 1/10.

LeNet rows (``bench_per_example_lenet``): the same seven variants on ``fnbp.cnn.lenet((28, 28, 1))``
(conv 5x5x32 -> pool -> conv 5x5x64 -> pool -> 128 -> 10), B = 64 (``--quick``: a tiny 8 x 8 x 1
LeNet, channels (4, 6), B = ``--per-example-batch`` <= 8); fnbp's conv norms by the per-layer
Gram/direct choice (``fnbp.per_example.norm_method``), the clipped sum (c (.) delta)^T P;
the peer is ``jit(vmap(grad))`` of the same LeNet written with ``lax.conv_general_dilated``.
"""
import time

import jax
import jax.numpy as jnp

import fnbp

from .harness import interleaved, paired_ratio, summarize, temp_bytes
from .registry import register


def _fmt(x, digits=4):
    if x is None:
        return "—"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{digits}g}"


def md_table(headers, rows):
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
                     + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows])


VARIANTS = ("norms_fnbp", "norms_vmap", "dp_fnbp", "dp_vmap", "step_plain", "dp_clip", "noise")
CLIP, SIGMA, LR = 1.0, 1.1, 0.05


def plain_loss(params, x_n, d_n):
    """Example n's own loss with plain jnp (the peer's model; autodiff differentiates it)."""
    h = x_n
    for k, layer in enumerate(params):
        a = h @ layer["W"].T + layer["b"]
        h = jax.nn.relu(a) if k < len(params) - 1 else a
    return -jax.nn.log_softmax(h)[d_n]


def vmap_grads(params, x, d):
    return jax.vmap(jax.grad(plain_loss), in_axes=(None, 0, 0))(params, x, d)


def vmap_norms(params, x, d):
    g = vmap_grads(params, x, d)
    return _norms(g)


def _norms(g):
    return jnp.sqrt(sum(jnp.sum(v.reshape(v.shape[0], -1) ** 2, axis=1) for v in jax.tree_util.tree_leaves(g)))


def vmap_private_grad(params, x, d, key):
    g = vmap_grads(params, x, d)
    norms = _norms(g)
    c = 1.0 / jnp.maximum(1.0, norms / CLIP)
    sums = jax.tree_util.tree_map(lambda leaf: jnp.tensordot(c, leaf, axes=1), g)     # clip, then sum
    return fnbp.dp.add_noise(sums, key, clip=CLIP, noise_multiplier=SIGMA, batch_size=x.shape[0])


CE = fnbp.losses.softmax_cross_entropy


def programs():
    def sgd(params, g):
        return jax.tree_util.tree_map(lambda p, u: p - LR * u, params, g)

    return {
        "norms_fnbp": lambda p, x, d, key: fnbp.per_example.grad_norms(p, x, d, loss=CE),
        "norms_vmap": lambda p, x, d, key: vmap_norms(p, x, d),
        "dp_fnbp": lambda p, x, d, key: sgd(p, fnbp.dp.private_grad(p, x, d, key, clip=CLIP, noise_multiplier=SIGMA,
                                                                     loss=CE)[0]),
        "dp_vmap": lambda p, x, d, key: sgd(p, vmap_private_grad(p, x, d, key)),
        "step_plain": lambda p, x, d, key: sgd(p, fnbp.backprop(p, x, d, loss=CE)[1]),
        "dp_clip": lambda p, x, d, key: sgd(p, _mean(fnbp.dp.clipped_grad_sum(p, x, d, clip=CLIP, loss=CE)[0], x)),
        "noise": _noise,
    }


def _mean(sums, x):
    """The clipped sum over the batch divided by B (what ``add_noise`` does, without the noise)."""
    return jax.tree_util.tree_map(lambda g: g / x.shape[0], sums)


def _noise(p, x, d, key):
    """p + sigma C N(0, I): the DP step's noise draw on a tree of params' shapes (``fnbp.dp.gaussian``)."""
    return fnbp.dp.gaussian(p, key, fnbp.dp.noise_std(CLIP, SIGMA))


def _measure(progs, params, x, d, noise_key, batch, min_time, max_time=None):
    """Compile the seven programs, check the two ways agree, time them interleaved: the section's numbers.
    ``max_time``: stop the rounds after that many seconds (``interleaved``'s) even if the fastest variant has not
    yet filled ``min_time``: the vmap variants run 10-70x longer than the fast ones, every round."""
    compiled, info = {}, {}
    for name, fn in progs.items():
        t0 = time.perf_counter()
        compiled[name] = jax.jit(fn).lower(params, x, d, noise_key).compile()
        info[name] = {"compile_s": time.perf_counter() - t0, "temp_bytes": temp_bytes(compiled[name])}
    # the two ways agree (float32): norms and the private step
    n1, n2 = compiled["norms_fnbp"](params, x, d, noise_key), compiled["norms_vmap"](params, x, d, noise_key)
    p1, p2 = compiled["dp_fnbp"](params, x, d, noise_key), compiled["dp_vmap"](params, x, d, noise_key)
    # and the split adds up: dp_fnbp = dp_clip - LR / B (noise - p), noise = p + sigma C z
    p_clip, p_noise = compiled["dp_clip"](params, x, d, noise_key), compiled["noise"](params, x, d, noise_key)
    split = jax.tree_util.tree_map(lambda c, z, p: c - LR / batch * (z - p), p_clip, p_noise, params)

    def max_abs(t1, t2):
        return max(float(jnp.max(jnp.abs(a - b))) for a, b in
                   zip(jax.tree_util.tree_leaves(t1), jax.tree_util.tree_leaves(t2)))

    agree = {"norms_max_rel": float(jnp.max(jnp.abs(n1 - n2) / n2)), "dp_step_max_abs": max_abs(p1, p2),
             "dp_split_max_abs": max_abs(p1, split)}
    fns = {n: (lambda c=c: jax.block_until_ready(c(params, x, d, noise_key))) for n, c in compiled.items()}
    samples = interleaved(fns, min_time, max_time=max_time)
    stats = {n: dict(summarize(samples[n], batch_size=batch), **info[n]) for n in VARIANTS}
    ratios = {"norms_time": paired_ratio(samples["norms_fnbp"], samples["norms_vmap"]),
              "dp_time": paired_ratio(samples["dp_fnbp"], samples["dp_vmap"]),
              "dp_vs_plain_step": paired_ratio(samples["dp_fnbp"], samples["step_plain"]),
              "dp_clip_vs_plain_step": paired_ratio(samples["dp_clip"], samples["step_plain"]),
              "noise_vs_plain_step": paired_ratio(samples["noise"], samples["step_plain"])}
    mem = {}
    for a, b in (("norms_fnbp", "norms_vmap"), ("dp_fnbp", "dp_vmap")):
        ta, tb = info[a]["temp_bytes"], info[b]["temp_bytes"]
        mem[a.split("_")[0] + "_temp"] = (ta / tb) if ta is not None and tb else None
    ta, tb = info["dp_fnbp"]["temp_bytes"], info["step_plain"]["temp_bytes"]
    mem["dp_vs_plain_temp"] = (ta / tb) if ta is not None and tb else None
    return {"batch": batch, "min_time": min_time, "max_time": max_time, "stats": stats, "ratios": ratios,
            "temp_ratios": mem, "agreement_float32": agree}


def bench_per_example_rules(sizes, batch, *, min_time, max_time=None, seed=0):
    """Interleaved timing of the seven variants; returns the report section (stats, paired ratios, temp ratios)."""
    key = jax.random.key(seed)
    params = fnbp.mlp.init(key, sizes)
    x = jax.random.normal(jax.random.fold_in(key, 1), (batch, sizes[0]), jnp.float32)
    d = jax.random.randint(jax.random.fold_in(key, 2), (batch,), 0, sizes[-1])
    res = _measure(programs(), params, x, d, jax.random.fold_in(key, 3), batch, min_time, max_time)
    return {"sizes": list(sizes), "n_params": fnbp.mlp.num_params(sizes), **res}


def lenet_plain_loss(arch, params, x_n, d_n):
    """Example n's own loss through the LeNet with lax's conv / reduce_window (the peer's model)."""
    R = fnbp.reference
    h = x_n[None]
    for layer in params["conv"]:
        h = R.max_pool(R.relu(R.conv2d(layer["W"], layer["b"], h, padding=arch.padding)), arch.pool)
    h = R.flatten(h)
    for k, layer in enumerate(params["dense"]):
        h = R.dense(layer["W"], layer["b"], h)
        h = R.relu(h) if k < len(params["dense"]) - 1 else h
    return R.softmax_cross_entropy(h, d_n[None])


def lenet_programs(arch):
    """The seven variants for a LeNet ``arch`` (fnbp: ``arch=``; vmap: ``lenet_plain_loss``)."""
    def sgd(params, g):
        return jax.tree_util.tree_map(lambda p, u: p - LR * u, params, g)

    def grads(p, x, d):
        return jax.vmap(jax.grad(lambda p, x_n, d_n: lenet_plain_loss(arch, p, x_n, d_n)), in_axes=(None, 0, 0))(p, x, d)

    def vmap_private(p, x, d, key):
        g = grads(p, x, d)
        c = 1.0 / jnp.maximum(1.0, _norms(g) / CLIP)
        sums = jax.tree_util.tree_map(lambda leaf: jnp.tensordot(c, leaf, axes=1), g)     # clip, then sum
        return fnbp.dp.add_noise(sums, key, clip=CLIP, noise_multiplier=SIGMA, batch_size=x.shape[0])

    def plain_step(p, x, d):
        net = fnbp.objective.objective(fnbp.cnn.network(p, arch=arch, train=True), CE)
        return fnbp.graph.value_and_grad(net, p, {"x": x, "d": d})[1]          # the walker's batch gradient

    return {
        "norms_fnbp": lambda p, x, d, key: fnbp.per_example.grad_norms(p, x, d, loss=CE, arch=arch),
        "norms_vmap": lambda p, x, d, key: _norms(grads(p, x, d)),
        "dp_fnbp": lambda p, x, d, key: sgd(p, fnbp.dp.private_grad(p, x, d, key, clip=CLIP, noise_multiplier=SIGMA,
                                                                     loss=CE, arch=arch)[0]),
        "dp_vmap": lambda p, x, d, key: sgd(p, vmap_private(p, x, d, key)),
        "step_plain": lambda p, x, d, key: sgd(p, plain_step(p, x, d)),
        "dp_clip": lambda p, x, d, key: sgd(p, _mean(fnbp.dp.clipped_grad_sum(p, x, d, clip=CLIP, loss=CE,
                                                                            arch=arch)[0], x)),
        "noise": _noise,
    }


def bench_per_example_lenet(arch, batch, *, min_time, max_time=None, seed=0):
    """The seven variants on a LeNet (``fnbp.cnn.LeNet``), float32; the same fields as ``bench_per_example_rules``
    plus the architecture and each conv layer's norm method."""
    key = jax.random.key(seed)
    params = fnbp.cnn.init(key, arch)
    x = jax.random.normal(jax.random.fold_in(key, 1), (batch,) + arch.image_shape, jnp.float32)
    d = jax.random.randint(jax.random.fold_in(key, 2), (batch,), 0, arch.n_classes)
    shapes = jax.eval_shape(lambda: [(r.delta, r.patches) for r in fnbp.per_example.walk(
        params, x, d, arch=arch, loss=CE)[1]])
    methods = [fnbp.per_example.norm_method(dl.shape[1], dl.shape[2], pt.shape[2]) for dl, pt in shapes]
    clip_methods = [fnbp.per_example.clip_method(dl.shape[1], dl.shape[2], pt.shape[2]) for dl, pt in shapes]
    res = _measure(lenet_programs(arch), params, x, d, jax.random.fold_in(key, 3), batch, min_time, max_time)
    return {"arch": {"image_shape": list(arch.image_shape), "channels": list(arch.channels), "kernel": arch.kernel,
                     "padding": arch.padding, "hidden": list(arch.hidden)},
            "n_params": fnbp.cnn.num_params(params), "conv_norm_methods": methods[:len(arch.channels)],
            "conv_clip_methods": clip_methods[:len(arch.channels)], **res}


def _tables(res):
    s, r, m = res["stats"], res["ratios"], res["temp_ratios"]
    rows = [[n, _fmt(s[n]["ms_median"]), f"{_fmt(s[n]['ms_q1'])}–{_fmt(s[n]['ms_q3'])}",
             _fmt(s[n]["n_samples"]), _fmt((s[n]["temp_bytes"] or 0) / 2 ** 20),
             _fmt(s[n]["compile_s"])] for n in VARIANTS if n in s]
    L = [md_table(["variant", "ms median", "IQR", "samples", "temp MB", "compile s"], rows)]
    L += ["", "| ratio (fnbp / vmap way) | median over rounds | IQR | target |", "|---|---|---|---|",
          f"| per-example norms, time | {_fmt(r['norms_time']['median'])} | "
          f"{_fmt(r['norms_time']['q1'])}–{_fmt(r['norms_time']['q3'])} | ≤ 0.1 |",
          f"| DP step, time | {_fmt(r['dp_time']['median'])} | "
          f"{_fmt(r['dp_time']['q1'])}–{_fmt(r['dp_time']['q3'])} | ≤ 0.2 (≥ 5x faster) |",
          f"| DP step, temp memory | {_fmt(m['dp_temp'])} | — | ≤ 0.1 |",
          f"| norms, temp memory | {_fmt(m['norms_temp'])} | — | — |",
          f"| DP step / ordinary step, time | {_fmt(r['dp_vs_plain_step']['median'])} | "
          f"{_fmt(r['dp_vs_plain_step']['q1'])}–{_fmt(r['dp_vs_plain_step']['q3'])} | ≤ 1.15 |"]
    if "dp_clip_vs_plain_step" in r:       # results written before the split have no such rows
        clip_only, noise_only = r["dp_clip_vs_plain_step"], r["noise_vs_plain_step"]
        L += [f"| … its clipping only (dp_clip) / ordinary step, time | {_fmt(clip_only['median'])} | "
              f"{_fmt(clip_only['q1'])}–{_fmt(clip_only['q3'])} | — |",
              f"| … its noise draw alone / ordinary step, time | {_fmt(noise_only['median'])} | "
              f"{_fmt(noise_only['q1'])}–{_fmt(noise_only['q3'])} | — |",
              f"| DP step / ordinary step, temp memory | {_fmt(m.get('dp_vs_plain_temp'))} | — | ≤ 1.15 |"]
    L += ["", f"Agreement in float32: norms max relative difference {_fmt(res['agreement_float32']['norms_max_rel'])}, "
          f"DP step parameters max abs difference {_fmt(res['agreement_float32']['dp_step_max_abs'])} "
          "(same noise key; the float64 tests check ≤ 1e-10).", ""]
    return L


def render(res, result=None):
    """Markdown lines of the section (the MLP rows, then the LeNet rows when the run has them)."""
    L = [f"## Per-example norms and DP-SGD: explicit rules vs vmap(grad)", "",
         f"Network {'-'.join(map(str, res['sizes']))} (ReLU, softmax cross-entropy, {res['n_params']:,} parameters), "
         f"B = {res['batch']}, float32, clip C = {CLIP}, sigma = {SIGMA}. One process, interleaved rounds "
         f"(`fnbp.bench.harness.interleaved`), min {res['min_time']} s per variant"
         + (f" or {res['max_time']:g} s of rounds" if res.get("max_time") else "") + ". Shared CPU: compare the paired "
         "ratios, not absolute times.", ""] + _tables(res)
    le = res.get("lenet")
    if le:
        a = le["arch"]
        L += ["### LeNet rows", "",
              f"LeNet {'x'.join(map(str, a['image_shape']))} input, conv {a['kernel']}x{a['kernel']} channels "
              f"{tuple(a['channels'])} ({a['padding']}, 2x2 max-pool), dense {tuple(a['hidden'])} -> 10 "
              f"({le['n_params']:,} parameters), B = {le['batch']}, float32. Conv norm methods "
              f"(`fnbp.per_example.norm_method`): {', '.join(le['conv_norm_methods'])}; in the DP step "
              f"(`fnbp.per_example.clip_method`): {', '.join(le.get('conv_clip_methods', ['—']))}. The vmap way: "
              "jit(vmap(grad)) of the same LeNet written with lax.conv_general_dilated / reduce_window.", ""]
        L += _tables(le)
    return L


def _run(ctx):
    ctx.log("per-example norms and DP step: fnbp rules vs vmap(grad) ...")
    B = min(ctx.per_example_batch, 32) if ctx.quick else 256          # the B = 256 for a full run
    res = bench_per_example_rules(ctx.sizes, B, min_time=ctx.min_time, seed=ctx.seed)
    ctx.log("per-example norms and DP step on a LeNet ...")
    if ctx.quick:           # a tiny LeNet: a few small compiles
        arch, B = fnbp.cnn.LeNet(image_shape=(8, 8, 1), channels=(4, 6), kernel=3, padding="SAME", hidden=(8,)), \
            min(ctx.per_example_batch, 8)
    else:
        arch, B = fnbp.cnn.lenet((28, 28, 1)), 64
    res["lenet"] = bench_per_example_lenet(arch, B, min_time=ctx.min_time, seed=ctx.seed)
    return res


register("per_example_rules", run=_run, render=render,
         help="per-example norms and the DP-SGD step: fnbp.per_example/fnbp.dp vs vmap(grad) (+ clip)")
