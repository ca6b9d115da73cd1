"""Tests of fnbp._checkpoint_format: the names, records and tree layout that fnbp.checkpoint writes and reads.

(Saving, loading, atomicity and resume: tests/test_checkpoint.py.)
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnbp import _checkpoint_format as fmt
from fnbp import checkpoint as ckpt
from test_checkpoint import _same_leaves        # one comparison of leaf names, dtypes, shapes and bytes


def test_flat_dict_and_unflatten_names_round_trip_and_errors():
    from fnbp import optim
    params = {"conv": [{"W": jnp.ones((2, 1, 3, 3)), "b": jnp.zeros(2)}], "dense": [{"W": jnp.eye(3)}] * 2}
    flat = ckpt.flat_dict(params)
    assert sorted(flat) == ["conv.0.W", "conv.0.b", "dense.0.W", "dense.1.W"]
    assert all(isinstance(v, np.ndarray) for v in flat.values())
    back = ckpt.unflatten(flat)
    assert isinstance(back["conv"], list) and isinstance(back["dense"], list) and len(back["dense"]) == 2
    _same_leaves(back, params)
    state = optim.adam(1e-3).init(params)                          # a NamedTuple: its fields name the leaves
    assert "s.conv.0.W" in ckpt.flat_dict(state)
    again = ckpt.unflatten(ckpt.flat_dict(state), like=state)
    assert type(again) is type(state)
    _same_leaves(again, state)
    assert ckpt.unflatten({"a.10": np.zeros(1), "a.2": np.ones(1)}) == {"a": {"10": np.zeros(1), "2": np.ones(1)}}
    with pytest.raises(ValueError, match=r"flat_dict: the key 'a\.b' .* contains the separator"):
        ckpt.flat_dict({"a.b": jnp.zeros(1)})
    with pytest.raises(ValueError, match="bare leaf"):
        ckpt.flat_dict(jnp.zeros(2))
    with pytest.raises(TypeError, match="typed PRNG key"):
        ckpt.flat_dict({"k": jax.random.key(0)})
    with pytest.raises(ValueError, match=r"unflatten: the names do not match the template: missing \['conv.0.b'\]"):
        ckpt.unflatten({k: v for k, v in flat.items() if k != "conv.0.b"}, like=params)


def test_keystr_fallback_and_tree_rebuild():
    """Records written without 'keys' name leaves by ``keystr``: the fallback parser reads them back."""
    assert fmt._parse_keystr("['a'][0].mu") == [["dict", "a"], ["seq", 0], ["attr", "mu"]]
    assert fmt._parse_keystr("['it\\'s'][12]") == [["dict", "it\\'s"], ["seq", 12]]
    items = [([["dict", "p"], ["seq", 1], ["dict", "W"]], 1.0), ([["dict", "p"], ["seq", 0], ["dict", "W"]], 0.0),
             ([["dict", "step"]], 7)]
    assert fmt._rebuild_tree(items) == {"p": [{"W": 0.0}, {"W": 1.0}], "step": 7}
    # a list position without leaves (an empty container) comes back as {}
    assert fmt._rebuild_tree([([["seq", 2]], 5)]) == [{}, {}, 5]


def test_checkpoint_error_is_a_value_error_and_the_public_names_are_these():
    assert issubclass(fmt.CheckpointError, ValueError)
    assert ckpt.flat_dict is fmt.flat_dict and ckpt.unflatten is fmt.unflatten
