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

For a CNN (``arch=``: a ``fnbp.cnn.LeNet`` or a ``fnbp.graph.Graph``) a conv layer's example-n gradient
is delta_n^T P_n (delta (B, S, C_out) over the S = H_out W_out positions, patches P (B, S, K)), its norm
from the Gram matrices over positions or the per-example matrix (``method=``, see ``fnbp.per_example``),
and the clipped sum is still ONE GEMM per layer, over the B S rows:

    sum_n c_n delta_n^T P_n = (c (.) delta)^T P      (c_n repeated over example n's positions; C_out x K)

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
import optax

from . import activations, losses
from .layers import dense_backward
from .per_example import layer_passes, norms_from_passes

__all__ = ["clipped_grad_sum", "loss_and_clipped_grad_sum", "private_grad", "gaussian_noise", "GaussianNoiseState",
           "add_noise", "gaussian", "epsilon"]


def _check_clip(name, clip, noise_multiplier=None):
    if not isinstance(clip, (int, float)) or isinstance(clip, bool) or not clip > 0 or not math.isfinite(clip):
        raise ValueError(f"{name}: clip must be a positive finite number (the L2 norm bound C), got {clip!r}")
    if noise_multiplier is not None and (not isinstance(noise_multiplier, (int, float)) or
                                         isinstance(noise_multiplier, bool) or not noise_multiplier >= 0 or
                                         not math.isfinite(noise_multiplier)):
        raise ValueError(f"{name}: noise_multiplier must be a finite number >= 0 (sigma: noise std = sigma C), "
                         f"got {noise_multiplier!r}")


def clipped_grad_sum(params, x, d, *, clip, activation=activations.relu, output=activations.identity,
                     loss=losses.half_sse, dropout=0.0, key=None, arch=None, method="auto"):
    """(sum_n c_n grad_theta E_n, norms): the clipped sum of the per-example gradients (params' structure)
    and the per-example norms ||grad_theta E_n|| before clipping, (B,).

    One forward, one backward (reduction='sum', so delta_n is example n's own), then per dense layer
    grad_W = delta^T diag(c) H and grad_b = delta^T c through ``dense_backward`` -- no per-example gradient
    is formed.  Arguments as ``fnbp.per_example.grads``; clip: C > 0.

    ``arch`` (a ``fnbp.cnn.LeNet`` or a ``fnbp.graph.Graph``, see ``fnbp.per_example.grads``): a conv layer's
    clipped sum is (c (.) delta)^T P, one GEMM over the B H_out W_out rows of delta and of the patches P;
    the norms by ``method`` ("auto", "gram", "direct": ``fnbp.per_example.batch_l2``).
    """
    _, sums, norms = loss_and_clipped_grad_sum(params, x, d, clip=clip, activation=activation, output=output,
                                               loss=loss, dropout=dropout, key=key, arch=arch, method=method,
                                               name="fnbp.dp.clipped_grad_sum")
    return sums, norms


def loss_and_clipped_grad_sum(params, x, d, *, clip, activation=activations.relu, output=activations.identity,
                              loss=losses.half_sse, dropout=0.0, key=None, arch=None, method="auto",
                              name="fnbp.dp.loss_and_clipped_grad_sum"):
    """(E, clipped sum, norms): ``clipped_grad_sum`` plus E = sum_n E_n, the batch's summed loss."""
    _check_clip(name, clip)
    if arch is not None or method != "auto":
        return _network_clipped_sum(params, x, d, clip, activation, output, loss, dropout, key, arch, method, name)
    E, passes = layer_passes(params, x, d, activation=activation, output=output, loss=loss, dropout=dropout,
                             key=key, name=name)
    norms = norms_from_passes(passes)
    c = 1.0 / jnp.maximum(1.0, norms / clip)                 # c_n = min(1, C / ||g_n||); 1 for a zero gradient
    sums = []
    for layer, p in zip(params, passes):
        weighted_delta = p.delta * c[:, None].astype(p.delta.dtype)          # diag(c) delta
        grad_W, grad_b, _ = dense_backward((layer["W"], p.h_prev), weighted_delta)   # delta^T diag(c) H
        sums.append({"W": grad_W, "b": grad_b})
    return E, sums, norms


def _network_clipped_sum(params, x, d, clip, activation, output, loss, dropout, key, arch, method, name):
    """The clipped sum for a network given by ``arch`` (conv and dense layers, ``fnbp.per_example_conv``)."""
    from . import per_example_conv as pc
    if method not in pc.METHODS:
        raise ValueError(f"{name}: method must be one of {pc.METHODS}, got {method!r}")
    if arch is None:
        raise ValueError(f"{name}: method={method!r} chooses the Gram or direct form for a network given by arch=; "
                         "an MLP's dense layers always use ||delta_n||^2 ||h_n||^2")
    E, passes = pc.network_passes(params, x, d, arch=arch, activation=activation, output=output, loss=loss,
                                  dropout=dropout, key=key, name=name)
    norms = pc.patch_norms(passes, method)
    c = 1.0 / jnp.maximum(1.0, norms / clip)                 # c_n = min(1, C / ||g_n||)
    sums = pc.as_params_tree(params, passes, [pc.patch_clipped_sum(p, c) for p in passes], jnp.zeros_like)
    return E, sums, norms


def gaussian(tree, key, std):
    """tree + N(0, std^2 I), one normal draw per leaf from fold_in(key, leaf index)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    noised = [g + std * jax.random.normal(jax.random.fold_in(key, i), jnp.shape(g), jnp.result_type(g))
              for i, g in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(treedef, noised)


def add_noise(clipped_sum, key, *, clip, noise_multiplier, batch_size):
    """(clipped_sum + N(0, sigma^2 C^2 I)) / batch_size (noise from ``gaussian(., key, sigma C)``)."""
    return jax.tree_util.tree_map(lambda g: g / batch_size, gaussian(clipped_sum, key, noise_multiplier * clip))


def private_grad(params, x, d, key, *, clip, noise_multiplier, activation=activations.relu,
                 output=activations.identity, loss=losses.half_sse, dropout=0.0, dropout_key=None, arch=None,
                 method="auto"):
    """(g_tilde, norms): the DP-SGD gradient 1/B (sum_n c_n grad E_n + N(0, sigma^2 C^2 I)) and the
    per-example norms before clipping.  ``key`` draws the noise (same key, same noise); B = x.shape[0]
    (the expected batch size of Abadi et al.'s lot).  Feed g_tilde to any optimizer (``fnbp.optim``, optax).
    ``arch``/``method``: a CNN, as in ``clipped_grad_sum``."""
    _check_clip("fnbp.dp.private_grad", clip, noise_multiplier)
    _, sums, norms = loss_and_clipped_grad_sum(params, x, d, clip=clip, activation=activation, output=output,
                                               loss=loss, dropout=dropout, key=dropout_key, arch=arch, method=method,
                                               name="fnbp.dp.private_grad")
    return add_noise(sums, key, clip=clip, noise_multiplier=noise_multiplier, batch_size=jnp.shape(x)[0]), norms


class GaussianNoiseState(NamedTuple):
    key: jax.Array     # the noise key of the run
    count: jax.Array   # steps taken; step t draws from fold_in(key, t)


def gaussian_noise(clip, noise_multiplier, batch_size, key) -> optax.GradientTransformation:
    """optax transformation: clipped sums (from ``clipped_grad_sum``) -> noised mean gradient.

    update: g_tilde = (updates + N(0, sigma^2 C^2 I)) / batch_size, noise from fold_in(key, step).
    Chain it before an optimizer: ``optax.chain(fnbp.dp.gaussian_noise(C, sigma, B, key), fnbp.optim.sgd(lr))``.
    """
    _check_clip("fnbp.dp.gaussian_noise", clip, noise_multiplier)
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
