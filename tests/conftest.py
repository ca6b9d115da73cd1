"""Test configuration: float64 is available everywhere (tests that need float32 ask for it).

``pytest -m "not slow"`` is the fast loop (unit tests); CI (.ci/run) runs everything.  Slow tests carry
``@pytest.mark.slow`` (or a module ``pytestmark``) in their own file; a cross-check over many cases keeps one
or two in the fast loop and marks the rest slow (``tests/marks.py``).

XLA's persistent compilation cache is on for the whole run, the subprocesses included (the CLI, experiments,
multi-process runs): many tests compile the same training programs, and a cache hit skips XLA's compile, never
the tracing, so what a test checks is unchanged.  Every program is cached, the one-op programs of eager jnp
calls too (the fast loop, 2 cores: 56 s with a warm cache, 96 s cold).  The cache lives in the temporary
directory, keyed by user and jax version (the whole suite writes ~100 MB; jax's size cap needs filelock, not
a dependency); set JAX_COMPILATION_CACHE_DIR to choose another, or to "" to turn it off.

XLA compiles faster here than by default, in the test processes and their subprocesses (XLA_FLAGS, each flag
only where XLA_FLAGS does not already set it and this jaxlib's XLA knows it): the tests compile thousands of
small one-off programs -- every eager jnp call is one -- and XLA's compile time dominates them.
  * ``--xla_backend_optimization_level=0``: no LLVM optimisation passes (20 of the slowest tests: 188 s, was
    263 s);
  * ``--xla_cpu_use_fusion_emitters=false``: fusions are emitted by XLA:CPU's elemental IR emitters instead of
    the MLIR fusion emitters: a one-op program compiles in ~22 ms instead of ~37 ms (the fast loop on 2 cores,
    cold cache: 112 s, was 172 s).
The HLO -- what fnbp's rules produce and what the tests inspect -- is the same, and so are the numbers to the
tests' tolerances (no fast-math reassociation either way).  Set FNBP_TEST_XLA_OPT=default to run the tests with
XLA's defaults.
"""
import importlib.metadata
import importlib.util
import os
import tempfile

os.environ.setdefault("MPLBACKEND", "Agg")


def _cache_dir():
    """(Before jax is imported: jax reads its JAX_* environment variables at import.)"""
    user = getattr(os, "getuid", lambda: "user")()
    return os.path.join(tempfile.gettempdir(), f"fnbp-tests-jax-cache-{user}-{importlib.metadata.version('jaxlib')}")


def _xla_knows(flags):
    """The names in ``flags`` that this jaxlib's XLA has (XLA aborts the process on an unknown flag in XLA_FLAGS, so
    a flag a later jaxlib drops must not be set): looked up in jaxlib's shared libraries, each read once (~10 ms)."""
    import glob
    import mmap
    spec = importlib.util.find_spec("jaxlib")
    known = set()
    for path in glob.glob(os.path.join(os.path.dirname(spec.origin), "*.so")):
        if os.path.getsize(path) == 0:
            continue
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            known.update(name for name in flags if name not in known and m.find(name.encode()) >= 0)
    return known


def _fast_compile_flags():
    """The XLA flags for compile speed (see the module docstring), those this XLA knows and XLA_FLAGS lacks."""
    have = os.environ.get("XLA_FLAGS", "")
    wanted = {"xla_backend_optimization_level": "0",     # no LLVM optimisation passes
              "xla_cpu_use_fusion_emitters": "false"}     # the elemental IR emitters, not the MLIR ones
    missing = [name for name in wanted if f"--{name}" not in have]
    known = _xla_knows(missing) if missing else set()
    return [f"--{name}={wanted[name]}" for name in missing if name in known]


os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache_dir())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")     # every program, the one-op ones too
if os.environ.get("FNBP_TEST_XLA_OPT") != "default":
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *_fast_compile_flags()]).strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
