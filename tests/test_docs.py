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


LOCAL_MATHJAX = Path("/usr/share/javascript/mathjax")      # Debian's libjs-mathjax, where installed


def _env():
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONPATH=str(ROOT))
    if (LOCAL_MATHJAX / "MathJax.js").is_file():
        env["FNBP_DOCS_MATHJAX"] = str(LOCAL_MATHJAX)          # offline: typeset math from the local copy
    return env


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(out)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def _public(module):
    mod = importlib.import_module(f"fnbp.{module}")
    return mod, list(getattr(mod, "__all__", []))


def test_mkdocs_build_strict_and_every_page_exists(site):
    for page in ["index.html", "equations/index.html", "conventions/index.html", "transforms/index.html",
                 "notebooks/index.html", "multihost/index.html", "checkpoints/index.html", "guide/index.html",
                 "results/index.html", "results/cnn/index.html", "notebooks/tutorial/index.html"]:
        assert (site / page).is_file(), page
    # the equations page is a page of its own: typeset math, each function linked to its API entry
    eq = (site / "equations" / "index.html").read_text()
    assert eq.count('class="arithmatex"') >= 50 and "\\nabla_{W_k} E" in eq
    for name, page in [("fnbp.layers.dense_backward", "layers"), ("fnbp.conv.conv2d", "conv"),
                       ("fnbp.pool.batch_norm_channels", "pool"), ("fnbp.feedback.step_ste", "feedback")]:
        assert f'href="../api/{page}/#{name}"' in eq, name


def test_results_pages_read_the_figures_from_the_json(site):
    """The CNN page's per-seed accuracies are those of experiments/results/cnn.json, and its plots are on the site."""
    import json
    data = json.loads((ROOT / "experiments" / "results" / "cnn.json").read_text())
    html = (site / "results" / "cnn" / "index.html").read_text()
    main = data["results"]["main: shifts ±2 + dropout 0.25"]
    assert f"{100 * main['mean']:.2f}" in html
    assert " / ".join(f"{100 * a:.2f}" for a in main["accuracies"]) in html
    assert 'src="../cnn_curves.png"' in html and (site / "results" / "cnn_curves.png").is_file()
    index = (site / "results" / "index.html").read_text()
    for name in ["worked_examples", "optimizers", "mnist_mlp", "cnn", "dp_sgd", "feedback", "bench"]:
        assert f'href="{name}/"' in index, name


def test_notebooks_are_rendered_with_their_outputs(site):
    tutorial = (site / "notebooks" / "tutorial" / "index.html").read_text()
    assert "softplus rule ok: True" in tutorial and "final test accuracy" in tutorial     # executed at build
    cnn = (site / "notebooks" / "cnn" / "index.html").read_text()
    assert "data:image/png;base64" in cnn                                              # the filters plot


def test_screenshots_of_the_site_in_headless_chromium(site, tmp_path):
    """Where Debian's chromium is installed: the home, equations, results and notebook pages render to
    non-blank screenshots (PNG files of the expected size, with more than one colour)."""
    import shutil
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    for page in ["index.html", "equations/index.html", "results/cnn/index.html", "notebooks/tutorial/index.html"]:
        shot = tmp_path / (page.replace("/", "_") + ".png")
        proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                               "--window-size=1280,1600", (site / page).as_uri()], capture_output=True, text=True,
                              timeout=120)
        assert shot.is_file() and shot.stat().st_size > 20_000, (page, proc.stderr[-2000:])
        from matplotlib import image
        pixels = image.imread(shot)
        assert pixels.shape[:2] == (1600, 1280)
        assert len({tuple(p) for p in pixels[::40, ::40].reshape(-1, pixels.shape[-1])}) > 5      # not blank
    if (LOCAL_MATHJAX / "MathJax.js").is_file():        # the math is typeset (MathJax ran), not left as TeX
        dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000",
                              "--dump-dom", (site / "equations" / "index.html").as_uri()], capture_output=True,
                             text=True, timeout=180).stdout
        assert dom.count('class="MathJax') >= 50, dom[:2000]


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


@pytest.mark.slow
def test_models_page_blocks_run_as_pasted_and_print_what_the_page_says(tmp_path):
    """docs/models.md: each python block (a composed CNN, a residual MLP with per-example norms and DP-SGD, a LeNet
    trained with DP) runs in a fresh interpreter and prints the text block the page shows under it."""
    blocks = _blocks((ROOT / "docs" / "models.md").read_text())
    assert len(blocks) == 3 and all(expected is not None for _, expected in blocks)
    for code, expected in blocks:
        assert _run(code, tmp_path) == expected


def test_index_example_is_the_readme_example():
    """The home page's example is line for line part of the README's explicit-loop block, which
    tests/test_readme.py runs as pasted (so it is not run a second time here)."""
    (code, _), = _blocks((ROOT / "docs" / "index.md").read_text())
    readme_block = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[1]
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
