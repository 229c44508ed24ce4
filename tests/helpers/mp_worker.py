"""One process of the 2-process test in test_parallel.py (run as a script, one CPU device each)."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
os.environ["JAX_PLATFORMS"] = "cpu"

from mcr_jax import parallel  # noqa: E402


def main():
    process_id, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    parallel.initialize(f"localhost:{port}", 2, process_id)
    from mcr_jax.train import train_and_evaluate  # noqa: PLC0415
    from tests.test_parallel import two_device_config  # noqa: PLC0415

    train_and_evaluate(two_device_config(), workdir)


if __name__ == "__main__":
    main()
