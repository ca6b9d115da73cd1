"""Package-level promises: the import layers, no module shadowed by a function of the same name."""
import ast
import importlib
import pathlib
import pkgutil
import subprocess
import sys

import pytest

import fnbp

ROOT = pathlib.Path(__file__).resolve().parents[1] / "fnbp"


# ---------------------------------------------------------------------------------------- layering
# The layers (docs: /work/shared/reviews/target-layering.md): each layer imports only the layers listed for
# it and modules of its own layer (without a cycle).  Every module of fnbp must be listed here.
RULES, OPS, WALKER, MODELS, QUANTITIES, TRAINING, FRONT = range(7)
IMPORTS = {RULES: {RULES}, OPS: {RULES, OPS}, WALKER: {RULES, WALKER}, MODELS: {RULES, OPS, WALKER, MODELS},
           QUANTITIES: set(range(QUANTITIES + 1)), TRAINING: set(range(TRAINING + 1)), FRONT: set(range(FRONT + 1))}
LAYERS = {
    RULES: ["rules", "check_cases", "keys", "_threefry"],            # _threefry: jax.random's draws, unrolled
    OPS: ["activations", "layers", "losses", "norm", "regularization", "conv", "pool", "ops", "reference",
          "extensions", "rnn", "rnn_steps", "reference_rnn", "embeddings"],                                    # extensions: each rule's per-example extension
    WALKER: ["graph"],
    MODELS: ["mlp", "cnn", "skip", "perceptron", "nn", "nn.*", "objective"],   # objective: E = L(y; d) nodes
    QUANTITIES: ["per_example", "dp", "feedback", "curvature"],
    TRAINING: ["train", "train_checks", "optim", "optim.*", "data", "idx", "checkpoint", "_checkpoint_format",
               "parallel", "text", "charlm"],                 # charlm: a char model's training step
    FRONT: ["", "__main__", "cli", "cli_train", "_cli_model", "_cli_args", "_cli_text", "bench", "bench.*", "crosscheck",
            "checklist", "_malloc"],                        # "": the package's facade, fnbp/__init__.py
}
# Known violations, each (importer, imported): none.  (Wave 2's -- cnn -> train, the per_example <->
# per_example_conv cycle, optim._base <-> gradient_descent, graph -> losses/ops, nn.model <-> nn.layers -- are gone:
# fnbp.nn, gradient_point beside nesterov, fnbp.objective, fnbp.nn.describe.)  An entry that no longer occurs fails.
ALLOWED = set()


def _layer(module):
    for layer, names in LAYERS.items():
        for n in names:
            if module == n or (n.endswith(".*") and module.startswith(n[:-1])):
                return layer
    return None


def _module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(module, source, modules, is_package):
    """The fnbp modules ``module`` imports anywhere in its source (function bodies included): ``import``,
    ``from ... import``, ``__import__("fnbp.x")`` and ``importlib.import_module("fnbp.x")``."""
    found = set()
    here = module.split(".") if (is_package and module) else module.split(".")[:-1]

    def add(dotted):                    # dotted: relative to fnbp ("" = the package itself)
        found.add(dotted)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "fnbp":
                    add(alias.name[len("fnbp."):] if "." in alias.name else "")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = [p for p in here[:len(here) - (node.level - 1)] if p] if node.level > 1 or here else []
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "fnbp":
                target = node.module[len("fnbp."):] if "." in node.module else ""
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}".lstrip(".")
                add(sub if sub in modules else target)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and node.args[0].value.split(".")[0] == "fnbp"
              and getattr(node.func, "id", getattr(node.func, "attr", None)) in ("__import__", "import_module")):
            add(node.args[0].value[len("fnbp."):] if "." in node.args[0].value else "")
    found.discard(module)
    return found


def _import_graph(sources):
    """{module: set of imported modules} for {module: (source, is_package)}, names relative to fnbp."""
    return {m: _imports(m, src, sources, is_pkg) for m, (src, is_pkg) in sources.items()}


def _package_sources():
    return {_module_name(p): (p.read_text(), p.name == "__init__.py") for p in sorted(ROOT.rglob("*.py"))}


def _cycles(graph):
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _violations(graph, allowed=frozenset()):
    """Human-readable violations: unassigned modules, upward (or forbidden) imports, cycles."""
    problems = [f"fnbp.{m}: no layer (add it to LAYERS in tests/test_package.py)" for m in graph if _layer(m) is None]
    kept = {m: {t for t in targets if (m, t) not in allowed} for m, targets in graph.items()}
    for m, targets in sorted(kept.items()):
        for t in sorted(targets):
            lm, lt = _layer(m), _layer(t)
            if None not in (lm, lt) and lt not in IMPORTS[lm]:
                problems.append(f"fnbp.{m or '__init__'} (layer {lm}) imports fnbp.{t or '__init__'} (layer {lt})")
    problems += [f"import cycle: {' <-> '.join(c)}" for c in _cycles(kept)]
    return problems


def test_no_module_imports_a_higher_layer_and_no_cycle():
    graph = _import_graph(_package_sources())
    assert not _violations(graph, ALLOWED), "\n".join(_violations(graph, ALLOWED))
    stale = sorted(e for e in ALLOWED if e[1] not in graph.get(e[0], ()))
    assert not stale, f"ALLOWED entries that no longer occur (remove them): {stale}"
    # the graph sees top-level, lazy and __import__ edges
    assert "nn.model" in graph["nn.describe"] and "per_example" in graph["dp"] and "parallel" in graph["cli_train"]


@pytest.mark.slow
def test_an_injected_upward_import_or_cycle_fails():
    """The test above can fail: a lazy upward import in an op, a new cycle inside a layer."""
    sources = _package_sources()
    upward = dict(sources, relu_extra=("def f():\n    from . import train\n    return train\n", False))
    LAYERS[OPS].append("relu_extra")
    try:
        problems = _violations(_import_graph(upward), ALLOWED)
    finally:
        LAYERS[OPS].remove("relu_extra")
    assert problems == ["fnbp.relu_extra (layer 1) imports fnbp.train (layer 5)"]
    src, is_pkg = sources["norm"]
    cyclic = dict(sources, norm=(src + "\nfrom .ops import add\n", is_pkg))      # norm -> ops -> norm
    assert _violations(_import_graph(cyclic), ALLOWED) == ["import cycle: norm <-> ops"]
    assert "fnbp.zz_new: no layer" in _violations(_import_graph(dict(sources, zz_new=("", False))), ALLOWED)[0]
    assert _violations(_import_graph(sources)) == []          # and the package as it is has none


def test_no_module_is_shadowed_by_a_name_of_the_package():
    """``fnbp.<m>`` is the module fnbp/<m>.py itself (``from .backprop import backprop`` would hide it)."""
    for package in [fnbp, fnbp.optim]:
        for info in pkgutil.iter_modules(package.__path__):
            if info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            assert getattr(package, info.name, module) is module, f"{package.__name__}.{info.name}"


@pytest.mark.slow
def test_importing_fnbp_imports_no_optional_export_library():
    """safetensors and orbax are for the export recipes (docs/checkpoints.md), not run-time dependencies."""
    code = ("import importlib, pkgutil, sys, fnbp\n"
            "for m in pkgutil.walk_packages(fnbp.__path__, 'fnbp.'):\n"
            "    m.name.endswith('__main__') or importlib.import_module(m.name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('safetensors', 'orbax', 'tensorstore')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------- tests mirror the package
TESTS = ROOT.parent / "tests"
# A module whose tests live in another module's file, with the reason.  Everything else public has its own
# tests/test_<module>.py; a subpackage's modules (fnbp/nn/*, fnbp/optim/*, fnbp/bench/*) are tested in
# tests/test_<subpackage>*.py.
FOLDED = {
    "check_cases": "test_checklist.py",      # the registry the checklist walks
    "cli_train": "test_cli.py",              # the `fnbp train` command, run as users run it
    "rnn_steps": "test_rnn.py",              # the step-by-step teaching version, cross-checked against fnbp.rnn
    "reference_rnn": "test_rnn.py",          # the plain-jnp scan references fnbp.rnn is checked against
    "charlm": "test_text.py",                # the character model's stateful training step
}


def test_every_public_module_has_its_test_file():
    missing = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if any(p.startswith("_") for p in parts):
            continue                                        # private modules, __init__, __main__
        if len(parts) == 1:
            want = [FOLDED.get(parts[0], f"test_{parts[0]}.py")]
        else:
            want = [p.name for p in TESTS.glob(f"test_{parts[0]}*.py")]
        if not want or not all((TESTS / w).is_file() for w in want):
            missing.append(".".join(parts))
    assert missing == [], f"modules without tests/test_<module>.py (or a FOLDED entry): {missing}"
    assert all((TESTS / f).is_file() for f in FOLDED.values())
    stale = [m for m in FOLDED if not (ROOT / f"{m}.py").is_file() or (TESTS / f"test_{m}.py").is_file()]
    assert stale == [], f"FOLDED entries for modules that are gone or have their own file now: {stale}"
