"""Tests of fnbp.keys: every random stream of a step is distinct, and each is a pure function of the run's key.

Oracle: the key data themselves (``jax.random.key_data``) compared across streams, and ``jax.random.fold_in`` /
``split`` as the module's docstring table states them.
"""
import jax
import numpy as np

from fnbp import keys


def _data(k):
    return tuple(np.asarray(jax.random.key_data(k)).ravel().tolist())


def test_the_streams_of_one_step_never_collide():
    """Dropout layers 0 .. DP_NOISE - 1 (216), the augmentation shifts and the DP noise of one step get pairwise
    different keys, and so do the examples' keys.  (With 1000 dropout layers the test fails: layer 217 would
    share the DP noise's tag 0xD9, kept for reproducibility with earlier releases; the docstring says so.)"""
    step_key = keys.step(keys.epoch(jax.random.key(0), 3), 7)
    streams = [keys.dropout(step_key, k) for k in range(keys.DP_NOISE)] + [keys.augment(step_key), keys.dp_noise(step_key)]
    assert len({_data(k) for k in streams}) == len(streams)
    assert keys.AUGMENT > keys.DP_NOISE >= 200                      # room for 200 dropout layers
    per = keys.per_example(step_key, 64)
    assert len({_data(k) for k in per}) == 64


def test_same_key_same_stream_different_key_different_stream():
    for make in (lambda k: keys.augment(keys.step(keys.epoch(k, 1), 2)),
                 lambda k: keys.leaf(keys.dp_noise(keys.micro_batch(k, 3)), 5)):
        assert _data(make(jax.random.key(11))) == _data(make(jax.random.key(11)))
        assert _data(make(jax.random.key(11))) != _data(make(jax.random.key(12)))


def test_the_docstring_table_is_what_the_functions_do():
    k = jax.random.key(5)
    fold = jax.random.fold_in
    for fn, tag in [(keys.epoch, 4), (keys.step, 9), (keys.micro_batch, 2), (keys.dropout, 1), (keys.leaf, 6)]:
        assert _data(fn(k, tag)) == _data(fold(k, tag)), fn.__name__
    assert _data(keys.augment(k)) == _data(fold(k, keys.AUGMENT))
    assert _data(keys.dp_noise(k)) == _data(fold(k, keys.DP_NOISE))
    assert all(_data(a) == _data(b) for a, b in zip(keys.per_example(k, 4), jax.random.split(k, 4)))
