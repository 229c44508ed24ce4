"""Test configuration: 8 fake CPU devices, float64 available, strict rank promotion.

XLA_FLAGS must be set before JAX initialises its backends, which is why this happens at import
time of the conftest (pytest imports it before any test module).
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TFDS must never try to reach the network from the tests.
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(os.path.dirname(__file__), ".tfds_unused"))
os.environ.setdefault("NO_GCE_CHECK", "true")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# One persistent compilation cache per test session, shared by its xdist workers: the many smoke runs
# compile the same programs, and an identical program is then compiled once. A fresh folder per
# session (xdist's run id; the process id without xdist), so nothing carries over between sessions.
if os.environ.get("MCR_JAX_TEST_COMPILATION_CACHE", "1") != "0":
    _run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
    jax.config.update("jax_compilation_cache_dir", os.path.join("/tmp", "mcr_jax_test_xla_cache", _run))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

