"""The wheel is complete: built offline from a copy of the source, installed (not editable) into a
fresh virtual environment, and run from outside the source tree as a user would.

No network: ``pip wheel --no-build-isolation --no-index`` uses the setuptools of the running
environment (a ``dev`` extra), and the fresh environment gets fnbp's run-time dependencies by a
``.pth`` line naming the running environment's site-packages (added after fnbp is installed, so
pip sees an empty environment). ``PYTHONPATH`` is removed, so only the installed wheel can be
imported.
"""
import importlib.metadata
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

import fnbp

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(cmd, cwd, env=None, timeout=300):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "fnbp", src / "fnbp", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "--disable-pip-version-check", "-q", "-w", tmp / "dist", src], cwd=tmp)
    (wheel,) = (tmp / "dist").glob("fnbp-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
          "--disable-pip-version-check", "-q", wheel], cwd=tmp)
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).stdout
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (Path(purelib.strip()) / "_fnbp_test_deps.pth").write_text("\n".join(deps) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["MPLBACKEND"] = "Agg"
    away = tmp / "elsewhere"                    # outside the source tree
    away.mkdir()
    return {"wheel": wheel, "venv": venv, "python": python, "fnbp": venv / "bin" / "fnbp", "env": env, "cwd": away}


def test_wheel_contents_and_installed_location(installed):
    import zipfile
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    assert "fnbp/py.typed" in names and "fnbp/bench/run.py" in names and "fnbp/idx.py" in names
    assert "fnbp/datasets/shakespeare.txt.gz" in names               # the shipped corpus (package-data)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith(("experiments/", "tests/")) for n in names)
    probe = ("import fnbp, importlib.metadata as m, pathlib; p = pathlib.Path(fnbp.__file__).parent; "
             "print(p); print((p / 'py.typed').is_file()); print(m.version('fnbp')); "
             "print(m.metadata('fnbp')['License-Expression'])")
    out = _run([installed["python"], "-c", probe], cwd=installed["cwd"], env=installed["env"]).stdout.split("\n")
    assert Path(out[0]).is_relative_to(installed["venv"])          # the wheel, not the source tree
    assert out[1:4] == ["True", fnbp.__version__, "MIT"]
    corpus = _run([installed["python"], "-c", "import fnbp; c = fnbp.data.load_shakespeare(); print(len(c.text), "
                   "len(c.vocab))"], cwd=installed["cwd"], env=installed["env"]).stdout.split()
    assert corpus == ["1176823", "67"]                                # read from the wheel, md5 checked


def test_installed_command_line(installed):
    exe, cwd, env = installed["fnbp"], installed["cwd"], installed["env"]
    version = _run([exe, "--version"], cwd=cwd, env=env).stdout.strip()
    assert version == f"fnbp {fnbp.__version__}" == f"fnbp {importlib.metadata.version('fnbp')}"
    assert "finite differences" in _run([exe, "check", "--help"], cwd=cwd, env=env).stdout
    bench_help = _run([exe, "bench", "--help"], cwd=cwd, env=env).stdout
    assert bench_help.startswith("usage: fnbp bench") and "--quick" in bench_help and "--cases" in bench_help
    train = _run([exe, "train", "--epochs", "1", "--quiet", "--out", "run"], cwd=cwd, env=env)
    assert "final test accuracy" in train.stdout and "after 1 epochs" in train.stdout
    assert (cwd / "run" / "checkpoint.npz").is_file() and (cwd / "run" / "history.json").is_file()
