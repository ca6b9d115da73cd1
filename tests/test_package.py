"""Package-level promises: small files, no module shadowed by a function of the same name."""
import importlib
import pathlib
import pkgutil

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
