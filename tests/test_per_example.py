"""fnbp.per_example against vmap(grad) of a plain-jnp reference (float64)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbp
from fnbp import per_example
from fnbp import reference as R

from vjp_oracle import AD_RTOL, compile_fast, max_rel
from per_example_oracle import B, CASES, SIZES, flat_norms, make_case, max_abs_diff, reference_grads
from marks import slow_except

jax.config.update("jax_enable_x64", True)


@pytest.mark.parametrize("case", slow_except(sorted(CASES), "tanh-softmax_ce"))
def test_grads_equal_vmap_grad_of_reference(case):
    act, _, loss, _, params, x, d = make_case(case)
    got = per_example.grads(params, x, d, activation=act, loss=loss)
    ref = reference_grads(case, params, x, d)
    assert max_abs_diff(got, ref) <= 1e-12
    assert float(jnp.min(flat_norms(ref))) > 1e-3      # the comparison is not between zeros


@pytest.mark.parametrize("case", slow_except(sorted(CASES), "tanh-softmax_ce"))
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


@pytest.mark.slow
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
    with pytest.raises(ValueError, match=r"fnbp\.per_example\.grad_norms: node 'bn1' \(batch_norm\): "
                                         r"batch norm couples the examples"):
        per_example.grad_norms(bn, x, d)
    with pytest.raises(ValueError, match=r"fnbp\.per_example\.grads: x must be a mini-batch .* got shape \(5,\)"):
        per_example.grads(params, x[0], d[0])
    with pytest.raises(ValueError, match=r"fnbp\.per_example\.grads: the model's dropout needs an explicit jax\.random key"):
        per_example.grads(params, x, d, dropout=0.5)
    with pytest.raises(ValueError, match=r"dropout must be a drop probability in \[0, 1\), got 1\.5"):
        per_example.batch_l2(params, x, d, dropout=1.5, key=jax.random.key(0))
    pre = fnbp.mlp.init(jax.random.key(0), SIZES, prelu_alpha=0.25, dtype=jnp.float64)
    with pytest.raises(ValueError, match=r"node 'h1' \(prelu\) uses parameters \[\(0, 'alpha'\)\] but its rule has no per-example extension"):
        per_example.grads(pre, x, d, activation=fnbp.prelu)


def test_nan_input_gives_nan_norm_for_that_example_only():
    act, _, loss, _, params, x, d = make_case("relu-half_sse")
    norms = per_example.grad_norms(params, x.at[2, 0].set(jnp.nan), d, activation=act, loss=loss)
    assert bool(jnp.isnan(norms[2])) and bool(jnp.all(jnp.isfinite(jnp.delete(norms, 2))))


# --- CNNs: a LeNet (fnbp.cnn) and walker graphs with stride / padding variants ------------------------------------
from per_example_oracle import (CNN_B, CONV_GRAPHS, LENET, conv_graph_case, lenet_reference_grads,  # noqa: E402
                                make_cnn_case)

CE = fnbp.losses.softmax_cross_entropy
CNN_CASES = ["lenet"] + sorted(CONV_GRAPHS)


def jitted(fn, *args, **options):
    """fn(*args, **options) under one jit (the options static): one compile, not one per eager op."""
    return jax.jit(functools.partial(fn, **options))(*args)


def cnn_case(case, seed=0):
    """(arch, params, x, d, reference per-example grads)."""
    if case == "lenet":
        params, x, d = make_cnn_case(seed)
        return LENET, params, x, d, lenet_reference_grads(params, x, d)
    net, params, x, d, ref = conv_graph_case(case, seed)
    return net, params, x, d, ref


def _all_quantities(params, x, d, *, arch):
    """Every per-example quantity, by both norm methods, in ONE jit (one compile per case)."""
    kw = dict(arch=arch, loss=CE)
    out = {"grads": per_example.grads(params, x, d, **kw), "sgs": per_example.sum_grad_squared(params, x, d, **kw),
           "var": per_example.variance(params, x, d, **kw)}
    for method in ("gram", "direct", "auto"):
        out[f"norms_{method}"] = per_example.grad_norms(params, x, d, method=method, **kw)
        out[f"l2_{method}"] = per_example.batch_l2(params, x, d, method=method, **kw)
    net = fnbp.objective.objective(arch if isinstance(arch, fnbp.graph.Graph) else fnbp.cnn.network(params, arch=arch),
                               functools.partial(CE, reduction="sum"))
    out["batch_grad"] = fnbp.graph.value_and_grad(net, params, {"x": x, "d": d})[1]     # the ordinary walk
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", CNN_CASES)
def test_cnn_per_example_quantities_equal_vmap_grad_of_reference(case):
    """grads <= 1e-12; norms and batch_l2 by the Gram AND the direct form (and auto) <= 1e-10 relative;
    sum of squares and variance <= 1e-12; the per-example gradients sum to the ordinary batch gradient."""
    arch, params, x, d, ref = cnn_case(case, seed=1)
    got = jitted(_all_quantities, params, x, d, arch=arch)
    assert max_abs_diff(got["grads"], ref) <= 1e-12
    assert float(jnp.min(flat_norms(ref))) > 1e-3
    for layer in ref["conv"]:                           # every conv layer's gradient is non-trivial for each example
        assert float(jnp.min(jnp.sum(layer["W"].reshape(CNN_B, -1) ** 2, 1))) > 1e-8
    ref_l2 = jax.tree_util.tree_map(lambda g: jnp.sum(g.reshape(CNN_B, -1) ** 2, 1), ref)
    for method in ("gram", "direct", "auto"):
        np.testing.assert_allclose(got[f"norms_{method}"], flat_norms(ref), rtol=1e-10, err_msg=method)
        leaves, ref_leaves = jax.tree_util.tree_leaves(got[f"l2_{method}"]), jax.tree_util.tree_leaves(ref_l2)
        assert len(leaves) == len(ref_leaves) == 2 * (len(params["conv"]) + len(params["dense"]))
        for got_leaf, ref_leaf in zip(leaves, ref_leaves):
            np.testing.assert_allclose(got_leaf, ref_leaf, rtol=1e-10, err_msg=method)
    assert max_abs_diff(got["sgs"], jax.tree_util.tree_map(lambda g: jnp.sum(g ** 2, 0), ref)) <= 1e-12
    assert max_abs_diff(got["var"], jax.tree_util.tree_map(lambda g: jnp.var(g, 0), ref)) <= 1e-12
    assert float(jnp.max(got["var"]["conv"][0]["W"])) > 1e-6
    assert max_abs_diff(jax.tree_util.tree_map(lambda g: jnp.sum(g, 0), got["grads"]), got["batch_grad"]) <= 1e-12


def test_gram_form_needs_the_cross_position_terms():
    """On random (delta, P) of 12 positions: the Gram form equals the direct one, and its off-diagonal
    (p != p') terms matter (dropping them, a plausible bug, is far outside the tolerance)."""
    k1, k2 = jax.random.split(jax.random.key(5))
    delta, patches = jax.random.normal(k1, (3, 12, 4), jnp.float64), jax.random.normal(k2, (3, 12, 6), jnp.float64)
    r = per_example.LayerRows("conv", ("conv", 0, "W"), None, patches, delta, None, None, (4, 6), lambda m, s: m)
    gram, direct = (per_example.rows_batch_l2(r, m)[0] for m in ("gram", "direct"))
    np.testing.assert_allclose(gram, direct, rtol=1e-12)
    np.testing.assert_allclose(direct, jnp.sum(jnp.einsum("bso,bsk->bok", delta, patches) ** 2, (1, 2)), rtol=1e-12)
    diagonal = jnp.sum(jnp.sum(delta ** 2, -1) * jnp.sum(patches ** 2, -1), 1)
    assert float(jnp.min(jnp.abs(gram - diagonal) / gram)) > 1e-3


def test_norm_method_rule_picks_gram_when_two_positions_squared_fit_in_the_weight_matrix():
    assert per_example.norm_method(1, 3, 7) == "gram"                  # dense layer: one position
    assert per_example.norm_method(16, 12, 45) == "gram"               # 2 * 256 = 512 <= 540
    assert per_example.norm_method(16, 5, 18) == "direct"              # 512 > 90
    assert per_example.norm_method(16, 12, 45, "direct") == "direct"
    assert per_example.norm_method(576, 32, 25) == "direct"            # MNIST LeNet conv 1: 24 x 24 positions
    assert per_example.norm_method(64, 64, 800) == "gram"              # MNIST LeNet conv 2: 8 x 8 positions
    # the stride-2 graph case exercises both under "auto"
    net, params, x, d, _ = conv_graph_case("stride2-same", with_reference=False)
    shapes = jax.eval_shape(lambda: [(r.delta, r.patches) for r in
                                     per_example.walk(params, x, d, model=net, loss=CE)[1]])
    assert [per_example.norm_method(delta.shape[1], delta.shape[2], patches.shape[2])
            for delta, patches in shapes] == ["direct", "gram", "gram"]


def test_clip_method_rule_picks_direct_where_the_per_example_matrices_fit_in_the_patches():
    assert per_example.clip_method(1, 3, 7) == "gram"                  # dense layer: the ghost norm
    assert per_example.clip_method(576, 32, 25) == "direct"            # MNIST LeNet conv 1: 24 x 24 positions
    assert per_example.clip_method(64, 64, 800) == "direct"            # MNIST LeNet conv 2: 8 x 8 positions
    assert per_example.clip_method(49, 512, 4608) == "gram"            # C_out > S: G_n bigger than the patches
    assert per_example.clip_method(576, 32, 25, "gram") == "gram"
    with pytest.raises(ValueError, match=r"fnbp\.per_example: method must be one of .* got 'ghost'"):
        per_example.clip_method(4, 2, 3, "ghost")


def test_norms_and_clipped_sums_together_equal_the_two_step_forms():
    """``rows_norms_and_clipped_sums`` (a "direct" layer's clipped sum from the G_n it formed for its norm) equals
    ``rows_norms`` then ``rows_clipped_sum`` (one GEMM over the B S rows), for a conv-like row and a dense one."""
    ks = jax.random.split(jax.random.key(6), 4)
    conv = per_example.LayerRows("conv", ("conv", 0, "W"), ("conv", 0, "b"),
                                 jax.random.normal(ks[0], (5, 12, 6), jnp.float64),
                                 jax.random.normal(ks[1], (5, 12, 4), jnp.float64), None, None, (4, 6),
                                 lambda m, s: m)
    dense = per_example.LayerRows("dense", ("dense", 0, "W"), ("dense", 0, "b"),
                                  jax.random.normal(ks[2], (5, 1, 3), jnp.float64),
                                  jax.random.normal(ks[3], (5, 1, 2), jnp.float64), None, None, (2, 3),
                                  lambda m, s: m)
    rows = [conv, dense]
    assert [per_example.clip_method(r.delta.shape[1], r.delta.shape[2], r.patches.shape[2]) for r in rows] == [
        "direct", "gram"]
    for method in ("auto", "gram", "direct"):
        ref_norms = per_example.rows_norms(rows, method)
        clip = 0.5 * float(jnp.median(ref_norms))
        c = 1.0 / jnp.maximum(1.0, ref_norms / clip)
        assert float(jnp.min(c)) < 0.7                                  # some examples clipped
        norms, sums = per_example.rows_norms_and_clipped_sums(rows, lambda n: 1.0 / jnp.maximum(1.0, n / clip),
                                                              method)
        np.testing.assert_allclose(norms, ref_norms, rtol=1e-12, err_msg=method)
        for r, (W_sum, b_sum) in zip(rows, sums):
            ref_W, ref_b = per_example.rows_clipped_sum(r, c)
            np.testing.assert_allclose(W_sum, ref_W, rtol=1e-12, atol=1e-12, err_msg=method)
            np.testing.assert_allclose(b_sum, ref_b, rtol=1e-12, atol=1e-12, err_msg=method)


@pytest.mark.slow
def test_cnn_dropout_uses_one_mask_per_example_from_its_own_key():
    params, x, d = make_cnn_case(seed=4)
    p, key = 0.3, jax.random.key(11)
    got, without = jitted(lambda *a, **o: (per_example.grads(*a, dropout=p, key=key, **o), per_example.grads(*a, **o)),
                          params, x, d, arch=LENET, loss=CE)
    keys = jax.random.split(key, CNN_B)
    widths = [24, 7]                                      # inputs of the dense layers: 2 x 2 x 6 features, 7 hidden
    masks = [jax.vmap(lambda kn, k=k, n=n: jax.random.bernoulli(jax.random.fold_in(kn, k), 1 - p, (n,)))(keys)
             / (1 - p) for k, n in enumerate(widths)]
    assert max_abs_diff(got, lenet_reference_grads(params, x, d, masks=masks)) <= 1e-12
    assert max_abs_diff(got, without) > 1e-3


@pytest.mark.slow
def test_cnn_refusals_name_the_function_and_what_came():
    params, x, d = make_cnn_case()
    bn_arch = fnbp.cnn.LeNet(**{**LENET.__dict__, "batch_norm": True})
    bn = fnbp.cnn.init(jax.random.key(0), bn_arch, dtype=jnp.float64)
    with pytest.raises(ValueError, match=r"fnbp\.per_example\.grad_norms: node 'bn1' \(batch_norm_channels\): "
                                         r"batch norm couples the examples"):
        per_example.grad_norms(bn, x, d, arch=bn_arch, loss=CE)
    with pytest.raises(ValueError, match=r"fnbp\.per_example\.grads: x must have shape \(batch, 8, 8, 1\)"):
        per_example.grads(params, x[0], d, arch=LENET, loss=CE)
    with pytest.raises(ValueError, match=r"method must be one of .* got 'ghost'"):
        per_example.batch_l2(params, x, d, arch=LENET, loss=CE, method="ghost")
    with pytest.raises(ValueError, match=r"activation=, output= and dropout= describe the MLP used without a model"):
        per_example.grads(params, x, d, arch=LENET, loss=CE, activation=fnbp.tanh)
    with pytest.raises(ValueError, match=r"grads: arch must be a fnbp\.cnn\.LeNet or a fnbp\.graph\.Graph, got str"):
        per_example.grads(params, x, d, arch="lenet", loss=CE)
    with pytest.raises(ValueError, match=r"grads: the model's dropout needs an explicit jax\.random key"):
        per_example.grads(params, x, d, arch=LENET, loss=CE, dropout=0.5)
    # weights shared by two layers have no per-example norm here
    net, gparams, gx, gd, _ = conv_graph_case("int-pad-valid", with_reference=False)
    shared = fnbp.graph.make([n if n.name != "conv1" else n._replace(args=(fnbp.graph.Param("conv", 0, "W"),
                              fnbp.graph.Param("conv", 0, "b")) + n.args[2:]) for n in net.nodes], net.output)
    with pytest.raises(ValueError, match=r"'conv1' share the parameter \('conv', 0, 'W'\)"):
        per_example.grad_norms(gparams, gx, gd, arch=shared, loss=CE)


# --- vmap(grad) through the rules: per-example gradients of a small net (moved from tests/test_layers.py) ---
def _net_loss(mods, params, x, label, reduction="mean"):
    dense, relu, sce = mods
    h = relu(dense(params[0]["W"], params[0]["b"], x))
    return sce(dense(params[1]["W"], params[1]["b"], h), label, reduction=reduction)


OURS = (fnbp.dense, fnbp.relu, fnbp.losses.softmax_cross_entropy)


REFS = (R.dense, R.relu, R.softmax_cross_entropy)


def test_per_example_gradients_match_reference_and_sum_to_batch_gradient():
    rng = np.random.default_rng(7)
    n_in, n_hid, n_cls, batch = 5, 8, 4, 11
    params = [{"W": rng.standard_normal((n_hid, n_in)), "b": rng.standard_normal(n_hid)},
              {"W": rng.standard_normal((n_cls, n_hid)), "b": rng.standard_normal(n_cls)}]
    x = rng.standard_normal((batch, n_in))
    labels = rng.integers(0, n_cls, batch)

    def everything(params, x, labels):
        grad_ours = jax.grad(functools.partial(_net_loss, OURS))
        per_ex = jax.vmap(grad_ours, in_axes=(None, 0, 0))(params, x, labels)
        per_ex_ref = jax.vmap(jax.grad(functools.partial(_net_loss, REFS)), in_axes=(None, 0, 0))(params, x, labels)
        one = grad_ours(params, x[3], labels[3])           # example 3 alone, no vmap
        batch_sum = jax.grad(lambda p: _net_loss(OURS, p, x, labels, reduction="sum"))(params)
        batch_mean = jax.grad(lambda p: _net_loss(OURS, p, x, labels, reduction="mean"))(params)
        return per_ex, per_ex_ref, one, batch_sum, batch_mean

    outputs = compile_fast(everything, params, x, labels)
    per_ex, per_ex_ref, one, batch_sum, batch_mean = map(jax.tree_util.tree_leaves, outputs)
    assert [g.shape for g in per_ex] == [(batch,) + p.shape for p in jax.tree_util.tree_leaves(params)]
    for got, want, alone, g_sum, g_mean in zip(per_ex, per_ex_ref, one, batch_sum, batch_mean):
        assert max_rel(got, want) <= AD_RTOL                 # per-example autodiff of the reference
        assert max_rel(got[3], alone) <= 1e-12
        assert max_rel(g_sum, np.sum(got, axis=0)) <= 1e-12      # sum of per-example = reduction='sum'
        assert max_rel(g_mean, np.sum(got, axis=0) / batch) <= 1e-12


# --- against BackPACK (backpack-for-pytorch), float64, where FNBP_TORCH_PYTHON names a venv with it ----------
# Convention: BackPACK's first-order quantities are of the loss as torch reduces it.  Its per-example gradient
# under reduction='mean' is grad E_n / B (the gradient of E_n's share of the mean), so BatchL2Grad and
# SumGradSquared are fnbp's batch_l2 and sum_grad_squared (each example's own loss, E_n) over B^2; its Variance is
# (SGS_bp / B - (sum_n g_bp,n / B)^2) = fnbp's variance / B^2.  Under reduction='sum' all three are fnbp's.
@pytest.fixture(scope="module")
def backpack_out(tmp_path_factory):
    import backpack_oracle
    return backpack_oracle.backpack_results(
        tmp_path_factory.mktemp("backpack"), groups=backpack_oracle.FIRST_ORDER,
        names=("mlp-tanh-ce-mean", "mlp-relu-ce-sum", "cnn-sigmoid-mse-sum", "cnn-relu-ce-mean"))


@pytest.mark.slow
def test_first_order_quantities_equal_backpack(backpack_out):
    """BatchL2Grad, Variance, SumGradSquared: MLPs and CNNs (conv, max pool, flatten, dense), tanh/sigmoid/relu,
    cross-entropy and MSE, mean and sum."""
    from backpack_oracle import B as B_bp, rel_err
    fields = {"batch_l2": per_example.batch_l2, "variance": per_example.variance,
              "sum_grad_squared": per_example.sum_grad_squared}
    errs = {}
    for name, (case, bp) in backpack_out.items():
        scale = 1.0 / B_bp ** 2 if case.reduction == "mean" else 1.0
        for field, fn in fields.items():
            got = fn(case.params, case.x, case.d, model=case.model, loss=case.loss)
            for i, layer in enumerate(got):
                W_bp = bp[f"p{i}.weight.{field}"]
                errs[f"{name} {field} {i}.W"] = rel_err(
                    scale * np.asarray(layer["W"]), W_bp if field == "batch_l2" else case.to_fnbp_W(i, W_bp))
                errs[f"{name} {field} {i}.b"] = rel_err(scale * np.asarray(layer["b"]), bp[f"p{i}.bias.{field}"])
    print("first-order max relative error vs BackPACK:", max(errs.values()))
    assert max(errs.values()) <= 1e-10, errs
