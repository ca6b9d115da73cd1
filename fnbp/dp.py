"""Differentially private SGD (Abadi et al. 2016) from one backward pass of the explicit rules.

DP-SGD clips each example's gradient to L2 norm at most C and adds Gaussian noise of
standard deviation sigma C to the sum:

    c_n       = 1 / max(1, ||grad_theta E_n|| / C)                     (clip factor; ||.|| over all parameters)
    g_tilde   = 1/B ( sum_n c_n grad_theta E_n + N(0, sigma^2 C^2 I) )

Neither step needs per-example gradients.  The norms come from ``fnbp.per_example``
(||delta_n||^2 ||h_n||^2 per dense layer), and since example n's gradient of a dense layer
is delta_n h_n^T, the clipped sum is ONE weighted GEMM, the same product as the ordinary step:

    sum_n c_n delta_{k,n} h_{k-1,n}^T = delta_k^T diag(c) H_{k-1}     (``dense_backward`` on c (.) delta)
    sum_n c_n delta_{k,n}             = delta_k^T c

For any model (``model=``, an ``fnbp.nn`` model whose parametrised nodes have per-example extensions: dense,
conv2d; ``fnbp.per_example``) the same holds per node.  A conv layer's example-n gradient
is delta_n^T P_n (delta (B, S, C_out) over the S = H_out W_out positions, patches P (B, S, K)), its norm
from the Gram matrices over positions or the per-example matrix (``method=``; "auto" is
``fnbp.per_example.clip_method``'s time rule), and the clipped sum is either ONE GEMM per layer, over the B S rows,

    sum_n c_n delta_n^T P_n = (c (.) delta)^T P      (c_n repeated over example n's positions; C_out x K)

or, where the layer formed its per-example matrices G_n = delta_n^T P_n for the norm ("direct"), sum_n c_n G_n
from those same G_n (book-keeping, Bu et al. 2023): no layer does more GEMM work than the ordinary step's grad_W.
The memory trade: "direct" holds B C_out K numbers per layer, "gram" 2 B S^2; ``method="gram"`` is the lean one.

What the DP step costs beyond the ordinary step: the clipping adds only elementwise work (the norms, c ⊙ delta)
and holds every layer's delta until c is known (B sum_k C_out,k numbers: the ordinary backward frees each delta
as it goes); the noise draw, one N(0, 1) per parameter (``_normal``), is the part no clipping method removes,
and on a CPU it is the larger part for a dense network (784-512-512-10, B = 256: about a quarter of the
ordinary step's time; PyTorch's ``normal_`` of the same size costs about the same).

The noise is drawn from an explicit key: ``private_grad`` for a one-call noised mean gradient, or
``clipped_grad_sum`` followed by the optax-style ``gaussian_noise`` transformation (key and step
count in its state) chained before any optimizer.  The privacy budget (epsilon at delta) comes from
Google's ``dp-accounting`` library (``epsilon``); fnbp writes no accountant.
"""
import logging
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _threefry, activations, keys, losses
from .per_example import METHODS, as_params_tree, rows_norms_and_clipped_sums, walk

__all__ = ["clipped_grad_sum", "loss_and_clipped_grad_sum", "clipped_objective", "private_grad", "gaussian_noise",
           "GaussianNoiseState", "add_noise", "gaussian", "noise_std", "clip_factors", "epsilon"]


def _number(name, what, v, *, positive, meaning):
    """v as a float (anything float() takes: numpy and JAX scalars too), else a ValueError naming ``name``."""
    bound = "> 0" if positive else ">= 0"
    try:
        if isinstance(v, (bool, str, bytes)) or v is None:
            raise TypeError
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {what} must be a finite number {bound} ({meaning}), got {v!r}") from None
    if not math.isfinite(f) or (f <= 0 if positive else f < 0):
        raise ValueError(f"{name}: {what} must be a finite number {bound} ({meaning}), got {v!r}")
    return f


def _check_clip(name, clip, noise_multiplier=False):
    """C as a float > 0 (and sigma >= 0 unless ``noise_multiplier`` is False: not asked for)."""
    clip = _number(name, "clip", clip, positive=True, meaning="the L2 norm bound C")
    if noise_multiplier is False:
        return clip, None
    return clip, _number(name, "noise_multiplier", noise_multiplier, positive=False,
                         meaning="sigma: the noise std is sigma C")


def clip_factors(norms, clip):
    """c_n = min(1, C / ||g_n||) = 1 / max(1, ||g_n|| / C): 1 for a zero gradient."""
    return 1.0 / jnp.maximum(1.0, norms / clip)


def noise_std(clip, noise_multiplier, scale=1.0):
    """The standard deviation of DP-SGD's noise on a gradient reduced by ``scale`` (1/B for the mean over the
    batch, 1 for the sum): sigma C scale -- fnbp's one formula for it."""
    return noise_multiplier * clip * scale


def loss_and_clipped_grad_sum(params, x, d, *, clip, model=None, loss=losses.half_sse, key=None, method="auto",
                              activation=activations.relu, output=activations.identity, dropout=0.0, arch=None,
                              name="fnbp.dp.loss_and_clipped_grad_sum"):
    """(E, clipped sum, norms): E = sum_n E_n, the sum of the per-example gradients each clipped to norm C
    (params' structure), and the per-example norms before clipping, (B,).

    One forward, one backward (reduction='sum', so delta_n is example n's own); per parametrised node the
    norms come from (P, delta) (``fnbp.per_example``: ghost/Gram or direct, ``method``) and the clipped sum is
    the ordinary weight-gradient GEMM on the reweighted rows, (c (.) delta)^T P: no second backward and no
    per-example gradient.  Arguments as ``fnbp.per_example.grads``; clip: C > 0."""
    clip, _ = _check_clip(name, clip)
    if method not in METHODS:
        raise ValueError(f"{name}: method must be one of {METHODS}, got {method!r}")
    E, rows, _ = walk(params, x, d, model=model, loss=loss, key=key, arch=arch, activation=activation,
                      output=output, dropout=dropout, name=name)
    norms, row_sums = rows_norms_and_clipped_sums(rows, lambda n: clip_factors(n, clip), method)
    return E, as_params_tree(params, rows, row_sums, jnp.zeros_like), norms


def clipped_grad_sum(params, x, d, *, clip, model=None, loss=losses.half_sse, key=None, method="auto",
                     activation=activations.relu, output=activations.identity, dropout=0.0, arch=None):
    """(sum_n c_n grad_theta E_n, norms): ``loss_and_clipped_grad_sum`` without E."""
    _, sums, norms = loss_and_clipped_grad_sum(params, x, d, clip=clip, model=model, loss=loss, key=key,
                                               method=method, activation=activation, output=output, dropout=dropout,
                                               arch=arch, name="fnbp.dp.clipped_grad_sum")
    return sums, norms


def clipped_objective(params, x, d, *, clip, model=None, loss=losses.softmax_cross_entropy, l2=0.0, key=None,
                      method="auto", name="fnbp.dp.clipped_objective"):
    """(J, g, norms): the training objective J = reduce_n E_n + l2 Omega and its DP-SGD gradient before noise,
    g = s sum_n c_n grad E_n + l2 grad Omega, with s = 1/B when the loss reduces by the mean (1 for 'sum'): the
    examples' part clipped, the L2 penalty (one node of the same walk) added once, unclipped.  What
    ``fnbp.train`` runs for ``dp_clip > 0``; the noise is then ``gaussian(g, key, noise_std(C, sigma, s))``."""
    clip, _ = _check_clip(name, clip)
    spec = losses.loss_spec(loss, name=name)
    E, rows, penalty = walk(params, x, d, model=model, loss=spec, l2=l2, key=key, name=name)
    norms, row_sums = rows_norms_and_clipped_sums(rows, lambda n: clip_factors(n, clip), method)
    sums = as_params_tree(params, rows, row_sums, jnp.zeros_like)
    scale = example_scale(spec, jnp.shape(x)[0])
    if penalty is None:
        return E * scale, jax.tree_util.tree_map(lambda g: g * scale, sums), norms
    E_penalty, grad_penalty = penalty
    J = (E - E_penalty) * scale + E_penalty
    return J, jax.tree_util.tree_map(lambda g, p: g * scale + p, sums, grad_penalty), norms


def example_scale(spec, batch_size):
    """s: how the loss combines the examples' own losses, 1/B for reduction='mean', 1 for 'sum'."""
    return 1.0 / batch_size if spec.reduction == "mean" else 1.0


def _normal(key, shape, dtype):
    """``jax.random.normal(key, shape, dtype)``, bit for bit, for a threefry2x32 key (JAX's default, with
    ``jax_threefry_partitionable``, JAX's default since 0.5), with the cipher unrolled (``fnbp._threefry``):
    counter i = the flat index, bits = (hi ^ lo) (32-bit) or hi << 32 | lo (64-bit), u uniform in (-1, 1) from the
    mantissa bits, z = sqrt(2) erfinv(u).  Any other key, dtype or size: ``jax.random.normal`` itself.

    Why this generator (measured for the 669,706 float32 normals of the 784-512-512-10 MLP on a 2-core AMD EPYC,
    XLA:CPU, paired ratios to this function on a loaded machine): the cipher is about 35 % of the draw, erfinv
    about 45 % (its log1p half of that), and XLA runs the whole draw as one vectorised loop on ONE core.
    ``jax.random.normal`` itself (rolled cipher): 1.8x.  A ``jax.random.key(seed, impl="rbg")`` or
    ``"unsafe_rbg"`` key (XLA's RngBitGenerator): 8x.  Box-Muller from the two 32-bit words of one block (half
    the cipher work) with XLA's sin/cos: about 3x; both words through erfinv: 1.0x (laying the two halves out
    costs what the cipher saves).  Giles' erfinv with log((1 - u)(1 + u)) in place of log1p: 0.9x, no longer
    bit for bit.  None is a big win, so the noise stays ``jax.random.normal``'s numbers, bit for bit: same key,
    same noise, across releases and across this function and JAX's."""
    dtype = jnp.dtype(dtype)
    words = _threefry.key_words(key, shape, dtype)
    if words is None:
        return jax.random.normal(key, shape, dtype)
    floats = _threefry.uniform01(words, shape, dtype)
    one = np.array(1.0, dtype)
    low, high = np.nextafter(np.array(-1.0, dtype), np.array(0.0, dtype)), one
    u = jax.lax.max(jnp.asarray(low), floats * (high - low) + low)
    return np.array(np.sqrt(2), dtype) * jax.lax.erf_inv(u)


def gaussian(tree, key, std):
    """tree + N(0, std^2 I), one normal draw per leaf from ``fnbp.keys.leaf(key, leaf index)`` (the numbers of
    ``jax.random.normal``, drawn by ``_normal``)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    noised = [g + std * _normal(keys.leaf(key, i), jnp.shape(g), jnp.result_type(g))
              for i, g in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(treedef, noised)


def add_noise(clipped_sum, key, *, clip, noise_multiplier, batch_size):
    """(clipped_sum + N(0, sigma^2 C^2 I)) / batch_size (noise from ``gaussian(., key, noise_std(C, sigma))``)."""
    clip, noise_multiplier = _check_clip("fnbp.dp.add_noise", clip, noise_multiplier)
    return jax.tree_util.tree_map(lambda g: g / batch_size,
                                  gaussian(clipped_sum, key, noise_std(clip, noise_multiplier)))


def private_grad(params, x, d, key, *, clip, noise_multiplier, model=None, loss=losses.half_sse, dropout_key=None,
                 method="auto", activation=activations.relu, output=activations.identity, dropout=0.0, arch=None):
    """(g_tilde, norms): the DP-SGD gradient 1/B (sum_n c_n grad E_n + N(0, sigma^2 C^2 I)) and the per-example
    norms before clipping.  ``key`` draws the noise (same key, same noise); B = x.shape[0] (the expected batch
    size of Abadi et al.'s lot).  Feed g_tilde to any optimizer (``fnbp.optim``, optax)."""
    clip, noise_multiplier = _check_clip("fnbp.dp.private_grad", clip, noise_multiplier)
    _, sums, norms = loss_and_clipped_grad_sum(params, x, d, clip=clip, model=model, loss=loss, key=dropout_key,
                                               method=method, activation=activation, output=output, dropout=dropout,
                                               arch=arch, name="fnbp.dp.private_grad")
    return add_noise(sums, key, clip=clip, noise_multiplier=noise_multiplier, batch_size=jnp.shape(x)[0]), norms


class GaussianNoiseState(NamedTuple):
    key: jax.Array     # the noise key of the run
    count: jax.Array   # steps taken; step t draws from fold_in(key, t)


def gaussian_noise(clip, noise_multiplier, batch_size, key) -> optax.GradientTransformation:
    """optax transformation: clipped sums (from ``clipped_grad_sum``) -> noised mean gradient.

    update: g_tilde = (updates + N(0, sigma^2 C^2 I)) / batch_size, noise from fold_in(key, step).
    Chain it before an optimizer: ``optax.chain(fnbp.dp.gaussian_noise(C, sigma, B, key), fnbp.optim.sgd(lr))``.
    """
    clip, noise_multiplier = _check_clip("fnbp.dp.gaussian_noise", clip, noise_multiplier)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"fnbp.dp.gaussian_noise: batch_size must be a positive integer, got {batch_size!r}")

    def init(params):
        del params
        return GaussianNoiseState(key, jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        del params
        step_key = jax.random.fold_in(state.key, state.count)
        noised = add_noise(updates, step_key, clip=clip, noise_multiplier=noise_multiplier, batch_size=batch_size)
        return noised, GaussianNoiseState(state.key, state.count + 1)

    return optax.GradientTransformation(init, update)


def epsilon(*, noise_multiplier, sample_rate, steps, delta, accountant="rdp"):
    """The privacy budget epsilon at delta of ``steps`` DP-SGD steps, from Google's ``dp-accounting``.

    Each step is the subsampled Gaussian mechanism: ``PoissonSampledDpEvent(sample_rate,
    GaussianDpEvent(noise_multiplier))`` composed ``steps`` times, accounted with the RDP accountant
    (Abadi et al.'s moments accountant, ``accountant="rdp"``) or the PLD accountant (``"pld"``, tighter).
    sample_rate q = B / N.  (fnbp's trainer shuffles and takes fixed-size batches; the usual convention,
    followed here, reports the Poisson-sampling bound.)  Returns a float (0.0 for 0 steps, inf if sigma = 0).
    """
    name = "fnbp.dp.epsilon"
    if not isinstance(noise_multiplier, (int, float)) or not noise_multiplier >= 0:
        raise ValueError(f"{name}: noise_multiplier must be a number >= 0, got {noise_multiplier!r}")
    if not isinstance(sample_rate, (int, float)) or not 0 < sample_rate <= 1:
        raise ValueError(f"{name}: sample_rate must be in (0, 1] (batch size / training-set size), got "
                         f"{sample_rate!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"{name}: steps must be an integer >= 0, got {steps!r}")
    if not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ValueError(f"{name}: delta must be in (0, 1), got {delta!r}")
    if accountant not in ("rdp", "pld"):
        raise ValueError(f"{name}: accountant must be 'rdp' or 'pld', got {accountant!r}")
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    import dp_accounting                       # imported here: only privacy accounting needs it
    absl_logger = logging.getLogger("absl")    # dp-accounting logs each RDP order it drops (harmless) at WARNING
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), steps)
    if accountant == "rdp":
        acc = dp_accounting.rdp.RdpAccountant()
    else:
        acc = dp_accounting.pld.PLDAccountant()
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        acc.compose(event)
        return float(acc.get_epsilon(delta))
    finally:
        absl_logger.setLevel(level)
