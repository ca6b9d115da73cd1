"""Tests of fnbp.graph (the walker) and fnbp.ops.

* the notes' log(xy): the grad_table's dz/dx = 1/x, dz/dy = 1/y against math.log and finite differences;
* random DAGs drawn by hypothesis (every op: dense, each activation, add, batch norm, dropout with a fixed
  key): the explicit walker's gradients equal jax.grad of a plain-jnp network built from fnbp.reference;
* batch norm and dropout in the explicit walker: equal to autodiff, and 20 training steps with
  grad="backprop" equal grad="autodiff";
* a student's rule works in backprop and apply; a plain function is refused by the explicit walker
  (naming the node) and accepted by autodiff;
* the trace: a, h, delta per node and the grad_table; the PNG of experiments/graph.py.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fnbp
from fnbp import graph, losses, mlp, ops, optim
from fnbp.objective import objective
from fnbp import reference as ref
from fnbp import train as T
from fnbp.graph import Const, Input, Param

F64 = jnp.float64


from vjp_oracle import max_rel as rel_err, tree_rel_err          # noqa: E402  (the one relative-error helper)


# ------------------------------------------------------------------ the notes' log(xy)
LOG_XY = graph.make([graph.node("v", ops.mul, "x", "y"), graph.node("w", ops.log, "v"),
                     graph.node("z", fnbp.identity, "w")], "z")


@pytest.mark.parametrize("x,y", [(2.0, 3.0), (0.5, 7.0), (1e-3, 40.0)])
def test_log_xy_grad_table(x, y):
    """v = xy, w = log v, z = w: grad_table[x] = dz/dx = 1/x, grad_table[y] = 1/y, grad_table[v] = 1/v."""
    z, tape = graph.forward(LOG_XY, {}, {"x": jnp.asarray(x, F64), "y": jnp.asarray(y, F64)})
    table = graph.backward(tape).grad_table
    assert math.isclose(float(z), math.log(x * y), rel_tol=1e-15)
    assert math.isclose(float(table["z"]), 1.0) and math.isclose(float(table["w"]), 1.0)
    assert math.isclose(float(table["v"]), 1 / (x * y), rel_tol=1e-15)
    assert math.isclose(float(table["x"]), 1 / x, rel_tol=1e-15)
    assert math.isclose(float(table["y"]), 1 / y, rel_tol=1e-15)
    h = 1e-6 * x                                                    # central difference of math.log(x y)
    fd = (math.log((x + h) * y) - math.log((x - h) * y)) / (2 * h)
    assert math.isclose(float(table["x"]), fd, rel_tol=1e-8)
    assert not math.isclose(float(table["x"]), 1 / y, rel_tol=1e-3)  # not the other argument's gradient


def test_fan_out_sums_in_the_grad_table():
    """A value used twice (z = x * x + x) gets the sum of its three cotangents: dz/dx = 2x + 1."""
    net = graph.make([graph.node("sq", ops.mul, "x", "x"), graph.node("z", ops.add, "sq", "x")], "z")
    _, tape = graph.forward(net, {}, {"x": jnp.asarray(1.5, F64)})
    assert float(graph.backward(tape).inputs["x"]) == 2 * 1.5 + 1
    # a parameter used by two nodes: summed too
    net = graph.make([graph.node("u", ops.mul, Param("w"), "x"), graph.node("v", ops.mul, Param("w"), "u")], "v")
    _, tape = graph.forward(net, {"w": jnp.asarray(3.0, F64)}, {"x": jnp.asarray(2.0, F64)})
    assert float(graph.backward(tape).params["w"]) == 2 * 3.0 * 2.0          # d(w^2 x)/dw = 2 w x


def test_make_and_forward_errors():
    with pytest.raises(ValueError, match="two nodes are named 'a'"):
        graph.make([graph.node("a", ops.log, "x"), graph.node("a", ops.log, "x")], "a")
    with pytest.raises(ValueError, match="no node named 'b'"):
        graph.make([graph.node("a", ops.log, "x")], "b")
    net = graph.make([graph.node("a", ops.log, "x"), graph.node("b", jnp.sin, "a")], "b")
    with pytest.raises(ValueError, match=r"node 'b': 'sin' has no hand-written rule"):
        graph.forward(net, {}, {"x": 2.0})
    with pytest.raises(ValueError, match="needs the network input 'x'"):
        graph.forward(net, {}, {})
    assert math.isclose(float(graph.apply(net, {}, {"x": 2.0})[0]), math.sin(math.log(2.0)), rel_tol=1e-15)


# ------------------------------------------------------------------ random DAGs (hypothesis)
WIDTH, BATCH = 3, 5
ACTS = {"identity": (fnbp.identity, ref.identity), "sigmoid": (fnbp.sigmoid, ref.sigmoid),
        "tanh": (fnbp.tanh, ref.tanh), "relu": (fnbp.relu, ref.relu),
        "leaky_relu": (functools.partial(fnbp.leaky_relu, slope=0.1), functools.partial(ref.leaky_relu, slope=0.1)),
        "prelu": (fnbp.prelu, None), "step": (fnbp.step, ref.step), "sign": (fnbp.sign, ref.sign),
        "softmax": (fnbp.softmax, ref.softmax)}
OPS = ["dense", "add", "batch_norm", "dropout"] + list(ACTS)


@st.composite
def dags(draw):
    """A DAG spec: [(op, [argument indices])]; index 0 is x, i + 1 is node i.  Depth <= 6, fan-out <= 3."""
    n = draw(st.integers(2, 7))
    order = draw(st.permutations(OPS))            # distinct ops in one DAG: every op is seen in a few DAGs
    uses, depth, spec = [0], [0], []
    for i in range(n):
        op = order[i]
        free = [j for j in range(len(uses)) if uses[j] < 3 and depth[j] < 6]
        if not free:
            break
        args = [draw(st.sampled_from(free))]
        if op == "add":
            args.append(draw(st.sampled_from(free)))
        for j in args:
            uses[j] += 1
        spec.append((op, args))
        uses.append(0)
        depth.append(1 + max(depth[j] for j in args))
    return spec


def build(spec):
    """The fnbp graph of spec (its sinks summed into y) and the parameters' numpy layout."""
    nodes, names, shapes = [], ["x"], {}
    for i, (op, args) in enumerate(spec):
        name, a = f"n{i}", [names[j] for j in args]
        if op == "dense":
            nodes.append(graph.node(name, fnbp.dense, Param(name, "W"), Param(name, "b"), a[0]))
            shapes[name] = {"W": (WIDTH, WIDTH), "b": (WIDTH,)}
        elif op == "add":
            nodes.append(graph.node(name, ops.add, a[0], a[1]))
        elif op == "batch_norm":
            nodes.append(graph.node(name, fnbp.batch_norm, a[0], Param(name, "gamma"), Param(name, "beta")))
            shapes[name] = {"gamma": (WIDTH,), "beta": (WIDTH,)}
        elif op == "dropout":
            nodes.append(graph.node(name, fnbp.dropout, a[0], 0.4, Input(f"key{i}")))
        elif op == "prelu":
            nodes.append(graph.node(name, fnbp.prelu, a[0], Param(name, "alpha")))
            shapes[name] = {"alpha": (WIDTH,)}
        else:
            nodes.append(graph.node(name, ACTS[op][0], a[0]))
        names.append(name)
    used = {j for _, args in spec for j in args}
    sinks = [names[k] for k in range(1, len(names)) if k not in used]
    out = sinks[0]
    for k, s in enumerate(sinks[1:]):
        nodes.append(graph.node(f"sum{k}", ops.add, out, s))
        out = f"sum{k}"
    return graph.make(nodes, out), shapes


def reference_dag(spec, params, x, keys):
    """The same DAG in plain jnp (fnbp.reference), evaluated without fnbp.graph."""
    values = [x]
    for i, (op, args) in enumerate(spec):
        a = [values[j] for j in args]
        p = params.get(f"n{i}")
        if op == "dense":
            v = ref.dense(p["W"], p["b"], a[0])
        elif op == "add":
            v = a[0] + a[1]
        elif op == "batch_norm":
            v = ref.batch_norm(a[0], p["gamma"], p["beta"])
        elif op == "dropout":
            v = ref.dropout(a[0], 0.4, keys[f"key{i}"])
        elif op == "prelu":
            v = ref.prelu(a[0], p["alpha"])
        else:
            v = ACTS[op][1](a[0])
        values.append(v)
    used = {j for _, args in spec for j in args}
    sinks = [values[k] for k in range(1, len(values)) if k not in used]
    return functools.reduce(lambda u, v: u + v, sinks)


def check_dag(spec, seed):
    """The explicit walker's E and gradients on spec equal jax.grad of the reference DAG (<= 1e-12)."""
    net, shapes = build(spec)
    rng = np.random.default_rng(seed)
    params = {n: {k: rng.uniform(0.3, 1.0, s) if k in ("gamma", "alpha") else rng.normal(size=s)
                  for k, s in layer.items()} for n, layer in shapes.items()}
    x, d = rng.normal(size=(BATCH, WIDTH)), rng.normal(size=(BATCH, WIDTH))
    keys = {f"key{i}": jax.random.fold_in(jax.random.key(7), i) for i in range(len(spec))}
    net_E = objective(net, losses.half_sse)

    @jax.jit
    def both(params, x, d):
        (E, _), g = graph.value_and_grad(net_E, params, {"x": x, "d": d, **keys})
        E_ref, g_ref = jax.value_and_grad(lambda p: ref.half_sse(reference_dag(spec, p, x, keys), d))(params)
        return E, g, E_ref, g_ref

    E, g, E_ref, g_ref = both(params, x, d)
    assert rel_err(E, E_ref) <= 1e-12, spec
    if params:
        assert tree_rel_err(g, g_ref) <= 1e-12, spec


@pytest.mark.slow
def test_random_dags_walker_equals_jax_grad_of_reference():
    seen = []

    @settings(max_examples=25, deadline=None, derandomize=True)
    @given(spec=dags(), seed=st.integers(0, 2 ** 16))
    def random_dag(spec, seed):
        seen.append(spec)
        check_dag(spec, seed)

    random_dag()
    assert {op for spec in seen for op, _ in spec} == set(OPS)            # every op was drawn
    assert max(len(spec) for spec in seen) >= 6
    assert any(sum(j == k for _, args in spec for j in args) >= 2 for spec in seen for k in range(len(spec)))


# ------------------------------------------------------------------ batch norm and dropout, both modes
def bn_case(seed=0, sizes=(4, 6, 5, 3)):
    rng = np.random.default_rng(seed)
    params = mlp.init(jax.random.key(seed), sizes, dtype=F64, batch_norm=True)
    params = [dict(layer, **({"gamma": rng.uniform(0.5, 1.5, layer["b"].shape),
                              "beta": rng.normal(size=layer["b"].shape)} if "gamma" in layer else {}))
              for layer in params]
    return params, rng.normal(size=(8, sizes[0])), rng.integers(0, sizes[-1], size=8)


@pytest.mark.parametrize("bn_position", ["before", "after"])
def test_batch_norm_and_dropout_explicit_equals_autodiff(bn_position):
    params, x, d = bn_case()
    key = jax.random.key(5)
    loss = losses.softmax_cross_entropy

    @jax.jit
    def both(params, x, d):
        E, g = fnbp.backprop(params, x, d, loss=loss, dropout=0.3, key=key, bn_position=bn_position, l2=0.01)

        def J(p):
            y, _ = mlp.apply_stateful(p, mlp.init_state(p), x, train=True, key=key, dropout=0.3,
                                      bn_position=bn_position)
            return loss(y, d) + losses.l2_penalty(p, 0.01)
        return E, g, *jax.value_and_grad(J)(params)

    E, g, E_ad, g_ad = both(params, x, d)
    assert rel_err(E, E_ad) <= 1e-12
    assert tree_rel_err(g, g_ad) <= 1e-12
    assert np.any(np.asarray(g[0]["gamma"]) != 0)


@pytest.mark.slow
def test_twenty_training_steps_backprop_equals_autodiff_with_batch_norm_and_dropout():
    params, _, _ = bn_case(1)
    rng = np.random.default_rng(2)
    xs, ds = rng.normal(size=(20, 8, 4)), rng.integers(0, 3, size=(20, 8))
    keys = jax.random.split(jax.random.key(3), 20)
    runs = {}
    for grad in ("autodiff", "backprop"):
        cfg = T.Config(grad=grad, dropout=0.25, l2=1e-3)
        opt = optim.sgd(0.1)
        step = T.make_step(cfg, opt)

        @jax.jit
        def twenty(carry):
            return jax.lax.scan(step, carry, (xs, ds, keys))

        (p, _, state), E = twenty((params, opt.init(params), mlp.init_state(params)))
        runs[grad] = (p, state, E)
    (pa, sa, Ea), (pb, sb, Eb) = runs["autodiff"], runs["backprop"]
    assert tree_rel_err(pb, pa) <= 1e-10 and tree_rel_err(sb, sa) <= 1e-10
    assert rel_err(Eb, Ea) <= 1e-10
    assert tree_rel_err(pa, params) > 1e-3                         # training moved the parameters
    assert not np.allclose(np.asarray(sa[0]["mean"]), 0.0)         # and the running statistics


def test_dropout_same_key_same_mask_in_both_modes():
    params, x, _ = bn_case(4)
    key = jax.random.key(9)
    y_apply, _ = mlp.apply_stateful(params, mlp.init_state(params), x, train=True, key=key, dropout=0.5)
    net = mlp.network(params, train=True, dropout=0.5, running=False)
    y_walk, tape = graph.forward(net, params, {"x": x, "key": key})
    np.testing.assert_array_equal(np.asarray(y_walk), np.asarray(y_apply))
    h1, dropped = np.asarray(tape.values["h1"]), np.asarray(tape.values["dropout1"])
    assert np.any(dropped == 0) and np.any(dropped != 0)
    np.testing.assert_allclose(dropped[dropped != 0], 2 * h1[dropped != 0], rtol=1e-15)   # 1 / (1 - p)


def test_inference_batch_norm_rule_equals_autodiff_of_reference():
    rng = np.random.default_rng(0)
    x, gamma, beta, mean = (rng.normal(size=s) for s in ((6, 3), (3,), (3,), (3,)))
    var = rng.uniform(0.5, 2.0, 3)
    g = rng.normal(size=(6, 3))
    f = lambda *a: ops.batch_norm_eval(*a, eps=1e-3)                                    # noqa: E731
    r = lambda x, ga, be, mu, va: ga * (x - mu) / jnp.sqrt(va + 1e-3) + be             # noqa: E731
    ours = jax.vjp(f, x, gamma, beta, mean, var)[1](g)
    theirs = jax.vjp(r, x, gamma, beta, mean, var)[1](g)
    assert tree_rel_err(ours, theirs) <= 1e-13


# ------------------------------------------------------------------ student rules, plain functions
from student_rules import softplus   # noqa: E402  (the student rule shared with tests/test_rules.py)


def test_student_rule_in_backprop_and_apply_and_plain_functions():
    params, x, d = bn_case(6, sizes=(4, 5, 3))
    params = [{"W": p["W"], "b": p["b"]} for p in params]
    E_bp, g_bp = fnbp.backprop(params, x, d, activation=softplus, loss=losses.softmax_cross_entropy)
    reference = lambda p: ref.softmax_cross_entropy(                                    # noqa: E731
        ref.dense(p[1]["W"], p[1]["b"], jax.nn.softplus(ref.dense(p[0]["W"], p[0]["b"], x))), d)
    E_ref, g_ref = jax.value_and_grad(reference)(params)
    assert rel_err(E_bp, E_ref) <= 1e-12 and tree_rel_err(g_bp, g_ref) <= 1e-12
    g_apply = jax.grad(lambda p: losses.softmax_cross_entropy(mlp.apply(p, x, activation=softplus), d))(params)
    assert tree_rel_err(g_apply, g_ref) <= 1e-12
    # a plain function: refused by the explicit walker, naming the node; fine for autodiff
    with pytest.raises(ValueError, match=r"node 'h1': 'softplus' has no hand-written rule"):
        fnbp.backprop(params, x, d, activation=jax.nn.softplus, loss=losses.softmax_cross_entropy)
    optax_like = lambda y, d: jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(y), d[:, None], axis=1))  # noqa
    with pytest.raises(ValueError, match=r"node 'E': '<lambda>' has no hand-written rule"):
        fnbp.backprop(params, x, d, activation=softplus, loss=optax_like)
    cfg = T.Config(activation=jax.nn.softplus, loss=optax_like)
    (E, _), g = graph.value_and_grad(objective(cfg.mlp().graph(params, train=True), cfg.loss), params,
                                     {"x": x, "d": d}, explicit=False)
    assert rel_err(E, E_ref) <= 1e-12 and tree_rel_err(g, g_ref) <= 1e-12


# ------------------------------------------------------------------ trace
def test_backprop_trace_a_h_delta_and_grad_table():
    rng = np.random.default_rng(3)
    params = [{"W": rng.normal(size=(4, 3)), "b": rng.normal(size=4)}, {"W": rng.normal(size=(2, 4)),
                                                                        "b": rng.normal(size=2)}]
    x, d = rng.normal(size=(5, 3)), rng.normal(size=(5, 2))
    E, grads, tr = fnbp.backprop(params, x, d, activation=fnbp.tanh, loss=losses.half_sse, trace=True)
    assert [n for n in tr.nodes] == ["a1", "h1", "a2", "h2", "E"]
    a1, h1 = tr.nodes["a1"].output, tr.nodes["h1"].output
    assert rel_err(a1, x @ params[0]["W"].T + params[0]["b"]) <= 1e-12
    assert rel_err(h1, np.tanh(a1)) <= 1e-12
    # delta_2 = grad_y E (.) g'(a_2) with identity output: (y - d) / M; delta_1 = (W_2^T delta_2) (.) (1 - h1^2)
    delta2 = (tr.nodes["h2"].output - d) / 5
    assert rel_err(tr.nodes["a2"].grad_output, delta2) <= 1e-12
    delta1 = (delta2 @ params[1]["W"]) * (1 - h1 ** 2)
    assert rel_err(tr.nodes["a1"].grad_output, delta1) <= 1e-12
    assert rel_err(grads[0]["W"], delta1.T @ x) <= 1e-12              # grad W = delta^T H
    np.testing.assert_array_equal(tr.grad_table["params[0]['W']"], grads[0]["W"])
    assert rel_err(tr.grad_table["h1"], delta2 @ params[1]["W"]) <= 1e-12
    assert tr.nodes["a1"].op == "dense" and tr.nodes["E"].op == "half_sse"
    # the trace is a pytree: it comes out of jit
    tr_jit = jax.jit(lambda p: fnbp.backprop(p, x, d, activation=fnbp.tanh, trace=True)[2])(params)
    assert rel_err(tr_jit.nodes["a1"].grad_output, delta1) <= 1e-12


@pytest.mark.slow
def test_experiment_draws_the_graphs(tmp_path):
    from experiments import graph as experiment
    assert experiment.main(["--out", str(tmp_path)]) == 0
    for name in ("graph_log_xy.png", "graph_skip.png"):
        path = tmp_path / name
        assert path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "1/x" in (tmp_path / "graph.md").read_text()
