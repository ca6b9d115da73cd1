"""Test configuration: float64 is available everywhere (tests that need float32 ask for it).

``pytest -m "not slow"`` is the fast loop (unit tests); CI (.ci/run) runs everything.  Slow tests carry
``@pytest.mark.slow`` (or a module ``pytestmark``) in their own file; a cross-check over many cases keeps one
or two in the fast loop and marks the rest slow (``tests/marks.py``).

XLA's persistent compilation cache is on for the whole run, the subprocesses included (the CLI, experiments,
multi-process runs): many tests compile the same training programs, and a cache hit skips XLA's compile, never
the tracing, so what a test checks is unchanged.  The cache lives in the temporary directory, keyed by user
and jax version; set JAX_COMPILATION_CACHE_DIR to choose another, or to "" to turn it off.

XLA's backend (LLVM) optimisation level is 0 for every program the tests compile, here and in the
subprocesses (``XLA_FLAGS=--xla_backend_optimization_level=0``, unless XLA_FLAGS already sets it): the tests
compile hundreds of small one-off programs, and the backend's optimisations cost compile time they never win
back.  The HLO -- what fnbp's rules produce and what the tests inspect -- is the same, and so are the numbers (no
fast-math reassociation at any level).  Measured on 2 cores: 20 of the slowest tests 188 s against 263 s.  Set
FNBP_TEST_XLA_OPT=default to run the tests with XLA's default level.
"""
import importlib.metadata
import os
import tempfile

os.environ.setdefault("MPLBACKEND", "Agg")


def _cache_dir():
    """(Before jax is imported: jax reads its JAX_* environment variables at import.)"""
    user = getattr(os, "getuid", lambda: "user")()
    return os.path.join(tempfile.gettempdir(), f"fnbp-tests-jax-cache-{user}-{importlib.metadata.version('jaxlib')}")


os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache_dir())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
if (os.environ.get("FNBP_TEST_XLA_OPT") != "default"
        and "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "")):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
