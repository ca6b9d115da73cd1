"""Tests of the cross-check itself (fnbp.crosscheck, ``python -m fnbp check``).

``check_all`` must pass for every registered rule (one example and a batch),
and ``check`` must be able to fail: a rule with a wrong backward is caught by
the autodiff comparison, a rule with the right backward but a wrong forward by
the finite differences, and a wrong gradient for a second argument (PReLU's
alpha) is reported on that argument.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbp
from fnbp import cli, crosscheck, reference
from fnbp.crosscheck import AUTODIFF_RTOL, FD_TOL

RULES = ["dense", "identity", "sigmoid", "tanh", "relu", "leaky_relu", "prelu", "step", "sign", "softmax"] + \
    [f"{loss}[{r}]" for loss in ["half_sse", "sse", "mse", "mae", "cross_entropy", "softmax_cross_entropy"]
     for r in ("mean", "sum")]


@pytest.fixture(scope="module")
def all_results():
    return crosscheck.check_all()          # ~30 s: every registered rule, one example and a batch of 7


def test_check_all_passes_for_every_rule(all_results):
    names = [r.name for r in all_results]
    for rule in RULES:
        assert f"{rule} (one example)" in names and f"{rule} (batch 7)" in names, rule
    assert "l2_penalty (params)" in names
    assert len(all_results) == len(set(names)) >= 2 * len(RULES) + 1      # (other rules may be registered too)
    for r in all_results:
        assert r.ok, r
        assert max(r.autodiff_rel) <= AUTODIFF_RTOL and max(r.fd_rel) <= FD_TOL, r
        assert r.jit_abs <= 1e-12 and r.vmap_abs <= 1e-12, r     # jit and vmap equal the plain call
    by_name = {r.name: r for r in all_results}
    assert by_name["dense (batch 7)"].argnums == (0, 1, 2)
    assert by_name["prelu (batch 7)"].argnums == (0, 1)                       # alpha's gradient is checked
    assert by_name["softmax_cross_entropy[mean] (batch 7)"].argnums == (0,)   # integer labels are not
    assert by_name["mse[sum] (one example)"].argnums == (0, 1)
    assert by_name["l2_penalty (params)"].argnums == (0, 1)


def test_table_and_cli(all_results, monkeypatch, capsys):
    table = crosscheck.format_table(all_results).splitlines()
    assert len(table) == 2 + len(all_results)
    assert all(row.endswith("| yes |") for row in table[2:])
    # the CLI prints the table and exits 0; one failing rule makes it exit 1
    monkeypatch.setattr(crosscheck, "check_all", lambda: all_results)
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    assert f"{len(all_results)}/{len(all_results)} rules agree" in out and "| dense (one example) |" in out
    bad = all_results[0]._replace(autodiff_rel=(1.0,) * len(all_results[0].argnums))
    monkeypatch.setattr(crosscheck, "check_all", lambda: [bad] + all_results[1:])
    assert cli.main(["check"]) == 1
    assert "| NO |" in capsys.readouterr().out


# --- the check can fail ------------------------------------------------------------------------
def _custom(fwd_value, bwd_factor):
    """A custom_vjp rule: forward fwd_value(a), backward grad_h * bwd_factor(a)."""
    @jax.custom_vjp
    def f(a):
        return fwd_value(a)

    f.defvjp(lambda a: (fwd_value(a), a), lambda a, g: (g * bwd_factor(a),))
    return f


A = np.array([[-1.3, 0.4, 2.1, -0.2], [0.7, -2.2, 0.3, 1.5]])     # away from relu's kink


def test_relu_rule_itself_passes():
    r = fnbp.check(_custom(lambda a: jnp.maximum(a, 0), lambda a: (a > 0) * 1.0), reference.relu, A)
    assert r.ok, r


def test_wrong_backward_is_caught_by_autodiff():
    wrong = _custom(lambda a: jnp.maximum(a, 0), lambda a: 2.0 * (a > 0))          # backward x 2
    r = fnbp.check(wrong, reference.relu, A, name="relu x2")
    assert not r.ok
    assert r.autodiff_rel[0] == pytest.approx(1.0, rel=1e-12)   # |2g - g| / |g|
    assert r.fd_rel[0] > 1e-2                                     # and finite differences agree it is wrong


def test_right_backward_wrong_forward_is_caught_by_finite_differences():
    wrong = _custom(lambda a: 2.0 * jnp.maximum(a, 0), lambda a: (a > 0) * 1.0)    # forward x 2
    r = fnbp.check(wrong, reference.relu, A, name="relu forward x2")
    assert not r.ok
    assert r.autodiff_rel[0] <= AUTODIFF_RTOL       # the backward is the reference's ...
    assert r.fd_rel[0] > 1e-2                        # ... but not the derivative of this forward


def test_wrong_gradient_of_a_second_argument_is_reported_there():
    @jax.custom_vjp
    def prelu_bad(a, alpha):
        return jnp.where(a > 0, a, alpha * a)

    def fwd(a, alpha):
        return prelu_bad(a, alpha), (a, alpha)

    def bwd(res, g):
        a, alpha = res
        delta = jnp.where(a > 0, g, alpha * g)
        return delta, jnp.sum(jnp.where(a > 0, 0, g), axis=0)     # forgot the factor a in dg/dalpha

    prelu_bad.defvjp(fwd, bwd)
    r = fnbp.check(prelu_bad, reference.prelu, A, np.array([0.1, 0.2, 0.3, 0.4]))
    assert not r.ok and r.argnums == (0, 1)
    assert r.autodiff_rel[0] <= AUTODIFF_RTOL and r.fd_rel[0] <= FD_TOL
    assert r.autodiff_rel[1] > 0.1 and r.fd_rel[1] > 1e-2
