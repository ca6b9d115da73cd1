"""Tests of fnbp.train_checks: the host-side checks before training, and the error types.

(How ``fnbp.train.train`` uses them: tests/test_train.py.)
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnbp import train_checks as tc


def test_labels_integer_in_range_pass_and_others_are_named():
    tc.check_labels("train", np.array([0, 2, 9]), 10)
    tc.check_labels("test", np.ones((3, 2)), 10)                   # 2-D targets: finite is enough
    with pytest.raises(TypeError, match=r"fnbp.train: train labels must be integer class indices in \[0, 10\), "
                                        r"got dtype float64"):
        tc.check_labels("train", np.array([0.0, 1.0]), 10)
    with pytest.raises(ValueError, match=r"validation labels must be in \[0, 3\): 2 of 5 are not "
                                         r"\(min -1, max 3, first bad at index 1\)"):
        tc.check_labels("validation", np.array([0, -1, 2, 3, 1]), 3)
    with pytest.raises(tc.NonFiniteInputError, match=r"my_fn: test targets holds 1 NaN/inf value\(s\) "
                                                     r"\(first at index \(1, 0\)\)"):
        tc.check_labels("test", np.array([[0.0, 1.0], [np.inf, 0.0]]), 2, name="my_fn")


def test_check_int_refuses_bool_float_and_small_values():
    assert tc._check_int("epochs", np.int64(3), 1) == 3 and tc._check_int("batch_size", None, 1, allow_none=True) is None
    for bad in (True, 2.0, "3"):
        with pytest.raises(TypeError, match="fnbp.train: epochs must be an integer, got"):
            tc._check_int("epochs", bad, 1)
    with pytest.raises(ValueError, match="fnbp.train: epochs must be >= 1, got 0"):
        tc._check_int("epochs", 0, 1)


def test_finite_tree_names_the_leaf_and_skips_keys():
    tree = {"params": [{"W": jnp.ones((2, 2)), "b": jnp.array([0.0, jnp.nan])}], "key": jax.random.key(0)}
    with pytest.raises(tc.NonFiniteInputError, match=r"initial parameters\['params'\]\[0\]\['b'\] holds 1 NaN"):
        tc._check_finite_tree("initial parameters", tree)
    tc._check_finite_tree("ok", {"W": jnp.ones(3), "key": jax.random.key(1), "n": np.arange(3)})


def test_error_types():
    assert issubclass(tc.NonFiniteLossError, tc.NonFiniteError) and issubclass(tc.NonFiniteParamsError, tc.NonFiniteError)
    assert issubclass(tc.NonFiniteError, FloatingPointError) and issubclass(tc.NonFiniteInputError, ValueError)
