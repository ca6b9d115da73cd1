"""Which parametrised cases the fast loop runs.

``pytest -m "not slow"`` is the quick feedback loop (unit tests, <= 2 minutes on 2 cores); CI runs everything.
A cross-check parametrised over many models or cells keeps one or two representative cases in the fast loop and
marks the rest slow: most of such a test's time is XLA compiling each case's programs, not the check itself.
"""
import pytest


def slow_except(cases, *fast):
    """``cases`` for ``pytest.mark.parametrize``: those listed in ``fast`` unmarked, every other one marked slow."""
    missing = [f for f in fast if f not in cases]
    if missing:
        raise ValueError(f"slow_except: fast cases {missing} are not among the cases {list(cases)}")
    return [c if c in fast else pytest.param(*(c if isinstance(c, tuple) else (c,)), marks=pytest.mark.slow)
            for c in cases]
