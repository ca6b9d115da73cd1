"""The README: its set-up commands are exactly what CI runs, every python block runs as pasted (in a fresh
interpreter, outside the source tree) and prints what the README says, every rule it maps exists, and its
links and paths work on a package index page (no relative links; every named path is in the sdist)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _commands(text):
    return [line.strip() for line in text.splitlines()
            if line.strip().startswith(("python3 -m venv", ". .venv/bin/activate"))]


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README, re.S)


def _run(code, tmp_path):
    """Run code as a fresh `python -c` from an empty folder (fnbp importable, as after `pip install`)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in os.environ.get(
        "PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_ci_runs_the_readme_commands():
    readme = _commands(README)
    ci = _commands((ROOT / ".ci" / "run").read_text())
    assert len(ci) == 2 and ci == readme, (ci, readme)
    assert "fnbp train" in ci[0] and "pytest" in ci[1]


def test_readme_maps_every_rule_to_a_function():
    import fnbp
    for name in ["dense", "identity", "sigmoid", "tanh", "relu", "leaky_relu", "prelu", "step", "sign", "softmax"]:
        assert f"`fnbp.{name}`" in README, name
        assert callable(getattr(fnbp, name))
    for name in ["half_sse", "sse", "mse", "mae", "cross_entropy", "softmax_cross_entropy", "l2_penalty"]:
        assert f"`fnbp.losses.{name}`" in README, name
        assert callable(getattr(fnbp.losses, name))


def test_readme_has_exactly_the_two_python_examples():
    blocks = _python_blocks()
    assert len(blocks) == 2, "a new python block in the README needs its own test here"
    for code in blocks:
        assert code.lstrip().startswith("import jax"), "each block must run as pasted into a fresh interpreter"


@pytest.fixture(scope="module")
def first_example(tmp_path_factory):
    """Block 1 as pasted, then (after it) lines that report what the test compares."""
    code = _python_blocks()[0]
    extra = ("\nimport numpy as _np\n"
             "print('MAXDIFF', max(float(_np.max(_np.abs(a - b))) for a, b in "
             "zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads2))))\n"
             "print('SHAPES', [tuple(l['W'].shape) for l in params])\n")
    out = _run(code + extra, tmp_path_factory.mktemp("readme1"))
    lines = out.splitlines()
    return lines[0], dict(line.split(" ", 1) for line in lines[1:])


@pytest.mark.slow
def test_first_example_runs_and_backprop_equals_grad(first_example):
    printed, extra = first_example
    assert printed in ("True", "False")                        # what the block prints: fnbp.check(...).ok
    assert float(extra["MAXDIFF"]) <= 1e-5                      # fnbp.backprop == jax.grad through our rules
    assert extra["SHAPES"] == "[(32, 64), (10, 32)]"           # W (n_out, n_in), as the comment says


@pytest.mark.slow
def test_first_example_prints_true(first_example):
    assert first_example[0] == "True"


@pytest.mark.slow
def test_training_example_prints_its_accuracy(tmp_path):
    code = _python_blocks()[1]
    out = _run(code, tmp_path)
    m = re.fullmatch(r"test accuracy ([\d.]+)%\n", out)
    assert m, out
    assert float(m.group(1)) >= 94.0                             # README: 97.49 % at seed 0; 96.4-97.5 % over seeds


def test_readme_links_and_paths_work_on_a_package_index_page():
    # no relative links: they break on a package index page
    for target in re.findall(r"\]\(([^)]+)\)", README):
        assert target.startswith(("http://", "https://")), f"relative link {target!r}: state the path in text"
    # every path the README names exists, and MANIFEST.in ships it in the sdist
    manifest = (ROOT / "MANIFEST.in").read_text()
    for path in set(re.findall(r"`((?:docs|notebooks|experiments|tests|fnbp)/[\w/.-]*)`", README)):
        assert (ROOT / path).exists(), path
        top = path.split("/")[0]
        assert top == "fnbp" or f"graft {top}" in manifest, path


def test_readme_names_the_lecture_notes():
    assert "five sets of university lecture notes on backpropagation" in README
    for topic in ["log(xy)", "784-512-512-10", "AdaGrad", "batch norm"]:
        assert topic in README.split("## Set-up")[0], topic


def test_equations_table_names_existing_functions():
    """Every function the equations table names (`fnbp.x`, `fnbp.mod.x`, and the `_<name>` rules in
    parentheses, looked up in the row's module) exists."""
    import importlib

    import fnbp
    table = README.split("[start:equations]")[1].split("[end:equations]")[0]
    for row in table.splitlines():
        if not row.startswith("|") or "---" in row:
            continue
        cell = row.split("|")[2]
        dotted = re.findall(r"`(fnbp(?:\.\w+)+)`", cell)
        for name in dotted:
            obj = fnbp
            for part in name.split(".")[1:]:
                assert hasattr(obj, part), name
                obj = getattr(obj, part)
        privates = re.findall(r"`(_\w+)`", cell)
        if privates:
            module = importlib.import_module(dotted[0].rsplit(".", 1)[0] if dotted[0].count(".") > 1
                                             else "fnbp.activations")
            for name in privates:
                assert hasattr(module, name), (name, module.__name__)
