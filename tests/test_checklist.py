"""Tests of fnbp.checklist and fnbp.check_cases: ``fnbp check`` covers every rule of the package.

Each rule registers its row beside its definition (``register_check(...)``); the walk below imports
every module of fnbp, collects each ``fnbp.rule`` object it holds (public or private attribute) and
fails on one that no registered row checks.  The rows' results themselves: tests/test_crosscheck.py.
"""
import importlib
import pkgutil
import types

import jax.numpy as jnp
import numpy as np
import pytest

import fnbp
from fnbp import check_cases, checklist
from fnbp.rules import Rule, rule, rule_of


def _rules_in(module):
    """{Rule: 'module.attribute'} for every rule object ``module`` holds."""
    found = {}
    for attr, value in vars(module).items():
        r = value if isinstance(value, Rule) else rule_of(value) if callable(value) else None
        if r is not None and r.fwd.__module__ == module.__name__:      # defined here, not imported
            found.setdefault(r, f"{module.__name__}.{attr}")
    return found


def _package_rules():
    found = {}
    for info in pkgutil.walk_packages(fnbp.__path__, "fnbp."):
        if info.name.endswith("__main__"):
            continue
        found.update(_rules_in(importlib.import_module(info.name)))
    return found


def test_every_rule_in_the_package_has_a_check_row():
    found = _package_rules()
    missing = sorted(where for r, where in found.items() if r not in check_cases.covered_rules())
    assert not missing, (f"rules without a `fnbp check` row (add register_check(...) beside each): "
                         f"{', '.join(missing)}")
    # the walk sees the rules of every layer: ops, conv, pools, feedback, per-example
    where = set(found.values())
    for name in ["fnbp.layers.dense", "fnbp.ops.batch_norm_eval", "fnbp.conv.conv2d_naive", "fnbp.pool.max_pool",
                 "fnbp.feedback.step_ste", "fnbp.regularization._dropout", "fnbp.losses.l2_penalty"]:
        assert name in where, name
    assert len(found) >= 34                # the review's count at wave 2 (a floor: rules get added)


def test_the_walk_finds_an_unregistered_rule():
    """The mechanism of the test above: a module with a rule that no row covers is reported."""
    module = types.ModuleType("fnbp_fake_ops")

    def cube_fwd(a):
        return a ** 3, a
    cube_fwd.__module__ = module.__name__
    module.cube = rule(cube_fwd, lambda a, g: (3 * a * a * g,))
    module.imported = fnbp.relu                              # imported from elsewhere: not this module's
    found = _rules_in(module)
    assert list(found.values()) == ["fnbp_fake_ops.cube"]
    assert module.cube.rule not in check_cases.covered_rules()


def test_register_refuses_a_non_rule_and_a_duplicate_row(monkeypatch):
    monkeypatch.setattr(check_cases, "CASES", list(check_cases.CASES))
    with pytest.raises(TypeError, match="check_cases.register: .*not a function made with fnbp.rule"):
        check_cases.register(jnp.tanh, "tanh", "activation", name="plain_tanh")
    with pytest.raises(ValueError, match="'relu' is registered twice"):
        check_cases.register(fnbp.relu, "relu", "activation")


def test_rows_names_and_inputs():
    names = checklist.case_names()
    assert len(names) == len(set(names))
    for name in ["dense", "relu", "leaky_relu", "half_sse[mean]", "softmax_cross_entropy[sum]", "l2_penalty",
                 "batch_norm", "dropout", "conv2d[1,SAME]", "conv2d_naive[2,1]", "max_pool", "avg_pool", "flatten",
                 "global_avg_pool", "batch_norm_channels", "add", "mul", "log", "ops.batch_norm_eval", "dense_fa",
                 "dense_fa[grad_h]", "sign_ste", "step_ste", "dropout_per_example"]:
        assert name in names, name
    with pytest.raises(ValueError, match="no inputs of kind 'nope'"):
        checklist._inputs("nope", np.random.default_rng(0), 3)


@pytest.fixture(scope="module")
def new_rows():
    new = ["conv2d[2,1]", "conv2d_naive[1,SAME]", "max_pool", "avg_pool", "flatten", "global_avg_pool",
           "batch_norm_channels", "add", "mul", "log", "ops.batch_norm_eval", "dense_fa", "dense_fa[grad_h]",
           "sign_ste", "step_ste", "dropout_per_example"]
    return {r.name: r for r in checklist.check_all(rules=new)}


@pytest.mark.slow
def test_the_rows_added_in_wave_3_pass(new_rows):
    assert len(new_rows) == 8 + 2 * 8   # 8 batch-only rows; add, mul, log, bn_eval, dense_fa x2, 2 STEs: also one example
    for r in new_rows.values():
        assert r.ok and min(r.fd_coords) > 0, r
    assert new_rows["dense_fa (batch 7)"].argnums == (0, 1)        # W, b: the true gradient
    assert new_rows["dense_fa[grad_h] (batch 7)"].argnums == (0,)  # h alone, against B h + b
    assert new_rows["ops.batch_norm_eval (batch 7)"].argnums == (0, 1, 2, 3, 4)


def _bad_window_bwd(res, grad_h):
    a, window = res
    return grad_h * (jnp.abs(a) <= 2 * window), None         # the window doubled


def test_a_wrong_surrogate_backward_is_caught(monkeypatch):
    """The STE rows can fail: an STE whose window is twice the surrogate's is reported by both oracles."""
    from fnbp import feedback
    bad = rule(feedback.sign_ste.rule.fwd, _bad_window_bwd, name="sign_ste", nondiff=("window",))
    monkeypatch.setattr(check_cases, "CASES", [c._replace(fn=bad) if c.name == "sign_ste" else c
                                               for c in check_cases.CASES])
    monkeypatch.setattr(checklist, "CASES", check_cases.CASES)
    results = checklist.check_all(rules=["sign_ste"], seed=3)
    assert results and not any(r.ok for r in results)
    assert all(max(r.autodiff_rel) > 0.1 and max(r.fd_rel) > 0.1 for r in results)
