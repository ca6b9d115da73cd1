"""The case registry of ``fnbp.bench``: what a run measures, in which order, and how it is reported.

A *case* is one section of the report: a ``run(ctx) -> dict`` that times something (JSON-able
result, stored under the case's name in the report), a ``render(section, result) -> list[str]``
giving its markdown lines, and optionally a ``summary(section) -> list[str]`` of stdout lines.
Cases run in registration order; ``requires`` names cases whose results ``run`` reads from
``ctx.results`` (they are added to a ``--cases`` selection automatically).

To add one (a CNN step, a per-example or data-parallel variant, ...): write a module
``fnbp/bench/<topic>.py`` that calls :func:`register` at import time, and append its name to
``CASE_MODULES``. See ``fnbp/bench/__init__.py`` for an example.
"""
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

CASE_MODULES = ["fnbp.bench.cases", "fnbp.bench.simulated", "fnbp.bench.multiprocess", "fnbp.bench.per_example_rules",
                "fnbp.bench.lenet", "fnbp.bench.lenet_run", "fnbp.bench.text_run"]
"""Modules whose import registers cases, in report order."""


@dataclass
class Context:
    """What a case's ``run`` gets: the run's settings, the results of the cases run before it
    (``results[name]``), the machine's description, and ``log(msg)`` (a timestamped stderr line)."""

    sizes: tuple
    batch_sizes: tuple
    gemm_sizes: tuple
    min_time: float
    seed: int
    quick: bool
    cores: int
    use_torch: bool = False
    threads: Any = None
    torch_skip_reason: str = "torch not installed"
    no_torch: bool = False
    torch_malloc: str = "default"
    run_epochs: int = 3
    text_seconds: Any = None
    text_train_flags: Any = None
    per_example_batch: int = 128
    simulated_devices: int = 8
    machine: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)
    log: Callable[[str], None] = lambda msg: None


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[Context], dict]
    render: Callable[[dict, dict], list] | None = None
    summary: Callable[[dict], list] | None = None
    requires: tuple = ()
    help: str = ""


CASES: dict = {}
"""name -> Case, in registration (= run and report) order."""


def register(name, *, run, render=None, summary=None, requires=(), help=""):
    """Add a case named ``name`` (its key in the JSON report and in ``--cases``); returns it.

    When ``run``'s module is one of ``CASE_MODULES``, the modules before it are imported first, so the
    report order is ``CASE_MODULES``' order whichever case module a program imports first."""
    if name in CASES:
        raise ValueError(f"fnbp.bench.register: a case named {name!r} is already registered")
    module = getattr(run, "__module__", None)
    if module in CASE_MODULES:       # whatever is imported first, earlier modules' cases register first
        for earlier in CASE_MODULES[:CASE_MODULES.index(module)]:
            importlib.import_module(earlier)
    unknown = [r for r in requires if r not in CASES]
    if unknown:
        raise ValueError(f"fnbp.bench.register: case {name!r} requires {unknown}, which are not registered "
                         f"before it (registered: {list(CASES)})")
    CASES[name] = case = Case(name, run, render, summary, tuple(requires), help)
    return case


def load_cases():
    """Import every module of ``CASE_MODULES`` (registering their cases); returns ``CASES``."""
    for mod in CASE_MODULES:
        importlib.import_module(mod)
    return CASES


def select(names):
    """The cases to run for a ``--cases`` selection (None: all), requirements included, in order."""
    load_cases()
    if names is None:
        return list(CASES.values())
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise ValueError(f"fnbp bench: --cases: unknown case(s) {unknown}; expected names from {list(CASES)}")
    wanted = set()

    def add(n):
        if n not in wanted:
            wanted.add(n)
            for r in CASES[n].requires:
                add(r)

    for n in names:
        add(n)
    return [c for c in CASES.values() if c.name in wanted]
