"""Package-level promises: small files, no module shadowed by a function of the same name."""
import importlib
import pathlib
import pkgutil
import subprocess
import sys

import fnbp

ROOT = pathlib.Path(__file__).resolve().parents[1] / "fnbp"


def test_no_file_in_the_package_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_no_module_is_shadowed_by_a_name_of_the_package():
    """``fnbp.<m>`` is the module fnbp/<m>.py itself (``from .backprop import backprop`` would hide it)."""
    for package in [fnbp, fnbp.optim]:
        for info in pkgutil.iter_modules(package.__path__):
            if info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            assert getattr(package, info.name, module) is module, f"{package.__name__}.{info.name}"


def test_importing_fnbp_imports_no_optional_export_library():
    """safetensors and orbax are for the export recipes (docs/checkpoints.md), not run-time dependencies."""
    code = ("import importlib, pkgutil, sys, fnbp\n"
            "for m in pkgutil.walk_packages(fnbp.__path__, 'fnbp.'):\n"
            "    m.name.endswith('__main__') or importlib.import_module(m.name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('safetensors', 'orbax', 'tensorstore')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
