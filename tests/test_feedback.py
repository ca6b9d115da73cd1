"""fnbp.feedback: feedback alignment and straight-through estimators."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fnbp
from fnbp import feedback as fb
from fnbp import reference as R

jax.config.update("jax_enable_x64", True)

CE = fnbp.losses.softmax_cross_entropy


def small_net(seed=0, sizes=(5, 8, 7, 3), batch=6):
    k0, k1, k2, k3 = jax.random.split(jax.random.key(seed), 4)
    params = fnbp.mlp.init(k0, sizes, dtype=jnp.float64)
    feedback = fb.init_feedback(k1, params)
    x = jax.random.normal(k2, (batch, sizes[0]), jnp.float64)
    d = jax.random.randint(k3, (batch,), 0, sizes[-1])
    return params, feedback, x, d


def test_dense_fa_forward_is_dense_and_backward_sends_delta_through_B():
    k = jax.random.split(jax.random.key(1), 5)
    W, Bm = jax.random.normal(k[0], (4, 3)), jax.random.normal(k[1], (4, 3))
    b, h, g = jax.random.normal(k[2], (4,)), jax.random.normal(k[3], (5, 3)), jax.random.normal(k[4], (5, 4))
    a, vjp = jax.vjp(fb.dense_fa, W, b, h, Bm)
    np.testing.assert_allclose(a, R.dense(W, b, h), rtol=1e-14)
    grad_W, grad_b, grad_h, grad_B = vjp(g)
    _, ref_vjp = jax.vjp(R.dense, W, b, h)
    ref_W, ref_b, ref_h = ref_vjp(g)
    np.testing.assert_allclose(grad_W, ref_W, rtol=1e-13)     # the local updates are the true ones
    np.testing.assert_allclose(grad_b, ref_b, rtol=1e-13)
    np.testing.assert_allclose(grad_h, g @ Bm, rtol=1e-13)    # B^T delta per example, not W^T delta
    assert float(jnp.max(jnp.abs(grad_h - ref_h))) > 1e-2
    assert float(jnp.max(jnp.abs(grad_B))) == 0.0             # B is fixed
    with pytest.raises(ValueError, match=r"fnbp\.feedback\.dense_fa: the feedback matrix B must have W's shape"):
        fb.dense_fa(W, b, h, Bm.T)


@pytest.mark.slow
def test_fa_output_layer_update_is_backprops_and_hidden_ones_differ():
    params, feedback, x, d = small_net()
    _, bp = fnbp.backprop(params, x, d, loss=CE)
    _, fa_loop = fb.backprop(params, feedback, x, d, loss=CE)
    fa_grad = jax.grad(lambda p: CE(fb.apply(p, feedback, x), d))(params)
    for u, v in zip(jax.tree_util.tree_leaves(fa_loop), jax.tree_util.tree_leaves(fa_grad)):
        np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-14)   # the loop and jax.grad run the same rule
    for n in ("W", "b"):
        np.testing.assert_allclose(fa_loop[-1][n], bp[-1][n], rtol=1e-13)
        for k in range(len(params) - 1):
            assert float(jnp.max(jnp.abs(fa_loop[k][n] - bp[k][n]))) > 1e-3
    assert float(fb.angle(fa_loop[:-1], bp[:-1])) > 5.0
    np.testing.assert_allclose(fb.apply(params, feedback, x), fnbp.mlp.apply(params, x), rtol=1e-14)


def train_digits(grad_fn, *, seed, epochs=10, batch=32, lr=0.05, sizes=(64, 128, 10)):
    data = fnbp.data.load_digits(seed=0)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    k0, k1, k2 = jax.random.split(jax.random.key(seed), 3)
    params = fnbp.mlp.init(k0, sizes)
    feedback = fb.init_feedback(k1, params)
    opt = optax.sgd(lr, momentum=0.9)
    n_steps = x.shape[0] // batch

    def epoch(carry, e):
        order = jax.random.permutation(jax.random.fold_in(k2, e), x.shape[0])[: n_steps * batch]

        def step(c, idx):
            p, s = c
            u, s = opt.update(grad_fn(p, feedback, x[idx], y[idx]), s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(step, carry, order.reshape(n_steps, batch))[0], None

    run = jax.jit(lambda p, s: jax.lax.scan(epoch, (p, s), jnp.arange(epochs))[0])
    params, _ = run(params, opt.init(params))
    return float(jnp.mean(jnp.argmax(fnbp.mlp.apply(params, jnp.asarray(data.x_test)), -1) == data.y_test))


@pytest.mark.slow
def test_feedback_alignment_trains_digits():
    """Measured 94-95 % test accuracy over seeds 0-2 (64-128-10, 10 epochs, SGD+momentum); asserts >= 90 %."""
    acc = train_digits(lambda p, B, x, y: fb.backprop(p, B, x, y, loss=CE)[1], seed=0)
    assert acc >= 0.90


def test_sign_ste_backward_is_the_surrogates_derivative():
    a = jnp.array([-3.0, -1.5, -0.7, -0.2, 0.3, 0.9, 1.2, 4.0])
    g = jnp.arange(1.0, 9.0)
    h, vjp = jax.vjp(fb.sign_ste, a)
    np.testing.assert_array_equal(h, jnp.sign(a))
    np.testing.assert_allclose(vjp(g)[0], jax.vjp(lambda v: jnp.clip(v, -1, 1), a)[1](g)[0])   # hardtanh
    np.testing.assert_allclose(jax.vjp(lambda v: fb.sign_ste(v, math.inf), a)[1](g)[0], g)       # identity
    np.testing.assert_allclose(jax.vjp(lambda v: fb.sign_ste(v, 2.0), a)[1](g)[0],
                               jnp.where(jnp.abs(a) <= 2, g, 0))
    h, vjp = jax.vjp(fb.step_ste, a)
    np.testing.assert_array_equal(h, (a > 0).astype(a.dtype))
    np.testing.assert_allclose(vjp(g)[0], jax.vjp(lambda v: jnp.clip(v + 0.5, 0, 1), a)[1](g)[0])  # hard sigmoid
    assert float(jnp.max(jnp.abs(jax.vjp(fnbp.sign, a)[1](g)[0]))) == 0.0     # without STE: nothing flows
    assert bool(jnp.isnan(fb.sign_ste(jnp.array([jnp.nan]))[0])) and bool(jnp.isnan(fb.step_ste(jnp.array([jnp.nan]))[0]))
    with pytest.raises(ValueError, match=r"fnbp\.feedback\.sign_ste: window must be > 0"):
        fb.sign_ste(a, 0.0)


@pytest.mark.slow
def test_ste_in_the_explicit_loop_and_jax_grad_agree_and_reach_the_first_layer():
    params, _, x, d = small_net(seed=2)
    for act in (fb.sign_ste, functools.partial(fb.step_ste, window=math.inf)):
        _, loop = fnbp.backprop(params, x, d, activation=act, loss=CE)
        auto = jax.grad(lambda p: CE(fnbp.mlp.apply(p, x, activation=act), d))(params)
        for u, v in zip(jax.tree_util.tree_leaves(loop), jax.tree_util.tree_leaves(auto)):
            np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-14)
        assert float(jnp.max(jnp.abs(loop[0]["W"]))) > 1e-3
    _, plain = fnbp.backprop(params, x, d, activation=fnbp.sign, loss=CE)
    assert float(jnp.max(jnp.abs(plain[0]["W"]))) == 0.0


def test_feedback_list_is_checked():
    params, feedback, x, d = small_net()
    with pytest.raises(ValueError, match=r"fnbp\.feedback\.apply: feedback must be a list of 3 matrices"):
        fb.apply(params, feedback[:2], x)
    with pytest.raises(ValueError, match=r"fnbp\.feedback\.backprop: feedback matrix 1 must have W's shape"):
        fb.backprop(params, [feedback[0], feedback[1].T, feedback[2]], x, d, loss=CE)
    again = fb.init_feedback(jax.random.key(0), params)
    assert all(bool(jnp.array_equal(u, v)) for u, v in zip(again, fb.init_feedback(jax.random.key(0), params)))
