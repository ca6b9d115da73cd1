"""Computational graphs and their grad_table: the notes' general back-propagation, node by node.

1. The notes' opening example f(x, y) = log(xy), split as v = xy, w = log v, z = w: a
   three-node graph (``fnbp.ops.mul``, ``fnbp.ops.log``, ``fnbp.identity``) run by the explicit
   walker ``fnbp.graph.forward``/``backward``.  Its grad_table holds dz/dw = 1, dz/dv = 1/v,
   dz/dx = y/v = 1/x and dz/dy = x/v = 1/y, each checked against plain-Python arithmetic
   (``math.log`` and a central finite difference).
2. Fan-out: the skip-connection network (``fnbp.skip``), where h1 feeds two nodes and its
   grad_table entry is the *sum* of what the two consumers send back (``build_grad``).
3. Each graph drawn with its values and gradients as a PNG (micrograd's ``draw_dot`` is the
   model: one box per node with its value and gradient; laid out with networkx, drawn with
   matplotlib).

    python experiments/graph.py            # writes experiments/results/graph.{md,json}, graph_*.png
    python -m experiments.graph --out /tmp/x
"""
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import common  # noqa: E402

NAME = "graph"


def log_xy_graph():
    """v = x y, w = log v, z = w (the notes' split of f(x, y) = log(xy))."""
    import fnbp
    from fnbp import graph, ops
    return graph.make([graph.node("v", ops.mul, "x", "y"),
                       graph.node("w", ops.log, "v"),
                       graph.node("z", fnbp.identity, "w")], "z")


def log_xy(x, y):
    """(z, Trace) of the log(xy) graph by the explicit walker (grad_table[z] = 1)."""
    from fnbp import graph
    net = log_xy_graph()
    z, tape = graph.forward(net, {}, {"x": jnp.asarray(x, jnp.float64), "y": jnp.asarray(y, jnp.float64)})
    return z, graph.trace(tape, graph.backward(tape))


def by_hand(x, y, h=1e-6):
    """The same quantities in plain Python: the chain rule and central finite differences of math.log(x*y)."""
    v = x * y
    f = lambda a, b: math.log(a * b)       # noqa: E731
    return {"z": math.log(v), "dz/dv": 1 / v, "dz/dx": 1 / v * y, "dz/dy": 1 / v * x,
            "fd dz/dx": (f(x + h, y) - f(x - h, y)) / (2 * h), "fd dz/dy": (f(x, y + h) - f(x, y - h)) / (2 * h)}


def fan_out(seed=0):
    """(net, Trace) of the skip-connection network on one example, and the two summands at h1."""
    import fnbp
    from fnbp import graph
    params = fnbp.skip.skip_connection_init(jax.random.key(seed), 2, 3, 2, 1, dtype=jnp.float64)
    x, d = jnp.array([0.5, -1.0]), jnp.array([0.3])
    net = fnbp.objective.objective(fnbp.skip.skip_connection_network(activation=fnbp.tanh), fnbp.losses.half_sse)
    E, tape = graph.forward(net, params, {"x": x, "d": d})
    tr = graph.trace(tape, graph.backward(tape))
    from_a2, from_skip = tr.nodes["a2"].grad_inputs[2], tr.nodes["skip"].grad_inputs[2]
    return net, tr, from_a2, from_skip


def _text(v):
    v = np.asarray(v)
    if v.size == 1:
        return f"{float(v.reshape(())):.4g}"
    if v.size <= 3:
        return "[" + ", ".join(f"{u:.3g}" for u in v.ravel()) + "]"
    return f"shape {v.shape}"


def draw(net, tr, path, title=""):
    """Draw ``net`` with each node's value and gradient (from the trace's grad_table) as a PNG."""
    import networkx as nx
    from fnbp import graph
    G, layer = nx.DiGraph(), {}
    for n in net.nodes:                      # op nodes: 1 + the deepest op node they read
        layer[n.name] = 1 + max([layer[r.node] for r in n.args if isinstance(r, graph.Out)], default=0)
    for n in net.nodes:
        record = tr.nodes.get(n.name)
        for i, ref in enumerate(n.args):
            if isinstance(ref, graph.Const):
                continue
            src = graph.key_name(ref)
            if src not in G:
                value = None if record is None else record.inputs[i]
                G.add_node(src, label=f"{src}\n{_text(value)}" + _grad(tr, src), kind="leaf")
            if not isinstance(ref, graph.Out):    # a leaf sits one column before its first consumer
                layer[src] = min(layer.get(src, layer[n.name] - 1), layer[n.name] - 1)
            G.add_edge(src, n.name)
        value = "" if record is None else _text(record.output)
        G.add_node(n.name, label=f"{n.name} = {record.op if record else 'aux'}\n{value}" + _grad(tr, n.name),
                   kind="op")
    nx.set_node_attributes(G, layer, "layer")
    pos = nx.multipartite_layout(G, subset_key="layer")
    fig, ax = common.plt.subplots(figsize=(3.0 * (max(layer.values()) + 1), 1.2 + 1.1 * max(
        sum(1 for v in layer.values() if v == k) for k in set(layer.values()))))
    nx.draw_networkx_edges(G, pos, ax=ax, arrows=True, arrowsize=14, node_size=2600)
    for name, (px, py) in pos.items():
        leaf = G.nodes[name]["kind"] == "leaf"
        ax.text(px, py, G.nodes[name]["label"], ha="center", va="center", fontsize=8,
                bbox=dict(boxstyle="round" if not leaf else "square", fc="#dde8f7" if not leaf else "#f4f4f4"))
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    return common.save_figure(fig, Path(path).parent, Path(path).name)


def _grad(tr, name):
    g = tr.grad_table.get(name)
    return "" if g is None else f"\ngrad {_text(g)}"


def main(argv=None):
    args = common.parse_args("Computational graphs with their grad_table (log(xy), fan-out), drawn.", argv)
    with common.Timer() as timer:
        x, y = 2.0, 3.0
        z, tr = log_xy(x, y)
        hand = by_hand(x, y)
        table = {k: float(v) for k, v in tr.grad_table.items()}
        rows = [("z", float(z), hand["z"], "log(xy)"),
                ("dz/dv", table["v"], hand["dz/dv"], "1/v"),
                ("dz/dx", table["x"], hand["dz/dx"], "1/x (finite difference " + f"{hand['fd dz/dx']:.10f})"),
                ("dz/dy", table["y"], hand["dz/dy"], "1/y (finite difference " + f"{hand['fd dz/dy']:.10f})")]
        for name, got, want, _ in rows:
            assert math.isclose(got, want, rel_tol=1e-14), (name, got, want)
        png_log = draw(log_xy_graph(), tr, args.out / "graph_log_xy.png", "f(x, y) = log(xy): values and grad_table")
        net, tr2, from_a2, from_skip = fan_out(args.seed)
        h1 = np.asarray(tr2.grad_table["h1"])
        assert np.allclose(h1, np.asarray(from_a2) + np.asarray(from_skip), rtol=1e-14, atol=0)
        png_skip = draw(net, tr2, args.out / "graph_skip.png", "skip connection: h1 fans out, its gradients add up")
    md = ["# Computational graphs and their grad_table", "",
          "The notes' opening example f(x, y) = log(xy), as v = xy, w = log v, z = w, run by the explicit walker "
          "(`fnbp.graph.forward`/`backward`, grad_table[z] = 1), beside plain-Python arithmetic:", "",
          common.md_table(["quantity", "grad_table (fnbp)", "by hand", "formula"],
                          [(n, f"{g:.15g}", f"{w:.15g}", f) for n, g, w, f in rows]),
          "", f"![log(xy)]({png_log.name})", "",
          "Fan-out (the skip-connection network, `fnbp.skip`): h1 feeds `a2` and `skip`; its grad_table entry is "
          "the sum of the two cotangents they send back (`build_grad`: G = Σ G⁽ⁱ⁾):", "",
          common.md_table(["from a2 (W2ᵀ δ2)", "from skip (W4ᵀ δ_y)", "grad_table[h1]"],
                          [(_text(from_a2), _text(from_skip), _text(h1))]),
          "", f"![skip connection]({png_skip.name})"]
    common.write_results(args.out, NAME, "\n".join(md),
                         {"log_xy": {n: {"fnbp": g, "by_hand": w} for n, g, w, _ in rows},
                          "fan_out": {"from_a2": from_a2, "from_skip": from_skip, "h1": h1}},
                         args=args, seconds=timer.seconds)
    print(f"log(xy) at x={x}, y={y}: dz/dx = {table['x']:.12g} (1/x = {1 / x:.12g}); wrote {png_log}, {png_skip}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
