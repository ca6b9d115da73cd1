"""fnbp.nn's sequence layers (Embedding, Elman, LSTM, GRU; Dense on the last axis): models built from them against
plain-jnp references (forward and gradient, jax.grad and the explicit walker), descriptions, named errors, the
embedding's per-example extension, and the first loss of a fresh model ~ ln V."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbp
from fnbp import nn, reference, reference_rnn
from vjp_oracle import max_rel
from marks import slow_except

V, B, T, D, H = 11, 3, 6, 4, 5
LOSS = fnbp.losses.softmax_cross_entropy


def _plain(cell, params, ids):
    """The same model in plain jnp (PyTorch's equations through lax.scan, no rule)."""
    emb, rec, out = params
    x = emb["E"][ids]
    h0 = jnp.zeros((ids.shape[0], H), x.dtype)
    if cell == "lstm":
        hs, _ = reference_rnn.lstm(rec["W_x"], rec["W_h"], rec["b"], x, h0, h0)
    elif cell == "gru":
        hs = reference_rnn.gru(rec["W_x"], rec["W_h"], rec["b_x"], rec["b_h"], x, h0)
    else:
        hs = reference_rnn.elman(rec["W_x"], rec["W_h"], rec["b"], x, h0)
    return hs @ out["W"].T + out["b"]


LAYERS = {"elman": nn.Elman, "lstm": nn.LSTM, "gru": nn.GRU}


@pytest.mark.parametrize("cell", slow_except(sorted(LAYERS), "gru"))
def test_sequence_model_matches_the_plain_reference(cell):
    model = nn.serial(nn.Embedding(V, D), LAYERS[cell](H), nn.Dense(V))
    ids = np.random.default_rng(0).integers(0, V, (B, T + 1))
    x, d = ids[:, :-1], ids[:, 1:]
    with jax.enable_x64(True):
        params, state = model.init(jax.random.key(0), (T,), jnp.float64)
        assert [sorted(p) for p in params] == [["E"], sorted(["W_x", "W_h"] + (["b_x", "b_h"] if cell == "gru"
                                                                              else ["b"])), ["W", "b"]]
        y, _ = jax.jit(lambda p: model.apply(p, state, x))(params)
        assert y.shape == (B, T, V) and model.output_shape((T,)) == (T, V)
        assert max_rel(y, _plain(cell, params, x)) <= 1e-12
        E, grads = jax.jit(lambda p: fnbp.backprop(p, x, d, model=model, loss=LOSS))(params)      # explicit walker
        E_ref, grads_ref = jax.jit(jax.value_and_grad(lambda p: reference.softmax_cross_entropy(
            _plain(cell, p, x), d)))(params)
        assert float(E) == pytest.approx(float(E_ref), rel=1e-13)
        for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_ref)):
            assert max_rel(a, b) <= 1e-12
        grads_jax = jax.jit(jax.grad(lambda p: LOSS(model.apply(p, state, x)[0], d)))(params)
        for a, b in zip(jax.tree_util.tree_leaves(grads_jax), jax.tree_util.tree_leaves(grads_ref)):
            assert max_rel(a, b) <= 1e-12


@pytest.mark.parametrize("cell", slow_except(["lstm", "gru"], "gru"))
def test_first_loss_of_a_fresh_model_is_ln_V(cell):
    # LSTM and GRU measured within 0.1 % and 0.3 % over 4 keys.  (Not Elman: with nn.Dense's Glorot output layer
    # its larger h_t make the first loss 0.7-1.9 % above ln V; fnbp.charlm's PyTorch-initialised output layer
    # keeps all three within 1 %, tests/test_embeddings.py.)
    V_, T_ = 67, 32
    model = nn.serial(nn.Embedding(V_, 16), LAYERS[cell](64), nn.Dense(V_))
    params, state = model.init(jax.random.key(1), (T_,))
    ids = jax.random.randint(jax.random.key(2), (16, T_ + 1), 0, V_)
    E = jax.jit(lambda p: LOSS(model.apply(p, state, ids[:, :-1])[0], ids[:, 1:]))(params)
    assert abs(float(E) - math.log(V_)) <= 0.01 * math.log(V_), float(E)


@pytest.mark.slow
def test_descriptions_round_trip_and_initialisation_is_pytorch_s():
    model = nn.serial(nn.Embedding(V, D), nn.GRU(H), nn.LSTM(7), nn.Elman(3), nn.Dense(V))
    assert nn.from_description(model.describe()) == model
    params, _ = model.init(jax.random.key(0), (T,))
    bound = 1 / math.sqrt(7)
    assert params[2]["W_h"].shape == (28, 7) and float(jnp.max(jnp.abs(params[2]["W_h"]))) <= bound
    assert params[1]["W_x"].shape == (15, D) and params[3]["W_x"].shape == (3, 7)


def test_named_errors():
    with pytest.raises(ValueError, match=r"fnbp.nn.LSTM: the input must be a sequence \(T, n_in\) per example, got "
                                         r"shape \(6,\)"):
        nn.serial(nn.LSTM(4)).init(jax.random.key(0), (6,))
    with pytest.raises(ValueError, match=r"fnbp.nn.GRU: hidden must be >= 1, got 0"):
        nn.GRU(0)
    with pytest.raises(TypeError, match=r"fnbp.nn.Embedding: dim must be an integer"):
        nn.Embedding(5, 2.5)


@pytest.mark.slow
def test_embedding_per_example_gradients():
    # the embedding's per-example extension: example n's gradient of its summed token losses, from one walk
    model = nn.serial(nn.Embedding(V, D), nn.Tanh(), nn.Dense(V))
    ids = np.random.default_rng(3).integers(0, V, (B, T + 1))
    x, d = ids[:, :-1], ids[:, 1:]
    with jax.enable_x64(True):
        params, state = model.init(jax.random.key(0), (T,), jnp.float64)
        per_example = fnbp.per_example.grads(params, x, d, model=model, loss=LOSS)
        ref = jax.vmap(lambda xi, di: jax.grad(lambda p: LOSS(model.apply(p, state, xi[None])[0], di[None],
                                                              reduction="sum"))(params))(x, d)
        for a, b in zip(jax.tree_util.tree_leaves(per_example), jax.tree_util.tree_leaves(ref)):
            assert a.shape[0] == B and max_rel(a, b) <= 1e-12
        ref_norms = jnp.sqrt(sum(jnp.sum(g.reshape(B, -1) ** 2, axis=1) for g in jax.tree_util.tree_leaves(ref)))
        norms = fnbp.per_example.grad_norms(params, x, d, model=model, loss=LOSS)   # E has no bias: no bias term
        assert max_rel(norms, ref_norms) <= 1e-12
