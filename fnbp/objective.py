"""The training objective as nodes of the walker's graph: E = L(y; d) (+ lambda Omega).

``objective(net, loss, l2=...)`` appends the loss node (and the L2 penalty's) to a network's graph, so the
explicit walker and ``jax.grad`` differentiate the objective like any other node.  (Kept out of
``fnbp.graph``, which depends on the rule type alone.)
"""
from . import graph, losses, ops

__all__ = ["objective"]


def objective(net, loss, *, l2=False):
    """The network with its training objective appended: node "E" = L(y; d) (y the network's
    output, d the input "d"), or with ``l2``: "L" = L(y; d), "penalty" = lambda Omega(params)
    (lambda the input "l2", Omega over every leaf named "W") and "E" = L + penalty.
    ``loss`` is a loss spec (``fnbp.losses.loss_spec``) or anything it parses."""
    spec = loss if isinstance(loss, losses.LossSpec) else losses.loss_spec(loss, name="fnbp.objective")
    options = {"reduction": spec.reduction} if spec.takes_reduction else {}
    data = "L" if l2 else "E"
    nodes = list(net.nodes) + [graph.node(data, spec.fn, graph.Out(net.output), graph.Input("d"), **options)]
    if l2:
        nodes += [graph.node("penalty", losses.l2_penalty, graph.Param(), graph.Input("l2")),
                  graph.node("E", ops.add, "L", "penalty")]
    return graph.make(nodes, "E", net.state_updates)
