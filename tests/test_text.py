"""fnbp.text: the shipped Shakespeare corpus (md5, vocabulary, 90/10 split), d2l's sequential batcher, and stateful
truncated BPTT with fnbp.charlm: carrying the state across chunks equals one pass over the whole stream (bit for
bit) and the gradient stops at the chunk boundary."""
import hashlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fnbp
from fnbp import charlm, optim, text
from marks import slow_except


@pytest.fixture(scope="module")
def corpus():
    return fnbp.data.load_shakespeare()


def test_shipped_shakespeare_is_the_documented_text(corpus):
    assert hashlib.md5(corpus.text.encode("ascii")).hexdigest() == "28ca313ef4325f4a36c338502f862ac2"
    # 46,508 newlines (the data README's "46,509 lines" counts the pieces of text.split("\n"), the last one empty)
    assert len(corpus.text) == 1_176_823 and corpus.text.count("\n") == 46_508 and corpus.text.endswith("\n")
    assert len(corpus.vocab) == 67 and corpus.vocab == "".join(sorted(set(corpus.text)))
    assert corpus.vocab[0] == "\n" and corpus.vocab[1] == " " and "ROMEO:\n" in corpus.text
    # nanoGPT's split: the first 90 % of the characters, then the last 10 %, together the whole text
    assert len(corpus.train) == int(0.9 * 1_176_823) and len(corpus.train) + len(corpus.validation) == 1_176_823
    assert text.decode(corpus.train[:200], corpus.vocab) == corpus.text[:200]
    assert text.decode(corpus.validation[-50:], corpus.vocab) == corpus.text[-50:]
    assert corpus.train.dtype == np.int32


def test_damaged_corpus_is_refused(monkeypatch):
    import gzip
    real = gzip.decompress
    monkeypatch.setattr(gzip, "decompress", lambda data: real(data)[:-1] + b"!")
    with pytest.raises(ValueError, match=r"fnbp.text.load_shakespeare: the shipped fnbp/datasets/shakespeare.txt.gz is "
                                         r"damaged: md5 of the text [0-9a-f]{32}, expected 28ca313e"):
        text.load_shakespeare()


def test_encode_decode_and_errors():
    vocab = "\n abc"
    assert list(text.encode("ab c\n", vocab)) == [2, 3, 1, 4, 0]
    assert text.decode(text.encode("ab c\n", vocab), vocab) == "ab c\n"
    with pytest.raises(ValueError, match=r"fnbp.text.encode: characters 'Zx' are not in the vocabulary"):
        text.encode("axZ", vocab)
    with pytest.raises(ValueError, match=r"fnbp.text.load_shakespeare: train_fraction must be a number strictly"):
        text.load_shakespeare(train_fraction=1.0)


def test_sequential_batches_are_d2l_sequential_partitioning():
    ids = np.arange(35)
    chunks = list(text.sequential_batches(ids, batch_size=2, seq_len=5))
    # rows of (35 - 1) // 2 = 17 symbols: row 0 = 0..16, row 1 = 17..33; 17 // 5 = 3 chunks
    assert len(chunks) == 3 == text.n_sequential_batches(35, 2, 5)
    np.testing.assert_array_equal(chunks[0][0], [[0, 1, 2, 3, 4], [17, 18, 19, 20, 21]])
    np.testing.assert_array_equal(chunks[1][0], [[5, 6, 7, 8, 9], [22, 23, 24, 25, 26]])
    for x, y in chunks:
        np.testing.assert_array_equal(y, x + 1)
    # row b of chunk k+1 continues row b of chunk k
    stitched = np.concatenate([x for x, _ in chunks], axis=1)
    np.testing.assert_array_equal(stitched, [np.arange(15), np.arange(17, 32)])
    # a random offset in [0, seq_len) from an explicit key: the same key, the same batches
    a = [x for x, _ in text.sequential_batches(ids, 2, 5, key=jax.random.key(3))]
    b = [x for x, _ in text.sequential_batches(ids, 2, 5, key=jax.random.key(3))]
    assert all(np.array_equal(u, v) for u, v in zip(a, b)) and 0 <= a[0][0, 0] < 5
    with pytest.raises(ValueError, match=r"fnbp.text.sequential_batches: a stream of 10 symbols is too short"):
        list(text.sequential_batches(np.arange(10), 2, 5))
    with pytest.raises(ValueError, match=r"fnbp.text.sequential_batches: seq_len must be an int >= 1, got 0"):
        list(text.sequential_batches(ids, 2, 0))


@pytest.mark.parametrize("cell", slow_except(["elman", "lstm", "gru"], "elman"))
def test_carried_state_equals_one_pass_over_the_whole_stream_bit_for_bit(cell):
    V, B, T, K = 13, 3, 4, 5
    params = charlm.init(jax.random.key(0), V, 6, embed=5, cell=cell)
    ids = np.random.default_rng(0).integers(0, V, B * T * K + 1)
    chunks = list(text.sequential_batches(ids, B, T))
    assert len(chunks) == K
    apply = jax.jit(lambda p, x, s: charlm.apply(p, x, s, cell))
    state, pieces = charlm.zero_state(params, B, cell), []
    for x, _ in chunks:
        logits, state = apply(params, x, state)
        pieces.append(logits)
    whole, final = apply(params, np.concatenate([x for x, _ in chunks], axis=1), charlm.zero_state(params, B, cell))
    np.testing.assert_array_equal(np.concatenate(pieces, axis=1), whole)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(final)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_detached_state_cuts_the_gradient_at_the_chunk_boundary():
    # chunk k+1's loss, started from chunk k's final state: with the state detached its gradient is that of a loss
    # whose h0, c0 are constants (nothing flows back into chunk k); without, it differs (full BPTT through k)
    V, B, T, H = 11, 2, 5, 4
    with jax.enable_x64(True):
        params = charlm.init(jax.random.key(1), V, H, embed=3, dtype=jnp.float64)
        (x0, y0), (x1, y1) = list(text.sequential_batches(np.random.default_rng(1).integers(0, V, 2 * B * T + 1),
                                                          B, T))
        zero = charlm.zero_state(params, B)

        def second_chunk_loss(p, cut):
            _, state = charlm.apply(p, x0, zero)
            return charlm.loss(p, x1, y1, charlm.detach(state) if cut else state)[0]
        constant_state = charlm.apply(params, x0, zero)[1]
        grad_cut = jax.jit(jax.grad(lambda p: second_chunk_loss(p, True)))(params)
        grad_full = jax.jit(jax.grad(lambda p: second_chunk_loss(p, False)))(params)
        grad_const = jax.jit(jax.grad(lambda p: charlm.loss(p, x1, y1, constant_state)[0]))(params)
        for name in params:
            np.testing.assert_array_equal(grad_cut[name], grad_const[name])
        # the cut matters: chunk 0's symbols' embedding rows get gradient only through the carried state
        assert max(float(np.max(np.abs(grad_full[n] - grad_cut[n]))) for n in params) > 1e-6
        # and the gradient does reach h0 of chunk k+1 (it is cut there, not zero)
        grad_h0 = jax.grad(lambda s: charlm.loss(params, x1, y1, s)[0])(constant_state)
        assert float(jnp.max(jnp.abs(grad_h0[0]))) > 1e-6


@pytest.mark.slow
def test_training_steps_on_shakespeare_lower_the_loss_from_ln_V(corpus):
    # a few stateful truncated-BPTT steps with clipping and Adam on the shipped text
    V, B, T = len(corpus.vocab), 16, 32
    params = charlm.init(jax.random.key(2), V, 64, embed=16)
    opt = optax.chain(optim.clip_by_global_norm(1.0), optim.adam(1e-2))
    step = charlm.make_train_step(opt)
    opt_state, state, losses = opt.init(params), charlm.zero_state(params, B), []
    for k, (x, y) in enumerate(text.sequential_batches(corpus.train[:40_000], B, T)):
        params, opt_state, state, E, grad_norm = step(params, opt_state, state, x, y)
        losses.append(float(E))
        if k == 59:
            break
    assert abs(losses[0] - math.log(V)) <= 0.01 * math.log(V)
    assert np.mean(losses[-10:]) < 0.85 * math.log(V), losses[-10:]
    out = charlm.sample(params, jax.random.key(0), text.encode("ROMEO:", corpus.vocab), 20, temperature=0.8)
    assert out.shape == (20,) and len(text.decode(out, corpus.vocab)) == 20


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_dropout_on_the_cell_outputs_equals_the_plain_jnp_model(cell):
    # charlm's dropout: the reference's inverted dropout (same key, same mask) on hs before the dense layer; the
    # carried state is the undropped h_T; value and gradients equal autodiff of the plain-jnp model (float64)
    from fnbp import reference, reference_rnn
    V, B, T, H, p = 9, 3, 5, 4, 0.3
    with jax.enable_x64(True):
        params = charlm.init(jax.random.key(4), V, H, embed=3, cell=cell, dtype=jnp.float64)
        ids = np.random.default_rng(4).integers(0, V, (B, T + 1))
        x, y, key, state = ids[:, :-1], ids[:, 1:], jax.random.key(5), charlm.zero_state(params, B, cell)

        def plain(q):
            xe = q["E"][x]
            if cell == "lstm":
                hs, _ = reference_rnn.lstm(q["W_x"], q["W_h"], q["b"], xe, *state)
            else:
                hs = reference_rnn.gru(q["W_x"], q["W_h"], q["b"], q["b_h"], xe, state)
            logits = reference.dropout(hs, p, key) @ q["W_out"].T + q["b_out"]
            return reference.softmax_cross_entropy(logits, y), hs[:, -1]

        (E, new_state), grads = jax.value_and_grad(
            lambda q: charlm.loss(q, x, y, state, cell, dropout=p, key=key), has_aux=True)(params)
        (E_ref, h_T), grads_ref = jax.value_and_grad(plain, has_aux=True)(params)
        assert abs(float(E - E_ref)) <= 1e-12 and float(E) != float(charlm.loss(params, x, y, state, cell)[0])
        np.testing.assert_allclose(new_state[0] if cell == "lstm" else new_state, h_T, rtol=0, atol=1e-14)
        for name in params:
            np.testing.assert_allclose(grads[name], grads_ref[name], rtol=0, atol=1e-12, err_msg=name)
        step = charlm.make_train_step(optim.sgd(0.1), cell, dropout=p)
        with pytest.raises(ValueError, match="needs an explicit jax.random key"):
            step(params, optim.sgd(0.1).init(params), state, x, y)
