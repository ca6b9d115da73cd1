"""glibc malloc that keeps freed memory: what ``fnbp train`` and ``fnbp bench`` set for their own process.

Each call of a compiled XLA:CPU program allocates its temporaries afresh.  glibc serves every block over its mmap
threshold (128 KiB, growing to at most 32 MiB) with a new ``mmap`` and returns it to the kernel on ``free``, so every
call page-faults its temporaries in again: the LeNet step at B = 64 ~10,000 minor faults (22-26 ms of kernel time
per call), the LSTM text step (H = 256, B = 64, T = 64) ~12,500 (27 ms of an 82 ms step), on a 2-core AMD EPYC.  A
``lax.scan`` of many steps pays that once per call; a training loop that calls one compiled step per chunk, as
``fnbp train --data shakespeare`` does, pays it every step.  PyTorch's CPU allocator is glibc's malloc too, and pays
the same (~10,000 faults per ``nn.LSTM`` step).

``keep_freed_memory()`` sets, with ``mallopt``: blocks under 2 GiB from the heap, not ``mmap``; the heap's top never
trimmed; the heap grown 256 MiB at a time.  The process then keeps its peak memory for reuse instead of returning
it to the kernel between steps.  ``FNBP_MALLOC=default`` (or the older ``FNBP_BENCH_MALLOC=default``) leaves
glibc's defaults.  ``child_env()`` gives the same settings as glibc's environment variables, for a child process.
"""
import os
import platform

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = {"M_MMAP_THRESHOLD": 2 ** 31 - 1, "M_TRIM_THRESHOLD": 2 ** 31 - 1, "M_TOP_PAD": 2 ** 28}
_PARAMS = {"M_MMAP_THRESHOLD": _M_MMAP_THRESHOLD, "M_TRIM_THRESHOLD": _M_TRIM_THRESHOLD, "M_TOP_PAD": _M_TOP_PAD}


def disabled():
    """True where ``FNBP_MALLOC=default`` or ``FNBP_BENCH_MALLOC=default`` asks for glibc's defaults."""
    return "default" in (os.environ.get("FNBP_MALLOC"), os.environ.get("FNBP_BENCH_MALLOC"))


def keep_freed_memory():
    """Make this process's glibc malloc keep freed memory for reuse (``SETTINGS``, through ``mallopt``).  Returns
    what was set: {} where this is not Linux with glibc's ``mallopt``, or where ``disabled()``."""
    if disabled() or platform.system() != "Linux":
        return {}
    import ctypes
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return {}
    return {name: value for name, value in SETTINGS.items() if mallopt(_PARAMS[name], value) == 1}


def describe(settings):
    """``keep_freed_memory()``'s result in words, for reports: "mallopt M_... v, ..." or the platform's
    defaults."""
    if settings:
        return "glibc malloc keeps freed memory for reuse (mallopt " + ", ".join(
            f"{k} {v}" for k, v in settings.items()) + ")"
    return "malloc: the platform's defaults (FNBP_MALLOC=default, or not glibc)"


def child_env():
    """The same settings as glibc's environment variables (``MALLOC_MMAP_THRESHOLD_`` ...), for a child process
    (e.g. the PyTorch loops of ``fnbp bench``'s lenet_run and text_run with ``--torch-malloc same``)."""
    return {f"MALLOC_{name[2:]}_": str(value) for name, value in SETTINGS.items()}
