"""fnbp.embedding (lookup; backward a scatter-add), softmax cross-entropy on (batch, T, V) logits averaged over
tokens, and the first loss of a fresh character model (fnbp.charlm) ~ ln V."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbp
from fnbp import charlm, losses, reference, reference_rnn
from vjp_oracle import FD_RTOL, max_rel, vjp_check


def test_embedding_vjp_matches_autodiff_and_finite_differences():
    rng = np.random.default_rng(0)
    checks = []
    for V, d, ids_shape in [(7, 3, (2, 5)), (4, 1, (9,)), (5, 4, ()), (3, 2, (2, 3, 4))]:
        ids = rng.integers(0, V, ids_shape).astype(np.int32)
        checks.append((fnbp.embedding, reference_rnn.embedding, (rng.standard_normal((V, d)), ids), (0,)))
    for res in vjp_check(checks):
        assert res["ad"][0] <= 1e-12 and res["fd"][0] <= FD_RTOL, res


def test_embedding_gradient_is_the_scatter_add_of_delta_by_symbol():
    # ids use symbol 1 three times, symbol 0 once and symbol 2 never: rows sum the deltas of their uses
    E = np.arange(8.0).reshape(4, 2)
    ids = np.array([[1, 0, 1], [3, 1, 3]])
    delta = np.arange(12.0).reshape(2, 3, 2) + 1
    out, vjp = jax.vjp(lambda E: fnbp.embedding(E, ids), E)
    np.testing.assert_array_equal(out, E[ids])
    (grad_E,) = vjp(delta)
    expected = np.zeros_like(E)
    for n in np.ndindex(ids.shape):
        expected[ids[n]] += delta[n]
    np.testing.assert_array_equal(grad_E, expected)
    assert np.all(grad_E[2] == 0)
    np.testing.assert_array_equal(grad_E[1], delta[0, 0] + delta[0, 2] + delta[1, 1])


def test_embedding_errors_and_out_of_range_ids_inside_jit_are_nan():
    E = np.zeros((5, 3))
    with pytest.raises(ValueError, match=r"fnbp.embedding: ids must be in \[0, 5\) for E of shape \(5, 3\), got "
                                         r"values in \[-1, 4\]"):
        fnbp.embedding(E, np.array([0, 4, -1]))
    with pytest.raises(ValueError, match=r"fnbp.embedding: ids must be integer symbol indices, got dtype float"):
        fnbp.embedding(E, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"fnbp.embedding: E must have shape \(V, d\), got shape \(5,\)"):
        fnbp.embedding(np.zeros(5), np.array([0]))
    out = np.asarray(jax.jit(fnbp.embedding)(np.ones((5, 3)), np.array([0, 5, -1, 2])))
    assert np.all(np.isnan(out[1])) and np.all(np.isnan(out[2])) and np.all(out[[0, 3]] == 1)


def test_softmax_cross_entropy_on_sequences_averages_over_tokens():
    rng = np.random.default_rng(1)
    B, T, V = 3, 5, 7
    logits, targets = 2 * rng.standard_normal((B, T, V)), rng.integers(0, V, (B, T))
    z = logits - logits.max(-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
    per_token = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
    assert float(losses.softmax_cross_entropy(logits, targets)) == pytest.approx(per_token.mean(), rel=1e-13)
    assert float(losses.softmax_cross_entropy(logits, targets, reduction="sum")) == pytest.approx(
        per_token.sum(), rel=1e-13)
    grad = jax.grad(losses.softmax_cross_entropy)(logits, targets)
    np.testing.assert_allclose(grad, (np.exp(log_p) - np.eye(V)[targets]) / (B * T), rtol=1e-12, atol=1e-15)
    res = vjp_check([(losses.softmax_cross_entropy, reference.softmax_cross_entropy, (logits, targets), (0,))])[0]
    assert res["ad"][0] <= 1e-12 and res["fd"][0] <= FD_RTOL


@pytest.mark.slow        # the fast loop checks ln V in test_nn_recurrent
@pytest.mark.parametrize("cell", ["elman", "lstm", "gru"])
def test_first_loss_of_a_fresh_character_model_is_ln_V(cell):
    # a fresh model's logits are small, so it predicts every one of V characters about equally: E ~ ln V nats/char
    V, B, T = 67, 16, 32
    key_params, key_data = jax.random.split(jax.random.key(0))
    params = charlm.init(key_params, V, 64, embed=16, cell=cell)
    ids = jax.random.randint(key_data, (B, T + 1), 0, V)
    E, _ = jax.jit(lambda p, ids: charlm.loss(p, ids[:, :-1], ids[:, 1:], charlm.zero_state(p, B, cell), cell))(
        params, ids)
    assert abs(float(E) - math.log(V)) <= 0.01 * math.log(V), (float(E), math.log(V))


@pytest.mark.slow
def test_char_model_gradient_matches_autodiff_of_the_plain_model():
    # the whole model (embedding, LSTM, dense on every step, token-averaged loss) vs jax.grad of plain jnp
    V, B, T, H = 11, 3, 6, 5
    with jax.enable_x64(True):
        params = charlm.init(jax.random.key(1), V, H, embed=4, cell="lstm", dtype=jnp.float64)
        ids = np.random.default_rng(2).integers(0, V, (B, T + 1))
        state = (0.1 * np.ones((B, H)), -0.2 * np.ones((B, H)))

        def plain(p):
            hs, _ = reference_rnn.lstm(p["W_x"], p["W_h"], p["b"], p["E"][ids[:, :-1]], *state)
            return reference.softmax_cross_entropy(hs @ p["W_out"].T + p["b_out"], ids[:, 1:])
        ours = jax.jit(jax.grad(lambda p: charlm.loss(p, ids[:, :-1], ids[:, 1:], state)[0]))(params)
        theirs = jax.jit(jax.grad(plain))(params)
        for name in params:
            assert max_rel(ours[name], theirs[name]) <= 1e-12, name
