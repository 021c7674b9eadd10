"""Ahead-of-time compilation of a train step for other devices, with an HBM verdict."""

import importlib.util

import jax
import pytest

from genie_jax import aot
from test_train import tiny_config


def test_compile_for_devices_reports_memory_and_fit():
  # The 8 fake CPU devices stand in for a topology: the same path as a TPU's compile-only
  # devices, without libtpu.
  config = tiny_config("")
  config.mesh = dict(data=2, fsdp=2, tensor=2)
  report = aot.compile_for(config, jax.devices(), hbm_bytes=2**40)
  assert report.mesh == dict(data=2, fsdp=2, tensor=2)
  assert 0 < report.peak_bytes < 2**40
  assert report.fits
  small = aot.AotReport(report.mesh, report.device_kind, report.stats,
                        hbm_bytes=report.peak_bytes / 2)
  assert small.fits is False and "DOES NOT FIT" in small.summary()


def test_config_checks_run_before_compiling():
  config = tiny_config("", batch_size=12)
  with pytest.raises(ValueError, match="config.batch_size=12"):
    aot.compile_for(config, jax.devices())


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="needs the libtpu wheel (pip install libtpu; no TPU needed)")
def test_tpu_topology_two_slices():
  devices = aot.topology_devices("v5e:2x2", num_slices=2)
  assert len(devices) == 8
  config = tiny_config("")
  config.mesh = dict(data=1, fsdp=2, tensor=2)
  config.mesh_dcn = dict(data=2, fsdp=1, tensor=1)
  report = aot.compile_for(config, devices)
  assert report.device_kind == "TPU v5 lite" and report.fits
