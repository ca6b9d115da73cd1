"""fnbp.curvature against plain-JAX references: jax.jacobian / jax.hessian of a plain-jnp network (float64).

The references never touch a rule: the network is ``ref_apply`` (test_nn's lax/jnp layers), the loss plain jnp.
Convention (BackPACK's): quantities of E as the loss reduces it -- 'mean': E = 1/B sum_n E_n.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbp
from fnbp import curvature, losses, nn
from fnbp import reference as R
from test_nn import ref_apply
from marks import slow_except

TOL = 1e-10
B, C = 4, 3


def hessian(f):
    """jax.hessian, jit-compiled: one XLA program instead of hundreds of op-by-op dispatches (suite time)."""
    return jax.jit(jax.hessian(f))


def jacobian(f):
    return jax.jit(jax.jacobian(f))


def jitted(quantity):
    """``quantity(params, x, d, **kw)`` compiled once as a whole (keywords: the model, loss, key, samples)."""
    return lambda params, x, d, **kw: jax.jit(lambda p, x_, d_: quantity(p, x_, d_, **kw))(params, x, d)


def _ce(y, d, reduction="mean"):
    e = jax.nn.logsumexp(y, axis=-1) - jnp.take_along_axis(y, d[:, None], axis=-1)[:, 0]
    return jnp.mean(e) if reduction == "mean" else jnp.sum(e)


def _half_sse(y, d, reduction="mean"):
    e = 0.5 * jnp.sum((y - d) ** 2, axis=-1)
    return jnp.mean(e) if reduction == "mean" else jnp.sum(e)


LOSSES = {"ce": (losses.softmax_cross_entropy, _ce), "half_sse": (losses.half_sse, _half_sse)}


def _mlp(act):
    return nn.serial(nn.Dense(5), act(), nn.Dense(4), act(), nn.Dense(C))


def _cnn(act):
    return nn.serial(nn.Conv2D(2, 3), act(), nn.MaxPool(2, 2), nn.Flatten(), nn.Dense(C))


MODELS = {"mlp-tanh": (_mlp, nn.Tanh, (3,)), "mlp-sigmoid": (_mlp, nn.Sigmoid, (3,)),
          "mlp-relu": (_mlp, nn.Relu, (3,)), "cnn-tanh": (_cnn, nn.Tanh, (6, 6, 1)),
          "cnn-sigmoid": (_cnn, nn.Sigmoid, (6, 6, 1)), "cnn-relu": (_cnn, nn.Relu, (6, 6, 1))}


def _problem(name, loss, batch=B, seed=0):
    make, act, shape = MODELS[name]
    model = make(act)
    params, _ = model.init(jax.random.key(seed), shape, jnp.float64)
    params = jax.tree_util.tree_map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(seed + 7), p.shape,
                                                                            p.dtype), params)   # nonzero biases
    x = jax.random.normal(jax.random.key(seed + 1), (batch,) + shape, jnp.float64)
    if loss == "ce":
        d = jax.random.randint(jax.random.key(seed + 2), (batch,), 0, C)
    else:
        d = jax.random.normal(jax.random.key(seed + 2), (batch, C), jnp.float64)
    return model, params, x, d


def _leaves_with_paths(params):
    return jax.tree_util.tree_flatten_with_path(params)[0]


def _replace(params, path, value):
    return jax.tree_util.tree_map_with_path(lambda p, v: value if p == path else v, params)


def ref_diag_ggn(model, params, x, d, ref_loss, reduction="mean"):
    """diag(J^T H_L J) per leaf: J = d y / d leaf (all examples), H_L = d^2 E / dy^2 (block-diagonal)."""
    y = ref_apply(model.layers, params, x, None)
    H = hessian(lambda y_: ref_loss(y_, d, reduction))(y).reshape(y.size, y.size)
    out = {}
    for path, leaf in _leaves_with_paths(params):
        J = jacobian(lambda v: ref_apply(model.layers, _replace(params, path, v), x, None))(leaf)
        J = J.reshape(y.size, leaf.size)
        out[path] = jnp.einsum("in,ij,jn->n", J, H, J).reshape(leaf.shape)
    return out


def ref_diag_hessian(model, params, x, d, ref_loss, reduction="mean"):
    out = {}
    for path, leaf in _leaves_with_paths(params):
        def E(v):
            return ref_loss(ref_apply(model.layers, _replace(params, path, v), x, None), d, reduction)
        out[path] = jnp.diagonal(hessian(E)(leaf).reshape(leaf.size, leaf.size)).reshape(leaf.shape)
    return out


def _max_err(got, ref):
    """max over leaves of max |got - ref| / (1 + max |ref|)."""
    return max(float(jnp.max(jnp.abs(g - ref[path])) / (1 + jnp.max(jnp.abs(ref[path]))))
               for path, g in _leaves_with_paths(got))


CASES = [("mlp-tanh", "ce"), ("mlp-sigmoid", "half_sse"), ("mlp-relu", "ce"), ("cnn-tanh", "ce"),
         ("cnn-sigmoid", "half_sse"), ("cnn-relu", "ce")]


@pytest.mark.parametrize("name,loss,reduction", slow_except(
    [c + ("mean",) for c in CASES] + [("mlp-sigmoid", "half_sse", "sum"), ("cnn-relu", "ce", "sum")],   # 'sum': one per kind
    ("mlp-relu", "ce", "mean"), ("mlp-sigmoid", "half_sse", "sum")))
def test_diag_ggn_equals_diag_JtHJ(name, loss, reduction):
    with jax.enable_x64(True):
        model, params, x, d = _problem(name, loss)
        fn, ref_loss = LOSSES[loss]
        got = jitted(curvature.diag_ggn)(params, x, d, model=model, loss=functools.partial(fn, reduction=reduction))
        err = _max_err(got, ref_diag_ggn(model, params, x, d, ref_loss, reduction))
    assert err <= TOL, err


@pytest.mark.parametrize("name,loss", slow_except(CASES, ("mlp-sigmoid", "half_sse")))
def test_diag_hessian_equals_diag_of_jax_hessian(name, loss):
    with jax.enable_x64(True):
        model, params, x, d = _problem(name, loss)
        fn, ref_loss = LOSSES[loss]
        got = jitted(curvature.diag_hessian)(params, x, d, model=model, loss=fn)
        ref = ref_diag_hessian(model, params, x, d, ref_loss)
        err = _max_err(got, ref)
        if "relu" not in name:      # the activations' term matters: the GGN alone is far from the Hessian
            assert _max_err(jitted(curvature.diag_ggn)(params, x, d, model=model, loss=fn), ref) > 1e-4
    assert err <= TOL, err


@pytest.mark.parametrize("name", slow_except(["mlp-relu", "cnn-relu"], "mlp-relu"))
def test_diag_hessian_equals_diag_ggn_for_relu(name):
    with jax.enable_x64(True):
        model, params, x, d = _problem(name, "ce")
        h = jitted(curvature.diag_hessian)(params, x, d, model=model, loss=losses.softmax_cross_entropy)
        g = jitted(curvature.diag_ggn)(params, x, d, model=model, loss=losses.softmax_cross_entropy)
        err = _max_err(h, {p: v for p, v in _leaves_with_paths(g)})
    assert err <= TOL, err


def test_diag_ggn_without_model_is_the_mlp():
    with jax.enable_x64(True):
        model, params, x, d = _problem("mlp-tanh", "half_sse")
        got = jitted(curvature.diag_ggn)(params, x, d, loss=losses.half_sse, activation=fnbp.tanh)
        err = _max_err(got, ref_diag_ggn(model, params, x, d, _half_sse))
    assert err <= TOL, err


def _dense_inputs(model, params, x):
    """h_{k-1} of each dense layer (the plain forward up to it)."""
    hs, j = [], 0
    for i, layer in enumerate(model.layers):
        if isinstance(layer, nn.Dense):
            hs.append(ref_apply(model.layers[:i], params[:j], x, None).reshape(x.shape[0], -1))
            j += 1
    return hs


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ce", "half_sse"])
def test_kflr_factors_equal_their_definitions_mlp(loss):
    """A = 1/B sum_n h_n h_n^T from the plain forward; G: for one example the GGN block of W is exactly G (x) A
    (and of b, G * 1); for a batch, G = 1/B sum_n G(example n alone) under reduction='mean'."""
    with jax.enable_x64(True):
        model, params, x, d = _problem("mlp-tanh", loss)
        fn, ref_loss = LOSSES[loss]
        errs = []
        kf = jitted(curvature.kflr)(params, x, d, model=model, loss=fn)
        for layer, h in zip(kf, _dense_inputs(model, params, x)):
            errs.append(float(jnp.max(jnp.abs(layer["W"].A - h.T @ h / B))))
            errs.append(float(jnp.max(jnp.abs(layer["b"].A - 1.0))))
        G_sum = [jnp.zeros_like(layer["W"].G) for layer in kf]
        for n in range(B):
            xn, dn = x[n:n + 1], d[n:n + 1]
            one = jitted(curvature.kflr)(params, xn, dn, model=model, loss=fn)
            y = ref_apply(model.layers, params, xn, None)
            H = hessian(lambda y_: ref_loss(y_, dn))(y).reshape(C, C)
            for i, layer in enumerate(one):
                for leaf in ("W", "b"):
                    J = jacobian(lambda v: ref_apply(model.layers, _replace(params, (
                        jax.tree_util.SequenceKey(i), jax.tree_util.DictKey(leaf)), v), xn, None))(params[i][leaf])
                    J = J.reshape(C, -1)
                    block = J.T @ H @ J
                    errs.append(float(jnp.max(jnp.abs(jnp.kron(layer[leaf].G, layer[leaf].A) - block))))
                G_sum[i] = G_sum[i] + layer["W"].G
        errs += [float(jnp.max(jnp.abs(layer["W"].G - Gs / B))) for layer, Gs in zip(kf, G_sum)]
        errs += [float(jnp.max(jnp.abs(layer["W"].G - layer["b"].G))) for layer in kf]
    assert max(errs) <= TOL, errs


@pytest.mark.slow
def test_kflr_factors_equal_their_definitions_cnn():
    """Conv (KFC): A = 1/B sum_{n,p} P_{n,p} P_{n,p}^T with P_{n,p,k} = d a_{n,p,o} / d W_{o,k} (jax.jacobian of the
    plain conv); G = sum_{n,p} (J_n^T H_n J_n)_{(p,o),(p,o')}, J_n = d y_n / d a_n of the plain tail network."""
    with jax.enable_x64(True):
        model, params, x, d = _problem("cnn-tanh", "ce")
        kf = jitted(curvature.kflr)(params, x, d, model=model, loss=losses.softmax_cross_entropy)
        W, b = params[0]["W"], params[0]["b"]
        conv = lambda W_: R.conv2d(W_, b, x, stride=1, padding="SAME")              # noqa: E731
        a = conv(W)
        P = jacobian(conv)(W)[:, :, :, 0, 0].reshape(B, -1, W[0].size)           # (B, S, K)
        A_ref = jnp.einsum("bsk,bsl->kl", P, P) / B
        tail = lambda a_: ref_apply(model.layers[1:], params[1:], a_, None)          # noqa: E731
        y = tail(a)
        H = hessian(lambda y_: _ce(y_, d))(y)                                    # (B, C, B, C)
        J = jacobian(tail)(a)                                                    # (B, C, B, H, W, C_out)
        ggn_a = jnp.einsum("bcmhwo,bcBD,BDnijq->mhwonijq", J, H, J)
        S = a.shape[1] * a.shape[2]
        ggn_a = ggn_a.reshape(B, S, a.shape[3], B, S, a.shape[3])
        G_ref = jnp.einsum("nsonsq->oq", ggn_a)
        errs = [float(jnp.max(jnp.abs(kf[0]["W"].A - A_ref))), float(jnp.max(jnp.abs(kf[0]["W"].G - G_ref))),
                float(jnp.max(jnp.abs(kf[0]["b"].A - S)))]
    assert max(errs) <= TOL, errs


@pytest.mark.slow
@pytest.mark.parametrize("name,loss", [("mlp-tanh", "ce"), ("cnn-relu", "half_sse")])
def test_mc_versions_converge_to_exact(name, loss):
    """Fixed key; the relative error (max over leaves) of 20 000 samples is below 0.05 and at most a third of 20
    samples' (the error falls as 1/sqrt(samples): expected ratio ~ 30)."""
    with jax.enable_x64(True):
        model, params, x, d = _problem(name, loss)
        fn = LOSSES[loss][0]
        exact = {p: v for p, v in _leaves_with_paths(jitted(curvature.diag_ggn)(params, x, d, model=model, loss=fn))}
        kf_exact = jitted(curvature.kflr)(params, x, d, model=model, loss=fn)
        errs, kf_errs = [], []
        for samples in (20, 20000):
            key = jax.random.key(42)
            mc = jitted(curvature.diag_ggn_mc)(params, x, d, key=key, samples=samples, model=model, loss=fn)
            errs.append(max(float(jnp.max(jnp.abs(v - exact[p])) / jnp.max(jnp.abs(exact[p])))
                            for p, v in _leaves_with_paths(mc)))
            kf = jitted(curvature.kfac)(params, x, d, key=key, samples=samples, model=model, loss=fn)
            kf_errs.append(max(float(jnp.max(jnp.abs(k["W"].G - e["W"].G)) / jnp.max(jnp.abs(e["W"].G)))
                               for k, e in zip(kf, kf_exact)))
            assert all(float(jnp.max(jnp.abs(k["W"].A - e["W"].A))) <= TOL for k, e in zip(kf, kf_exact))
    assert errs[1] < 0.05 and errs[1] < errs[0] / 3, errs
    assert kf_errs[1] < 0.05 and kf_errs[1] < kf_errs[0] / 3, kf_errs


def test_refusals_name_the_node():
    x = jnp.ones((2, 3))
    d = jnp.array([0, 1])
    cases = [
        (nn.serial(nn.Dense(4), nn.BatchNorm(), nn.Relu(), nn.Dense(C)), curvature.diag_ggn, "1.batchnorm"),
        (nn.serial(nn.Dense(4), nn.PReLU(), nn.Dense(C)), curvature.diag_ggn, "1.prelu"),
        (nn.serial(nn.Dense(4), nn.LeakyRelu(), nn.Dense(C)), curvature.diag_hessian, "1.leaky_relu"),
        (nn.serial(nn.Dense(4), nn.Dropout(0.5), nn.Dense(C)), curvature.diag_ggn, "dropout"),
    ]
    for model, fn, node in cases:
        params, _ = model.init(jax.random.key(0), (3,))
        with pytest.raises(ValueError, match=node):
            fn(params, x, d, model=model, loss=losses.softmax_cross_entropy)
    model = _mlp(nn.Tanh)
    params, _ = model.init(jax.random.key(0), (3,))
    with pytest.raises(ValueError, match="fnbp.curvature.kflr: the loss 'mae' has no Hessian factor"):
        curvature.kflr(params, x, jnp.zeros((2, C)), model=model, loss=losses.mae)
    with pytest.raises(ValueError, match="samples must be a positive int"):
        curvature.kfac(params, x, d, key=jax.random.key(0), samples=0, model=model,
                        loss=losses.softmax_cross_entropy)


def test_negative_control_wrong_factor_is_caught(monkeypatch):
    """A deliberately wrong loss-Hessian factor (H's columns instead of its square root's) must fail the same
    comparison the real one passes."""
    with jax.enable_x64(True):
        model, params, x, d = _problem("mlp-tanh", "ce")
        ref = ref_diag_ggn(model, params, x, d, _ce)

        def wrong(y, spec, name=""):
            p = jax.nn.softmax(y, axis=-1)
            H = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(p) / y.shape[0]       # (B, C, C): not a root
            return jnp.transpose(H, (2, 0, 1))
        monkeypatch.setattr(curvature, "hessian_factor", wrong)
        err = _max_err(jitted(curvature.diag_ggn)(params, x, d, model=model, loss=losses.softmax_cross_entropy), ref)
    assert err > 1e-4, err


def _train(opt, model, params, x, d, steps, curvature_fn=None):
    def E(p):
        return losses.softmax_cross_entropy(ref_apply(model.layers, p, x, None), d)
    state = opt.init(params)
    grad, update = jax.jit(jax.grad(E)), jax.jit(opt.update)
    for _ in range(steps):
        extra = {} if curvature_fn is None else {"factors": curvature_fn(params)}
        updates, state = update(grad(params), state, params, **extra)
        params = fnbp.optim.apply_updates(params, updates)
    return float(E(params))


@pytest.mark.slow
def test_optim_kfac_decreases_the_loss_faster_than_sgd():
    """Tiny tanh MLP, full batch of 32, 3 classes, 30 steps at the same learning rate 0.1: K-FAC (sampled factors,
    fixed key, damping 1e-2, inverses every 5 steps) ends below 0.8 x SGD's loss (measured
    0.64 vs 1.04), which itself decreased."""
    with jax.enable_x64(True):
        model, params, x, d = _problem("mlp-tanh", "ce", batch=32)
        E0 = float(losses.softmax_cross_entropy(ref_apply(model.layers, params, x, None), d))
        keys = iter(jax.random.split(jax.random.key(3), 30))
        factors = jax.jit(lambda p, k: curvature.kfac(p, x, d, key=k, model=model,
                                                      loss=losses.softmax_cross_entropy))
        kf = _train(fnbp.optim.kfac(0.1, damping=1e-2, inverse_every=5), model, params, x, d, 30,
                    lambda p: factors(p, next(keys)))
        sgd = _train(fnbp.optim.sgd(0.1), model, params, x, d, 30)
    assert sgd < E0 and kf < 0.8 * sgd, (E0, sgd, kf)


def _quick(tmp_path, part):
    from experiments import curvature as exp
    return exp.main(["--quick", "--out", str(tmp_path), "--rounds", "2", "--parts", part])[part]


@pytest.mark.slow
def test_experiment_quick_overhead(tmp_path):
    """experiments/curvature.py --quick --parts overhead: every quantity timed, a finite positive ratio to the
    plain backward."""
    res = _quick(tmp_path, "overhead")
    assert (tmp_path / "curvature.md").exists()
    for rows in res.values():
        assert set(rows) >= {"backward (baseline)", "diag_ggn", "kfac", "kflr", "diag_hessian"}
        assert all(0 < v["ratio"] < float("inf") for v in rows.values())


@pytest.mark.slow
def test_experiment_quick_laplace(tmp_path):
    """--parts laplace: the predictives are distributions; the posterior's spread (tau by the evidence) lowers
    the linearised predictive's confidence on noise images below the MAP's."""
    res = _quick(tmp_path, "laplace")
    assert (tmp_path / "curvature_laplace.md").exists() and (tmp_path / "curvature_laplace.png").exists()
    for row in res["sets"].values():
        for m in row.values():
            assert 0.1 <= m["confidence"] <= 1 and 0 <= m["entropy"] <= np.log(10) + 1e-6
    noise = res["sets"]["uniform noise"]
    assert noise["Laplace linearised (tau: evidence)"]["confidence"] < noise["MAP"]["confidence"] - 0.05


@pytest.mark.slow
def test_experiment_quick_kfac(tmp_path):
    """--parts kfac: curves of accuracies in [0, 1] at the same steps for SGD, Adam and K-FAC; wall time
    increasing."""
    res = _quick(tmp_path, "kfac")
    assert (tmp_path / "curvature_kfac.md").exists() and (tmp_path / "curvature_kfac.png").exists()
    curves = res["curves"]
    assert set(curves) == {"SGD", "Adam", "K-FAC"}
    assert len({tuple(c["step"]) for c in curves.values()}) == 1
    for c in curves.values():
        assert all(0 <= a <= 1 for a in c["test_accuracy"]) and np.all(np.diff(c["seconds"]) > 0)
        assert np.all(np.isfinite(c["loss"]))


@pytest.mark.slow
def test_a_graph_as_model_gives_the_same_quantities():
    """model= a fnbp.graph.Graph (the model's own graph): the same numbers as the model, every quantity."""
    with jax.enable_x64(True):
        model, params, x, d = _problem("cnn-sigmoid", "ce")
        net = model.graph(params, train=True)
        kw = dict(loss=losses.softmax_cross_entropy)
        for fn in (curvature.diag_ggn, curvature.diag_hessian, curvature.kflr):
            a = jax.tree_util.tree_leaves(fn(params, x, d, model=model, **kw))
            b = jax.tree_util.tree_leaves(fn(params, x, d, model=net, **kw))
            assert len(a) == len(b) and all(bool(jnp.array_equal(u, v)) for u, v in zip(a, b)), fn.__name__


def test_a_rule_with_several_weights_is_refused_by_name():
    """The recurrent rules register one per-example view per weight (fnbp.extensions); curvature reads one."""
    from fnbp.graph import Input, Param
    net = fnbp.graph.make([fnbp.graph.node("rnn", fnbp.rnn.elman, Param("W_x"), Param("W_h"), Param("b"), Input("x"),
                                           Input("h0")),
                           fnbp.graph.node("y", fnbp.dense, Param("W"), Param("c"), "rnn")], "y")
    params = {"W_x": jnp.ones((4, 2)), "W_h": jnp.ones((4, 4)), "b": jnp.ones(4), "W": jnp.ones((C, 4)),
              "c": jnp.ones(C)}
    with pytest.raises(ValueError, match=r"fnbp.curvature.diag_ggn: node 'rnn' \(elman\) has several weights"):
        curvature.diag_ggn(params, jnp.ones((2, 3, 2)), jnp.array([0, 1]), model=net,
                           loss=losses.softmax_cross_entropy)


# --- against BackPACK (backpack-for-pytorch), float64, where FNBP_TORCH_PYTHON names a venv with it ----------
# Conventions (tests/backpack_oracle.py has the layouts): DiagGGNExact and DiagHessian are of the loss as reduced,
# as here (CrossEntropyLoss/MSELoss 'mean' carry 1/B, and MSELoss 'mean' also 1/C: fnbp's mse); they compare
# unscaled.  KFLR: BackPACK returns [G, A] for a weight and [G] for a bias, G the output factor first as in
# fnbp's KronFactors(G, A); a Dense layer's G and A equal fnbp's.  A conv's A equals fnbp's (over the patch
# entries, 1/B sum_{n,p} P P^T, after the (c, i, j) -> (i, j, c) reorder); its G does NOT: BackPACK sums the
# back-propagated columns over the positions before the outer product, G_bp = sum_{m,n} (sum_p delta_{m,n,p})
# (sum_p delta_{m,n,p})^T -- the exact GGN block of the bias, which BackPACK returns for the bias too -- while
# fnbp's is KFC's sum_{m,n,p} delta_{m,n,p} delta_{m,n,p}^T (positions uncorrelated; Grosse & Martens 2016, |T|
# times their Gamma).  So for a conv the test checks diag(G_bp) = fnbp's diag_ggn of b, and that the two G differ.


@pytest.fixture(scope="module")
def backpack_out(tmp_path_factory):
    import backpack_oracle
    return backpack_oracle.backpack_results(tmp_path_factory.mktemp("backpack"))


@pytest.mark.slow
@pytest.mark.parametrize("quantity,bp_field", [("diag_ggn", "diag_ggn_exact"), ("diag_hessian", "diag_h")])
def test_diag_ggn_and_diag_hessian_equal_backpack(backpack_out, quantity, bp_field):
    """DiagGGNExact and DiagHessian, every case (tanh, sigmoid, relu; MLP and CNN; CE and MSE, mean and sum)."""
    from backpack_oracle import rel_err
    errs = {}
    with jax.enable_x64(True):
        for name, (case, bp) in backpack_out.items():
            got = jitted(getattr(curvature, quantity))(case.params, case.x, case.d, model=case.model, loss=case.loss)
            for i, layer in enumerate(got):
                errs[f"{name} {i}.W"] = rel_err(layer["W"], case.to_fnbp_W(i, bp[f"p{i}.weight.{bp_field}"]))
                errs[f"{name} {i}.b"] = rel_err(layer["b"], bp[f"p{i}.bias.{bp_field}"])
    print(quantity, "max relative error vs BackPACK:", max(errs.values()))          # seen with -s
    assert max(errs.values()) <= TOL, errs


@pytest.mark.slow
def test_kflr_factors_equal_backpack(backpack_out):
    from backpack_oracle import rel_err
    errs, differ = {}, {}
    with jax.enable_x64(True):
        for name, (case, bp) in backpack_out.items():
            kf = jitted(curvature.kflr)(case.params, case.x, case.d, model=case.model, loss=case.loss)
            ggn = jitted(curvature.diag_ggn)(case.params, case.x, case.d, model=case.model, loss=case.loss)
            for i, layer in enumerate(kf):
                G_bp, A_bp = bp[f"p{i}.weight.kflr0"], bp[f"p{i}.weight.kflr1"]
                errs[f"{name} {i}.A"] = rel_err(layer["W"].A, case.to_fnbp_A(i, A_bp))
                errs[f"{name} {i}.b[G] = W's G"] = rel_err(bp[f"p{i}.bias.kflr0"], G_bp)
                if case.kind == "cnn" and i == 0:          # conv: G_bp is the bias's GGN block (see above)
                    errs[f"{name} {i}.diag G_bp"] = rel_err(ggn[i]["b"], np.diagonal(G_bp))
                    differ[name] = rel_err(layer["W"].G, G_bp)
                else:
                    errs[f"{name} {i}.G"] = rel_err(layer["W"].G, G_bp)
                    errs[f"{name} {i}.b.G"] = rel_err(layer["b"].G, bp[f"p{i}.bias.kflr0"])
    print("kflr max relative error vs BackPACK:", max(errs.values()), "conv G differ by", differ)
    assert max(errs.values()) <= TOL, errs
    assert min(differ.values()) > 1e-3, differ      # the documented convention difference is real
