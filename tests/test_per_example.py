"""fnbp.per_example against vmap(grad) of a plain-jnp reference (float64)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbp
from fnbp import per_example
from fnbp import reference as R

from per_example_oracle import B, CASES, SIZES, flat_norms, make_case, max_abs_diff, reference_grads

jax.config.update("jax_enable_x64", True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_grads_equal_vmap_grad_of_reference(case):
    act, _, loss, _, params, x, d = make_case(case)
    got = per_example.grads(params, x, d, activation=act, loss=loss)
    ref = reference_grads(case, params, x, d)
    assert max_abs_diff(got, ref) <= 1e-12
    assert float(jnp.min(flat_norms(ref))) > 1e-3      # the comparison is not between zeros


@pytest.mark.parametrize("case", sorted(CASES))
def test_norms_and_second_moments_equal_reference(case):
    act, _, loss, _, params, x, d = make_case(case, seed=1)
    kw = dict(activation=act, loss=loss)
    ref = reference_grads(case, params, x, d)
    ref_norms = flat_norms(ref)
    np.testing.assert_allclose(per_example.grad_norms(params, x, d, **kw), ref_norms, rtol=1e-10)
    l2 = per_example.batch_l2(params, x, d, **kw)
    for got_layer, ref_layer in zip(l2, ref):
        for n in ("W", "b"):
            np.testing.assert_allclose(got_layer[n], jnp.sum(ref_layer[n].reshape(B, -1) ** 2, 1), rtol=1e-10)
    sgs = per_example.sum_grad_squared(params, x, d, **kw)
    assert max_abs_diff(sgs, jax.tree_util.tree_map(lambda g: jnp.sum(g ** 2, 0), ref)) <= 1e-12
    var = per_example.variance(params, x, d, **kw)
    assert max_abs_diff(var, jax.tree_util.tree_map(lambda g: jnp.var(g, 0), ref)) <= 1e-12
    assert float(max(jnp.max(v) for v in jax.tree_util.tree_leaves(var))) > 1e-4


def test_per_example_gradients_sum_to_the_batch_gradient_under_jit():
    act, _, loss, _, params, x, d = make_case("tanh-softmax_ce", seed=2)
    got = jax.jit(functools.partial(per_example.grads, activation=act, loss=loss))(params, x, d)
    _, batch = fnbp.backprop(params, x, d, activation=act, loss=functools.partial(loss, reduction="sum"))
    assert max_abs_diff(jax.tree_util.tree_map(lambda g: jnp.sum(g, 0), got), batch) <= 1e-12


def test_dropout_uses_one_mask_per_example_from_its_own_key():
    act, _, loss, _, params, x, d = make_case("relu-half_sse", seed=3)
    p, key = 0.4, jax.random.key(7)
    got = per_example.grads(params, x, d, activation=act, loss=loss, dropout=p, key=key)
    keys = jax.random.split(key, B)
    widths = SIZES[1:-1]
    masks = [jax.vmap(lambda kn, k=k, n=n: jax.random.bernoulli(jax.random.fold_in(kn, k), 1 - p, (n,)))(keys)
             / (1 - p) for k, n in enumerate(widths)]
    ref = reference_grads("relu-half_sse", params, x, d, masks=masks)
    assert max_abs_diff(got, ref) <= 1e-12
    assert float(jnp.mean(masks[0] == 0)) > 0.1                       # units were dropped
    without = per_example.grads(params, x, d, activation=act, loss=loss)
    assert max_abs_diff(got, without) > 1e-3
    # the same per-example key draws the mask fnbp.mlp.apply_stateful draws for that example alone
    y0, _ = fnbp.mlp.apply_stateful(params, fnbp.mlp.init_state(params), x[0], train=True, key=keys[0],
                                    dropout=p, activation=act)
    y0_ref = x[0]
    for k, layer in enumerate(params):
        y0_ref = R.dense(layer["W"], layer["b"], y0_ref)
        y0_ref = R.relu(y0_ref) * masks[k][0] if k < len(params) - 1 else y0_ref
    np.testing.assert_allclose(y0, y0_ref, rtol=1e-12)


def test_refusals_name_the_function_and_what_came():
    act, _, loss, _, params, x, d = make_case("relu-half_sse")
    bn = fnbp.mlp.init(jax.random.key(0), SIZES, batch_norm=True, dtype=jnp.float64)
    with pytest.raises(ValueError, match=r"fnbp\.per_example\.grad_norms: batch norm couples the examples"):
        per_example.grad_norms(bn, x, d)
    with pytest.raises(ValueError, match=r"fnbp\.per_example\.grads: x must be a mini-batch .* got shape \(5,\)"):
        per_example.grads(params, x[0], d[0])
    with pytest.raises(ValueError, match=r"fnbp\.per_example\.grads: dropout=0\.5 needs an explicit jax\.random key"):
        per_example.grads(params, x, d, dropout=0.5)
    with pytest.raises(ValueError, match=r"dropout must be a drop probability in \[0, 1\), got 1\.5"):
        per_example.batch_l2(params, x, d, dropout=1.5, key=jax.random.key(0))
    pre = fnbp.mlp.init(jax.random.key(0), SIZES, prelu_alpha=0.25, dtype=jnp.float64)
    with pytest.raises(ValueError, match=r"learnable PReLU slope"):
        per_example.grads(pre, x, d, activation=fnbp.prelu)


def test_nan_input_gives_nan_norm_for_that_example_only():
    act, _, loss, _, params, x, d = make_case("relu-half_sse")
    norms = per_example.grad_norms(params, x.at[2, 0].set(jnp.nan), d, activation=act, loss=loss)
    assert bool(jnp.isnan(norms[2])) and bool(jnp.all(jnp.isfinite(jnp.delete(norms, 2))))


def test_bench_case_reports_the_issue_ratios():
    """The benchmark rows (fnbp.bench case 'per_example_rules') on a tiny network: fields present, and the
    two ways agree in float32.  Speed is reported by the benchmark, never asserted."""
    from fnbp.bench import per_example_rules
    res = per_example_rules.bench_per_example_rules((8, 6, 3), 4, min_time=0.001, seed=0)
    assert set(res["stats"]) == set(per_example_rules.VARIANTS)
    assert all(res["ratios"][k]["median"] > 0 for k in ("norms_time", "dp_time", "dp_vs_plain_step"))
    assert res["agreement_float32"]["norms_max_rel"] < 1e-5 and res["agreement_float32"]["dp_step_max_abs"] < 1e-5
    text = "\n".join(per_example_rules.render(res))
    assert "| DP step, temp memory |" in text and "≤ 0.1" in text
