"""Test set-up: 8 fake CPU devices (before jax is imported) and small shared fixtures."""

import os

# Must precede any jax import: every test process sees 8 CPU devices, so sharded runs and
# single-device baselines (meshes over jax.devices()[:1]) can be compared in one process.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Read when gcsfs is imported: its experimental file system would ask the Storage Control
# API (gRPC to Google, not the test server of tests/gcs_server.py) for every bucket's layout.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
  """A TFDS data_dir shared by the tests that build the tiny builtin dataset."""
  return str(tmp_path_factory.mktemp("tfds"))
