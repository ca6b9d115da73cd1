"""Tests of fnbp.perceptron: the notes' OR table step by step, the notes' single-step example,
XOR (perceptron fails, a trained 2-2-1 network succeeds), and the hand-set A AND NOT B and XOR
networks against Python's boolean operators."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnbp import activations, losses, mlp, perceptron

INPUTS = [(0, 0), (0, 1), (1, 0), (1, 1)]          # binary order, as in the notes
X = jnp.array(INPUTS, jnp.float64)

# The notes' "Ex: learning the logical OR" table (notes 001), transcribed:
# step, weights before (w0, w1, w2), input (x0, x1, x2), sum_i w_i x_i, output u, label y, weights after.
OR_TABLE = [
    (1, (0, 1, -1), (1, 0, 0), 0, 0, 0, (0, 1, -1)),
    (2, (0, 1, -1), (1, 0, 1), -1, 0, 1, (1, 1, 0)),
    (3, (1, 1, 0), (1, 1, 0), 2, 1, 1, (1, 1, 0)),
    (4, (1, 1, 0), (1, 1, 1), 2, 1, 1, (1, 1, 0)),
    (5, (1, 1, 0), (1, 0, 0), 1, 1, 0, (0, 1, 0)),
    (6, (0, 1, 0), (1, 0, 1), 0, 0, 1, (1, 1, 1)),
    (7, (1, 1, 1), (1, 1, 0), 2, 1, 1, (1, 1, 1)),
    (8, (1, 1, 1), (1, 1, 1), 3, 1, 1, (1, 1, 1)),
    (9, (1, 1, 1), (1, 0, 0), 1, 1, 0, (0, 1, 1)),
    (10, (0, 1, 1), (1, 0, 1), 1, 1, 1, (0, 1, 1)),
]
OR_W0 = (0, 1, -1)
OR_Y = [int(a or b) for a, b in INPUTS]


@pytest.fixture(scope="module")
def or_run():
    return perceptron.train(jnp.array(OR_W0, jnp.float64), X, jnp.array(OR_Y), c=1.0, epochs=6)


def test_or_table_step_by_step(or_run):
    t = jax.tree_util.tree_map(np.asarray, or_run.trace)
    for i, (step, w_before, inp, s, u, y, w_after) in enumerate(OR_TABLE):
        assert t.step[i] == step
        assert t.epoch[i] == (step - 1) // 4 + 1
        np.testing.assert_array_equal(t.weights_before[i], w_before, err_msg=f"step {step}")
        np.testing.assert_array_equal(t.input[i], inp, err_msg=f"step {step}")
        assert t.net[i] == s, step
        assert t.output[i] == u, step
        assert t.target[i] == y, step
        assert t.error[i] == y - u, step
        np.testing.assert_array_equal(t.weights[i], w_after, err_msg=f"step {step}")


def test_or_no_change_after_step_10_and_converged_epoch(or_run):
    t = jax.tree_util.tree_map(np.asarray, or_run.trace)
    final = OR_TABLE[-1][-1]                                    # (0, 1, 1)
    np.testing.assert_array_equal(t.weights[10:], np.broadcast_to(final, t.weights[10:].shape))
    assert np.all(t.error[10:] == 0)
    np.testing.assert_array_equal(or_run.weights, final)
    # step 9 (epoch 3) still had an error, so the first error-free epoch is epoch 4 (steps 13-16)
    assert bool(or_run.converged) and int(or_run.converged_epoch) == 4
    assert [int(perceptron.predict(or_run.weights, jnp.array(x, jnp.float64))) for x in INPUTS] == OR_Y


def test_or_trace_markdown(or_run):
    md = perceptron.format_trace(or_run.trace, max_steps=16)
    lines = md.splitlines()
    assert len(lines) == 2 + 16 and lines[0].startswith("| epoch | step |")
    # row for step 2 of the notes: (0, 1, -1), input 101, sum -1, u 0, y 1 -> (1, 1, 0)
    cells = [c.strip() for c in lines[2 + 1].strip("|").split("|")]
    assert cells == ["1", "2", "(0, 1, -1)", "(1, 0, 1)", "-1", "0", "1", "1", "(1, 1, 0)"]


def test_train_is_jit_compatible(or_run):
    jitted = jax.jit(perceptron.train, static_argnames="epochs")(jnp.array(OR_W0, jnp.float64), X,
                                                                 jnp.array(OR_Y), c=1.0, epochs=6)
    for a, b in zip(jax.tree_util.tree_leaves(jitted), jax.tree_util.tree_leaves(or_run)):
        np.testing.assert_array_equal(a, b)


def test_notes_single_update_example():
    """Notes: y = 0, u = 1, w = (w0, w1, w2) = (-1, 0.5, 0.3), x = (2, 1), c = 1 -> (-2, -1.5, -0.7)."""
    w = jnp.array([-1.0, 0.5, 0.3])
    x = jnp.array([2.0, 1.0])
    assert float(perceptron.net_input(w, x)) == pytest.approx(0.3)
    w_new, u = perceptron.update(w, x, 0.0, c=1.0)
    assert float(u) == 1.0
    np.testing.assert_allclose(w_new, [-2.0, -1.5, -0.7], rtol=1e-12)


def test_step_zero_is_zero():
    # sum = 0 gives output 0 (the notes' step 1 and step 6)
    assert float(perceptron.predict(jnp.array([0.0, 1.0, -1.0]), jnp.array([1.0, 1.0]))) == 0.0


def test_and_converges_and_is_correct():
    y = [int(a and b) for a, b in INPUTS]
    r = perceptron.train(jnp.zeros(3), X, jnp.array(y), epochs=20)
    assert bool(r.converged)
    assert [int(v) for v in perceptron.predict(r.weights, X)] == y
    # after the converged epoch nothing changes
    e = int(r.converged_epoch)
    np.testing.assert_array_equal(r.trace.weights[4 * (e - 1):], np.broadcast_to(r.weights, (4 * (21 - e), 3)))


@pytest.mark.parametrize("w0", [(0.0, 0.0, 0.0), (0.0, 1.0, -1.0), (0.3, -0.7, 0.2), (-0.5, 1.0, 1.0)])
def test_xor_perceptron_never_has_an_error_free_epoch(w0):
    y = [int(a != b) for a, b in INPUTS]
    r = perceptron.train(jnp.array(w0), X, jnp.array(y), c=1.0, epochs=100)
    errors_per_epoch = np.sum(np.asarray(r.trace.error).reshape(100, 4) != 0, axis=1)
    assert np.all(errors_per_epoch >= 1)
    assert not bool(r.converged) and int(r.converged_epoch) == -1


def test_train_validates_shapes():
    with pytest.raises(ValueError, match="w0"):
        perceptron.train(jnp.zeros(2), X, jnp.zeros(4), epochs=1)


# ---------------------------------------------------------------- hand-set networks
def test_a_and_not_b_perceptron():
    for a, b in INPUTS:
        u = perceptron.predict(perceptron.A_AND_NOT_B_WEIGHTS, jnp.array([a, b], jnp.float64))
        assert bool(u) == (bool(a) and not bool(b)), (a, b)


def test_hand_set_xor_network():
    params = perceptron.xor_network_params(jnp.float64)
    mlp.check_params(params, X)
    assert [p["W"].shape for p in params] == [(2, 2), (1, 2)]
    for a, b in INPUTS:
        assert bool(perceptron.xor_network(jnp.array([a, b]))) == (bool(a) != bool(b)), (a, b)
    # batched, and float32 by default
    np.testing.assert_array_equal(perceptron.xor_network(X), [int(bool(a) ^ bool(b)) for a, b in INPUTS])
    assert perceptron.xor_network_params()[0]["W"].dtype == jnp.float32


# ---------------------------------------------------------------- XOR learned by backprop
XOR_SEED, XOR_LR, XOR_STEPS = 0, 2.0, 1000


def test_xor_2_2_1_network_learns_xor():
    """2-2-1 network, tanh hidden, sigmoid output, half squared error (batch mean), full-batch
    gradient descent through fnbp.mlp.apply (our hand-written rules) in a lax.scan."""
    d = jnp.array([[float(a != b)] for a, b in INPUTS], jnp.float64)
    params = mlp.init(jax.random.PRNGKey(XOR_SEED), (2, 2, 1), init="uniform", dtype=jnp.float64)

    def loss(p):
        return losses.half_sse(mlp.apply(p, X, activation=activations.tanh, output=activations.sigmoid), d)

    @jax.jit
    def fit(p):
        def body(p, _):
            g = jax.grad(loss)(p)
            return jax.tree_util.tree_map(lambda w, gw: w - XOR_LR * gw, p, g), loss(p)
        return jax.lax.scan(body, p, None, length=XOR_STEPS)

    trained, history = fit(params)
    y = mlp.apply(trained, X, activation=activations.tanh, output=activations.sigmoid)[:, 0]
    predictions = [bool(v > 0.5) for v in y]
    assert predictions == [bool(a) != bool(b) for a, b in INPUTS]          # 100 % on XOR
    assert float(jnp.max(jnp.abs(y - d[:, 0]))) < 0.1
    assert float(history[-1]) < 0.01 * float(history[0])
