"""The documentation site: `mkdocs build --strict` passes offline, the API reference covers every public
name, and the python blocks of the docs pages run and print what the pages say they print."""
import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import pkgutil

pytestmark = pytest.mark.slow          # builds the site (mkdocs subprocess) and runs the pages' blocks

ROOT = Path(__file__).resolve().parents[1]
# every public module of the package has an API page (a new module without one fails here)
MODULES = sorted(m.name for m in pkgutil.iter_modules([str(ROOT / "fnbp")])
                 if not m.name.startswith("_") and m.name not in ("cli", "cli_train", "bench"))


def _env():
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONPATH=str(ROOT))
    return env


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(out)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def _public(module):
    mod = importlib.import_module(f"fnbp.{module}")
    return mod, list(getattr(mod, "__all__", []))


def test_mkdocs_build_strict_and_every_page_exists(site):
    for page in ["index.html", "equations/index.html", "conventions/index.html", "transforms/index.html",
                 "notebooks/index.html", "multihost/index.html", "checkpoints/index.html"]:
        assert (site / page).is_file(), page
    # the equations page is the README's table, included
    eq = (site / "equations" / "index.html").read_text()
    assert "fnbp.layers.dense_backward" in eq and "fnbp.losses.softmax_cross_entropy" in eq


@pytest.mark.parametrize("module", MODULES)
def test_api_reference_documents_every_public_name(site, module):
    mod, names = _public(module)
    assert names, f"fnbp.{module} has no __all__"
    page = "mlp" if module == "backprop" else module
    html = (site / "api" / page / "index.html").read_text()
    for name in names:
        assert f'id="fnbp.{module}.{name}"' in html, f"fnbp.{module}.{name} missing from api/{page}"


@pytest.mark.parametrize("module", MODULES)
def test_every_public_function_and_class_has_a_docstring(module):
    mod, names = _public(module)
    undocumented = [n for n in names
                    if (inspect.isfunction(getattr(mod, n)) or inspect.isclass(getattr(mod, n)))
                    and not (getattr(mod, n).__doc__ or "").strip()]
    assert not undocumented, f"fnbp.{module}: {undocumented}"


def _blocks(text):
    """(python code, the ```text block right after it that it prints, or None) for each python block."""
    out = []
    for m in re.finditer(r"```python\n(.*?)```(?:\s*\n(?:It prints|prints)\s*\n+```text\n(.*?)```)?", text, re.S):
        out.append((m.group(1), m.group(2)))
    return out


def _run(code, tmp_path):
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_transforms_page_claims_hold(tmp_path):
    """Runs the page's block: grad/jit/vmap/remat/jacrev/hessian agree with autodiff of the reference;
    jvp/jacfwd/linearize fail with the custom_vjp message; the two-VJP JVP equals the reference's JVP."""
    blocks = _blocks((ROOT / "docs" / "transforms.md").read_text())
    assert len(blocks) == 1 and blocks[0][1] is not None
    code, expected = blocks[0]
    assert _run(code, tmp_path) == expected


def test_index_example_is_the_readme_example():
    """The home page's example is line for line part of the README's first block, which
    tests/test_readme.py runs as pasted (so it is not run a second time here)."""
    (code, _), = _blocks((ROOT / "docs" / "index.md").read_text())
    readme_block = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    readme_lines = set(readme_block.splitlines())
    assert "fnbp.backprop(" in code
    for line in code.splitlines():
        assert line in readme_lines, line


def test_notebooks_page_rule_example():
    """The page's own fnbp.rule example prints True (our rule agrees with autodiff and differences).
    Run in this process (it changes no global JAX setting), which saves an interpreter start."""
    import contextlib
    import io
    (code, _), = _blocks((ROOT / "docs" / "notebooks.md").read_text())
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "docs/notebooks.md", "exec"), {})
    assert out.getvalue() == "True\n"


def test_docs_name_only_existing_paths_and_functions():
    """Every `fnbp.x.y` named in the conventions and transforms pages exists, and every repository path
    named in the docs and notebooks page exists."""
    import fnbp
    for page in ["conventions.md", "transforms.md", "notebooks.md", "index.md", "checkpoints.md"]:
        text = (ROOT / "docs" / page).read_text()
        for dotted in set(re.findall(r"`(fnbp(?:\.\w+)+)", text)):
            obj = fnbp
            for part in dotted.split(".")[1:]:
                assert hasattr(obj, part), f"{page}: {dotted}"
                obj = getattr(obj, part)
        for path in set(re.findall(r"`((?:notebooks|docs|experiments|tests)/[\w/.-]+)`", text)):
            assert (ROOT / path).exists(), f"{page}: {path}"
