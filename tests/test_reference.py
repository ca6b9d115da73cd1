"""Tests of fnbp.reference: the plain-jnp references are the functions they claim to be.

Each reference is the oracle of ``fnbp check`` for a rule, so it is compared here with an independent
numpy computation (loops, closed forms), never with the rule it checks.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnbp import reference as ref

rng = np.random.default_rng(11)


def test_dense_softmax_and_losses_by_hand():
    W, b, h = rng.standard_normal((3, 4)), rng.standard_normal(3), rng.standard_normal((5, 4))
    np.testing.assert_allclose(ref.dense(W, b, h), h @ W.T + b, rtol=1e-13)
    z = rng.standard_normal((5, 6))
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    np.testing.assert_allclose(ref.softmax(z), p, rtol=1e-13)
    labels = np.array([0, 5, 2, 2, 1])
    np.testing.assert_allclose(ref.softmax_cross_entropy(z, labels, reduction="sum"),
                               -np.log(p[np.arange(5), labels]).sum(), rtol=1e-13)
    y, d = rng.standard_normal((5, 2)), rng.standard_normal((5, 2))
    np.testing.assert_allclose(ref.half_sse(y, d, reduction="mean"), 0.5 * ((y - d) ** 2).sum() / 5, rtol=1e-13)


def _conv_loop(W, b, h, stride, pad):
    """a[n, y, x, o] = b[o] + sum_{c, i, j} W[o, c, i, j] h_pad[n, s y + i, s x + j, c]: the definition, looped."""
    h = np.pad(h, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    C_out, C_in, kh, kw = W.shape
    Ho, Wo = (h.shape[1] - kh) // stride + 1, (h.shape[2] - kw) // stride + 1
    a = np.zeros((h.shape[0], Ho, Wo, C_out)) + b
    for y in range(Ho):
        for x in range(Wo):
            patch = h[:, stride * y: stride * y + kh, stride * x: stride * x + kw, :]     # (n, kh, kw, c)
            a[:, y, x, :] += np.einsum("nijc,ocij->no", patch, W)
    return a


@pytest.mark.parametrize("stride,pad", [(1, 0), (2, 1), (1, 1)])
def test_conv2d_is_the_looped_definition(stride, pad):
    W, b, h = rng.standard_normal((3, 2, 3, 2)), rng.standard_normal(3), rng.standard_normal((2, 6, 5, 2))
    got = ref.conv2d(W, b, h, stride=stride, padding=pad if pad else "VALID")
    np.testing.assert_allclose(got, _conv_loop(W, b, h, stride, pad), rtol=1e-12, atol=1e-12)


def test_pools_flatten_and_batch_norm_channels_by_hand():
    x = rng.standard_normal((2, 4, 6, 3))
    blocks = x.reshape(2, 2, 2, 3, 2, 3)                            # (n, y, i, x, j, c) windows of 2 x 2
    np.testing.assert_allclose(ref.max_pool(x, 2), blocks.max(axis=(2, 4)), rtol=1e-15)
    np.testing.assert_allclose(ref.avg_pool(x, 2), blocks.mean(axis=(2, 4)), rtol=1e-13)
    np.testing.assert_allclose(ref.flatten(x), x.reshape(2, 72), rtol=0)
    np.testing.assert_allclose(ref.global_avg_pool(x), x.mean(axis=(1, 2)), rtol=1e-13)
    gamma, beta = rng.standard_normal(3), rng.standard_normal(3)
    flat = x.reshape(-1, 3)
    expected = gamma * (x - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5) + beta
    np.testing.assert_allclose(ref.batch_norm_channels(x, gamma, beta), expected, rtol=1e-12)


def test_surrogates_of_the_non_gradient_rules():
    a = np.array([-2.0, -0.7, -0.2, 0.3, 0.6, 1.5])
    np.testing.assert_array_equal(ref.hardtanh(a), [-1.0, -0.7, -0.2, 0.3, 0.6, 1.0])
    np.testing.assert_array_equal(ref.hard_sigmoid(a), [0.0, 0.0, 0.3, 0.8, 1.0, 1.0])
    np.testing.assert_array_equal(jax.grad(lambda a: ref.hardtanh(a).sum())(a), [0, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(jax.grad(lambda a: ref.hard_sigmoid(a).sum())(a), [0, 0, 1, 1, 0, 0])
    W, B, b, h = rng.standard_normal((3, 4)), rng.standard_normal((3, 4)), rng.standard_normal(3), rng.standard_normal(4)
    c = rng.standard_normal(3)
    np.testing.assert_allclose(ref.dense_fa(W, b, h, B), W @ h + b, rtol=1e-13)
    grad_h = jax.grad(lambda h: ref.dense_fa_feedback(W, b, h, B) @ c)(h)
    np.testing.assert_allclose(grad_h, B.T @ c, rtol=1e-13)              # feedback alignment: B^T delta


def test_add_mul_log_batch_norm_eval_and_per_example_dropout():
    u, v = rng.standard_normal((3, 2)), rng.standard_normal(2)
    np.testing.assert_allclose(ref.add(u, v), u + v, rtol=0)
    np.testing.assert_allclose(ref.mul(u, v), u * v, rtol=0)
    np.testing.assert_allclose(ref.log(np.e), 1.0, rtol=1e-15)
    x, gamma, beta, mean, var = rng.standard_normal((4, 2)), np.ones(2), np.zeros(2), np.zeros(2), np.full(2, 4.0)
    np.testing.assert_allclose(ref.batch_norm_eval(x, gamma, beta, mean, var, eps=0.0), x / 2, rtol=1e-15)
    h = np.ones((3, 50))
    keys = jax.random.split(jax.random.key(0), 3)
    rows = ref.dropout_per_example(h, 0.5, keys)
    for n in range(3):                                                   # row n: the mask of keys[n]
        np.testing.assert_array_equal(rows[n], ref.dropout(h[n], 0.5, keys[n]))
    assert not np.array_equal(rows[0], rows[1]) and set(np.unique(rows)) <= {0.0, 2.0}
