"""Tests of the cross-check itself (fnbp.crosscheck, fnbp.checklist, ``fnbp check``).

``check_all`` must pass for every registered rule (one example and a batch), and
``check`` must be able to fail: a rule with a wrong backward is caught by the
autodiff comparison, a rule with the right backward but a wrong forward by the
finite differences, a wrong gradient for a second argument (PReLU's alpha) is
reported on that argument, with the index and both values; a function without a
hand-written rule is refused; a point on a kink is reported, not failed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbp
from fnbp import checklist, cli, crosscheck, reference
from fnbp.crosscheck import AUTODIFF_RTOL, FD_TOL

RULES = ["dense", "identity", "sigmoid", "tanh", "relu", "leaky_relu", "prelu", "step", "sign", "softmax"] + \
    [f"{loss}[{r}]" for loss in ["half_sse", "sse", "mse", "mae", "cross_entropy", "softmax_cross_entropy"]
     for r in ("mean", "sum")]


@pytest.fixture(scope="module")
def all_results():
    return checklist.check_all()          # every registered rule, one example and a batch of 7


@pytest.mark.slow
def test_check_all_passes_for_every_rule(all_results):
    names = [r.name for r in all_results]
    for rule in RULES:
        assert f"{rule} (one example)" in names and f"{rule} (batch 7)" in names, rule
    assert "l2_penalty (params)" in names and "batch_norm (batch 7)" in names and "dropout (batch 7)" in names
    assert len(all_results) == len(set(names)) >= 2 * len(RULES) + 1
    for r in all_results:
        assert r.ok, r
        assert max(r.autodiff_rel) <= AUTODIFF_RTOL and max(r.fd_rel) <= FD_TOL, r
        assert r.vmap_abs <= 1e-12 and sum(r.kinks) == 0 and min(r.fd_coords) > 0, r
    by_name = {r.name: r for r in all_results}
    assert by_name["dense (batch 7)"].argnames == ("W", "b", "h_prev")
    assert by_name["prelu (batch 7)"].argnums == (0, 1)                       # alpha's gradient is checked
    assert by_name["softmax_cross_entropy[mean] (batch 7)"].argnums == (0,)   # integer labels are not
    assert by_name["mse[sum] (one example)"].argnums == (0, 1)
    assert by_name["l2_penalty (params)"].argnums == (0, 1)


@pytest.mark.slow
def test_table_and_cli(all_results, monkeypatch, capsys):
    table = checklist.format_table(all_results).splitlines()
    assert len(table) == 2 + len(all_results)
    assert all(row.endswith("| yes |") for row in table[2:])

    def fake(results):
        def check_all(rules=None, on_result=None, **_):
            chosen = [r for r in results if rules is None or r.name.split(" (")[0] in rules]
            for r in chosen:
                on_result(r)
            return chosen
        return check_all
    monkeypatch.setattr(checklist, "check_all", fake(all_results))
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    assert f"{len(all_results)}/{len(all_results)} rules agree" in out and "| dense (one example) |" in out
    assert cli.main(["check", "--rule", "relu,tanh"]) == 0
    out = capsys.readouterr().out
    assert "4/4 rules agree" in out and "| relu (batch 7) |" in out and "dense" not in out
    bad = all_results[0]._replace(autodiff_rel=(1.0,) * len(all_results[0].argnums),
                                  worst=crosscheck.Mismatch("autodiff", "W", (1, 2), 2.0, 1.0, 1.0))
    monkeypatch.setattr(checklist, "check_all", fake([bad] + all_results[1:]))
    assert cli.main(["check"]) == 1
    out = capsys.readouterr().out
    assert "| NO |" in out and "W[1, 2]: our rule gives 2, autodiff gives 1" in out


def test_cli_unknown_rule_is_a_named_error(capsys):
    assert cli.main(["check", "--rule", "relu,nope"]) == 2
    err = capsys.readouterr().err
    assert "--rule nope" in err and "relu" in err and "Traceback" not in err


# --- the check can fail ------------------------------------------------------------------------
def _custom(fwd_value, bwd_factor):
    """A rule: forward fwd_value(a), backward grad_h * bwd_factor(a)."""
    def fwd(a):
        return fwd_value(a), a

    def bwd(a, g):
        return (g * bwd_factor(a),)
    return fnbp.rule(fwd, bwd, name="custom")


A = np.array([[-1.3, 0.4, 2.1, -0.2], [0.7, -2.2, 0.3, 1.5]])     # away from relu's kink


def test_relu_rule_itself_passes():
    r = fnbp.check(_custom(lambda a: jnp.maximum(a, 0), lambda a: (a > 0) * 1.0), reference.relu, A)
    assert r.ok, r
    assert r.jit_abs == 0.0 and r.fd_coords == (8,)


def test_wrong_backward_is_caught_by_autodiff():
    wrong = _custom(lambda a: jnp.maximum(a, 0), lambda a: 2.0 * (a > 0))          # backward x 2
    r = fnbp.check(wrong, reference.relu, A, name="relu x2")
    assert not r.ok
    assert r.autodiff_rel[0] == pytest.approx(1.0, rel=1e-12)   # |2g - g| / |g|
    assert r.fd_rel[0] > 1e-2                                     # and finite differences agree it is wrong
    assert "MISMATCH" in str(r) and "worst: a[" in str(r)


def test_right_backward_wrong_forward_is_caught_by_finite_differences():
    wrong = _custom(lambda a: 2.0 * jnp.maximum(a, 0), lambda a: (a > 0) * 1.0)    # forward x 2
    with pytest.raises(AssertionError, match="forward differs from the reference"):
        fnbp.check(wrong, reference.relu, A, name="relu forward x2")
    r = fnbp.check(wrong, lambda a: 2.0 * reference.relu(a), A)                      # same forward as ref now
    assert not r.ok
    assert r.autodiff_rel[0] > 0.1 and r.fd_rel[0] > 1e-2 and r.worst.oracle in ("autodiff", "finite differences")


def test_one_wrong_entry_is_located_by_argument_and_index():
    def bwd_factor(a):
        return jnp.where(a > 0, 1.0, 0.0).at[1, 3].multiply(3.0)        # wrong only at a[1, 3] (= 1.5 > 0)
    r = fnbp.check(_custom(lambda a: jnp.maximum(a, 0), bwd_factor), reference.relu, A)
    assert not r.ok
    assert r.worst.arg == "a" and r.worst.index == (1, 3)
    assert r.worst.analytic == pytest.approx(3 * r.worst.numeric, rel=1e-6)


def test_wrong_gradient_of_a_second_argument_is_reported_there():
    def fwd(a, alpha):
        return jnp.where(a > 0, a, alpha * a), (a, alpha)

    def bwd(res, g):
        a, alpha = res
        delta = jnp.where(a > 0, g, alpha * g)
        return delta, jnp.sum(jnp.where(a > 0, 0, g), axis=0)     # forgot the factor a in dg/dalpha

    prelu_bad = fnbp.rule(fwd, bwd, name="prelu_bad")
    r = fnbp.check(prelu_bad, reference.prelu, A, np.array([0.1, 0.2, 0.3, 0.4]))
    assert not r.ok and r.argnums == (0, 1) and r.argnames == ("a", "alpha")
    assert r.autodiff_rel[0] <= AUTODIFF_RTOL and r.fd_rel[0] <= FD_TOL
    assert r.autodiff_rel[1] > 0.1 and r.fd_rel[1] > 1e-2
    assert r.worst.arg == "alpha"


def test_function_without_a_rule_is_refused():
    with pytest.raises(TypeError, match="fnbp.check: tanh has no hand-written rule"):
        fnbp.check(jnp.tanh, reference.tanh, A)
    with pytest.raises(TypeError, match="no hand-written rule"):
        fnbp.check(lambda a: jnp.maximum(a, 0), reference.relu, A)
    assert fnbp.check(lambda a: 2 * fnbp.tanh(a), lambda a: 2 * reference.tanh(a), A).ok   # wraps a rule: fine


def test_kinks_are_reported_and_left_out_not_failed():
    a = np.array([[0.0, 0.5, -0.3, 0.0], [1.2, 0.0, -2.0, 0.7]])       # three entries exactly on relu's kink
    r = fnbp.check(fnbp.relu, reference.relu, a)
    assert r.ok, r
    assert r.kinks == (3,) and r.fd_coords == (5,)
    assert "3 on a kink left out" in str(r)
    # the README's example: digits have many exact-zero pixels
    x = fnbp.data.load_digits().x_train[:128]
    r = fnbp.check(fnbp.relu, reference.relu, x)
    assert r.ok and sum(r.kinks) > 0, r


def test_a_trained_student_rule_checks_and_its_wrong_version_is_caught():
    def softplus_fwd(a):
        return jnp.logaddexp(a, 0.0), a

    def softplus_bwd(a, g):
        return (g * jax.nn.sigmoid(a),)

    def softplus_bad_bwd(a, g):
        return (g * jax.nn.sigmoid(-a),)

    ref = lambda a: jnp.logaddexp(a, 0.0)                                   # noqa: E731
    assert fnbp.check(fnbp.rule(softplus_fwd, softplus_bwd), ref, A).ok
    bad = fnbp.check(fnbp.rule(softplus_fwd, softplus_bad_bwd), ref, A)
    assert not bad.ok and bad.worst is not None


def test_check_refuses_to_pass_vacuously_when_there_is_nothing_to_differentiate():
    """A rule whose only inputs are integers used to report 'ok on 0 coordinates'; it checked nothing."""
    count = fnbp.rule(lambda labels: (jnp.sum(labels).astype(jnp.float32), None), lambda _, g: (None,), name="count")
    with pytest.raises(ValueError, match=r"fnbp.check: count has no floating-point input with any entries "
                                         r"\(labels: int\d+\[3\]\).*it would check nothing"):
        fnbp.check(count, lambda labels: jnp.sum(labels).astype(jnp.float32), np.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"fnbp.check: relu has no floating-point input with any entries "
                                         r"\(a: float64\[0\]\)"):
        fnbp.check(fnbp.relu, reference.relu, np.zeros(0))


def test_check_names_a_mis_shaped_reference_and_a_failing_one():
    a = np.linspace(-1, 1, 6).reshape(2, 3)
    with pytest.raises(ValueError, match=r"fnbp.check: relu's reference returns shape \(3,\) but relu returns shape "
                                         r"\(2, 3\)"):
        fnbp.check(fnbp.relu, lambda a: reference.relu(a)[0], a)
    with pytest.raises(ValueError, match=r"fnbp.check: relu: calling the reference on the inputs failed: TypeError"):
        fnbp.check(fnbp.relu, lambda a: jnp.dot(a, a), a)
    with pytest.raises(ValueError, match=r"fnbp.check: pair: fn must return one array"):
        fnbp.check(lambda a: (fnbp.relu(a), a), lambda a: (a, a), a, name="pair")
