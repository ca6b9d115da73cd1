"""fnbp.nn: composed models against a plain-jnp reference of the same layers, and the one model= keyword.

The oracle for "correct" is ``fnbp.reference`` (lax/jnp ops, no rule) differentiated by ``jax.grad``; the models
are drawn by hypothesis from every layer (conv, pools, batch norm, dropout, residual, dense, activations
including a student's own rule) with fixed keys.
"""
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import fnbp
from fnbp import nn
from fnbp import reference as R
from fnbp.conv import conv_output_size
from per_example_oracle import flat_norms, max_abs_diff
from vjp_oracle import compile_fast, tree_rel_err


def _softplus_fwd(a):
    """g(a) = log(1 + e^a).  Backward: delta = grad_h E (.) sigmoid(a)."""
    return jnp.logaddexp(a, 0.0), a


def _softplus_bwd(a, grad_h):
    return (grad_h * jax.nn.sigmoid(a),)


softplus = fnbp.rule(_softplus_fwd, _softplus_bwd, name="student_softplus")
ACTS = {"relu": (fnbp.relu, R.relu), "tanh": (fnbp.tanh, R.tanh), "sigmoid": (fnbp.sigmoid, R.sigmoid),
        "softplus": (softplus, lambda a: jnp.logaddexp(a, 0.0))}
CE = fnbp.losses.softmax_cross_entropy
B, N_CLASSES = 4, 3


# --- the reference: the same layers in plain jnp ---------------------------------------------------------------
def _ref_act(layer):
    for fn, ref in ACTS.values():
        if layer.fn is fn:
            return ref
    raise AssertionError(layer)


def ref_apply(layers, params, x, key, counter=None):
    """The model's forward in training mode, layer by layer, with lax/jnp ops (autodiff differentiates it)."""
    counter = [0] if counter is None else counter
    it = iter(params)
    for layer in layers:
        p = next(it) if layer.has_params else None
        if isinstance(layer, nn.Dense):
            x = x @ p["W"].T + p["b"]
        elif isinstance(layer, nn.Conv2D):
            x = R.conv2d(p["W"], p["b"], x, stride=layer.stride, padding=layer.padding)
        elif isinstance(layer, nn.MaxPool):
            x = R.max_pool(x, layer.window, layer.stride)
        elif isinstance(layer, nn.AvgPool):
            x = R.avg_pool(x, layer.window, layer.stride)
        elif isinstance(layer, nn.Flatten):
            x = x.reshape(x.shape[0], -1)
        elif isinstance(layer, nn.GlobalAvgPool):
            x = jnp.mean(x, axis=(1, 2))
        elif isinstance(layer, nn.BatchNorm):
            axes = tuple(range(x.ndim - 1))
            x = p["gamma"] * (x - jnp.mean(x, axes)) / jnp.sqrt(jnp.var(x, axes) + layer.eps) + p["beta"]
        elif isinstance(layer, nn.Dropout):
            x = R.dropout(x, layer.p, jax.random.fold_in(key, counter[0]))
            counter[0] += 1
        elif isinstance(layer, nn.Activation):
            x = _ref_act(layer)(x)
        elif isinstance(layer, nn.Residual):
            x = x + ref_apply(layer.layers, p, x, key, counter)
        else:
            raise AssertionError(layer)
    return x


# --- drawn models -------------------------------------------------------------------------------------------------
@st.composite
def models(draw, batch_norm=True, dropout=True):
    """(layers, input shape): images through 1-3 spatial layers, flatten or global pooling, 0-2 dense-side layers,
    a dense output."""
    H = draw(st.integers(4, 7))
    C = draw(st.integers(1, 2))
    shape, layers = [H, H, C], []
    act = lambda: nn.Activation(ACTS[draw(st.sampled_from(sorted(ACTS)))][0])     # noqa: E731
    spatial = ["conv", "act", "maxpool", "avgpool", "residual"] + (["bn"] if batch_norm else [])
    for kind in draw(st.lists(st.sampled_from(spatial), min_size=1, max_size=3)):
        if kind == "conv":
            k, s, pad = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.sampled_from(["SAME", "VALID", 1]))
            if min(shape[:2]) + (2 if pad == 1 else 0) < k:
                pad = "SAME"
            c = draw(st.integers(1, 3))
            layers.append(nn.Conv2D(c, k, stride=s, padding=pad))
            shape = [conv_output_size(shape[0], k, s, pad), conv_output_size(shape[1], k, s, pad), c]
        elif kind in ("maxpool", "avgpool") and min(shape[:2]) >= 2:
            layers.append(nn.MaxPool(2) if kind == "maxpool" else nn.AvgPool(2, stride=1))
            shape = [n // 2 if kind == "maxpool" else n - 1 for n in shape[:2]] + shape[2:]
        elif kind == "residual":
            layers.append(nn.Residual(nn.Conv2D(shape[2], 3), act()))
        elif kind == "bn":
            layers.append(nn.BatchNorm())
        else:
            layers.append(act())
    layers.append(draw(st.sampled_from([nn.Flatten(), nn.GlobalAvgPool()])))
    n = shape[0] * shape[1] * shape[2] if isinstance(layers[-1], nn.Flatten) else shape[2]
    dense_side = ["dense", "act", "residual"] + (["bn"] if batch_norm else []) + (["dropout"] if dropout else [])
    for kind in draw(st.lists(st.sampled_from(dense_side), max_size=2)):
        if kind == "dense":
            n = draw(st.integers(2, 5))
            layers.append(nn.Dense(n))
        elif kind == "residual":
            layers.append(nn.Residual(nn.Dense(n), act()))
        elif kind == "bn":
            layers.append(nn.BatchNorm())
        elif kind == "dropout":
            layers.append(nn.Dropout(0.3))
        else:
            layers.append(act())
    layers.append(nn.Dense(N_CLASSES))
    return tuple(layers), (H, H, C)


def _case(layers, shape, seed=0):
    model = nn.serial(*layers)
    params, state = model.init(jax.random.key(seed), shape, jnp.float64)
    kx, kd = jax.random.split(jax.random.key(seed + 1))
    x = jax.random.normal(kx, (B,) + shape, jnp.float64)
    d = jax.random.randint(kd, (B,), 0, N_CLASSES)
    return model, params, state, x, d


SETTINGS = settings(max_examples=6, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.slow
@SETTINGS
@given(models())
def test_drawn_models_walker_equals_autodiff_and_the_plain_reference(drawn):
    """fnbp.backprop(model=) (the explicit walker), jax.grad of model.apply (the custom_vjp rules) and jax.grad
    of the plain-jnp reference agree to 1e-12 (float64), dropout masks and batch statistics included."""
    layers, shape = drawn
    model, params, state, x, d = _case(layers, shape)
    key = jax.random.key(9)

    def all_three(params, x, d):
        E_w, g_w, _ = fnbp.backprop(params, x, d, model=model, loss=CE, key=key, state=state)
        E_a, g_a = jax.value_and_grad(lambda p: CE(model.apply(p, state, x, train=True, key=key)[0], d))(params)
        E_r, g_r = jax.value_and_grad(lambda p: R.softmax_cross_entropy(ref_apply(model.layers, p, x, key), d))(params)
        return (E_w, g_w), (E_a, g_a), (E_r, g_r)
    (E_w, g_w), (E_a, g_a), (E_r, g_r) = compile_fast(all_three, params, x, d)
    assert abs(float(E_w - E_r)) <= 1e-12 * max(1.0, abs(float(E_r))) and abs(float(E_a - E_r)) <= 1e-12
    assert tree_rel_err(g_w, g_r) <= 1e-12
    assert tree_rel_err(g_a, g_r) <= 1e-12
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(g_r)) > 1e-6   # not all zero


@SETTINGS
@pytest.mark.slow
@given(models(batch_norm=False))
def test_drawn_models_per_example_quantities_equal_vmap_grad(drawn):
    """Per-example grads, norms (every method) and the DP clipped sum of drawn batch-norm-free models equal
    vmap(grad) of each example's own loss through the plain reference to 1e-10 (float64)."""
    layers, shape = drawn
    model, params, _, x, d = _case(layers, shape, seed=3)
    key = jax.random.key(4)
    keys = jax.random.split(key, B)

    def own_loss(p, x_n, d_n, key_n):
        return R.softmax_cross_entropy(ref_apply(model.layers, p, x_n[None], key_n), d_n[None], reduction="sum")

    def quantities(params, x, d):
        kw = dict(model=model, loss=CE, key=key)
        out = {"grads": fnbp.per_example.grads(params, x, d, **kw),
               "ref": jax.vmap(jax.grad(own_loss), (None, 0, 0, 0))(params, x, d, keys),
               "clipped": fnbp.dp.clipped_grad_sum(params, x, d, clip=0.5, **kw)}
        for method in ("gram", "direct", "auto"):
            out[method] = fnbp.per_example.grad_norms(params, x, d, method=method, **kw)
        return out
    got = compile_fast(quantities, params, x, d)
    ref = got["ref"]
    assert max_abs_diff(got["grads"], ref) <= 1e-10
    norms = flat_norms(ref)
    for method in ("gram", "direct", "auto"):
        np.testing.assert_allclose(got[method], norms, rtol=1e-10, atol=1e-14, err_msg=method)
    c = 1.0 / jnp.maximum(1.0, norms / 0.5)
    clipped_ref = jax.tree_util.tree_map(lambda g: jnp.tensordot(c, g, axes=1), ref)
    sums, got_norms = got["clipped"]
    assert max_abs_diff(sums, clipped_ref) <= 1e-10
    np.testing.assert_allclose(got_norms, norms, rtol=1e-10, atol=1e-14)


@pytest.mark.slow
def test_a_wrong_rule_in_a_model_is_caught_by_the_reference():
    """Negative control: a softplus whose backward forgets the sigmoid factor fails the same comparison."""
    wrong = fnbp.rule(_softplus_fwd, lambda a, g: (g,), name="wrong_softplus")
    model = nn.serial(nn.Dense(4), nn.Activation(wrong), nn.Dense(N_CLASSES))
    params, _ = model.init(jax.random.key(0), (5,), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (B, 5), jnp.float64)
    d = jnp.array([0, 1, 2, 0])
    _, g_w = fnbp.backprop(params, x, d, model=model, loss=CE)
    ref_model = nn.serial(nn.Dense(4), nn.Activation(softplus), nn.Dense(N_CLASSES))
    g_r = jax.grad(lambda p: R.softmax_cross_entropy(ref_apply(ref_model.layers, p, x, None), d))(params)
    assert tree_rel_err(g_w, g_r) > 1e-3


# --- the model object -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_mlp_preset_draws_fnbp_mlp_init_parameters_and_the_same_dropout_masks():
    sizes = (6, 5, 4, 3)
    model = nn.mlp(sizes, fnbp.tanh, dropout=0.4)
    params, state = model.init(jax.random.key(3), (6,), jnp.float64)
    legacy = fnbp.mlp.init(jax.random.key(3), sizes, dtype=jnp.float64)
    assert state == [] and max_abs_diff(params, legacy) == 0.0
    x = jax.random.normal(jax.random.key(4), (7, 6), jnp.float64)
    y, _ = model.apply(params, state, x, train=True, key=jax.random.key(5))
    y_legacy, _ = fnbp.mlp.apply_stateful(legacy, fnbp.mlp.init_state(legacy), x, train=True, key=jax.random.key(5),
                                          activation=fnbp.tanh, dropout=0.4)
    np.testing.assert_array_equal(y, y_legacy)
    assert not np.allclose(y, model.apply(params, state, x)[0])                  # inference: no dropout


def test_residual_is_the_sum_over_consumers_of_x():
    """y = x + f(x): the walker's grad_table sums the cotangent through the branch and the identity path."""
    model = nn.serial(nn.Residual(nn.Dense(3), nn.Tanh()))
    params, _ = model.init(jax.random.key(0), (3,), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (2, 3), jnp.float64)
    E, _, trace = fnbp.backprop(params, x, jnp.zeros((2, 3)), model=model, loss=fnbp.losses.half_sse, trace=True)
    grad_x = trace.grad_table["x"]
    W = params[0][0]["W"]
    g = ref_apply(model.layers, params, x, None) / 2                                # grad_y of half_sse, mean over 2
    a = x @ W.T + params[0][0]["b"]
    np.testing.assert_allclose(grad_x, g + (g * (1 - jnp.tanh(a) ** 2)) @ W, rtol=1e-12)
    assert sorted(trace.nodes) == ["0.residual.add", "0.residual/0.dense", "0.residual/1.tanh", "E"]


@pytest.mark.slow
def test_batch_norm_state_is_updated_in_training_and_used_in_inference():
    model = nn.serial(nn.Conv2D(2, 3), nn.BatchNorm(momentum=0.5), nn.Relu(), nn.Flatten(), nn.Dense(2))
    params, state = model.init(jax.random.key(0), (4, 4, 1), jnp.float64)
    x = 3.0 + jax.random.normal(jax.random.key(1), (5, 4, 4, 1), jnp.float64)
    _, new = model.apply(params, state, x, train=True)
    a = R.conv2d(params[0]["W"], params[0]["b"], x).reshape(-1, 2)
    np.testing.assert_allclose(new[0]["mean"], 0.5 * jnp.mean(a, 0), rtol=1e-12)
    np.testing.assert_allclose(new[0]["var"], 0.5 + 0.5 * jnp.var(a, 0, ddof=1), rtol=1e-12)
    E, grads, state2 = fnbp.backprop(params, x, jnp.array([0, 1, 0, 1, 0]), model=model, loss=CE, state=state)
    assert max_abs_diff(state2, new) == 0.0                                       # the walker updates it the same way
    y_eval, same = model.apply(params, new, x)
    assert max_abs_diff(same, new) == 0.0 and not np.allclose(y_eval, model.apply(params, new, x, train=True)[0])


def test_describe_round_trips_through_json_and_names_what_cannot():
    import json
    model = nn.serial(nn.Conv2D(4, (3, 2), stride=2, padding=1), nn.LeakyRelu(0.2), nn.MaxPool(2),
                      nn.Residual(nn.Conv2D(4, 3), nn.BatchNorm(), nn.Relu()), nn.GlobalAvgPool(), nn.Dropout(0.1),
                      nn.Dense(5, weight_init="he"), nn.Activation(softplus))
    back = nn.from_description(json.loads(json.dumps(model.describe())))
    assert back == model and hash(back) == hash(model)
    local = nn.serial(nn.Dense(2), nn.Activation(lambda a: a))
    with pytest.raises(ValueError, match=r"fnbp\.nn: the model's Activation\.fn is a function that cannot be "
                                         r"imported by name"):
        nn.from_description(local.describe())


def test_named_errors():
    with pytest.raises(ValueError, match=r"fnbp\.nn\.Model\.init: layer 2 \(fnbp\.nn\.Conv2D\) on input shape "
                                         r"\(2, 2, 3\): .*kernel of size 5"):
        nn.serial(nn.Conv2D(3, 3), nn.MaxPool(2), nn.Conv2D(3, 5, padding="VALID")).init(jax.random.key(0), (4, 4, 1))
    with pytest.raises(ValueError, match=r"fnbp\.nn\.Residual: the branch maps shape \(3,\) to \(4,\)"):
        nn.serial(nn.Residual(nn.Dense(4))).init(jax.random.key(0), (3,))
    with pytest.raises(TypeError, match=r"fnbp\.nn\.serial: layer 1 must be an fnbp\.nn layer"):
        nn.serial(nn.Dense(3), fnbp.relu)
    with pytest.raises(ValueError, match=r"fnbp\.nn\.Dropout: p must be a drop probability in \[0, 1\), got 1\.0"):
        nn.Dropout(1.0)
    with pytest.raises(TypeError, match=r"fnbp\.nn\.Dense: n_out must be an integer, got 2\.5"):
        nn.Dense(2.5)
    assert nn.Dense(np.int64(3)).n_out == 3 and nn.Conv2D(jnp.int32(2), np.int64(3)).kernel == (3, 3)
    with pytest.raises(ValueError, match=r"fnbp\.nn\.lenet: n_classes must be an int >= 1, got 0"):
        nn.lenet((8, 8, 1), n_classes=0)
    model = nn.mlp((3, 4, 2))
    with pytest.raises(ValueError, match=r"fnbp\.backprop: params must be a list with one entry per layer with "
                                         r"parameters \(2 for this model"):
        fnbp.backprop([], jnp.ones((2, 3)), jnp.ones((2, 2)), model=model)
    with pytest.raises(ValueError, match=r"fnbp\.backprop: activation=, output=, dropout= and bn_position= describe "
                                         r"the MLP used without model="):
        fnbp.backprop(model.init(jax.random.key(0), (3,))[0], jnp.ones((2, 3)), jnp.ones((2, 2)), model=model,
                      activation=fnbp.tanh)
    dropped = nn.serial(nn.Dense(3), nn.Dropout(0.5), nn.Dense(2))
    p, s = dropped.init(jax.random.key(0), (3,))
    with pytest.raises(ValueError, match=r"fnbp\.nn\.Model\.apply: dropout in training mode needs an explicit"):
        dropped.apply(p, s, jnp.ones((2, 3)), train=True)


def test_per_example_refusals_name_the_node():
    bn = nn.serial(nn.Dense(3), nn.BatchNorm(), nn.Dense(2))
    p, _ = bn.init(jax.random.key(0), (3,))
    with pytest.raises(ValueError, match=r"fnbp\.per_example\.grad_norms: node '1\.batchnorm' \(batch_norm\): batch "
                                         r"norm couples the examples"):
        fnbp.per_example.grad_norms(p, jnp.ones((2, 3)), jnp.array([0, 1]), model=bn, loss=CE)
    prelu = nn.serial(nn.Dense(3), nn.PReLU(), nn.Dense(2))
    p, _ = prelu.init(jax.random.key(0), (3,))
    with pytest.raises(ValueError, match=r"fnbp\.dp\.clipped_grad_sum: node '1\.prelu' \(prelu\) uses parameters "
                                         r"\[\(1, 'alpha'\)\] but its rule has no per-example extension"):
        fnbp.dp.clipped_grad_sum(p, jnp.ones((2, 3)), jnp.array([0, 1]), clip=1.0, model=prelu, loss=CE)


# --- one model= through training ----------------------------------------------------------------------------------
def _digits_images(n_train=None):
    ds = fnbp.data.load_digits(seed=0, standardize=False)
    return ds._replace(x_train=ds.x_train[:n_train].reshape(-1, 8, 8, 1).astype(np.float32),
                       y_train=ds.y_train[:n_train], x_test=ds.x_test.reshape(-1, 8, 8, 1).astype(np.float32))


def residual_cnn(input_shape=(8, 8, 1), n_classes=10):
    """A user's own CNN with a residual block (``fnbp train --model test_nn:residual_cnn`` calls it)."""
    return nn.serial(nn.Conv2D(8, 3), nn.Relu(), nn.MaxPool(2),
                     nn.Residual(nn.Conv2D(8, 3), nn.Relu()),
                     nn.Flatten(), nn.Dense(n_classes))


@pytest.mark.slow
def test_a_residual_cnn_trains_through_fnbp_train_with_dp_and_both_gradient_modes():
    """The same run by autodiff and by the explicit walker gives the same parameters; DP-SGD runs on the model."""
    ds = _digits_images()                                                 # 1,437 raw-pixel images
    model = residual_cnn()
    params, _ = model.init(jax.random.key(0), (8, 8, 1))
    runs = {}
    for grad in ("autodiff", "backprop"):
        runs[grad] = fnbp.train.train(params, fnbp.optim.adam(3e-3), ds, key=jax.random.key(1), epochs=3,
                                      batch_size=32, model=model, cfg=fnbp.train.Config(grad=grad, augment=1),
                                      progress=False)
    a, b = runs["autodiff"], runs["backprop"]
    assert tree_rel_err(a.params, b.params) < 1e-4                       # float32: the same rules, another order
    losses = [h["loss"] for h in a.history]
    # measured (init seeds 0/1/2, this recipe): last/first epoch loss 0.59 / 0.61 / 0.64, test accuracy
    # 0.85 / 0.77 / 0.77; asserted with margins: a model that does not learn stays at ~1.0 and ~0.1
    assert losses[-1] < 0.75 * losses[0], losses
    assert a.history[-1]["test_accuracy"] > 0.6
    dp_run = fnbp.train.train(params, fnbp.optim.adam(3e-3), ds, key=jax.random.key(1), epochs=1, batch_size=32,
                              model=model, cfg=fnbp.train.Config(dp_clip=1.0, dp_noise=0.5), progress=False)
    assert np.isfinite(dp_run.history[-1]["loss"])
    assert tree_rel_err(dp_run.params, params) > 1e-3


def test_train_refuses_what_the_model_cannot_do():
    ds = _digits_images(64)
    bn = nn.serial(nn.Conv2D(2, 3), nn.BatchNorm(), nn.Relu(), nn.Flatten(), nn.Dense(10))
    params, _ = bn.init(jax.random.key(0), (8, 8, 1))
    with pytest.raises(ValueError, match=r"fnbp\.train \(DP-SGD, dp_clip=1\.0\): node '1\.batchnorm'"):
        fnbp.train.train(params, fnbp.optim.sgd(0.1), ds, key=jax.random.key(0), epochs=1, model=bn,
                         cfg=fnbp.train.Config(dp_clip=1.0), progress=False)
    with pytest.raises(ValueError, match=r"fnbp\.train: Config fields \['dropout'\] describe the MLP used without "
                                         r"model="):
        fnbp.train.train(params, fnbp.optim.sgd(0.1), ds, key=jax.random.key(0), epochs=1, model=bn,
                         cfg=fnbp.train.Config(dropout=0.5), progress=False)
    with pytest.raises(ValueError, match=r"fnbp\.train: augment must be an integer in \[0, 4\] for 8x8 images"):
        fnbp.train.train(params, fnbp.optim.sgd(0.1), ds, key=jax.random.key(0), epochs=1, model=bn,
                         cfg=fnbp.train.Config(augment=8), progress=False)


@pytest.mark.slow
def test_cli_trains_a_users_factory_and_the_checkpoint_reloads_into_its_model(tmp_path, monkeypatch):
    """``fnbp train --model test_nn:residual_cnn``: trains, writes a checkpoint that ``load_model`` rebuilds
    without the command, and whose reloaded model gives the accuracy the run reported."""
    import os
    import subprocess
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__)] + sys.path)}
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "fnbp", "train", "--model", "test_nn:residual_cnn", "--epochs", "2",
                        "--out", str(out), "--quiet"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    model, params, state, ck = fnbp.checkpoint.load_model(out / "checkpoint.npz")
    assert model == residual_cnn() and ck["epoch"] == 2
    ds = fnbp.data.load_digits(seed=0, standardize=False)
    x = ds.x_test.reshape(-1, 8, 8, 1).astype(np.float32)
    acc = float(np.mean(np.argmax(model(params, x, state=state), -1) == ds.y_test))
    assert acc == pytest.approx(ck["extra"]["history"][-1]["test_accuracy"], abs=1e-6)
    bad = subprocess.run([sys.executable, "-m", "fnbp", "train", "--model", "no_such_module:f", "--out",
                          str(tmp_path / "bad")], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "--model no_such_module:f: cannot import it" in bad.stderr
    assert "Traceback" not in bad.stderr


del functools
