"""fnbp.rnn: the Elman, LSTM and GRU rules (hand-derived BPTT) against autodiff of plain-jnp lax.scan
references (fnbp.reference_rnn) and finite differences; the step-by-step teaching versions against the
fast rules; the compiled program (the big products hoisted out of the loops); PyTorch when present."""
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fnbp
from fnbp import reference_rnn, rnn, rnn_steps
from vjp_oracle import FD_RTOL, compile_fast, max_rel, vjp_check
from marks import slow_except

AD_TOL = 1e-12          # our VJP vs jax.vjp of the plain scan, relative, float64


def _flat_lstm(fn):
    """lstm's two outputs (hs, c_T) as one vector, so that the one-output oracle can check both."""
    def f(*args):
        hs, c_T = fn(*args)
        return jnp.concatenate([hs.reshape(-1), c_T.reshape(-1)])
    return f


CELLS = {   # name: (rule, reference, number of gate blocks k, number of bias vectors, number of states)
    "elman": (rnn.elman, reference_rnn.elman, 1, 1, 1),
    "lstm": (_flat_lstm(rnn.lstm), _flat_lstm(reference_rnn.lstm), 4, 1, 2),
    "gru": (rnn.gru, reference_rnn.gru, 3, 2, 1),
    "lstm_sequence": (rnn.lstm_sequence, lambda *a: reference_rnn.lstm(*a)[0], 4, 1, 2),     # hs alone (nn.LSTM)
}


def _args(cell, B, T, n_in, H, zero_state, rng, scale=0.6):
    """(W_x, W_h, bias(es)..., x, state(s)...) for a cell, float64."""
    _, _, k, n_bias, n_state = CELLS[cell]
    weights = [scale * rng.standard_normal((k * H, n_in)), scale * rng.standard_normal((k * H, H))]
    biases = [0.5 * rng.standard_normal(k * H) for _ in range(n_bias)]
    states = [np.zeros((B, H)) if zero_state else rng.standard_normal((B, H)) for _ in range(n_state)]
    return tuple(weights + biases + [rng.standard_normal((B, T, n_in))] + states)


# (B, T, n_in, H, zero initial state): T = 1, odd sizes, one unit, one example
SHAPES = [(3, 5, 4, 6, False), (1, 1, 3, 5, True), (2, 7, 1, 3, False), (5, 3, 7, 1, True), (2, 1, 2, 2, False)]


@pytest.mark.parametrize("cell", slow_except(sorted(CELLS), "elman"))
def test_rule_matches_autodiff_of_the_plain_scan_and_finite_differences(cell):
    rng = np.random.default_rng(1)
    fn, ref = CELLS[cell][:2]
    checks = []
    for B, T, n_in, H, zero in SHAPES:
        args = _args(cell, B, T, n_in, H, zero, rng)
        checks.append((fn, ref, args, tuple(range(len(args)))))
    for (_, _, args, _), res in zip(checks, vjp_check(checks)):
        for i in res["ad"]:
            assert res["ad"][i] <= AD_TOL, (cell, args[-1].shape, i, "vs autodiff", res["ad"][i])
            assert res["fd"][i] <= FD_RTOL, (cell, args[-1].shape, i, "vs finite differences", res["fd"][i])


def _max_errors(cell, args):
    """(forward, gradient) max relative error of our rule vs the plain scan at args, one compiled program."""
    fn, ref = CELLS[cell][:2]

    def both(*a):
        (out, vjp), (out_ref, vjp_ref) = jax.vjp(fn, *a), jax.vjp(ref, *a)
        c = jnp.cos(jnp.arange(out.size, dtype=out.dtype)).reshape(out.shape)
        return out, out_ref, vjp(c), vjp_ref(c)
    out, out_ref, ours, theirs = compile_fast(both, *args)
    return max_rel(out, out_ref), max(max_rel(g, g_ref) for g, g_ref in zip(ours, theirs))


@pytest.mark.slow
@settings(max_examples=8, deadline=None)
@given(cell=st.sampled_from(sorted(CELLS)), B=st.integers(1, 3), T=st.integers(1, 6), n_in=st.integers(1, 5),
       H=st.integers(1, 5), zero_state=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_hypothesis_shapes_match_the_plain_scan(cell, B, T, n_in, H, zero_state, seed):
    args = _args(cell, B, T, n_in, H, zero_state, np.random.default_rng(seed))
    fwd_err, grad_err = _max_errors(cell, args)
    assert fwd_err <= AD_TOL and grad_err <= AD_TOL, (fwd_err, grad_err)


def test_a_wrong_backward_is_caught():
    # the oracle can fail: drop the (1 - h^2) factor of tanh' in a copy of elman's backward
    def bad_bwd(res, g):
        W_x, W_h, x_tm, h0, hs_tm = res
        return rnn._elman_bwd((W_x, W_h, x_tm, h0, jnp.zeros_like(hs_tm)), g)
    bad = fnbp.rule(rnn._elman_fwd, bad_bwd, name="bad_elman")
    args = _args("elman", 2, 3, 2, 3, False, np.random.default_rng(0))
    res = vjp_check([(bad, reference_rnn.elman, args, (0, 1, 2, 3, 4))])[0]
    assert max(res["ad"].values()) > 1e-3 and max(res["fd"].values()) > 1e-3


@pytest.mark.parametrize("cell", slow_except(sorted(CELLS), "elman"))
def test_fnbp_check_accepts_the_rules(cell):
    fn, ref = CELLS[cell][:2]
    result = fnbp.check(fn, ref, *_args(cell, 2, 3, 2, 3, False, np.random.default_rng(2)), name=cell)
    assert result.ok, str(result)
    assert max(result.autodiff_rel) <= AD_TOL


def test_lstm_final_cell_state_gets_its_own_cotangent():
    # a loss on c_T alone: the gradient flows only through the cell path (grad h0 via the gates, grad c0 = prod f)
    args = _args("lstm", 2, 4, 3, 3, False, np.random.default_rng(3))

    def grads(fn):
        return jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a)[1])), argnums=tuple(range(6)))(*args)
    for g, g_ref in zip(jax.jit(lambda: grads(rnn.lstm))(), jax.jit(lambda: grads(reference_rnn.lstm))()):
        assert max_rel(g, g_ref) <= AD_TOL


# --- the teaching versions, one step at a time --------------------------------------------------------------------
def test_step_by_step_elman_equals_the_fast_rule():
    rng = np.random.default_rng(4)
    W_x, W_h, b, x, h0 = _args("elman", 3, 4, 5, 2, False, rng)
    g = rng.standard_normal((3, 4, 2))

    def both():
        hs, vjp = jax.vjp(rnn.elman, W_x, W_h, b, x, h0)
        grad_W_x, grad_W_h, grad_b, grad_x, grad_h0 = vjp(g)
        hs_loop, caches = rnn_steps.rnn_forward(x, h0, W_x, W_h, b)
        return (hs, grad_x, grad_h0, grad_W_x, grad_W_h, grad_b), (hs_loop, *rnn_steps.rnn_backward(g, caches))
    fast, loop = jax.jit(both)()
    for a, b_ in zip(fast, loop):
        assert max_rel(b_, a) <= AD_TOL


def test_step_by_step_lstm_equals_the_fast_rule():
    rng = np.random.default_rng(5)
    W_x, W_h, b, x, h0, c0 = _args("lstm", 2, 3, 4, 3, False, rng)
    g_hs, g_c = rng.standard_normal((2, 3, 3)), rng.standard_normal((2, 3))

    def both():
        (hs, c_T), vjp = jax.vjp(rnn.lstm, W_x, W_h, b, x, h0, c0)
        grad_W_x, grad_W_h, grad_b, grad_x, grad_h0, grad_c0 = vjp((g_hs, g_c))
        hs_loop, c_loop, caches = rnn_steps.lstm_forward(x, h0, c0, W_x, W_h, b)
        return ((hs, c_T, grad_x, grad_h0, grad_c0, grad_W_x, grad_W_h, grad_b),
                (hs_loop, c_loop, *rnn_steps.lstm_backward(g_hs, g_c, caches)))
    fast, loop = jax.jit(both)()
    for a, b_ in zip(fast, loop):
        assert max_rel(b_, a) <= AD_TOL


def test_elman_by_hand_at_one_step():
    # T = 1, one unit: h_1 = tanh(w_x x + w_h h_0 + b); grad w_h = (1 - h_1^2) h_0 for E = h_1
    W_x, W_h, b, x, h0 = np.array([[0.5]]), np.array([[-0.3]]), np.array([0.1]), np.array([[[2.0]]]), np.array([[0.7]])
    h1 = math.tanh(0.5 * 2.0 - 0.3 * 0.7 + 0.1)
    grads = jax.grad(lambda *a: rnn.elman(*a)[0, 0, 0], argnums=(0, 1, 2, 3, 4))(W_x, W_h, b, x, h0)
    expected = [(1 - h1 ** 2) * 2.0, (1 - h1 ** 2) * 0.7, 1 - h1 ** 2, (1 - h1 ** 2) * 0.5, (1 - h1 ** 2) * -0.3]
    np.testing.assert_allclose([float(np.ravel(g)[0]) for g in grads], expected, rtol=1e-14)
    np.testing.assert_allclose(rnn.elman(W_x, W_h, b, x, h0)[0, 0, 0], h1, rtol=1e-14)


# --- the compiled program ------------------------------------------------------------------------------------------
_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$")
_CALLEE = re.compile(r"(?:calls|body|condition|to_apply)=%([\w.\-]+)")
_DOT = re.compile(r"= \w+\[([\d,]*)\]\{[\d,]*\} dot\(")


def _dots_inside_and_outside_loops(hlo):
    """The output shapes of the dot ops of a compiled HLO module, split into those that run inside a while
    loop (in a loop body or anything it calls) and those that do not; each shape flattened to (rows, cols)."""
    bodies, calls, dots, name = {}, {}, {}, None
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header:
            name = header.group(1)
            calls[name], dots[name] = [], []
            continue
        if name is None:
            continue
        for callee in _CALLEE.findall(line):
            calls[name].append(callee)
        if " while(" in line:
            bodies.update(dict.fromkeys(re.findall(r"body=%([\w.\-]+)", line)))
        m = _DOT.search(line)
        if m:
            shape = [int(s) for s in m.group(1).split(",") if s]
            dots[name].append((math.prod(shape[:-1]), shape[-1]))
    in_loop, todo = set(), list(bodies)
    while todo:
        c = todo.pop()
        if c not in in_loop:
            in_loop.add(c)
            todo.extend(calls.get(c, []))
    inside = sorted(d for c in in_loop for d in dots.get(c, []))
    outside = sorted(d for c in dots if c not in in_loop for d in dots[c])
    return inside, outside


def _compiled_gradient(cell, B, T, n_in, H, reference=False):
    """The compiled HLO text of the gradient of a loss on the cell's outputs (ours, or autodiff of the plain scan)."""
    fn = CELLS[cell][1] if reference else CELLS[cell][0]
    args = _args(cell, B, T, n_in, H, False, np.random.default_rng(6))
    loss = jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=tuple(range(len(args) - CELLS[cell][4])))
    return jax.jit(loss).lower(*args).compile().as_text()


@pytest.mark.parametrize("cell", slow_except(["elman", "lstm", "gru"], "lstm"))
def test_compiled_gradient_hoists_the_big_products_out_of_the_loops(cell):
    # distinct sizes, so every product is recognisable by its shape: B = 3, T = 7 (T B = 21 rows), n_in = 5, H = 11
    B, T, n_in, H = 3, 7, 5, 11
    kH = CELLS[cell][2] * H
    inside, outside = _dots_inside_and_outside_loops(_compiled_gradient(cell, B, T, n_in, H))
    # in the loops: only the sequential products, h_{t-1} W_h^T (forward) and delta_t W_h (backward), B rows each
    assert inside == sorted([(B, kH), (B, H)]), inside
    # outside: the input projection X W_x^T, grad W_x = delta^T X, grad W_h = delta^T H_prev, grad X = delta W_x,
    # each one GEMM over all T B rows
    assert outside == sorted([(T * B, kH), (kH, n_in), (kH, H), (T * B, n_in)]), outside
    # the same check fails for autodiff of the plain scan: it accumulates grad W_x and grad W_h step by step
    inside_ref, _ = _dots_inside_and_outside_loops(_compiled_gradient(cell, B, T, n_in, H, reference=True))
    assert (kH, n_in) in inside_ref and (kH, H) in inside_ref, inside_ref


def test_compiled_lstm_gradient_zero_fills_no_time_by_4H_stack():
    # the LSTM's forward writes D_t over A_x's row t and its backward writes delta_t over D_t (one buffer, updated
    # in place), so no (T, B, 4H) array is filled from a scalar as a stacked scan output would be
    B, T, n_in, H = 3, 7, 5, 11
    hlo = _compiled_gradient("lstm", B, T, n_in, H)
    fills = {tuple(int(n) for n in m) for m in re.findall(
        r"= \w+\[(\d+),(\d+),(\d+)\]\{[\d,]*\} broadcast\([^)]*\), dimensions=\{\}", hlo)}
    assert (T, B, H) in fills, fills                        # the stack of h_t is one: the pattern does match
    assert (T, B, 4 * H) not in fills, fills


# --- float32, errors -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", slow_except(sorted(CELLS), "elman"))
def test_float32_close_to_the_plain_scan(cell):
    args = [np.asarray(a, np.float32) for a in _args(cell, 4, 6, 5, 7, False, np.random.default_rng(7))]
    fn, ref = CELLS[cell][:2]
    out = jax.jit(fn)(*args)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref(*args), rtol=1e-5, atol=1e-5)
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=tuple(range(len(args)))))(*args)
    grad_ref = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(ref(*a))), argnums=tuple(range(len(args)))))(*args)
    for a, b in zip(grad, grad_ref):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_named_errors():
    W_x, W_h, b, x, h0 = (np.zeros(s) for s in [(3, 2), (3, 3), (3,), (4, 5, 2), (4, 3)])
    with pytest.raises(ValueError, match=r"fnbp.rnn.elman: x must have shape \(batch, T, n_in\) with n_in = 2"):
        rnn.elman(W_x, W_h, b, np.zeros((4, 5, 3)), h0)
    with pytest.raises(ValueError, match=r"fnbp.rnn.elman: x must have shape \(batch, T, n_in\)"):
        rnn.elman(W_x, W_h, b, np.zeros((5, 2)), h0)
    with pytest.raises(ValueError, match=r"fnbp.rnn.elman: h0 must have shape \(batch, H\) = \(4, 3\), got shape"):
        rnn.elman(W_x, W_h, b, x, np.zeros((3,)))
    with pytest.raises(ValueError, match=r"fnbp.rnn.elman: b must have shape \(3,\)"):
        rnn.elman(W_x, W_h, np.zeros(4), x, h0)
    with pytest.raises(ValueError, match=r"fnbp.rnn.elman: x must have at least one time step"):
        rnn.elman(W_x, W_h, b, np.zeros((4, 0, 2)), h0)
    with pytest.raises(ValueError, match=r"fnbp.rnn.lstm: W_h must have shape \(4 H \(i, f, g, o\), H\), got shape "
                                         r"\(3, 3\)"):
        rnn.lstm(W_x, W_h, b, x, h0, h0)
    with pytest.raises(ValueError, match=r"fnbp.rnn.lstm: c0 must have shape \(batch, H\) = \(4, 1\)"):
        rnn.lstm(np.zeros((4, 2)), np.zeros((4, 1)), np.zeros(4), x, np.zeros((4, 1)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"fnbp.rnn.gru: W_x must have shape \(3, n_in\) to match W_h"):
        rnn.gru(np.zeros((6, 2)), np.zeros((3, 1)), np.zeros(3), np.zeros(3), x, np.zeros((4, 1)))
    with pytest.raises(ValueError, match=r"fnbp.rnn.gru: b_h must have shape \(3,\)"):
        rnn.gru(np.zeros((3, 2)), np.zeros((3, 1)), np.zeros(3), np.zeros(2), x, np.zeros((4, 1)))
    with pytest.raises(ValueError, match=r"fnbp.rnn.elman: x must be a floating array, got dtype int"):
        rnn.elman(W_x, W_h, b, np.zeros((4, 5, 2), np.int32), h0)


# --- PyTorch -------------------------------------------------------------------------------------------------------
def _torch_case(cell, B=3, T=5, n_in=4, H=6, seed=8):
    """Our outputs and gradients and torch.nn.RNN/LSTM/GRU's at the same float64 weights, inputs and cotangents."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    k = {"elman": 1, "lstm": 4, "gru": 3}[cell]
    W_x, W_h = 0.5 * rng.standard_normal((k * H, n_in)), 0.5 * rng.standard_normal((k * H, H))
    b_ih, b_hh = rng.standard_normal(k * H), rng.standard_normal(k * H)
    x, h0, c0 = rng.standard_normal((B, T, n_in)), rng.standard_normal((B, H)), rng.standard_normal((B, H))
    g_hs, g_hT, g_cT = rng.standard_normal((B, T, H)), rng.standard_normal((B, H)), rng.standard_normal((B, H))

    module = {"elman": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](
        n_in, H, batch_first=True).double()
    with torch.no_grad():
        for name, value in [("weight_ih_l0", W_x), ("weight_hh_l0", W_h), ("bias_ih_l0", b_ih), ("bias_hh_l0", b_hh)]:
            getattr(module, name).copy_(torch.from_numpy(value.copy()))
    tx, th0, tc0 = (torch.tensor(a, requires_grad=True) for a in (x, h0[None], c0[None]))
    if cell == "lstm":
        t_hs, (t_hT, t_cT) = module(tx, (th0, tc0))
        torch_loss = (t_hs * torch.from_numpy(g_hs)).sum() + (t_cT[0] * torch.from_numpy(g_cT)).sum()
    else:
        t_hs, t_hT = module(tx, th0)
        torch_loss = (t_hs * torch.from_numpy(g_hs)).sum()
    torch_loss.backward()
    torch_grads = {"W_x": module.weight_ih_l0.grad, "W_h": module.weight_hh_l0.grad, "b_ih": module.bias_ih_l0.grad,
                   "b_hh": module.bias_hh_l0.grad, "x": tx.grad, "h0": th0.grad[0]}
    if cell == "lstm":
        torch_grads["c0"] = tc0.grad[0]
    torch_grads = {k_: v.numpy() for k_, v in torch_grads.items()}

    if cell == "elman":
        hs, vjp = jax.vjp(rnn.elman, W_x, W_h, b_ih + b_hh, x, h0)
        gW_x, gW_h, gb, gx, gh0 = vjp(g_hs)
        ours = {"W_x": gW_x, "W_h": gW_h, "b_ih": gb, "b_hh": gb, "x": gx, "h0": gh0}
    elif cell == "lstm":
        (hs, c_T), vjp = jax.vjp(rnn.lstm, W_x, W_h, b_ih + b_hh, x, h0, c0)
        gW_x, gW_h, gb, gx, gh0, gc0 = vjp((g_hs, g_cT))
        ours = {"W_x": gW_x, "W_h": gW_h, "b_ih": gb, "b_hh": gb, "x": gx, "h0": gh0, "c0": gc0}
        assert max_rel(c_T, t_cT[0].detach().numpy()) <= AD_TOL
    else:
        hs, vjp = jax.vjp(rnn.gru, W_x, W_h, b_ih, b_hh, x, h0)
        gW_x, gW_h, gb_x, gb_h, gx, gh0 = vjp(g_hs)
        ours = {"W_x": gW_x, "W_h": gW_h, "b_ih": gb_x, "b_hh": gb_h, "x": gx, "h0": gh0}
    errors = {"hs": max_rel(hs, t_hs.detach().numpy())}
    errors.update({name: max_rel(ours[name], torch_grads[name]) for name in torch_grads})
    return errors


@pytest.mark.parametrize("cell", ["elman", "lstm", "gru"])
def test_matches_pytorch_in_float64(cell):
    errors = _torch_case(cell)
    assert max(errors.values()) <= AD_TOL, errors


# --- per-example extensions: one view per weight from the rule's own reverse scan (fnbp.extensions) ------------
PE_TOL = 1e-10
PE_V, PE_B, PE_T, PE_D, PE_H = 7, 4, 5, 3, 4
PE_LAYERS = {"elman": fnbp.nn.Elman, "lstm": fnbp.nn.LSTM, "gru": fnbp.nn.GRU}


def _plain_model(cell, params, ids):
    """Embedding -> cell -> Dense on every step in plain jnp (fnbp.reference_rnn's scans, no rule): logits (B, T, V)."""
    emb, rec, out = params
    x = emb["E"][ids]
    h0 = jnp.zeros((ids.shape[0], rec["W_h"].shape[1]), x.dtype)
    if cell == "lstm":
        hs = reference_rnn.lstm(rec["W_x"], rec["W_h"], rec["b"], x, h0, h0)[0]
    elif cell == "gru":
        hs = reference_rnn.gru(rec["W_x"], rec["W_h"], rec["b_x"], rec["b_h"], x, h0)
    else:
        hs = reference_rnn.elman(rec["W_x"], rec["W_h"], rec["b"], x, h0)
    return hs @ out["W"].T + out["b"]


def _pe_case(cell, T=PE_T, seed=0):
    """(model, params, ids x, targets d, per-example reference gradients): vmap(grad) of each example's own summed
    token loss through the plain-jnp model."""
    model = fnbp.nn.serial(fnbp.nn.Embedding(PE_V, PE_D), PE_LAYERS[cell](PE_H), fnbp.nn.Dense(PE_V))
    ids = np.random.default_rng(seed).integers(0, PE_V, (PE_B, T + 1))
    x, d = ids[:, :-1], ids[:, 1:]
    params, _ = model.init(jax.random.key(seed), (T,), jnp.float64)

    def loss_n(p, x_n, d_n):
        return fnbp.reference.softmax_cross_entropy(_plain_model(cell, p, x_n[None]), d_n[None], reduction="sum")
    ref = jax.jit(jax.vmap(jax.grad(loss_n), in_axes=(None, 0, 0)))(params, x, d)
    return model, params, x, d, ref


def _tree_max_abs(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb) and all(u.shape == v.shape for u, v in zip(la, lb))
    return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(la, lb))


@pytest.mark.parametrize("cell", slow_except(sorted(PE_LAYERS), "elman"))
def test_per_example_quantities_and_dp_clipped_sum_equal_vmap_grad(cell):
    """grads, batch_l2 (both norm forms), grad_norms, sum_grad_squared, variance and the DP clipped sum of
    Embedding -> cell -> Dense (softmax cross-entropy over tokens) against vmap(grad) of the plain-jnp model."""
    model, params, x, d, ref = _pe_case(cell)
    ref_l2 = jax.tree_util.tree_map(lambda g: jnp.sum(g.reshape(PE_B, -1) ** 2, axis=1), ref)
    ref_norms = jnp.sqrt(sum(jax.tree_util.tree_leaves(ref_l2)))
    clip = float(jnp.median(ref_norms))                      # about half the examples clipped
    c = jnp.minimum(1.0, clip / ref_norms)

    @jax.jit                                                 # one compiled program: faster than op by op here
    def quantities(p):
        kw = dict(model=model, loss=fnbp.losses.softmax_cross_entropy)
        return (fnbp.per_example.grads(p, x, d, **kw),
                [fnbp.per_example.batch_l2(p, x, d, method=method, **kw) for method in ("gram", "direct")],
                fnbp.per_example.grad_norms(p, x, d, **kw), fnbp.per_example.sum_grad_squared(p, x, d, **kw),
                fnbp.per_example.variance(p, x, d, **kw), fnbp.dp.clipped_grad_sum(p, x, d, clip=clip, **kw))
    grads, l2s, grad_norms, sgs, variance, (sums, norms) = quantities(params)
    assert _tree_max_abs(grads, ref) <= PE_TOL
    assert all(_tree_max_abs(l2, ref_l2) <= PE_TOL for l2 in l2s)
    assert float(jnp.max(jnp.abs(grad_norms - ref_norms))) <= PE_TOL
    assert _tree_max_abs(sgs, jax.tree_util.tree_map(lambda g: jnp.sum(g ** 2, axis=0), ref)) <= PE_TOL
    assert _tree_max_abs(variance, jax.tree_util.tree_map(lambda g: jnp.var(g, axis=0), ref)) <= PE_TOL
    assert float(jnp.max(jnp.abs(norms - ref_norms))) <= PE_TOL and 0 < int(jnp.sum(c < 1)) < PE_B
    assert _tree_max_abs(sums, jax.tree_util.tree_map(lambda g: jnp.tensordot(c, g, 1), ref)) <= PE_TOL


def _rule_case(cell, rng, B=3, T=4, n_in=2, H=3):
    """(rule, args, output cotangent, per-example reference gradients of the weights and biases) at rule level:
    example n's gradient of <cotangent_n, output_n> through fnbp.reference_rnn's scan, by vmap(grad)."""
    n_params = 2 + CELLS[cell][3]                            # W_x, W_h and the bias(es)
    args = _args(cell, B, T, n_in, H, False, rng)
    g = rng.standard_normal((B, T, H))
    if cell == "lstm":
        cts = (g, rng.standard_normal((B, H)))               # lstm's c_T gets its own cotangent

        def out_n(*a):
            hs, c_T = reference_rnn.lstm(*a)
            return hs, c_T
        rule = rnn.lstm
    else:
        cts, out_n, rule = g, getattr(reference_rnn, cell), getattr(rnn, cell)

    def loss_n(weights, rest, ct):
        out = out_n(*weights, *[r[None] for r in rest])
        return sum(jnp.sum(o * c[None]) for o, c in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ct)))
    ref = jax.vmap(jax.grad(loss_n), in_axes=(None, 0, 0))(args[:n_params], args[n_params:], cts)
    return rule, args, cts, ref


@pytest.mark.parametrize("cell, T", slow_except([(c, T) for c in ("elman", "lstm", "gru") for T in (1, 4)], ("lstm", 4)))
def test_rule_views_give_each_examples_weight_and_bias_gradients(cell, T):
    """The registered views at rule level (lstm's with a cotangent on c_T too, h0/c0 given): example n's
    delta_n^T P_n and sum_t delta_{n,t} per (W, b) pair equal vmap(grad) of the plain scan; their sum is the rule's
    own gradient."""
    rule, args, cts, ref = _rule_case(cell, np.random.default_rng(5), T=T)
    ext = fnbp.extensions.per_example(rule)
    out, res = rule.rule.fwd(*args)
    batch_grads = rule.rule.bwd(res, cts)
    views = fnbp.extensions.rows_of(ext, args, {}, cts, res)
    for part, rows in zip(fnbp.extensions.parts(ext), views):
        grad_W = jnp.einsum("bso,bsk->bok", rows.delta, rows.patches)
        assert max_rel(grad_W, ref[part.weight]) <= PE_TOL
        assert max_rel(jnp.sum(grad_W, axis=0), batch_grads[part.weight]) <= 1e-12
        if part.bias is not None:
            assert max_rel(jnp.sum(rows.delta, axis=1), ref[part.bias]) <= PE_TOL


def _wrong_h_view(args, options, g, res):
    """Mutation: Elman's W_h view with rows h_t instead of h_{t-1}."""
    right_x, right_h = rnn._elman_rows(args, options, g, res)
    return right_x, fnbp.extensions.Rows(jnp.swapaxes(res[4], 0, 1), right_h.delta)


def _wrong_gru_view(args, options, g, res):
    """Mutation: the GRU's W_h paired with delta^u (the n-block without r_t)."""
    delta_u, _, _ = rnn._gru_deltas(res, g)
    x_tm, h0, hs_tm = res[2], res[3], res[-1]                        # residuals: (W_x, W_h, x_tm, h0, ..., hs_tm)
    return rnn._recurrent_rows(x_tm, rnn._shifted(h0, hs_tm), delta_u, delta_u)


@pytest.mark.slow          # negative controls of the per-example views (the fast loop keeps the views' checks)
@pytest.mark.parametrize("cell, view", [("elman", _wrong_h_view), ("gru", _wrong_gru_view)])
def test_a_wrong_view_is_caught_by_the_oracle(cell, view, monkeypatch):
    rule = getattr(rnn, cell)
    monkeypatch.setitem(fnbp.extensions._PER_EXAMPLE, rule.rule, fnbp.extensions.per_example(rule)._replace(view=view))
    model, params, x, d, ref = _pe_case(cell)
    got = fnbp.per_example.grads(params, x, d, model=model, loss=fnbp.losses.softmax_cross_entropy)
    assert float(jnp.max(jnp.abs(got[1]["W_h"] - ref[1]["W_h"]))) > 1e-3
    assert float(jnp.max(jnp.abs(got[1]["W_x"] - ref[1]["W_x"]))) <= PE_TOL      # the other weight's view untouched
