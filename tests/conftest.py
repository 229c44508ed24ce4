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

