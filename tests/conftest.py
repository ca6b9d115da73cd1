"""Test configuration: float64 is available everywhere (tests that need float32 ask for it)."""
import os

os.environ.setdefault("MPLBACKEND", "Agg")

import jax

jax.config.update("jax_enable_x64", True)
