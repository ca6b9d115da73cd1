"""Tests of the training loop (fnbp.train): accuracy, determinism, modes, accumulation, NaN guard."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fnbp
from fnbp import data, mlp, optim
from fnbp import train as T
from student_rules import softplus, softplus_fwd

DIGITS_LR = optim.exponential_decay(3e-3, 3e-4)   # the `fnbp train` defaults


@pytest.fixture(scope="module")
def digits():
    return data.load_digits(seed=0, standardize=True)


def _leaves_equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _run(ds, seed, epochs=40, cfg=T.Config(l2=1e-4), batch_size=16, **kw):
    k_init, k_train = jax.random.split(jax.random.PRNGKey(seed))
    params = mlp.init(k_init, kw.pop("sizes", [64, 32, 10]), batch_norm=kw.pop("batch_norm", False))
    return T.train(params, optim.adam(kw.pop("lr", DIGITS_LR)), ds, key=k_train, epochs=epochs,
                   batch_size=batch_size, cfg=cfg, progress=False, **kw)


# Accuracy thresholds sit >= 1.9 points below what was measured (float64 tests, AMD EPYC, seed 0:
# 97.49 % plain, 96.94 % batch norm + dropout; seeds 0-1 gave 97.49/96.66 and 96.94/97.49): they catch a
# broken rule or optimizer (which lands near 10 %, or in the 80s), not one CPU's rounding.  The headline
# accuracies live in the README and experiments/.
@pytest.mark.slow
def test_digits_64_32_10_relu_adam_reaches_95_percent(digits):
    result = _run(digits, seed=0)
    acc = result.history[-1]["test_accuracy"]
    assert acc >= 0.95, f"held-out accuracy {acc:.4f} < 0.95"
    assert result.history[-1]["loss"] < result.history[0]["loss"]


@pytest.mark.slow
def test_digits_with_batch_norm_and_dropout_reaches_95_percent(digits):
    result = _run(digits, seed=0, sizes=[64, 128, 10], cfg=T.Config(l2=1e-4, dropout=0.2), batch_norm=True,
                  batch_size=64, lr=optim.exponential_decay(1e-2, 3e-4))
    acc = result.history[-1]["test_accuracy"]
    assert acc >= 0.95, f"held-out accuracy with batch norm + dropout {acc:.4f} < 0.95"
    # the running statistics were updated by training
    assert not np.allclose(np.asarray(result.state[0]["mean"]), 0.0)


@pytest.mark.slow
def test_same_seed_bit_identical_different_seed_different(digits):
    a = _run(digits, seed=1, epochs=2)
    b = _run(digits, seed=1, epochs=2)
    c = _run(digits, seed=3, epochs=2)
    assert _leaves_equal(a.params, b.params) and _leaves_equal(a.opt_state, b.opt_state)
    assert not _leaves_equal(a.params, c.params)


@pytest.mark.slow
def test_resume_in_process_is_bit_identical(digits):
    full = _run(digits, seed=4, epochs=3)
    first = _run(digits, seed=4, epochs=1)
    k_train = jax.random.split(jax.random.PRNGKey(4))[1]
    rest = T.train(first.params, optim.adam(DIGITS_LR), digits, key=k_train, epochs=3, batch_size=16,
                   cfg=T.Config(l2=1e-4), opt_state=first.opt_state, state=first.state, start_epoch=1,
                   start_step=first.step, progress=False)
    assert rest.step == full.step
    assert _leaves_equal(rest.params, full.params)


def _counting(opt):
    """``opt`` with a counter of the update calls actually run, kept in its state (so it survives jit and scan)."""
    def init(params):
        return jnp.zeros((), jnp.int32), opt.init(params)

    def update(grads, state, params=None):
        updates, inner = opt.update(grads, state[1], params)
        return updates, (state[0] + 1, inner)
    return optax.GradientTransformation(init, update)


def test_modes_full_batch_sgd_minibatch_step_counts():
    """The optimizer runs epochs x (N // B) times (counted inside the compiled loop, not re-derived from the loop's
    own arithmetic), and full-batch training is exactly gradient descent on the whole set."""
    ds = data.load("xor")
    params = mlp.init(jax.random.PRNGKey(0), [2, 4, 2], dtype=jnp.float64)
    for batch_size, steps in [(None, 1), (1, 4), (2, 2), (3, 1)]:
        r = T.train(params, _counting(optim.sgd(0.1)), ds, key=jax.random.PRNGKey(0), epochs=3,
                    batch_size=batch_size, progress=False)
        assert int(r.opt_state[0]) == 3 * steps == r.step, (batch_size, int(r.opt_state[0]), r.step)
    full = T.train(params, optim.sgd(0.1), ds, key=jax.random.PRNGKey(0), epochs=3, batch_size=None,
                   progress=False).params
    x, d = jnp.asarray(ds.x_train, jnp.float64), jnp.asarray(ds.y_train)
    loss = lambda p: fnbp.losses.softmax_cross_entropy(mlp.apply(p, x), d)
    by_hand = params
    for _ in range(3):
        by_hand = jax.tree_util.tree_map(lambda w, g: w - 0.1 * g, by_hand, jax.grad(loss)(by_hand))
    for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(by_hand)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_batch_plan_drops_remainder_and_validates():
    assert T.batch_plan(100, 32) == (32, 3)
    assert T.batch_plan(100, None) == (100, 1)
    with pytest.raises(ValueError, match="between 1 and"):
        T.batch_plan(10, 11)
    with pytest.raises(ValueError, match="divisible by accumulate"):
        T.batch_plan(100, 30, accumulate=4)


def _one_step(params, x, d, *, accumulate, grad="autodiff", loss=fnbp.losses.softmax_cross_entropy):
    cfg = T.Config(loss=loss, grad=grad, l2=0.01)
    opt = optim.sgd(0.5)
    step = T.make_step(cfg, opt, accumulate=accumulate)
    (new_params, _, _), E = jax.jit(step)((params, opt.init(params), mlp.init_state(params)),
                                          (x, d, jax.random.PRNGKey(0)))
    return new_params, E


@pytest.mark.parametrize("loss", [fnbp.losses.softmax_cross_entropy,
                                  functools.partial(fnbp.losses.softmax_cross_entropy, reduction="sum")])
def test_gradient_accumulation_equals_whole_batch(loss):
    key = jax.random.PRNGKey(0)
    params = mlp.init(key, [6, 5, 3], dtype=jnp.float64)
    x = jax.random.normal(key, (12, 6), jnp.float64)
    d = jax.random.randint(jax.random.PRNGKey(1), (12,), 0, 3)
    whole, E_whole = _one_step(params, x, d, accumulate=1, loss=loss)
    accumulated, E_acc = _one_step(params, x, d, accumulate=4, loss=loss)
    np.testing.assert_allclose(E_acc, E_whole, rtol=1e-12)
    for a, b in zip(jax.tree_util.tree_leaves(accumulated), jax.tree_util.tree_leaves(whole)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    # and accumulation is not a no-op: one micro-batch alone gives a different step
    part, _ = _one_step(params, x[:3], d[:3], accumulate=1, loss=loss)
    assert not np.allclose(part[0]["W"], whole[0]["W"])


@pytest.mark.parametrize("loss", [fnbp.losses.softmax_cross_entropy, fnbp.losses.half_sse])
def test_evaluation_in_chunks_equals_one_forward(loss):
    """``evaluate_in_chunks`` (``train``'s per-epoch evaluation): the full chunks by lax.map and the rest, the same
    (loss, accuracy) as one forward over all N examples; N <= chunk is that forward itself."""
    key = jax.random.PRNGKey(2)
    params = mlp.init(key, [6, 5, 3], dtype=jnp.float64)
    x = jax.random.normal(key, (30, 6), jnp.float64)
    d = jax.random.randint(jax.random.PRNGKey(3), (30,), 0, 3)
    if loss is fnbp.losses.half_sse:
        d = jax.nn.one_hot(d, 3, dtype=jnp.float64)
    cfg = T.Config(loss=loss)
    whole = T.evaluate(cfg, params, None, x, d)
    assert 0.2 < float(whole[1]) < 0.8                               # some right, some wrong
    for chunk in (7, 10, 30, 64):                                    # a rest of 2, none, one chunk, N < chunk
        got = jax.jit(lambda p, x, d, chunk=chunk: T.evaluate_in_chunks(cfg, p, None, x, d, chunk=chunk))(
            params, x, d)
        np.testing.assert_allclose(got, whole, rtol=1e-12, err_msg=str(chunk))


@pytest.mark.parametrize("grad", [pytest.param("autodiff", marks=pytest.mark.slow), "backprop"])
def test_lenet_step_computes_no_input_gradient_for_the_data(grad):
    """The first conv's input is the data: its input gradient (conv2d_xla's transposed convolution) is dead code,
    and the compiled step has no convolution making it, while the second conv's (a hidden layer's input) is there."""
    m = fnbp.nn.lenet((8, 8, 1), 10)                     # 3x3 SAME convs of 16 and 32 channels: 8 -> 4 -> 2
    B = 4
    params, _ = m.init(jax.random.PRNGKey(0), (8, 8, 1))
    opt = optim.adam(1e-3)
    step = T.make_step(T.Config(grad=grad), opt, model=m)
    x = jnp.zeros((B, 8, 8, 1), jnp.asarray(params[0]["W"]).dtype)
    batch = (x, jnp.zeros((B,), jnp.int32), jax.random.PRNGKey(1))
    hlo = jax.jit(step).lower((params, opt.init(params), m.init_state(params)), batch).compile().as_text()
    convs = [tuple(int(v) for v in dims.split(",")) for dims in
             re.findall(r"= f(?:32|64)\[([\d,]+)\]\S* convolution\(", hlo)]
    assert (B, 8, 8, 16) in convs and (B, 4, 4, 32) in convs, convs   # the two forward convolutions are seen
    assert (B, 4, 4, 16) in convs, convs                 # layer 2's input gradient (its input is pool1's output)
    assert (B, 8, 8, 1) not in convs, convs              # layer 1's (its input is x): none


def test_backprop_mode_equals_autodiff_mode():
    key = jax.random.PRNGKey(0)
    params = mlp.init(key, [6, 5, 3], dtype=jnp.float64)
    x = jax.random.normal(key, (8, 6), jnp.float64)
    d = jax.random.randint(jax.random.PRNGKey(1), (8,), 0, 3)
    a, Ea = _one_step(params, x, d, accumulate=1, grad="autodiff")
    b, Eb = _one_step(params, x, d, accumulate=1, grad="backprop")
    np.testing.assert_allclose(Ea, Eb, rtol=1e-12)
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-15)


@pytest.mark.slow
def test_nan_loss_stops_with_epoch_and_step_and_skips_callback(digits):
    # eta is ordinary until the middle of epoch 2 (0-based, batch 16) and 1e30 from there on, so the loss turns
    # non-finite in epoch 2 or later and the good epochs before it must all have been handed to on_epoch --
    # a list that is not empty.
    mid_epoch_2 = int(2.5 * len(digits.x_train) / 16)
    blow_up = optax.piecewise_constant_schedule(3e-3, {mid_epoch_2: 1e30 / 3e-3})
    saved = []
    with pytest.raises(T.NonFiniteLossError, match=r"epoch \d+ \(0-based\), step \d+") as ei:
        _run(digits, seed=0, epochs=6, lr=blow_up, cfg=T.Config(), on_epoch=lambda r: saved.append(r.epoch))
    bad_epoch = int(re.search(r"epoch (\d+) \(0-based\)", str(ei.value)).group(1))
    assert bad_epoch >= 2
    # exactly the epochs before the bad one were handed to on_epoch (i.e. checkpointed), as 1-based ints
    assert saved == list(range(1, bad_epoch + 1))
    assert all(type(e) is int for e in saved)


def _nan_at_step(n):
    """sgd(0.1) whose update at global step n (0-based) is NaN for the first weight: the loss of that step is
    still finite, so only the in-epoch parameter check can see it."""
    inner = optim.sgd(0.1)

    def update(grads, state, params=None):
        updates, new_state = inner.update(grads, state, params)
        bad = jnp.where(state.count == n, jnp.nan, 0.0).astype(updates[0]["W"].dtype)
        updates[0]["W"] = updates[0]["W"] + bad
        return updates, new_state

    return optax.GradientTransformation(inner.init, update)


def test_non_finite_parameters_stop_training_at_their_epoch_and_step():
    ds = data.load("xor")                             # batch 1: 4 steps per epoch; step 9 = epoch 2, step 1
    params = mlp.init(jax.random.PRNGKey(0), [2, 4, 2])
    saved = []
    with pytest.raises(T.NonFiniteParamsError, match=r"epoch 2 \(0-based\), step 1 of 4 .*global step 9"):
        T.train(params, _nan_at_step(9), ds, key=jax.random.PRNGKey(0), epochs=5, batch_size=1, progress=False,
                on_epoch=lambda r: saved.append(r.epoch))
    assert saved == [1, 2]                            # epochs 1 and 2 were good and checkpointed, epoch 3 not
    assert [type(e) for e in saved] == [int, int]     # 1-based Python ints, as checkpoint.save requires
    assert issubclass(T.NonFiniteParamsError, T.NonFiniteError)


def test_non_finite_data_or_parameters_are_refused_before_training():
    ds = data.load("xor")
    params = mlp.init(jax.random.PRNGKey(0), [2, 4, 2])
    x = ds.x_train.copy()
    x[2, 1] = np.nan
    with pytest.raises(T.NonFiniteInputError, match=r"data.x_train holds 1 NaN/inf value\(s\) \(first at index \(2, 1\)"):
        T.train(params, optim.sgd(0.1), ds._replace(x_train=x), key=jax.random.PRNGKey(0), epochs=1,
                progress=False)
    nan_W = [{**params[0], "W": params[0]["W"].at[0, 0].set(jnp.nan)}, params[1]]
    # l2 = 0 and relu: before, NaN weights trained silently to a finite loss
    with pytest.raises(T.NonFiniteInputError, match=r"params\[0\]\['W'\]"):
        T.train(nan_W, optim.sgd(0.1), ds, key=jax.random.PRNGKey(0), epochs=1, progress=False)


def test_labels_of_every_split_are_validated_before_training():
    ds = data.load("xor")
    params = mlp.init(jax.random.PRNGKey(0), [2, 4, 2])

    def run(**fields):
        return T.train(params, optim.sgd(0.1), ds._replace(**fields), key=jax.random.PRNGKey(0), epochs=1,
                       progress=False)

    with pytest.raises(ValueError, match=r"train labels must be in \[0, 2\): 1 of 4 .*min -1"):
        run(y_train=np.array([0, 1, -1, 0], np.int32))
    with pytest.raises(ValueError, match=r"test labels must be in \[0, 2\).*max 5.*index 3"):
        run(y_test=np.array([0, 1, 1, 5], np.int32))
    with pytest.raises(TypeError, match=r"train labels must be integer class indices.*float32"):
        run(y_train=np.array([0, 1, 1, 0], np.float32))


def test_wrong_hyperparameter_types_and_batch_norm_of_one_example_are_refused():
    ds = data.load("xor")
    params = mlp.init(jax.random.PRNGKey(0), [2, 4, 2])
    go = functools.partial(T.train, params, optim.sgd(0.1), ds, key=jax.random.PRNGKey(0), progress=False)
    with pytest.raises(TypeError, match=r"fnbp.train: batch_size must be an integer or None, got float 2.5"):
        go(epochs=1, batch_size=2.5)
    with pytest.raises(ValueError, match=r"fnbp.train: epochs must be >= 1, got -3"):
        go(epochs=-3)
    with pytest.raises(TypeError, match=r"fnbp.train: epochs must be an integer, got bool"):
        go(epochs=True)
    with pytest.raises(TypeError, match=r"fnbp.train: accumulate must be an integer"):
        go(epochs=1, accumulate=2.0)
    with pytest.raises(TypeError, match=r"fnbp.train: key must be a jax.random key"):
        T.train(params, optim.sgd(0.1), ds, key=None, epochs=1, progress=False)
    bn = mlp.init(jax.random.PRNGKey(0), [2, 4, 2], batch_norm=True)
    with pytest.raises(ValueError, match=r"batch norm in training needs at least 2 examples"):
        T.train(bn, optim.sgd(0.1), ds, key=jax.random.PRNGKey(0), epochs=1, batch_size=1, progress=False)
    with pytest.raises(ValueError, match=r"batch norm in training needs at least 2 examples"):
        T.train(bn, optim.sgd(0.1), ds, key=jax.random.PRNGKey(0), epochs=1, batch_size=2, accumulate=2,
                progress=False)


@pytest.mark.slow
def test_history_fields_and_silent_progress(digits, capsys):
    r = _run(digits, seed=0, epochs=2, record_learning_rate=DIGITS_LR)
    h = r.history[-1]
    for field in ["epoch", "loss", "test_loss", "test_accuracy", "train_accuracy", "learning_rate", "seconds",
                  "examples_per_s"]:
        assert field in h
    np.testing.assert_allclose(h["learning_rate"], 3e-3 * np.exp(-3e-4 * (r.step - 1)), rtol=1e-6)
    assert h["examples_per_s"] > 0
    captured = capsys.readouterr()
    assert "fnbp train" not in captured.err      # progress=False: no bar


def test_history_learning_rate_comes_from_inject_hyperparams_and_nothing_else_sets_it():
    """``record_learning_rate`` only writes the history; without it the history reads eta from an
    ``optax.inject_hyperparams`` state (optax's way of exposing a schedule), else records None."""
    ds = data.load("xor")
    params = mlp.init(jax.random.PRNGKey(0), [2, 4, 2])
    schedule = optax.exponential_decay(0.1, transition_steps=1, decay_rate=0.9)
    run = functools.partial(T.train, params, data=ds, key=jax.random.PRNGKey(0), epochs=2, batch_size=2,
                            progress=False)
    injected = run(opt=optax.inject_hyperparams(optim.sgd)(learning_rate=schedule))
    plain = run(opt=optim.sgd(schedule))
    # eta of the last step taken (step count - 1), read from the optimizer state, equals the schedule's
    np.testing.assert_allclose([h["learning_rate"] for h in injected.history],
                               [schedule(2 * (e + 1) - 1) for e in range(2)], rtol=1e-6)
    assert [h["learning_rate"] for h in plain.history] == [None, None]
    # the same optimizer and schedule, injected or not: the same parameters
    for a, b in zip(jax.tree_util.tree_leaves(injected.params), jax.tree_util.tree_leaves(plain.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    with pytest.raises(TypeError, match="learning_rate"):     # the old, misleading name is gone
        run(opt=optim.sgd(0.1), learning_rate=0.1)


def _compiles_during(fn):
    events = []

    def listener(name, secs, **kw):
        if name == "/jax/core/compile/backend_compile_duration":
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return len(events)


@pytest.mark.slow
def test_training_compiles_the_same_number_of_programs_for_2_and_6_epochs():
    """XLA compilations during train() do not grow with the number of epochs: the epoch is compiled
    once, not once per epoch (a retrace would compile again)."""
    ds = data.load("xor")
    params = mlp.init(jax.random.PRNGKey(0), [2, 4, 2])

    def run(epochs):
        return lambda: T.train(params, optim.sgd(0.1), ds, key=jax.random.PRNGKey(0), epochs=epochs,
                               batch_size=2, progress=False, record_learning_rate=0.1)

    _compiles_during(run(1))                            # warm the caches shared across calls
    two, six = _compiles_during(run(2)), _compiles_during(run(6))
    assert two >= 1 and six == two, (two, six)


# --- a student's own rule trains through fnbp.train (moved from tests/test_rules.py) ---
@pytest.mark.slow
def test_student_rule_trains_through_fnbp_train():
    ds = fnbp.data.load_digits(standardize=True)
    k_init, k_train = jax.random.split(jax.random.PRNGKey(0))
    params = fnbp.mlp.init(k_init, [64, 32, 10])
    cfg = fnbp.train.Config(activation=softplus)
    result = fnbp.train.train(params, fnbp.optim.adam(3e-3), ds, key=k_train, epochs=3, batch_size=32, cfg=cfg,
                              progress=False)
    # measured (seeds 0-4 of PRNGKey(seed), this setting): 0.922 0.930 0.916 0.919 0.908, mean 0.919;
    # threshold = mean - 2 points (chance is 0.10; 'does not learn' and 'learns clearly worse' both fail)
    assert result.history[-1]["test_accuracy"] >= 0.90
    # the wrong version is caught by fnbp.check
    bad = fnbp.rule(softplus_fwd, lambda a, g: (g * jax.nn.sigmoid(-a),))
    assert fnbp.check(softplus, lambda a: jnp.logaddexp(a, 0.0), ds.x_train[:4, :8]).ok
    assert not fnbp.check(bad, lambda a: jnp.logaddexp(a, 0.0), ds.x_train[:4, :8]).ok
