"""Tests of fnbp.mlp: init (determinism, ranges and statistics of the three initialisers),
apply (against a plain-numpy forward pass, single example and batch, per-layer activation
lists), num_params (hand arithmetic and leaf count), bad input, the notes' sigmoid forward
example (hand arithmetic with math.exp), and training steps vmapped over an ensemble and a
learning-rate sweep (equal to the Python loop over members) that compile once per input shape.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbp
import fnbp.optim
from fnbp import losses, mlp, reference
from np_batch_norm import np_batch_norm, np_batch_norm_eval

F64 = jnp.float64


def max_rel_err(a, b):
    """Largest per-leaf max |a - b| / max |b| over two pytrees of the same structure."""
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    errs = []
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        scale = np.max(np.abs(y)) if y.size else 0.0
        errs.append(float(np.max(np.abs(x - y)) / (scale if scale > 0 else 1.0)) if y.size else 0.0)
    return max(errs)


def numpy_params(seed, sizes, prelu=False):
    """Random float64 parameters in fnbp.mlp's layout (W, b uniform in [-1, 1], alpha near 0.25)."""
    rng = np.random.default_rng(seed)
    return [dict(W=rng.uniform(-1, 1, (n_out, n_in)), b=rng.uniform(-1, 1, n_out),
                 **({"alpha": 0.25 + rng.uniform(-0.2, 0.2, n_out)} if prelu and k < len(sizes) - 2 else {}))
            for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]))]


# ------------------------------------------------------------------ init
def test_init_layout_and_dtype():
    params = fnbp.mlp.init(jax.random.key(0), (3, 4, 2))
    assert isinstance(params, list) and len(params) == 2
    assert [sorted(p) for p in params] == [["W", "b"], ["W", "b"]]
    assert [(p["W"].shape, p["b"].shape) for p in params] == [((4, 3), (4,)), ((2, 4), (2,))]   # (n_out, n_in)
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(params))               # the default
    # the layout of every initialiser and option, without drawing numbers
    for init in fnbp.mlp.INITS:
        shapes = jax.eval_shape(lambda: fnbp.mlp.init(jax.random.key(0), (3, 5, 4, 2), init=init, dtype=F64,
                                                      prelu_alpha=0.25))
        assert [sorted(p) for p in shapes] == [["W", "alpha", "b"], ["W", "alpha", "b"], ["W", "b"]]
        assert [p["alpha"].shape for p in shapes[:2]] == [(5,), (4,)]
        assert all(v.dtype == F64 for v in jax.tree_util.tree_leaves(shapes))
    with_alpha = fnbp.mlp.init(jax.random.key(0), (3, 4, 2), prelu_alpha=0.25)
    np.testing.assert_array_equal(with_alpha[0]["alpha"], np.full(4, 0.25, np.float32))
    assert "alpha" not in with_alpha[1]                       # the output layer has no PReLU


@pytest.mark.parametrize("init", fnbp.mlp.INITS)
def test_init_same_key_same_params_different_key_different_params(init):
    sizes = (6, 5, 3)
    a = fnbp.mlp.init(jax.random.key(1), sizes, init=init)
    b = fnbp.mlp.init(jax.random.key(1), sizes, init=init)
    c = fnbp.mlp.init(jax.random.key(2), sizes, init=init)
    for p, q, r in zip(a, b, c):
        np.testing.assert_array_equal(p["W"], q["W"])
        np.testing.assert_array_equal(p["b"], q["b"])
        assert np.all(np.asarray(p["W"]) != np.asarray(r["W"]))          # every weight differs
        if init == "uniform":
            assert np.all(np.asarray(p["b"]) != np.asarray(r["b"]))
        else:
            assert np.all(np.asarray(p["b"]) == 0) and np.all(np.asarray(r["b"]) == 0)


# statistics on a 512 x 512 layer and a 128 x 512 one (n_in = 512, n_out = 128, so fan-in and
# fan-out give different answers); 65k-262k draws: the sample std is within ~0.3% of the truth
STATS_SIZES = (512, 512, 128)


@pytest.fixture(scope="module")
def drawn():
    """Each initialiser's parameters for STATS_SIZES, as numpy (one jit-compiled draw each)."""
    out = {}
    for init in fnbp.mlp.INITS:
        f = jax.jit(lambda key, init=init: fnbp.mlp.init(key, STATS_SIZES, init=init))
        out[init] = jax.tree_util.tree_map(np.asarray, f(jax.random.key(42)))
    return out


def test_init_uniform_statistics(drawn):
    for layer in drawn["uniform"]:
        for v in (layer["W"], layer["b"]):
            assert v.min() >= -1.0 and v.max() <= 1.0
            assert v.min() < -0.95 and v.max() > 0.95                     # the whole of [-1, 1] is used
        W = layer["W"]
        assert abs(W.mean()) < 0.01
        assert abs(W.std() / (1 / math.sqrt(3)) - 1) < 0.02              # std of U(-1, 1) is 1/sqrt(3)
        assert abs(np.mean(np.abs(W) < 0.5) - 0.5) < 0.01                # flat, not bell-shaped


def test_init_glorot_statistics(drawn):
    for layer, (n_in, n_out) in zip(drawn["glorot"], zip(STATS_SIZES[:-1], STATS_SIZES[1:])):
        W = layer["W"]
        r = math.sqrt(6.0 / (n_in + n_out))                                 # Glorot & Bengio's bound
        assert np.abs(W).max() <= r * (1 + 1e-6)
        assert np.abs(W).max() > 0.99 * r
        assert abs(W.std() / (r / math.sqrt(3)) - 1) < 0.02               # Var = 2 / (n_in + n_out)
        assert abs(W.std() / math.sqrt(2.0 / (n_in + n_out)) - 1) < 0.02
        assert abs(np.mean(np.abs(W) < r / 2) - 0.5) < 0.01               # uniform on [-r, r]
        assert np.all(layer["b"] == 0)


def test_init_he_statistics(drawn):
    for layer, n_in in zip(drawn["he"], STATS_SIZES[:-1]):
        W = layer["W"]
        std = math.sqrt(2.0 / n_in)                                        # He et al.: fan-in
        assert abs(W.mean()) < 0.02 * std                                 # 5 standard errors
        assert abs(W.std() / std - 1) < 0.02                               # (the issue asks for 10%)
        assert abs(np.mean(np.abs(W) < std) - 0.6827) < 0.01               # normal, not uniform (0.577)
        assert np.all(layer["b"] == 0)
    # fan-in, not fan-out: the 128 x 512 layer has std sqrt(2/512), not sqrt(2/128)
    assert abs(drawn["he"][1]["W"].std() - math.sqrt(2 / 512)) < 0.1 * math.sqrt(2 / 512)


def test_init_rejects_bad_arguments():
    with pytest.raises(ValueError, match="init must be one of"):
        fnbp.mlp.init(jax.random.key(0), (3, 2), init="xavier")
    with pytest.raises(ValueError, match="sizes"):
        fnbp.mlp.init(jax.random.key(0), (3,))
    with pytest.raises(ValueError, match="sizes"):
        fnbp.mlp.init(jax.random.key(0), (3, 0, 2))


# ------------------------------------------------------------------ num_params
def test_num_params_of_the_notes_exercise():
    sizes = (1600, 100, 100, 100, 10)
    by_hand = (1600 + 1) * 100 + (100 + 1) * 100 + (100 + 1) * 100 + (100 + 1) * 10
    assert by_hand == 160_100 + 10_100 + 10_100 + 1_010 == 181_310
    assert fnbp.mlp.num_params(sizes) == 181_310
    shapes = jax.eval_shape(lambda: fnbp.mlp.init(jax.random.key(0), sizes))      # the leaves init returns
    assert sum(math.prod(v.shape) for v in jax.tree_util.tree_leaves(shapes)) == 181_310
    # and a drawn network counts the same
    params = fnbp.mlp.init(jax.random.key(0), (7, 5, 3))
    assert sum(v.size for v in jax.tree_util.tree_leaves(params)) == fnbp.mlp.num_params((7, 5, 3)) == 58


@pytest.mark.parametrize("sizes", [(1, 1), (784, 512, 512, 10), (3, 64, 1, 64, 2)])
def test_num_params_counts_init_leaves(sizes):
    shapes = jax.eval_shape(lambda: fnbp.mlp.init(jax.random.key(0), sizes))
    assert fnbp.mlp.num_params(sizes) == sum(math.prod(v.shape) for v in jax.tree_util.tree_leaves(shapes))


# ------------------------------------------------------------------ apply vs numpy
def np_sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def np_softmax(a):
    e = np.exp(a - a.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


NUMPY_ACTS = {
    "identity": lambda a, layer: a,
    "sigmoid": lambda a, layer: np_sigmoid(a),
    "tanh": lambda a, layer: np.tanh(a),
    "relu": lambda a, layer: np.maximum(a, 0.0),
    "leaky_relu": lambda a, layer: np.where(a > 0, a, 0.2 * a),
    "prelu": lambda a, layer: np.where(a > 0, a, layer["alpha"] * a),
    "step": lambda a, layer: (a > 0).astype(np.float64),
    "sign": lambda a, layer: np.sign(a),
    "softmax": lambda a, layer: np_softmax(a),
}
FNBP_ACTS = {"identity": fnbp.identity, "sigmoid": fnbp.sigmoid, "tanh": fnbp.tanh, "relu": fnbp.relu,
             "leaky_relu": functools.partial(fnbp.leaky_relu, slope=0.2), "prelu": fnbp.prelu,
             "step": fnbp.step, "sign": fnbp.sign, "softmax": fnbp.softmax}


def numpy_forward(params, x, names):
    """h_0 = x; a_k = W_k h_{k-1} + b_k (rows of x are examples: H W^T + b); h_k = g_k(a_k)."""
    h = np.asarray(x)
    for layer, name in zip(params, names):
        a = np.einsum("ij,...j->...i", layer["W"], h) + layer["b"]
        h = NUMPY_ACTS[name](a, layer)
    return h


# hidden activation lists (every activation appears; step and sign late so the layers before
# them are seen through continuous outputs too) and output activations
NETWORKS = [
    (["sigmoid", "tanh", "relu", "leaky_relu", "prelu", "identity"], "softmax"),
    (["prelu", "relu", "step"], "identity"),
    (["tanh", "sign"], "sigmoid"),
    (["leaky_relu"], "tanh"),
]


@pytest.mark.parametrize("hidden,output", NETWORKS)
def test_apply_per_layer_activations_match_numpy(hidden, output):
    rng = np.random.default_rng(len(hidden))
    sizes = [5] + [int(n) for n in rng.integers(3, 9, size=len(hidden))] + [4]
    params = numpy_params(len(hidden), sizes, prelu=True)
    fwd = jax.jit(lambda p, x: fnbp.mlp.apply(p, x, activation=[FNBP_ACTS[n] for n in hidden],
                                              output=FNBP_ACTS[output]))
    names = hidden + [output]
    x1 = rng.normal(size=5)
    xb = rng.normal(size=(8, 5))
    x3 = rng.normal(size=(2, 3, 5))                      # any number of leading batch axes
    for x in (x1, xb, x3):
        y = np.asarray(fwd(params, x))
        assert y.shape == x.shape[:-1] + (4,)
        np.testing.assert_allclose(y, numpy_forward(params, x, names), rtol=1e-12, atol=1e-14)
    yb = np.asarray(fwd(params, xb))
    for n in range(len(xb)):                             # a batch is the examples, row by row
        np.testing.assert_allclose(yb[n], np.asarray(fwd(params, xb[n])), rtol=1e-13, atol=1e-15)


def test_apply_defaults_single_activation_and_eager():
    """Eager (no jit) with the defaults (relu hidden, identity output) and one activation for all layers."""
    params = numpy_params(5, (4, 6, 5, 3))
    rng = np.random.default_rng(6)
    x, xb = rng.normal(size=4), rng.normal(size=(3, 4))
    np.testing.assert_allclose(fnbp.mlp.apply(params, x), numpy_forward(params, x, ["relu", "relu", "identity"]),
                               rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(fnbp.mlp.apply(params, xb, activation=fnbp.tanh, output=fnbp.sigmoid),
                               numpy_forward(params, xb, ["tanh", "tanh", "sigmoid"]), rtol=1e-12, atol=1e-14)
    assert fnbp.mlp.layer_activations(3, fnbp.tanh, fnbp.sigmoid) == [fnbp.tanh, fnbp.tanh, fnbp.sigmoid]


# ------------------------------------------------------------------ bad input
def _call_apply(params, x, **kw):
    return fnbp.mlp.apply(params, x, **kw)


def _call_backprop(params, x, **kw):
    n_out = np.shape(params[-1]["W"])[0] if params else 1
    return fnbp.backprop(params, x, np.zeros(np.shape(x)[:-1] + (n_out,)), **kw)


@pytest.mark.parametrize("call", [_call_apply, _call_backprop], ids=["apply", "backprop"])
def test_bad_input_raises_value_error(call):
    good = numpy_params(0, (4, 5, 3, 2))
    x = np.ones(4)
    bad = [dict(good[0]), dict(good[1], W=np.ones((3, 6))), dict(good[2])]     # layer 1 expects 6, gets 5
    with pytest.raises(ValueError, match=r"layer 0 outputs 5 units but layer 1 expects 6 inputs"):
        call(bad, x)
    bad = [dict(good[0]), dict(good[1]), dict(good[2], W=np.ones((2, 7)))]
    with pytest.raises(ValueError, match=r"layer 1 outputs 3 units but layer 2 expects 7 inputs"):
        call(bad, x)
    with pytest.raises(ValueError, match=r"input x has shape \(3,\) but layer 0 expects 4 inputs"):
        call(good, np.ones(3))
    with pytest.raises(ValueError, match=r"input x has shape \(8, 5\) but layer 0 expects 4 inputs"):
        call(good, np.ones((8, 5)))
    with pytest.raises(ValueError, match=r"one entry per hidden layer \(2 for 3 layers\), got 1"):
        call(good, x, activation=[fnbp.tanh])
    with pytest.raises(ValueError, match=r"one entry per hidden layer \(2 for 3 layers\), got 3"):
        call(good, x, activation=[fnbp.tanh] * 3)
    with pytest.raises(ValueError, match=r"prelu needs a learnable 'alpha'"):
        call(good, x, activation=fnbp.prelu)
    with pytest.raises(ValueError, match=r"layer 1: b has shape \(4,\) but W has 3 rows"):
        call([good[0], dict(good[1], b=np.ones(4)), good[2]], x)
    with pytest.raises(ValueError, match=r"layer 2 must be a dict with 'W' and 'b'"):
        call([good[0], good[1], {"W": good[2]["W"]}], x)
    with pytest.raises(ValueError, match="non-empty list"):
        call([], x)


# ------------------------------------------------------------------ the notes' worked example
# Notes 003: W_XA and W_AO are applied as matrix times column vector (``w.dot(x)`` with x a
# column), X_hidden = W_XA . X, X_output = W_AO . X_hidden, sigmoid at both layers, no biases.
W_XA = [[0.9, 0.3, 0.4], [0.2, 0.8, 0.2], [0.1, 0.5, 0.6]]
W_AO = [[0.3, 0.7, 0.5], [0.6, 0.5, 0.2], [0.8, 0.1, 0.9]]
X = [0.9, 0.1, 0.8]
A_PRINTED = [0.76, 0.60, 0.65]
O_PRINTED = [0.72, 0.70, 0.77]


def hand_layer(W, v):
    """sigmoid(W v), one row at a time, with math.exp."""
    return [1.0 / (1.0 + math.exp(-sum(w * x for w, x in zip(row, v)))) for row in W]


def test_notes_sigmoid_forward_example():
    # hidden pre-activations by hand: 0.81 + 0.03 + 0.32, 0.18 + 0.08 + 0.16, 0.09 + 0.05 + 0.48
    pre = [sum(w * x for w, x in zip(row, X)) for row in W_XA]
    assert all(math.isclose(p, q, rel_tol=1e-14) for p, q in zip(pre, [1.16, 0.42, 0.62]))
    A = hand_layer(W_XA, X)
    O = hand_layer(W_AO, A)
    assert [round(a, 2) for a in A] == A_PRINTED                 # A = (0.76, 0.60, 0.65)
    # the notes print O = (0.72, 0.70, 0.77): the values truncated to two decimals
    # (O = 0.7263, 0.7086, 0.7780, which round to 0.73, 0.71, 0.78)
    assert [math.floor(o * 100) / 100 for o in O] == O_PRINTED
    assert all(abs(o - p) < 0.01 for o, p in zip(O, O_PRINTED))
    # the transposed convention (x^T W) does not give the notes' hidden values
    A_transposed = hand_layer([list(col) for col in zip(*W_XA)], X)
    assert [round(a, 2) for a in A_transposed] != A_PRINTED
    # fnbp: W_k h + b_k with zero biases and sigmoid at both layers
    params = [{"W": np.array(W_XA), "b": np.zeros(3)}, {"W": np.array(W_AO), "b": np.zeros(3)}]
    hidden = fnbp.mlp.apply(params[:1], np.array(X), activation=fnbp.sigmoid, output=fnbp.sigmoid)
    out = fnbp.mlp.apply(params, np.array(X), activation=fnbp.sigmoid, output=fnbp.sigmoid)
    np.testing.assert_allclose(hidden, A, rtol=1e-14)
    np.testing.assert_allclose(out, O, rtol=1e-14)


# ------------------------------------------------------------------ vmap over models and learning rates
SIZES = (3, 6, 2)
N_MODELS, LRS, STEPS, BATCH = 4, (0.0, 0.01, 0.05, 0.1, 0.3), 5, 8


def loss_of(params, x, d):
    return losses.half_sse(fnbp.mlp.apply(params, x, activation=fnbp.tanh), d)


def make_step(optimizer, grads_by, traces=None):
    """One training step with a traced learning rate: loss via fnbp layers, grads via fnbp.backprop
    or jax.grad, update via fnbp.optim."""
    def step(params, opt_state, lr, x, d):
        if traces is not None:
            traces.append(jnp.shape(x))                  # runs once per trace, not per call
        opt = optimizer(lr)
        if grads_by == "backprop":
            E, g = fnbp.backprop(params, x, d, activation=fnbp.tanh)
        else:
            E, g = jax.value_and_grad(loss_of)(params, x, d)
        updates, opt_state = opt.update(g, opt_state, params)
        return fnbp.optim.apply_updates(params, updates), opt_state, E
    return step


def data(seed, n=BATCH):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(STEPS, n, SIZES[0])), rng.normal(size=(STEPS, n, SIZES[-1]))


@pytest.mark.slow
@pytest.mark.parametrize("optimizer,grads_by", [(fnbp.optim.sgd, "backprop"), (fnbp.optim.adam, "jax.grad")],
                         ids=["sgd-backprop", "adam-jax.grad"])
def test_ensemble_and_learning_rate_sweep_in_one_vmapped_jitted_step(optimizer, grads_by):
    keys = jax.random.split(jax.random.key(0), N_MODELS)
    init_one = jax.jit(lambda k: fnbp.mlp.init(k, SIZES, init="uniform", dtype=F64))
    ensemble = jax.vmap(lambda k: fnbp.mlp.init(k, SIZES, init="uniform", dtype=F64))(keys)   # (4, ...) leaves
    members = [init_one(k) for k in keys]
    for m, member in enumerate(members):               # vmap(init) is init per key
        assert max_rel_err(jax.tree_util.tree_map(lambda v: v[m], ensemble), member) == 0.0
    lrs = jnp.asarray(LRS, F64)
    xs, ds = data(1)

    # one step for every (learning rate, model) pair: vmap over models inside vmap over rates
    traces = []
    step = make_step(optimizer, grads_by, traces)
    sweep = jax.jit(jax.vmap(jax.vmap(step, in_axes=(0, 0, None, None, None)), in_axes=(0, 0, 0, None, None)))
    grid = jax.tree_util.tree_map(lambda v: jnp.broadcast_to(v, (len(LRS),) + v.shape), ensemble)
    state = jax.vmap(jax.vmap(lambda p, lr: optimizer(lr).init(p), in_axes=(0, None)))(grid, lrs)
    for t in range(STEPS):
        grid, state, E = sweep(grid, state, lrs, xs[t], ds[t])
    assert E.shape == (len(LRS), N_MODELS)
    assert len(traces) == 1                             # one trace for the 5 steps

    # the Python loop over members, one (rate, model) at a time
    single = jax.jit(make_step(optimizer, grads_by))
    for i, lr in enumerate(LRS):
        for m, params in enumerate(members):
            opt_state = optimizer(lr).init(params)
            for t in range(STEPS):
                params, opt_state, E_loop = single(params, opt_state, lr, xs[t], ds[t])
            assert max_rel_err(jax.tree_util.tree_map(lambda v: v[i, m], grid), params) <= 1e-12
            assert abs(float(E[i, m]) - float(E_loop)) <= 1e-12 * max(1.0, abs(float(E_loop)))
    # lr = 0 leaves every model as it was; the other rates moved them, each differently
    assert max_rel_err(jax.tree_util.tree_map(lambda v: v[0], grid), ensemble) == 0.0
    W0 = np.asarray(grid[0]["W"])
    assert all(np.abs(W0[i] - W0[j]).max() > 1e-6 for i in range(len(LRS)) for j in range(i))


def test_training_step_compiles_once_per_input_shape():
    traces = []
    step = jax.jit(make_step(fnbp.optim.sgd, "backprop", traces))
    params = jax.jit(lambda k: fnbp.mlp.init(k, SIZES, dtype=F64))(jax.random.key(3))
    opt_state = fnbp.optim.sgd(0.1).init(params)
    xs, ds = data(2)
    for t in range(STEPS):                               # same shapes, new values
        params, opt_state, E = step(params, opt_state, 0.1, xs[t], ds[t])
    assert len(traces) == 1
    xs16, ds16 = data(3, n=16)                           # a new batch shape: one more compile
    for t in range(3):
        params, opt_state, E = step(params, opt_state, 0.1, xs16[t], ds16[t])
    assert len(traces) == 2
    params, opt_state, E = step(params, opt_state, 0.05, xs[0], ds[0])   # back to batch 8, another rate
    assert traces == [(BATCH, SIZES[0]), (16, SIZES[0])]       # the Python counter inside the traced step


def test_apply_refuses_batch_norm_params():
    params = fnbp.mlp.init(jax.random.PRNGKey(0), [4, 3, 2], batch_norm=True)
    with pytest.raises(ValueError, match=r"layers \[0\] have batch-norm parameters.*apply_stateful"):
        fnbp.mlp.apply(params, jnp.ones((2, 4)))


# ============================================================================ apply_stateful: batch norm and dropout
# (moved from tests/test_norm.py: these exercise fnbp.mlp.apply_stateful)
def test_network_eval_mode_is_per_example_and_keeps_state():
    params = random_bn_params(3, (3, 6, 4, 2))
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(10, 3)))
    x_other = x.at[1:].set(jnp.asarray(rng.normal(size=(9, 3)) * 5))     # every other example changed
    apply = jax.jit(mlp.apply_stateful, static_argnames=("train", "bn_position"))
    for pos in ("before", "after"):
        state = mlp.init_state(params)
        for t in range(3):        # some non-trivial running statistics
            _, state = apply(params, state, x * 2 + t, train=True, bn_position=pos)
        y, new_state = apply(params, state, x, train=False, bn_position=pos)
        jax.tree_util.tree_map(np.testing.assert_array_equal, new_state, state)      # eval: state untouched
        y_other, _ = apply(params, state, x_other, train=False, bn_position=pos)
        np.testing.assert_allclose(y_other[0], y[0], rtol=1e-14, atol=1e-14)
        y_single, _ = apply(params, state, x[:1], train=False, bn_position=pos)
        np.testing.assert_allclose(y_single[0], y[0], rtol=1e-14, atol=1e-14)
        y_train, _ = apply(params, state, x_other, train=True, bn_position=pos)    # training mode: batch-dependent
        assert np.max(np.abs(y_train[0] - apply(params, state, x, train=True, bn_position=pos)[0][0])) > 1e-3


def np_relu(a):
    return np.maximum(a, 0.0)


def np_network(params, x, position, train, state=None, momentum=0.1):
    """numpy reference network: returns (y, new running stats)."""
    h, new_state = np.asarray(x), []
    for k, layer in enumerate(params):
        W, b = np.asarray(layer["W"]), np.asarray(layer["b"])
        a = h @ W.T + b
        if k == len(params) - 1:
            new_state.append({})
            return a, new_state
        gamma, beta = np.asarray(layer["gamma"]), np.asarray(layer["beta"])
        st = state[k]

        def bn(v):
            if train:
                return np_batch_norm(v, gamma, beta), {
                    "mean": (1 - momentum) * st["mean"] + momentum * v.mean(0),
                    "var": (1 - momentum) * st["var"] + momentum * v.var(0, ddof=1)}   # PyTorch: unbiased
            return np_batch_norm_eval(v, gamma, beta, st["mean"], st["var"]), st

        if position == "before":
            a, st = bn(a)
        h = np_relu(a)
        if position == "after":
            h, st = bn(h)
        new_state.append(st)


def random_bn_params(seed, sizes):
    params = mlp.init(jax.random.PRNGKey(seed), sizes, dtype=jnp.float64, batch_norm=True)
    rng = np.random.default_rng(seed)
    for layer in params[:-1]:
        n = layer["gamma"].shape[0]
        layer["gamma"] = jnp.asarray(1 + 0.5 * rng.normal(size=n))
        layer["beta"] = jnp.asarray(0.5 * rng.normal(size=n))
        layer["b"] = jnp.asarray(0.3 * rng.normal(size=n))
    return params


def test_bn_position_before_and_after_each_match_numpy_reference():
    sizes = (3, 6, 5, 2)
    params = random_bn_params(7, sizes)
    x = np.random.default_rng(8).normal(size=(12, 3)) * 2
    outs = {}
    for pos in ("before", "after"):
        state = mlp.init_state(params)
        np_state = [{"mean": np.zeros(n), "var": np.ones(n)} for n in sizes[1:-1]] + [{}]
        for step in range(3):       # train: outputs and running stats
            xb = x + step
            y, state = mlp.apply_stateful(params, state, jnp.asarray(xb), train=True, bn_position=pos)
            y_np, np_state = np_network(params, xb, pos, True, np_state)
            np.testing.assert_allclose(y, y_np, rtol=1e-11, atol=1e-12)
            for s, s_np in zip(state[:-1], np_state[:-1]):
                np.testing.assert_allclose(s["mean"], s_np["mean"], rtol=1e-12, atol=1e-13)
                np.testing.assert_allclose(s["var"], s_np["var"], rtol=1e-12, atol=1e-13)
        y, _ = mlp.apply_stateful(params, state, jnp.asarray(x), train=False, bn_position=pos)
        y_np, _ = np_network(params, x, pos, False, np_state)
        np.testing.assert_allclose(y, y_np, rtol=1e-11, atol=1e-12)
        outs[pos] = np.asarray(y)
    assert np.max(np.abs(outs["before"] - outs["after"])) > 1e-2


def reference_network(params, x, *, position, key=None, p=0.0):
    """Plain-jnp training-mode network (reference.* only), for autodiff."""
    h = x
    for k, layer in enumerate(params):
        a = reference.dense(layer["W"], layer["b"], h)
        if k == len(params) - 1:
            return a
        if position == "before":
            a = reference.batch_norm(a, layer["gamma"], layer["beta"])
        h = reference.tanh(a)
        if position == "after":
            h = reference.batch_norm(h, layer["gamma"], layer["beta"])
        if p:
            h = reference.dropout(h, p, jax.random.fold_in(key, k))


@pytest.mark.parametrize("position", ["before", "after"])
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_network_gradients_vs_reference_autodiff(position, p):
    """grad of a loss through apply_stateful (our rules) vs autodiff of the plain-jnp network,
    with batch norm before/after tanh and dropout (same keys: layer k uses fold_in(key, k))."""
    params = random_bn_params(9, (4, 7, 5, 3))
    x = jax.random.normal(jax.random.PRNGKey(10), (11, 4), jnp.float64)
    d = jax.random.normal(jax.random.PRNGKey(11), (11, 3), jnp.float64)
    key = jax.random.PRNGKey(12)
    state = mlp.init_state(params)

    def ours(pr):
        y, _ = mlp.apply_stateful(pr, state, x, train=True, key=key, activation=fnbp.tanh, bn_position=position,
                                  dropout=p)
        return fnbp.losses.half_sse(y, d)

    def ref(pr):
        return reference.half_sse(reference_network(pr, x, position=position, key=key, p=p), d)

    (e, g), (e_ref, g_ref) = jax.jit(lambda pr: (jax.value_and_grad(ours)(pr), jax.value_and_grad(ref)(pr)))(params)
    np.testing.assert_allclose(e, e_ref, rtol=1e-12)
    # relative to the largest gradient component: with BN before the activation the hidden
    # biases' gradients are exactly 0 mathematically (BN removes the mean), ~1e-17 numerically
    scale = max(np.max(np.abs(b)) for b in jax.tree_util.tree_leaves(g_ref))
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10 * scale)
    if position == "before":     # dE/db_k = 0 for the hidden layers (b_k is cancelled by the batch mean)
        for layer in g[:-1]:
            assert np.max(np.abs(layer["b"])) <= 1e-12 * scale


def test_apply_stateful_without_bn_or_dropout_equals_apply():
    params = mlp.init(jax.random.PRNGKey(13), (3, 5, 2), dtype=jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(14), (6, 3), jnp.float64)
    for train in (True, False):
        y, _ = mlp.apply_stateful(params, mlp.init_state(params), x, train=train)
        np.testing.assert_array_equal(y, mlp.apply(params, x))
    # inference mode with dropout set is still deterministic and equals apply
    y, _ = mlp.apply_stateful(params, mlp.init_state(params), x, train=False, dropout=0.5)
    np.testing.assert_array_equal(y, mlp.apply(params, x))


def test_apply_stateful_validation():
    params = mlp.init(jax.random.PRNGKey(0), (3, 4, 2), dtype=jnp.float64, batch_norm=True)
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="bn_position"):
        mlp.apply_stateful(params, mlp.init_state(params), x, train=True, bn_position="middle")
    with pytest.raises(ValueError, match="key"):
        mlp.apply_stateful(params, mlp.init_state(params), x, train=True, dropout=0.5)


# --- named errors of fnbp.mlp.init / apply (moved from tests/test_rules.py) ---
def test_mlp_sizes_and_activation_of_the_wrong_kind_are_named_errors():
    key = jax.random.PRNGKey(0)
    for bad in ([5.7, 3], [None, 2], ["3", 2], [True, 3]):
        with pytest.raises(TypeError, match="fnbp.mlp.init: every width in sizes must be an int"):
            fnbp.mlp.init(key, bad)
    params = fnbp.mlp.init(key, [4, 3, 2])
    with pytest.raises(TypeError, match="an activation must be a function such as fnbp.relu, got 'relu' "
                                        "\\(use fnbp.activations.ACTIVATIONS\\['relu'\\]\\)"):
        fnbp.mlp.apply(params, np.ones((2, 4), np.float32), activation="relu")
