"""Every worked number of the lecture notes, recomputed by fnbp beside an independent computation.

Each quantity is computed twice -- once by fnbp (its layers, losses, ``fnbp.backprop``, ``jax.grad``
through ``fnbp.mlp.apply``, ``fnbp.optim``, ``fnbp.perceptron``) and once independently (plain
Python arithmetic with the ``math`` module, written from the notes' formulas) -- and compared with the
number the notes (or the published step-by-step example they link to) print, to the printed
precision.  The script asserts every comparison; ``tests/test_experiments.py`` asserts them again.

    python experiments/worked_examples.py            # writes experiments/results/worked_examples.{md,json}
    python -m experiments.worked_examples --out /tmp/x

Everything runs in float64 (``jax_enable_x64``), so fnbp and the plain-Python values agree to ~1e-15.
"""
import math
import sys
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import common  # noqa: E402

NAME = "worked_examples"
REL_TOL = 1e-10          # fnbp vs independent (float64 against Python floats)
ABS_TOL = 1e-12


# ----------------------------------------------------------------------------- comparison helpers
def printed_agreement(value, printed):
    """How ``value`` agrees with the decimal string ``printed``: 'exact', 'rounded', 'truncated' or None.

    'rounded': round-half-up to the printed number of decimals gives the printed string;
    'truncated': cutting the extra digits does (several slides truncate instead of rounding).
    """
    p = Decimal(printed)
    if Decimal(repr(float(value))) == p:
        return "exact"
    quantum = Decimal(1).scaleb(p.as_tuple().exponent)
    v = Decimal(repr(float(value)))
    if v.quantize(quantum, rounding=ROUND_HALF_UP) == p:
        return "rounded"
    if v.quantize(quantum, rounding=ROUND_DOWN) == p:
        return "truncated"
    return None


def close(a, b):
    return abs(a - b) <= ABS_TOL + REL_TOL * abs(b)


class Checks:
    """The rows of the table, grouped by section; every row records whether it matched."""

    def __init__(self):
        self.sections = []          # [(title, text, rows)]

    def section(self, title, text=""):
        self.sections.append((title, text, []))

    def add(self, quantity, printed, independent, fnbp_value, *, exact=False):
        """One quantity.  ``printed``: None (notes print nothing), a decimal string, a tuple of them
        (one per component), or ``("formula text", value)`` for a symbolic result.  ``independent`` and
        ``fnbp_value``: numbers or sequences of numbers.  ``exact=True`` requires equality (integers)."""
        ind = np.atleast_1d(np.asarray(independent, dtype=float))
        fn = np.atleast_1d(np.asarray(fnbp_value, dtype=float))
        if ind.shape != fn.shape:
            raise ValueError(f"{quantity}: shapes differ {ind.shape} vs {fn.shape}")
        agree = bool(np.all(ind == fn)) if exact else all(close(a, b) for a, b in zip(fn, ind))
        notes_ok, how = True, []
        printed_text = "—"
        if printed is not None:
            if isinstance(printed, tuple) and len(printed) == 2 and not isinstance(printed[1], str):
                printed_text, value = printed
                notes_ok = all(close(v, float(value)) for v in ind)
                how = ["formula"]
            else:
                items = printed if isinstance(printed, tuple) else (printed,)
                if len(items) != len(ind):
                    raise ValueError(f"{quantity}: {len(items)} printed values for {len(ind)} components")
                printed_text = ", ".join(items)
                for v, f, s in zip(ind, fn, items):
                    h = printed_agreement(v, s)
                    notes_ok &= h is not None and printed_agreement(f, s) is not None
                    how.append(h or "MISMATCH")
        ok = agree and notes_ok
        if not agree:
            match = "NO (fnbp ≠ independent)"
        elif not notes_ok:
            match = "NO (≠ printed)"
        elif printed is None:
            match = "yes (fnbp = independent)"
        else:
            kinds = sorted(set(how))
            match = "yes" + ("" if kinds in (["rounded"], ["exact"], ["exact", "rounded"], ["formula"])
                             else " (notes truncate)" if "truncated" in kinds else "")
        row = {"quantity": quantity, "printed": printed_text, "independent": ind.tolist(), "fnbp": fn.tolist(),
               "match": match, "ok": bool(ok), "printed_agreement": how}
        self.sections[-1][2].append(row)
        return row

    def rows(self):
        return [dict(r, section=t) for t, _, rs in self.sections for r in rs]

    def markdown(self):
        parts = []
        for title, text, rows in self.sections:
            parts.append(f"## {title}\n")
            if text:
                parts.append(text.strip() + "\n")
            parts.append(common.md_table(
                ["quantity", "notes/published", "independent", "fnbp", "match"],
                [[r["quantity"], r["printed"], _fmt_values(r["independent"]), _fmt_values(r["fnbp"]), r["match"]]
                 for r in rows]) + "\n")
        return "\n".join(parts)


def _fmt_values(values):
    def one(v):
        if float(v).is_integer() and abs(v) < 1e15:
            return f"{int(v)}"
        return f"{v:.10g}"
    return ", ".join(one(v) for v in values) if len(values) > 1 else one(values[0])


def sigmoid(t):
    return 1.0 / (1.0 + math.exp(-t))


# ----------------------------------------------------------------------------- the worked examples
def chain_rule_log_xy(c):
    """Notes 000: d/dx log(xy) step by step: v = xy, w = log v, z = w."""
    x, y = 2.0, 3.0
    c.section("Chain rule: ∂/∂x log(xy) step by step (notes 000)",
              f"At (x, y) = ({x:g}, {y:g}): v = xy, w = log v, z = w, so ∂z/∂x = ∂z/∂w · ∂w/∂v · ∂v/∂x = "
              "1 × 1/v × y = y/v = 1/x.  Independent: plain arithmetic; fnbp column: `jax.grad` of each "
              "stage and of the whole composition (plain `jnp` reference).")
    v = x * y
    c.add("v = xy", None, v, jnp.multiply(x, y))
    c.add("w = log v", None, math.log(v), jnp.log(jnp.multiply(x, y)))
    c.add("∂z/∂w", ("1", 1.0), 1.0, jax.grad(lambda w: w)(math.log(v)))
    c.add("∂w/∂v", ("1/v", 1 / v), 1.0 / v, jax.grad(jnp.log)(v))
    c.add("∂v/∂x", ("y", y), y, jax.grad(lambda x_: x_ * y)(x))
    c.add("∂z/∂x = y/v", ("y/v = 1/x", 1 / x), 1.0 * (1.0 / v) * y, jax.grad(lambda x_: jnp.log(x_ * y))(x))


def sigmoid_forward(c, fnbp):
    """Notes 003: forward propagation with sigmoid units, X_hidden = W_XA·X, X_output = W_AO·X_hidden."""
    W_XA = [[0.9, 0.3, 0.4], [0.2, 0.8, 0.2], [0.1, 0.5, 0.6]]
    W_AO = [[0.3, 0.7, 0.5], [0.6, 0.5, 0.2], [0.8, 0.1, 0.9]]
    X = [0.9, 0.1, 0.8]
    # Independent: row i of W times X (W[i][j] links input j to unit i), as the notes' w.dot(x).
    a_hidden = [sum(W_XA[i][j] * X[j] for j in range(3)) for i in range(3)]
    A = [sigmoid(t) for t in a_hidden]
    a_out = [sum(W_AO[i][j] * A[j] for j in range(3)) for i in range(3)]
    O = [sigmoid(t) for t in a_out]
    A_transposed = [sigmoid(sum(W_XA[j][i] * X[j] for j in range(3))) for i in range(3)]
    params = [{"W": jnp.array(W_XA), "b": jnp.zeros(3)}, {"W": jnp.array(W_AO), "b": jnp.zeros(3)}]
    x = jnp.array(X)
    sig = fnbp.sigmoid
    A_f = fnbp.mlp.apply(params[:1], x, activation=sig, output=sig)
    O_f = fnbp.mlp.apply(params, x, activation=sig, output=sig)
    c.section("Forward propagation with sigmoid units (notes 003)",
              "X = (0.9, 0.1, 0.8), X_hidden = W_XA·X, A = σ(X_hidden), X_output = W_AO·A, O = σ(X_output), no "
              "biases.  **Matrix convention**: the notes' `w.dot(x)` multiplies row i of W by X, i.e. W[i, j] links "
              "input j to unit i -- fnbp's convention (W of shape (n_out, n_in), a = W h).  The transposed "
              f"reading σ(W_XAᵀ·X) = ({', '.join(f'{v:.4f}' for v in A_transposed)}) does *not* give the "
              "printed A.  fnbp: `fnbp.mlp.apply` with sigmoid hidden and output layers and zero biases.  "
              "The printed O is truncated to two decimals (exact 0.7263, 0.7086, 0.7781 round to 0.73, 0.71, 0.78).")
    c.add("X_hidden = W_XA·X", None, a_hidden, fnbp.dense(params[0]["W"], params[0]["b"], x))
    c.add("A = σ(W_XA·X)", ("0.76", "0.60", "0.65"), A, A_f)
    c.add("X_output = W_AO·A", None, a_out, fnbp.dense(params[1]["W"], params[1]["b"], A_f))
    c.add("O = σ(W_AO·A)", ("0.72", "0.70", "0.77"), O, O_f)
    return {"A_transposed_convention": A_transposed}


def softmax_cross_entropy(c, fnbp):
    """Notes 001: softmax of u = (-2, 3, 1) and its cross-entropy for class 1."""
    u = [-2.0, 3.0, 1.0]
    t = 1
    y = [0.0, 1.0, 0.0]
    e = [math.exp(v) for v in u]
    p = [v / sum(e) for v in e]
    closs = -sum(yj * math.log(pj) for yj, pj in zip(y, p))
    J = -u[t] + math.log(sum(e))
    grad = [pj - yj for pj, yj in zip(p, y)]
    uj = jnp.array(u)
    p_f = fnbp.softmax(uj)
    c.section("Softmax and cross-entropy (notes 001)",
              "u = (−2, 3, 1), class t = 1 (0-based, y = [0, 1, 0]).  The slide's probabilities are truncated "
              "(0.0058 for 0.0059); its Python output prints 8 digits.  CLoss(p, y) = −Σ y_j ln p_j and the fused "
              "J(u, t) = −u_t + ln Σ e^{u_j} both give 0.1328.  (The slide's `crossEnt` code omits the minus sign: it "
              "returns −0.1328.)  fnbp: `fnbp.softmax`, `fnbp.losses.cross_entropy` on p, "
              "`fnbp.losses.softmax_cross_entropy` on u, and `jax.grad` of the latter (its hand-written rule).")
    c.add("p = softmax(u) (slide)", ("0.0058", "0.87", "0.118"), p, p_f)
    c.add("p = softmax(u) (slide's Python output)", ("0.00589975", "0.8756006", "0.11849965"), p, p_f)
    c.add("CLoss(p, y) = −Σ y ln p", "0.1328", closs, fnbp.losses.cross_entropy(p_f, jnp.array(y)))
    c.add("J(u, 1) = −u₁ + ln Σ e^u", "0.1328", J, fnbp.losses.softmax_cross_entropy(uj, 1))
    c.add("∇_u J = softmax(u) − y", None, grad, jax.grad(lambda v: fnbp.losses.softmax_cross_entropy(v, 1))(uj))


def squared_error(c, fnbp):
    """Notes 001: E = 1/2 sum_p (u_p - y_p)^2 for u = (1, 0), y = (0.8, 0.5)."""
    u, y = [1.0, 0.0], [0.8, 0.5]
    E = 0.5 * sum((a - b) ** 2 for a, b in zip(u, y))
    c.section("Squared error (notes 001)",
              "One example (N = 1), u = (1, 0), y = (0.8, 0.5): E = ½ Σ_p (u_p − y_p)² = 0.5·(0.04 + 0.25).  "
              "fnbp: `fnbp.losses.half_sse` (½‖y − d‖²) and its gradient u − y by `jax.grad`.")
    c.add("E = ½[(1−0.8)² + (0−0.5)²]", "0.145", E, fnbp.losses.half_sse(jnp.array(u), jnp.array(y)))
    c.add("MSE = 1/(2N) Σ_N Σ_P (u−y)², N = 1", "0.145", E,
          fnbp.losses.half_sse(jnp.array([u]), jnp.array([y]), reduction="mean"))
    c.add("∇_u E = u − y", None, [a - b for a, b in zip(u, y)],
          jax.grad(lambda v: fnbp.losses.half_sse(v, jnp.array(y)))(jnp.array(u)))


def sigmoid_exercise(c, fnbp):
    """Notes 001, exercise 2: a 2-2-1 sigmoid network, x = (1, 1), y = 0, c = 1, one backprop step."""
    w = {(0, 3): 0.2, (1, 3): 0.1, (2, 3): 0.3, (0, 4): -0.3, (1, 4): -0.2, (2, 4): 0.4,
         (0, 5): 0.4, (3, 5): 0.5, (4, 5): -0.4}
    x1, x2, y, lr = 1.0, 1.0, 0.0, 1.0

    # --- independent: the notes' recap formulas, node by node (node 0 is the bias input 1) ---
    def forward(w):
        out = {0: 1.0, 1: x1, 2: x2}
        for j, srcs in ((3, (0, 1, 2)), (4, (0, 1, 2)), (5, (0, 3, 4))):
            out[j] = sigmoid(sum(w[(i, j)] * out[i] for i in srcs))
        return out

    o = forward(w)
    E = 0.5 * (y - o[5]) ** 2
    d5 = (y - o[5]) * o[5] * (1 - o[5])                     # δ_j = (y_j − u_j) u_j (1 − u_j)
    d3 = o[3] * (1 - o[3]) * d5 * w[(3, 5)]                 # δ_j = σ_j (1 − σ_j) Σ_k δ_k w_jk
    d4 = o[4] * (1 - o[4]) * d5 * w[(4, 5)]
    delta = {3: d3, 4: d4, 5: d5}
    w_new = {(i, j): wij + lr * delta[j] * o[i] for (i, j), wij in w.items()}   # Δw_ij = c δ_j x_i
    o_new = forward(w_new)
    E_new = 0.5 * (y - o_new[5]) ** 2

    # --- fnbp: layer 1 W[i, j] links input j to hidden unit i (units 3, 4), b = weights from node 0 ---
    params = [{"W": jnp.array([[w[(1, 3)], w[(2, 3)]], [w[(1, 4)], w[(2, 4)]]]), "b": jnp.array([w[(0, 3)], w[(0, 4)]])},
              {"W": jnp.array([[w[(3, 5)], w[(4, 5)]]]), "b": jnp.array([w[(0, 5)]])}]
    x, d = jnp.array([x1, x2]), jnp.array([y])
    sig, loss = fnbp.sigmoid, fnbp.losses.half_sse
    hidden = fnbp.mlp.apply(params[:1], x, activation=sig, output=sig)
    u = fnbp.mlp.apply(params, x, activation=sig, output=sig)
    E_f, grads = fnbp.backprop(params, x, d, activation=sig, output=sig, loss=loss)
    grads_ad = jax.grad(lambda p: loss(fnbp.mlp.apply(p, x, activation=sig, output=sig), d))(params)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_ad)))
    assert diff <= 1e-15, f"fnbp.backprop and jax.grad through fnbp.mlp.apply differ by {diff}"
    opt = fnbp.optim.sgd(lr)
    updates, _ = opt.update(grads, opt.init(params), params)
    new = fnbp.optim.apply_updates(params, updates)
    u_new = fnbp.mlp.apply(new, x, activation=sig, output=sig)

    c.section("Sigmoid network exercise, one backpropagation step (notes 001, exercise 2)",
              "Inputs x₁ = x₂ = 1 (node 0 is the bias input 1), hidden units 3, 4, output unit 5, all sigmoid; "
              "target y = 0, learning rate c = 1, loss E = ½(y − u)² (the 'MSE' of the slide for one output).  "
              "The notes print only the initial weights, so the outputs, δ's and updated weights are compared "
              "between the plain-Python hand computation (the recap slide: δ₅ = (y − u₅)u₅(1 − u₅), "
              "δ_j = σ_j(1 − σ_j)Σ_k δ_k w_jk, Δw_ij = c δ_j x_i) and fnbp.  fnbp: `fnbp.mlp.apply` for the "
              "outputs; `fnbp.backprop` for E and the gradients (equal to `jax.grad` through `fnbp.mlp.apply` "
              f"to {diff:.0e}, asserted); the notes' δ_j = (y − u)… is −∂E/∂a_j, so the fnbp column shows "
              "−∇_{b_j}E; the update is `fnbp.optim.sgd(1.0)`.")
    c.add("output σ₃ of hidden unit 3", None, o[3], hidden[0])
    c.add("output σ₄ of hidden unit 4", None, o[4], hidden[1])
    c.add("output u₅", None, o[5], u[0])
    c.add("E = ½(y − u₅)²", None, E, E_f)
    c.add("δ₅ = (y − u₅)u₅(1 − u₅)", None, d5, -grads[1]["b"][0])
    c.add("δ₃ = σ₃(1 − σ₃)δ₅w(3,5)", None, d3, -grads[0]["b"][0])
    c.add("δ₄ = σ₄(1 − σ₄)δ₅w(4,5)", None, d4, -grads[0]["b"][1])
    fnbp_new = {(1, 3): new[0]["W"][0, 0], (2, 3): new[0]["W"][0, 1], (1, 4): new[0]["W"][1, 0],
                (2, 4): new[0]["W"][1, 1], (0, 3): new[0]["b"][0], (0, 4): new[0]["b"][1],
                (3, 5): new[1]["W"][0, 0], (4, 5): new[1]["W"][0, 1], (0, 5): new[1]["b"][0]}
    for key in sorted(w, key=lambda k: (k[1], k[0])):
        c.add(f"new w{key} (was {w[key]:g})", None, w_new[key], fnbp_new[key])
    c.add("new σ₃, σ₄", None, [o_new[3], o_new[4]],
          fnbp.mlp.apply(new[:1], x, activation=sig, output=sig))
    c.add("new output u₅ after one step", None, o_new[5], u_new[0])
    c.add("new E", None, E_new, loss(u_new, d))
    assert E_new < E


def parameter_count(c, fnbp):
    """Notes 001: MLP with 3 hidden layers of 100 units on 40x40 images, 10 classes."""
    sizes = (1600, 100, 100, 100, 10)
    independent = (1600 + 1) * 100 + (100 + 1) * 100 + (100 + 1) * 100 + (100 + 1) * 10
    shapes = jax.eval_shape(lambda k: fnbp.mlp.init(k, sizes), jax.random.PRNGKey(0))
    leaves = sum(math.prod(s.shape) for s in jax.tree_util.tree_leaves(shapes))
    c.section("Parameter count (notes 001)",
              "3 hidden layers of 100 units, 40×40 inputs, 10 classes: Σ_k (n_{k−1} + 1)·n_k.  fnbp: "
              "`fnbp.mlp.num_params` and the number of entries of the parameters `fnbp.mlp.init` builds.")
    c.add("parameters of 1600-100-100-100-10 (num_params)", "181310", independent, fnbp.mlp.num_params(sizes),
          exact=True)
    c.add("entries of fnbp.mlp.init(…) parameters", "181310", independent, leaves, exact=True)


# The notes' OR table: (w before, input (x0, x1, x2), sum, output u, label y, w after) for steps 1..10.
OR_TABLE = [
    ((0, 1, -1), (1, 0, 0), 0, 0, 0, (0, 1, -1)),
    ((0, 1, -1), (1, 0, 1), -1, 0, 1, (1, 1, 0)),
    ((1, 1, 0), (1, 1, 0), 2, 1, 1, (1, 1, 0)),
    ((1, 1, 0), (1, 1, 1), 2, 1, 1, (1, 1, 0)),
    ((1, 1, 0), (1, 0, 0), 1, 1, 0, (0, 1, 0)),
    ((0, 1, 0), (1, 0, 1), 0, 0, 1, (1, 1, 1)),
    ((1, 1, 1), (1, 1, 0), 2, 1, 1, (1, 1, 1)),
    ((1, 1, 1), (1, 1, 1), 3, 1, 1, (1, 1, 1)),
    ((1, 1, 1), (1, 0, 0), 1, 1, 0, (0, 1, 1)),
    ((0, 1, 1), (1, 0, 1), 1, 1, 1, (0, 1, 1)),
]


def perceptron_examples(c, fnbp):
    """Notes 001: one step of the perceptron rule, and the OR table."""
    from fnbp import perceptron
    # One step: y = 0, w = (w0, w1, w2) = (-1, 0.5, 0.3), x = (2, 1), c = 1.
    w, xs, y = (-1.0, 0.5, 0.3), (2.0, 1.0), 0.0
    s = w[0] * 1 + w[1] * xs[0] + w[2] * xs[1]
    u = 1.0 if s > 0 else 0.0
    w_new = tuple(wi + 1.0 * (y - u) * xi for wi, xi in zip(w, (1.0,) + xs))
    w_f, u_f = perceptron.update(jnp.array(w), jnp.array(xs), y, c=1.0)
    c.section("Perceptron learning rule (notes 001)",
              "One step: y = 0, w = (w₀, w₁, w₂) = (−1, 0.5, 0.3), x = (2, 1), x₀ = 1, c = 1: "
              "Σ w_i x_i = 0.3 > 0 so u = 1 and ΔW_i = c(y − u)X_i.  fnbp: `fnbp.perceptron.net_input`, "
              "`fnbp.perceptron.update`.")
    c.add("Σ_i w_i x_i", "0.3", s, perceptron.net_input(jnp.array(w), jnp.array(xs)))
    c.add("output u = F(x, W)", "1", u, u_f)
    c.add("new (w₀, w₁, w₂)", ("-2", "-1.5", "-0.7"), w_new, w_f)

    # OR table: independent plain-Python loop vs fnbp.perceptron.train.
    x_or, y_or = fnbp.data.toy("or")
    epochs = 5
    w_ind, rows_ind = [0.0, 1.0, -1.0], []
    for _ in range(epochs):
        for (a, b), t in zip(x_or.tolist(), y_or.tolist()):
            inp = (1.0, a, b)
            s = sum(wi * xi for wi, xi in zip(w_ind, inp))
            out = 1.0 if s > 0 else 0.0
            before = tuple(w_ind)
            w_ind = [wi + 1.0 * (t - out) * xi for wi, xi in zip(w_ind, inp)]
            rows_ind.append((before, inp, s, out, float(t), tuple(w_ind)))
    res = perceptron.train(jnp.array([0.0, 1.0, -1.0]), x_or, y_or, c=1.0, epochs=epochs)
    tr = jax.tree_util.tree_map(np.asarray, res.trace)
    c.section("Perceptron learning the logical OR (notes 001 table)",
              "w = (w₀, w₁, w₂) = (0, 1, −1), examples in binary order 00, 01, 10, 11, c = 1.  Each row flattens "
              "(w before; input (x₀, x₁, x₂); Σ w_i x_i; output u; label y; w after) of one step of the notes' "
              "table.  fnbp: `fnbp.perceptron.train` (its trace); independent: a plain-Python loop.")
    for k, row in enumerate(OR_TABLE):
        flat = lambda r: [*r[0], *r[1], r[2], r[3], r[4], *r[5]]  # noqa: E731
        printed = tuple(str(v) for v in flat(row))
        fn_row = (tr.weights_before[k], tr.input[k], tr.net[k], tr.output[k], tr.target[k], tr.weights[k])
        fn_flat = [*fn_row[0], *fn_row[1], fn_row[2], fn_row[3], fn_row[4], *fn_row[5]]
        c.add(f"step {k + 1}", printed, flat(rows_ind[k]), fn_flat, exact=True)
    last_change_ind = max(i + 1 for i, r in enumerate(rows_ind) if r[0] != r[5])
    changed = np.any(tr.weights_before != tr.weights, axis=1)
    last_change_f = int(np.flatnonzero(changed).max()) + 1
    errors_ind = [sum(r[3] != r[4] for r in rows_ind[e * 4:(e + 1) * 4]) for e in range(epochs)]
    first_clean_ind = next(e + 1 for e, n in enumerate(errors_ind) if n == 0)
    c.add("last step that changes w ('no more changes from here')", "9", last_change_ind, last_change_f, exact=True)
    c.add("first error-free epoch (the procedure stops after it)", None, first_clean_ind,
          int(res.converged_epoch), exact=True)
    c.add("final weights (w₀, w₁, w₂)", ("0", "1", "1"), w_ind, res.weights, exact=True)
    return {"or_trace_markdown": perceptron.format_trace(res.trace, max_steps=4 * first_clean_ind)}


# Matt Mazur, "A Step by Step Backpropagation Example" (2015), linked from notes 001.
MAZUR = {
    "net_h1": "0.3775", "out_h1": "0.593269992", "out_h2": "0.596884378", "out_o1": "0.75136507",
    "out_o2": "0.772928465", "E_o1": "0.274811083", "E_o2": "0.023560026", "E_total": "0.298371109",
    "dE_dw5": "0.082167041", "dE_dw1": "0.000438568",
    "w5": "0.35891648", "w6": "0.408666186", "w7": "0.511301270", "w8": "0.561370121",
    "w1": "0.149780716", "w2": "0.19956143", "w3": "0.24975114", "w4": "0.29950229",
    "E_total_after": "0.291027924",
}


def mazur_example(c, fnbp):
    """The classic 2-2-2 sigmoid step-by-step example (Mazur 2015), biases held fixed."""
    i1, i2, t1, t2, eta = 0.05, 0.10, 0.01, 0.99, 0.5
    w1, w2, w3, w4, b1 = 0.15, 0.20, 0.25, 0.30, 0.35
    w5, w6, w7, w8, b2 = 0.40, 0.45, 0.50, 0.55, 0.60

    # --- independent: the blog's chain rule, written out with math.exp ---
    def forward(w1, w2, w3, w4, w5, w6, w7, w8):
        net_h1, net_h2 = w1 * i1 + w2 * i2 + b1, w3 * i1 + w4 * i2 + b1
        h1, h2 = sigmoid(net_h1), sigmoid(net_h2)
        o1, o2 = sigmoid(w5 * h1 + w6 * h2 + b2), sigmoid(w7 * h1 + w8 * h2 + b2)
        E1, E2 = 0.5 * (t1 - o1) ** 2, 0.5 * (t2 - o2) ** 2
        return net_h1, h1, h2, o1, o2, E1, E2

    net_h1, h1, h2, o1, o2, E1, E2 = forward(w1, w2, w3, w4, w5, w6, w7, w8)
    d_o1 = (o1 - t1) * o1 * (1 - o1)                      # ∂E/∂net_o1
    d_o2 = (o2 - t2) * o2 * (1 - o2)
    dw5, dw6, dw7, dw8 = d_o1 * h1, d_o1 * h2, d_o2 * h1, d_o2 * h2
    d_h1 = (d_o1 * w5 + d_o2 * w7) * h1 * (1 - h1)          # ∂E/∂net_h1 (old w5, w7)
    d_h2 = (d_o1 * w6 + d_o2 * w8) * h2 * (1 - h2)
    dw1, dw2, dw3, dw4 = d_h1 * i1, d_h1 * i2, d_h2 * i1, d_h2 * i2
    new = [w - eta * g for w, g in zip((w1, w2, w3, w4, w5, w6, w7, w8), (dw1, dw2, dw3, dw4, dw5, dw6, dw7, dw8))]
    E_after = sum(forward(*new)[5:])

    # --- fnbp ---
    params = [{"W": jnp.array([[w1, w2], [w3, w4]]), "b": jnp.array([b1, b1])},
              {"W": jnp.array([[w5, w6], [w7, w8]]), "b": jnp.array([b2, b2])}]
    x, d = jnp.array([i1, i2]), jnp.array([t1, t2])
    sig, loss = fnbp.sigmoid, fnbp.losses.half_sse
    hidden = fnbp.mlp.apply(params[:1], x, activation=sig, output=sig)
    out = fnbp.mlp.apply(params, x, activation=sig, output=sig)
    E_f, grads = fnbp.backprop(params, x, d, activation=sig, output=sig, loss=loss)
    grads_ad = jax.grad(lambda p: loss(fnbp.mlp.apply(p, x, activation=sig, output=sig), d))(params)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_ad)))
    assert diff <= 1e-15, f"fnbp.backprop and jax.grad through fnbp.mlp.apply differ by {diff}"
    weights_only = [{"W": g["W"], "b": jnp.zeros_like(g["b"])} for g in grads]     # biases held fixed
    opt = fnbp.optim.sgd(eta)
    updates, _ = opt.update(weights_only, opt.init(params), params)
    new_p = fnbp.optim.apply_updates(params, updates)
    E_after_f = loss(fnbp.mlp.apply(new_p, x, activation=sig, output=sig), d)
    assert bool(jnp.all(new_p[0]["b"] == params[0]["b"])) and bool(jnp.all(new_p[1]["b"] == params[1]["b"]))

    c.section("The classic 2-2-2 step-by-step example (Mazur 2015, linked from notes 001)",
              "Inputs (0.05, 0.10), targets (0.01, 0.99), W1 = [[0.15, 0.20], [0.25, 0.30]] (w1..w4), b1 = 0.35, "
              "W2 = [[0.40, 0.45], [0.50, 0.55]] (w5..w8), b2 = 0.60, sigmoid units, E = Σ ½(target − out)², one "
              "gradient step with η = 0.5 on the weights (biases held fixed, as in the blog), all gradients at the "
              "old weights.  Published numbers from mattmazur.com/2015/03/17/a-step-by-step-backpropagation-example.  "
              "fnbp: `fnbp.mlp.apply`, `fnbp.backprop` (= `jax.grad` through `fnbp.mlp.apply` to "
              f"{diff:.0e}, asserted) and `fnbp.optim.sgd(0.5)` with the bias gradients zeroed.  "
              "**The blog's 'error after the first round', 0.291027924, is not the error of its own updated "
              "weights** (that is 0.2910277737): it is reproduced to all 9 digits only when the hidden-layer δ's "
              "are computed with the already-updated w5..w8 -- which the blog's text says not to do, and which "
              "would change w1 to 0.14981764 instead of the published 0.149780716.")
    m = MAZUR
    c.add("net_h1", m["net_h1"], net_h1, fnbp.dense(params[0]["W"], params[0]["b"], x)[0])
    c.add("out_h1", m["out_h1"], h1, hidden[0])
    c.add("out_h2", m["out_h2"], h2, hidden[1])
    c.add("out_o1", m["out_o1"], o1, out[0])
    c.add("out_o2", m["out_o2"], o2, out[1])
    c.add("E_o1", m["E_o1"], E1, loss(out[:1], d[:1]))
    c.add("E_o2", m["E_o2"], E2, loss(out[1:], d[1:]))
    c.add("E_total (initial error)", m["E_total"], E1 + E2, E_f)
    c.add("∂E_total/∂w5", m["dE_dw5"], dw5, grads[1]["W"][0, 0])
    c.add("∂E_total/∂w1", m["dE_dw1"], dw1, grads[0]["W"][0, 0])
    fn_new = [new_p[0]["W"][0, 0], new_p[0]["W"][0, 1], new_p[0]["W"][1, 0], new_p[0]["W"][1, 1],
              new_p[1]["W"][0, 0], new_p[1]["W"][0, 1], new_p[1]["W"][1, 0], new_p[1]["W"][1, 1]]
    for k in (5, 6, 7, 8, 1, 2, 3, 4):
        c.add(f"updated w{k}", m[f"w{k}"], new[k - 1], fn_new[k - 1])
    c.add("E_total after the step (every gradient at the old weights, as the published w1..w8)", None,
          E_after, E_after_f)

    # The blog's "error after the first round" is what its code gives when the hidden-layer deltas use the
    # *already updated* w5..w8 (its text says to use the old ones, and its printed w1..w4 do).  Recompute
    # that variant: independently, and with fnbp's rules (dense_backward with the new W2, sigmoid's bwd).
    d_h1s = (d_o1 * new[4] + d_o2 * new[6]) * h1 * (1 - h1)
    d_h2s = (d_o1 * new[5] + d_o2 * new[7]) * h2 * (1 - h2)
    new_seq = [w - eta * g for w, g in zip((w1, w2, w3, w4), (d_h1s * i1, d_h1s * i2, d_h2s * i1, d_h2s * i2))]
    E_after_seq = sum(forward(*new_seq, *new[4:])[5:])
    delta_o = grads[1]["b"]                                                   # ∂E/∂net_o, old forward pass
    _, _, grad_h = fnbp.layers.dense_backward((new_p[1]["W"], hidden), delta_o)  # W2_newᵀ δ_o
    (delta_h,) = fnbp.sigmoid.rule.bwd(hidden, grad_h)                         # ⊙ h (1 − h)
    gW1, _, _ = fnbp.layers.dense_backward((params[0]["W"], x), delta_h)
    seq_p = [{"W": params[0]["W"] - eta * gW1, "b": params[0]["b"]}, new_p[1]]
    E_after_seq_f = loss(fnbp.mlp.apply(seq_p, x, activation=sig, output=sig), d)
    c.add("E_total after the step, hidden δ computed with the already-updated w5..w8 (the blog's code)",
          m["E_total_after"], E_after_seq, E_after_seq_f)
    c.add("… and its w1 (≠ published w1: this variant is not the blog's stated procedure)", None,
          new_seq[0], seq_p[0]["W"][0, 0])
    return {"mazur_error_after": {"simultaneous": E_after, "sequential": E_after_seq,
                                  "published": float(m["E_total_after"])}}


# ----------------------------------------------------------------------------- main
def compute():
    """Run every worked example; returns (Checks, extra data).  Needs float64 (enabled here)."""
    jax.config.update("jax_enable_x64", True)
    import fnbp
    import fnbp.data  # noqa: F401
    import fnbp.layers  # noqa: F401
    c = Checks()
    extra = {}
    chain_rule_log_xy(c)
    extra.update(sigmoid_forward(c, fnbp))
    softmax_cross_entropy(c, fnbp)
    squared_error(c, fnbp)
    sigmoid_exercise(c, fnbp)
    parameter_count(c, fnbp)
    extra.update(perceptron_examples(c, fnbp))
    extra.update(mazur_example(c, fnbp))
    return c, extra


def main(argv=None):
    args = common.parse_args("Every worked number of the notes: fnbp beside an independent computation "
                             "and the printed value.", argv)
    with common.Timer() as timer:
        c, extra = compute()
    rows = c.rows()
    n_ok = sum(r["ok"] for r in rows)
    n_printed = sum(r["printed"] != "—" for r in rows)
    n_printed_ok = sum(r["ok"] for r in rows if r["printed"] != "—")
    headline = (f"{n_ok}/{len(rows)} quantities: fnbp = independent computation (rel. {REL_TOL:g}); "
                f"{n_printed_ok}/{n_printed} printed numbers reproduced to their printed precision")
    for r in rows:
        status = "ok " if r["ok"] else "FAIL"
        print(f"[{status}] {r['section'][:40]:40s} | {r['quantity'][:45]:45s} | printed {r['printed'][:30]:30s} | "
              f"independent {_fmt_values(r['independent'])[:40]:40s} | fnbp {_fmt_values(r['fnbp'])[:40]}")
    print(headline)
    md = ["# Worked examples of the notes, recomputed",
          "",
          "Each quantity is computed by fnbp and independently (plain Python `math`, or `jax.grad` of a plain "
          "function), and compared with the number printed in the notes or the published example, to its "
          "printed precision ('notes truncate': the printed digits are the value cut, not rounded).  "
          "Everything in float64; the script asserts every row.",
          "",
          f"**{headline}.**",
          "",
          c.markdown(),
          "### The OR run as `fnbp.perceptron.format_trace` prints it (up to the first error-free epoch)",
          "",
          extra["or_trace_markdown"]]
    common.write_results(args.out, NAME, "\n".join(md),
                         {"headline": headline, "n_ok": n_ok, "n_rows": len(rows), "rows": rows,
                          "A_transposed_convention": extra["A_transposed_convention"]},
                         args=args, seconds=timer.seconds)
    bad = [r for r in rows if not r["ok"]]
    assert not bad, "mismatches: " + "; ".join(f"{r['section']}: {r['quantity']} ({r['match']})" for r in bad)
    return 0


if __name__ == "__main__":
    sys.exit(main())
