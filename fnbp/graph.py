"""One network walker: a network is a DAG of nodes, each applying one rule (notes 003).

A node applies ONE function made by ``fnbp.rule`` to argument references --

    "name" / Out("name")   the output of an earlier node (a plain string names an earlier node,
                           else a network input)
    Input("x")             a network input (x, the target d, a dropout key, the L2 lambda ...)
    Param(0, "W")          a parameter leaf (or subtree) by its path into the params pytree
    State(0, "mean")       running statistics (batch norm) by their path into the state pytree
    Const(0.2)             a constant (a leaky slope, a dropout probability): no gradient

-- plus static options (the keyword-only options of the rule's fwd: reduction, eps, stride).
Auxiliary nodes (``aux=True``: a dropout key ``fold_in``, running batch-norm statistics)
are plain functions outside differentiation.

Two ways to run the same graph:

* ``apply``: calls each node's function -- the ``jax.custom_vjp`` ops -- so ``jax.grad``
  through it runs the hand-written rules (and any plain function is accepted);
* ``forward`` + ``backward``: the notes' general back-propagation, with no autodiff at all.
  ``forward`` calls each node's ``rule.fwd`` and keeps its residuals (the tape);
  ``backward`` sets ``grad_table[z] = 1`` and visits the nodes in reverse topological
  order; each node's ``rule.bwd`` turns the cotangent of its output D into one
  cotangent per argument, G^(i) = op.bprop(inputs, V, D), and the grad_table *sums*
  the G^(i) arriving at every node, input and parameter from all its consumers
  (``build_grad``: G = sum_i G^(i)).

Everything here runs in Python at trace time only: under ``jax.jit`` the graph is
static structure and the compiled program is the rules' arithmetic.
"""
import dataclasses
import functools
import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from .rules import rule_of

__all__ = ["Out", "Input", "Param", "State", "Const", "Node", "Graph", "node", "make", "apply", "forward",
           "backward", "accumulate", "value_and_grad", "Tape", "Gradients", "NodeTrace", "Trace", "trace", "key_name"]


class Out(NamedTuple):
    """The output of an earlier node, by its name (a plain string argument means the same)."""
    node: str


class Input(NamedTuple):
    """A network input by name: "x", the target "d", a dropout "key", the L2 lambda "l2"."""
    name: str


class _Path(NamedTuple):
    path: tuple


class Param(_Path):
    """A parameter leaf or subtree: ``Param(0, "W")`` is ``params[0]["W"]``, ``Param()`` all of params."""
    __slots__ = ()

    def __new__(cls, *path):
        return super().__new__(cls, tuple(path))


class State(_Path):
    """Running statistics by path into the state pytree: ``State(0, "mean")``."""
    __slots__ = ()

    def __new__(cls, *path):
        return super().__new__(cls, tuple(path))


class Const(NamedTuple):
    """A constant argument (a leaky slope, a dropout probability, a layer index): it gets no gradient."""
    value: Any


class Node(NamedTuple):
    """One node: ``name = op(*args, **options)`` (make it with :func:`node`)."""
    name: str
    op: Callable            # a function made by fnbp.rule (any function for aux nodes and in ``apply``)
    args: tuple             # references: Out, Input, Param, State, Const
    options: tuple          # ((option, value), ...): static keywords for fwd and bwd
    aux: bool = False       # auxiliary: computed, never differentiated (keys, running statistics)


class Graph(NamedTuple):
    """A network: nodes in topological order, the output node's name, and the running-statistics updates
    (make it with :func:`make`)."""
    nodes: tuple
    output: str                 # the node whose output the network returns (y, or the scalar E)
    state_updates: tuple = ()   # ((state path, node name), ...): new running statistics


def _op_name(op):
    r = rule_of(op)
    if r is not None:
        return r.name
    fn = op.func if isinstance(op, functools.partial) else op
    return getattr(fn, "__name__", repr(fn))


def node(name, op, *args, aux=False, **kwargs):
    """A node ``name = op(*args, **kwargs)``.  For a rule, arguments are bound to the
    rule's fwd signature (a ``functools.partial``'s keywords included): positional
    parameters become argument references (a value that is not a reference becomes a
    ``Const``), keyword-only ones static options with their defaults filled in."""
    r = None if aux else rule_of(op)
    if r is None:           # a plain function: arguments as given
        return Node(name, op, tuple(a if _is_ref(a) else Const(a) for a in args), tuple(kwargs.items()), aux)
    while isinstance(op, functools.partial):
        args, kwargs, op = op.args + tuple(args), {**op.keywords, **kwargs}, op.func
    sig = inspect.signature(r.fwd)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"fnbp.graph.node {name!r}: {r.name}: {e}") from None
    bound.apply_defaults()
    refs, options = [], []
    for p in sig.parameters.values():
        v = bound.arguments[p.name]
        if p.kind == p.KEYWORD_ONLY:
            options.append((p.name, v))
        else:
            refs.append(v if _is_ref(v) else Const(v))
    return Node(name, op, tuple(refs), tuple(options), aux)


def _is_ref(a):
    return isinstance(a, (str, Out, Input, Param, State, Const))


def make(nodes, output, state_updates=()):
    """A ``Graph`` from nodes in topological order; a string argument names an earlier
    node's output, or else a network input.  Raises ValueError on a repeated name, an unknown output
    or a reference to a node that is not earlier."""
    seen, out = set(), []
    for n in nodes:
        if n.name in seen:
            raise ValueError(f"fnbp.graph.make: two nodes are named {n.name!r}")
        out.append(n._replace(args=tuple(_resolve(n, a, seen) for a in n.args)))
        seen.add(n.name)
    for name in (output,) + tuple(u[1] for u in state_updates):
        if name not in seen:
            raise ValueError(f"fnbp.graph.make: no node named {name!r} (nodes: {sorted(seen)})")
    return Graph(tuple(out), output, tuple((tuple(p), s) for p, s in state_updates))


def _resolve(n, a, seen):
    if isinstance(a, str):
        return Out(a) if a in seen else Input(a)
    if isinstance(a, Out) and a.node not in seen:
        raise ValueError(f"fnbp.graph.make: node {n.name!r} uses {a.node!r}, which is not an earlier node")
    return a


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _values(n, values, params, inputs, state, who):
    out = []
    for a in n.args:
        if isinstance(a, Out):
            out.append(values[a.node])
        elif isinstance(a, Input):
            if inputs.get(a.name) is None:
                raise ValueError(f"{who}: node {n.name!r} needs the network input {a.name!r}, not given "
                                 f"(inputs: {sorted(k for k, v in inputs.items() if v is not None)})")
            out.append(inputs[a.name])
        elif isinstance(a, Param):
            out.append(_get(params, a.path))
        elif isinstance(a, State):
            if state is None:
                raise ValueError(f"{who}: node {n.name!r} needs the running statistics (state), none given")
            out.append(_get(state, a.path))
        else:
            out.append(a.value)
    return tuple(out)


def _stop(v):
    return jax.tree_util.tree_map(
        lambda x: jax.lax.stop_gradient(x) if jnp.issubdtype(jnp.result_type(x), jnp.inexact) else x, v)


def _new_state(net, values, state):
    """The state with each update written at its path (containers copied, never mutated)."""
    def put(tree, path, v):
        if not path:
            return v
        if isinstance(tree, dict):
            return {**tree, path[0]: put(tree[path[0]], path[1:], v)}
        items = list(tree)
        items[path[0]] = put(items[path[0]], path[1:], v)
        return type(tree)(items) if isinstance(tree, list) else tuple(items)
    for path, name in net.state_updates:
        state = put(state, path, values[name])
    return state


def apply(net, params, inputs, state=None):
    """Run the graph by calling each node's function (custom_vjp ops: ``jax.grad`` runs the
    rules).  Returns ``(output, new_state)``."""
    values = {}
    for n in net.nodes:
        args = _values(n, values, params, inputs, state, "fnbp.graph.apply")
        if n.aux:
            args = tuple(_stop(a) for a in args)
        values[n.name] = n.op(*args, **dict(n.options))
    return values[net.output], _new_state(net, values, state)


class Tape(NamedTuple):
    """What ``forward`` keeps for ``backward``: each node's argument values, output and residuals."""
    net: Graph
    params: Any
    inputs: dict
    args: dict              # node name -> tuple of argument values (as used)
    values: dict            # node name -> output
    residuals: dict         # node name -> the rule's residuals
    new_state: Any


def forward(net, params, inputs, state=None, *, who="fnbp.graph.forward"):
    """The explicit forward: each node's ``rule.fwd`` (after the rule's shape checks),
    keeping its residuals.  Returns ``(output, tape)``; ``tape.new_state`` holds the
    updated running statistics.  Raises ValueError naming a node whose op has no rule."""
    values, residuals, used = {}, {}, {}
    for n in net.nodes:
        args = _values(n, values, params, inputs, state, who)
        options = dict(n.options)
        if n.aux:
            values[n.name] = n.op(*args, **options)
            continue
        r = rule_of(n.op)
        if r is None:
            raise ValueError(f"{who}: node {n.name!r}: {_op_name(n.op)!r} has no hand-written rule (make one "
                             f"with fnbp.rule(fwd, bwd), or use one of fnbp's ops; jax.grad through "
                             f"fnbp.graph.apply accepts any function)")
        check = getattr(n.op, "check", None)
        if check is not None:
            check(*args, **options)
        values[n.name], residuals[n.name] = r.fwd(*args, **options)
        used[n.name] = args
    return values[net.output], Tape(net, params, inputs, used, values, residuals,
                                    _new_state(net, values, state))


class Gradients(NamedTuple):
    """What ``backward`` returns."""
    params: Any             # structured like params (zeros where no gradient arrives)
    inputs: dict            # network input name -> cotangent (only inputs that received one)
    grad_table: dict        # key_name(reference) -> summed cotangent, for every node, input and parameter
    nodes: dict             # node name -> (grad_output, grad_inputs)


def accumulate(a, b):
    """The notes' G <- sum_i G^(i), one consumer at a time (leaf by leaf for a pytree)."""
    return jax.tree_util.tree_map(jnp.add, a, b)


def _as_primal_type(ct, x):
    """A cotangent in its primal's dtype (leaf by leaf for a pytree argument)."""
    def cast(c, v):
        dtype = jnp.result_type(v)
        return c if c is None or jnp.result_type(c) == dtype else jnp.asarray(c).astype(dtype)
    return jax.tree_util.tree_map(cast, ct, x, is_leaf=lambda c: c is None)


def backward(tape, g=None, *, who="fnbp.graph.backward"):
    """The notes' back-propagation: grad_table[z] <- g (default 1), then for each node
    in reverse order, its rule's bwd and the sum of the cotangents over all consumers."""
    net = tape.net
    z = tape.values[net.output]
    table = {_key(Out(net.output)): jnp.ones_like(z) if g is None else g}
    per_node = {}
    for n in reversed(net.nodes):
        D = table.get(_key(Out(n.name)))
        if n.aux or D is None:                  # auxiliary, or no consumer on a gradient path
            continue
        r = rule_of(n.op)
        cts = r.bwd(tape.residuals[n.name], D, **dict(n.options))
        cts = tuple(cts) if isinstance(cts, (tuple, list)) else (cts,)
        if len(cts) != len(n.args):
            raise ValueError(f"{who}: rule {r.name!r} of node {n.name!r} returned {len(cts)} cotangents for "
                             f"{len(n.args)} arguments; return one per argument, None for those without")
        cts = tuple(None if ct is None else _as_primal_type(ct, x) for ct, x in zip(cts, tape.args[n.name]))
        per_node[n.name] = (D, cts)
        for ref, G in zip(n.args, cts):         # G^(i) = op.bprop(inputs, V, D)
            if G is None or isinstance(ref, Const):
                continue
            key = _key(ref)
            table[key] = accumulate(table[key], G) if key in table else G      # G = sum_i G^(i)
    refs = [(r, v) for (_, r), v in table.items()]
    grads = _param_grads(tape.params, {r.path: v for r, v in refs if isinstance(r, Param)})
    inputs = {r.name: v for r, v in refs if isinstance(r, Input)}
    return Gradients(grads, inputs, {key_name(r): v for r, v in refs}, per_node)


def _key(ref):
    return type(ref).__name__, ref


def _param_grads(params, direct):
    """Gradients structured like params: each leaf sums the cotangents sent to it directly
    and to any subtree holding it (e.g. the L2 penalty's); zeros where none arrived."""

    def build(tree, path, inherited):
        here = direct.get(path)
        if isinstance(tree, (dict, list, tuple)):
            keys = tree.keys() if isinstance(tree, dict) else range(len(tree))
            sub = {k: build(tree[k], path + (k,), _sub(here, k, inherited)) for k in keys}
            if isinstance(tree, dict):
                return sub
            items = [sub[k] for k in keys]
            return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
        parts = [v for v in (here, inherited) if v is not None]
        return functools.reduce(jnp.add, parts) if parts else jnp.zeros_like(tree)

    return build(params, (), None)


def _sub(here, k, inherited):
    parts = [t[k] for t in (here, inherited) if t is not None]
    return functools.reduce(accumulate, parts) if parts else None


def key_name(ref):
    """A grad_table key as text: a node's name, an input's name, ``params[0]['W']``, ``state[0]``."""
    if isinstance(ref, (Out, Input)):
        return ref[0]
    kind = "params" if isinstance(ref, Param) else "state"
    return kind + "".join(f"[{k!r}]" for k in ref.path)


def value_and_grad(net, params, inputs, state=None, *, explicit=True, g=None, who="fnbp.graph.value_and_grad"):
    """``((output, new_state), grads)`` with grads structured like params: by the explicit
    walker (``explicit=True``) or by ``jax.value_and_grad`` through ``apply``."""
    if explicit:
        out, tape = forward(net, params, inputs, state, who=who)
        return (out, tape.new_state), backward(tape, g, who=who).params
    return jax.value_and_grad(lambda p: apply(net, p, inputs, state), has_aux=True)(params)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["inputs", "output", "grad_output", "grad_inputs"],
                   meta_fields=["op"])
@dataclasses.dataclass(frozen=True)
class NodeTrace:
    """One node of a trace: its op's name, the argument values as used, its output, the
    cotangent arriving at its output (for a dense node: delta = grad_a E), and the
    cotangents it sent back (None for constants and integer inputs)."""
    op: str
    inputs: tuple
    output: Any
    grad_output: Any
    grad_inputs: tuple


class Trace(NamedTuple):
    """Per node its ``NodeTrace``, and the grad_table (what ``trace=True`` returns)."""
    nodes: dict             # node name -> NodeTrace
    grad_table: dict        # key_name(reference) -> summed cotangent (nodes, inputs, parameters)


def trace(tape, grads):
    """The ``Trace`` of a forward/backward pair: a ``NodeTrace`` for every differentiated node
    (grad_output and grad_inputs None where no gradient reached) and the grad_table."""
    out = {}
    for n in tape.net.nodes:
        if n.aux:
            continue
        D, cts = grads.nodes.get(n.name, (None, (None,) * len(n.args)))
        out[n.name] = NodeTrace(rule_of(n.op).name, tape.args[n.name], tape.values[n.name], D, cts)
    return Trace(out, grads.grad_table)
