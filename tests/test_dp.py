"""fnbp.dp: the clipped sum against clip-then-sum of vmap(grad), the noise, and epsilon from dp-accounting."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fnbp
from fnbp import dp

from per_example_oracle import flat_norms, make_case, max_abs_diff, reference_grads
from marks import slow_except

jax.config.update("jax_enable_x64", True)


@pytest.mark.parametrize("case", slow_except(["tanh-softmax_ce", "relu-half_sse"], "relu-half_sse"))
def test_clipped_sum_equals_clip_then_sum_of_vmap_grad(case):
    act, _, loss, _, params, x, d = make_case(case, seed=4)
    ref = reference_grads(case, params, x, d)
    ref_norms = flat_norms(ref)
    clip = float(jnp.median(ref_norms))                     # some examples clipped, some not
    assert int(jnp.sum(ref_norms > clip)) >= 2 and int(jnp.sum(ref_norms < clip)) >= 2
    scale = jnp.minimum(1.0, clip / ref_norms)
    ref_sum = jax.tree_util.tree_map(lambda g: jnp.tensordot(scale, g, axes=1), ref)
    got, norms = jax.jit(functools.partial(dp.clipped_grad_sum, clip=clip, activation=act, loss=loss))(params, x, d)
    assert max_abs_diff(got, ref_sum) <= 1e-10
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-10)
    unclipped = jax.tree_util.tree_map(lambda g: jnp.sum(g, 0), ref)
    assert max_abs_diff(got, unclipped) > 1e-3               # clipping changed the sum


@pytest.mark.slow
def test_huge_clip_gives_the_plain_sum_and_clipped_examples_have_norm_clip():
    act, _, loss, _, params, x, d = make_case("relu-half_sse", seed=5)
    got, _ = dp.clipped_grad_sum(params, x, d, clip=1e9, activation=act, loss=loss)
    _, plain = fnbp.backprop(params, x, d, activation=act, loss=functools.partial(loss, reduction="sum"))
    assert max_abs_diff(got, plain) <= 1e-10
    # one example alone, clipped: its contribution has norm exactly C
    one, norms = dp.clipped_grad_sum(params, x[:1], d[:1], clip=1e-3, activation=act, loss=loss)
    assert float(norms[0]) > 1e-3
    np.testing.assert_allclose(flat_norms(jax.tree_util.tree_map(lambda g: g[None], one)), [1e-3], rtol=1e-10)


def test_private_grad_noise_has_std_sigma_clip_and_follows_the_key():
    act, _, loss, _, params, x, d = make_case("tanh-softmax_ce", seed=6)
    clip, sigma = 0.5, 1.3
    kw = dict(clip=clip, noise_multiplier=sigma, activation=act, loss=loss)
    private_grad = jax.jit(functools.partial(dp.private_grad, **kw))                     # one program, three keys
    g1, _ = private_grad(params, x, d, jax.random.key(1))
    g1b, _ = private_grad(params, x, d, jax.random.key(1))
    g2, _ = private_grad(params, x, d, jax.random.key(2))
    assert max_abs_diff(g1, g1b) == 0.0 and max_abs_diff(g1, g2) > 1e-2
    sums, _ = jax.jit(functools.partial(dp.clipped_grad_sum, clip=clip, activation=act, loss=loss))(params, x, d)
    noise = jnp.concatenate([(x.shape[0] * a - s).ravel() for a, s in
                             zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(sums))])
    assert noise.size > 100
    np.testing.assert_allclose(float(jnp.std(noise)), sigma * clip, rtol=0.15)
    assert abs(float(jnp.mean(noise))) < 0.3 * sigma * clip
    zero_noise, _ = jax.jit(functools.partial(dp.private_grad, **dict(kw, noise_multiplier=0.0)))(
        params, x, d, jax.random.key(1))
    assert max_abs_diff(zero_noise, jax.tree_util.tree_map(lambda s: s / x.shape[0], sums)) <= 1e-15


@pytest.mark.parametrize("dtype", slow_except([jnp.float32, jnp.float64], jnp.float32))
def test_noise_draw_is_jax_random_normal_bit_for_bit(dtype):
    """The unrolled threefry of ``dp._normal`` gives exactly ``jax.random.normal``'s numbers (runs reproduce bit
    for bit): typed and raw keys, odd and multi-axis shapes; other key kinds fall back to jax.random.normal."""
    shapes = ((1,), (7,), (3, 5), (2, 3, 4), (64, 33))
    ours = jax.jit(lambda k: [dp._normal(k, shape, dtype) for shape in shapes])      # one program per key kind
    theirs = jax.jit(lambda k: [jax.random.normal(k, shape, dtype) for shape in shapes])
    for key in (jax.random.key(0), jax.random.key(2 ** 31 + 17), jax.random.PRNGKey(3)):
        for got, want in zip(ours(key), theirs(key)):
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    rbg = jax.random.key(1, impl="rbg")
    np.testing.assert_array_equal(dp._normal(rbg, (4, 3), dtype), jax.random.normal(rbg, (4, 3), dtype))


@pytest.mark.slow
def test_gaussian_noise_transformation_chains_with_an_optimizer():
    act, _, loss, _, params, x, d = make_case("relu-half_sse", seed=7)
    clip, sigma, key = 1.0, 0.8, jax.random.key(3)
    tx = optax.chain(dp.gaussian_noise(clip, sigma, x.shape[0], key), fnbp.optim.sgd(0.1))
    state = tx.init(params)
    sums, _ = dp.clipped_grad_sum(params, x, d, clip=clip, activation=act, loss=loss)
    updates, state = tx.update(sums, state, params)
    expected = dp.add_noise(sums, jax.random.fold_in(key, 0), clip=clip, noise_multiplier=sigma,
                            batch_size=x.shape[0])
    assert max_abs_diff(updates, jax.tree_util.tree_map(lambda g: -0.1 * g, expected)) <= 1e-12
    updates2, state = tx.update(sums, state, params)
    assert max_abs_diff(updates, updates2) > 1e-3             # step 1 draws fresh noise
    assert int(state[0].count) == 2


def test_epsilon_grows_with_steps_and_shrinks_with_sigma():
    kw = dict(sample_rate=256 / 60000, delta=1e-5)
    eps_steps = [dp.epsilon(noise_multiplier=1.1, steps=s, **kw) for s in (100, 1000, 10000)]
    assert eps_steps[0] < eps_steps[1] < eps_steps[2]
    eps_sigma = [dp.epsilon(noise_multiplier=s, steps=1000, **kw) for s in (0.7, 1.1, 2.0)]
    assert eps_sigma[0] > eps_sigma[1] > eps_sigma[2]
    assert dp.epsilon(noise_multiplier=1.1, steps=0, **kw) == 0.0
    assert dp.epsilon(noise_multiplier=0.0, steps=10, **kw) == math.inf


def _rdp_epsilon_integer_orders(q, sigma, steps, delta, orders=range(2, 257)):
    """epsilon of ``steps`` Poisson-subsampled Gaussian steps, computed here from the formulas, not from a library.

    RDP at an integer order alpha (Mironov, Talwar & Zhang 2019, "Renyi DP of the sampled Gaussian mechanism", Sec. 3.3):
        A_alpha = sum_k C(alpha, k) (1 - q)^(alpha - k) q^k exp((k^2 - k) / (2 sigma^2)),  RDP(alpha) = ln A_alpha / (alpha - 1)
    (q = 1: the plain Gaussian, RDP(alpha) = alpha / (2 sigma^2)); composition adds RDP over the steps; the conversion
    to (epsilon, delta) is Canonne, Kamath & Steinke 2020, Prop. 12 (Balle et al. 2020, Thm. 21):
        epsilon = min_alpha  steps RDP(alpha) + ln((alpha - 1) / alpha) - (ln delta + ln alpha) / (alpha - 1).
    Integer orders only, so this is an upper bound on an accountant that also tries fractional orders."""
    best = math.inf
    for a in orders:
        if q == 1.0:
            log_a = a * (a - 1) / (2 * sigma ** 2)
        else:
            terms = [math.lgamma(a + 1) - math.lgamma(k + 1) - math.lgamma(a - k + 1) + k * math.log(q)
                     + (a - k) * math.log1p(-q) + (k * k - k) / (2 * sigma ** 2) for k in range(a + 1)]
            top = max(terms)
            log_a = top + math.log(sum(math.exp(t - top) for t in terms))
        eps = steps * log_a / (a - 1) + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
        best = min(best, eps)
    return best


# (q, sigma, steps): Abadi et al.'s MNIST setting (B = 256 of N = 60000, sigma = 1.1, 60 epochs), their q = 0.01,
# sigma = 4 (10,000 steps), a small-sigma case and full-batch DP-GD.  Measured (delta = 1e-5): the formula above gives
# 2.59698 / 1.03549 / 5.39702 / 2.81411 and fnbp.dp.epsilon 2.59656 / 1.03549 / 5.37186 / 2.81365: fnbp's accountant also tries
# fractional orders, so it sits at or just below (by 0.02 %, 2e-13, 0.47 %, 0.02 %).
@pytest.mark.parametrize("q, sigma, steps", [(256 / 60000, 1.1, 60 * 60000 // 256), (0.01, 4.0, 10000),
                                             (0.02, 0.8, 500), (1.0, 5.0, 10)])
def test_epsilon_equals_the_rdp_formula_computed_here(q, sigma, steps):
    delta = 1e-5
    expected = _rdp_epsilon_integer_orders(q, sigma, steps, delta)
    got = dp.epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta)
    assert got <= expected * (1 + 1e-9)          # never looser than the integer-order bound
    assert got >= expected * (1 - 1e-2)          # and not tighter than fractional orders can make it
    pld = dp.epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, accountant="pld")
    assert 0.3 * got < pld <= got * 1.01         # PLD is the tighter bound


def test_bad_arguments_are_named():
    act, _, loss, _, params, x, d = make_case("relu-half_sse")
    with pytest.raises(ValueError, match=r"fnbp\.dp\.clipped_grad_sum: clip must be a finite number > 0 \(the L2 norm "
                                         r"bound C\), got 0\.0"):
        dp.clipped_grad_sum(params, x, d, clip=0.0)
    # None, a string: named, not a NoneType TypeError; numpy / JAX scalars are numbers (as float() takes them)
    with pytest.raises(ValueError, match=r"fnbp\.dp\.private_grad: noise_multiplier must be a finite number >= 0 "
                                         r"\(sigma: the noise std is sigma C\), got None"):
        dp.private_grad(params, x, d, jax.random.key(0), clip=1.0, noise_multiplier=None)
    with pytest.raises(ValueError, match=r"fnbp\.dp\.clipped_grad_sum: clip must be a finite number > 0 .*got '1'"):
        dp.clipped_grad_sum(params, x, d, clip="1")
    # (jit-ed: one program each instead of some 250 one-op programs run eagerly)
    clip_np, sigma_jnp = np.float64(1.0), jnp.float32(1.0)       # concrete scalars, made outside the trace
    g_np = jax.jit(lambda p: dp.private_grad(p, x, d, jax.random.key(0), clip=clip_np,
                                             noise_multiplier=sigma_jnp))(params)
    g_py = jax.jit(lambda p: dp.private_grad(p, x, d, jax.random.key(0), clip=1.0, noise_multiplier=1.0))(params)
    assert max_abs_diff(g_np, g_py) == 0.0
    with pytest.raises(ValueError, match=r"fnbp\.dp\.private_grad: noise_multiplier must be a finite number >= 0"):
        dp.private_grad(params, x, d, jax.random.key(0), clip=1.0, noise_multiplier=-1.0)
    with pytest.raises(ValueError, match=r"fnbp\.dp\.epsilon: delta must be in \(0, 1\), got 0"):
        dp.epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=10, delta=0)
    with pytest.raises(ValueError, match=r"fnbp\.dp\.epsilon: sample_rate must be in \(0, 1\]"):
        dp.epsilon(noise_multiplier=1.0, sample_rate=2.0, steps=10, delta=1e-5)
    with pytest.raises(ValueError, match=r"fnbp\.dp\.gaussian_noise: batch_size must be a positive integer"):
        dp.gaussian_noise(1.0, 1.0, 0, jax.random.key(0))
    bn = fnbp.mlp.init(jax.random.key(0), (5, 7, 6, 3), batch_norm=True)
    with pytest.raises(ValueError, match=r"fnbp\.dp\.clipped_grad_sum: node 'bn1' \(batch_norm\): batch norm couples"):
        dp.clipped_grad_sum(bn, x, d, clip=1.0)


@pytest.mark.slow
def test_train_with_huge_clip_and_no_noise_is_ordinary_training_and_noise_follows_the_key():
    data = fnbp.data.load_digits(seed=0)
    data = data._replace(x_train=data.x_train[:256], y_train=data.y_train[:256])
    params = fnbp.mlp.init(jax.random.key(0), (64, 16, 10))
    run = functools.partial(fnbp.train.train, params, fnbp.optim.sgd(0.1), data, key=jax.random.key(1), epochs=1,
                            batch_size=32, progress=False)
    plain = run(cfg=fnbp.train.Config(grad="backprop"))
    clipped_only = run(cfg=fnbp.train.Config(dp_clip=1e9))
    assert max_abs_diff(plain.params, clipped_only.params) <= 1e-5
    noisy = run(cfg=fnbp.train.Config(dp_clip=1.0, dp_noise=1.0))
    again = run(cfg=fnbp.train.Config(dp_clip=1.0, dp_noise=1.0))
    assert max_abs_diff(noisy.params, again.params) == 0.0
    assert max_abs_diff(noisy.params, plain.params) > 1e-3
    with pytest.raises(ValueError, match=r"fnbp\.train\.Config: dp_clip and dp_noise must be >= 0"):
        fnbp.train.Config(dp_noise=1.0)


@pytest.mark.slow
def test_cli_prints_epsilon_per_epoch(tmp_path):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "fnbp", "train", "--dp-clip", "1", "--dp-noise", "1.1", "--epochs",
                          "2", "--layers", "64,10", "--batch-size", "64", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("epoch")]
    eps = [float(ln.split("epsilon ")[1].split()[0]) for ln in lines]
    assert len(eps) == 2 and 0 < eps[0] < eps[1] < 10
    n_train, B = 1438, 64
    assert eps[1] == pytest.approx(dp.epsilon(noise_multiplier=1.1, sample_rate=B / n_train,
                                              steps=2 * (n_train // B), delta=1e-5), abs=1e-3)
    bad = subprocess.run([sys.executable, "-m", "fnbp", "train", "--dp-noise", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "--dp-noise needs --dp-clip > 0" in bad.stderr and "Traceback" not in bad.stderr


# --- CNNs: the clipped sum (c (.) delta)^T P per conv layer ----------------------------------------------------------
from per_example_oracle import LENET, conv_graph_case, lenet_reference_grads, make_cnn_case  # noqa: E402

CE = fnbp.losses.softmax_cross_entropy


@pytest.mark.slow
@pytest.mark.parametrize("case", ["lenet", "stride2-same"])
def test_cnn_clipped_sum_equals_clip_then_sum_of_vmap_grad_by_both_norm_methods(case):
    if case == "lenet":
        params, x, d = make_cnn_case(seed=8)
        arch, ref = LENET, lenet_reference_grads(params, x, d)
    else:
        arch, params, x, d, ref = conv_graph_case(case, seed=8)
    ref_norms = flat_norms(ref)
    clip = float(jnp.median(ref_norms))
    assert int(jnp.sum(ref_norms > clip)) >= 2 and int(jnp.sum(ref_norms < clip)) >= 2
    scale = jnp.minimum(1.0, clip / ref_norms)
    ref_sum = jax.tree_util.tree_map(lambda g: jnp.tensordot(scale, g, axes=1), ref)

    def both(params, x, d, key):
        kw = dict(clip=clip, arch=arch, loss=CE)
        return (dp.clipped_grad_sum(params, x, d, method="gram", **kw),
                dp.clipped_grad_sum(params, x, d, method="direct", **kw),
                dp.private_grad(params, x, d, key, noise_multiplier=0.0, **kw)[0])

    (gram, gram_norms), (direct, direct_norms), noiseless = jax.jit(both)(params, x, d, jax.random.key(0))
    for got, norms in ((gram, gram_norms), (direct, direct_norms)):
        assert max_abs_diff(got, ref_sum) <= 1e-10
        np.testing.assert_allclose(norms, ref_norms, rtol=1e-10)
    assert max_abs_diff(noiseless, jax.tree_util.tree_map(lambda g: g / x.shape[0], ref_sum)) <= 1e-12
    assert max_abs_diff(gram, jax.tree_util.tree_map(lambda g: jnp.sum(g, 0), ref)) > 1e-3   # clipping mattered


def test_cnn_dp_refusals():
    params, x, d = make_cnn_case()
    bn_arch = fnbp.cnn.LeNet(**{**LENET.__dict__, "batch_norm": True})
    bn = fnbp.cnn.init(jax.random.key(0), bn_arch, dtype=jnp.float64)
    with pytest.raises(ValueError, match=r"fnbp\.dp\.clipped_grad_sum: node 'bn1' \(batch_norm_channels\): batch norm couples"):
        dp.clipped_grad_sum(bn, x, d, clip=1.0, arch=bn_arch, loss=CE)
    with pytest.raises(ValueError, match=r"fnbp\.dp\.private_grad: method must be one of .* got 'ghost'"):
        dp.private_grad(params, x, d, jax.random.key(0), clip=1.0, noise_multiplier=1.0, arch=LENET, loss=CE,
                        method="ghost")
