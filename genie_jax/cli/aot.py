r"""Compiles a stage's train step ahead of time for a TPU topology, on this (CPU) machine, and
says whether it fits in HBM: the sharding and the memory plan are known before a pod is held.
With --rollout (dynamics configs) the cached rollout of `genie_jax.inference.genie` is
compiled too, and with --evaluators every per-batch function of the config's evaluators.

  pip install --no-deps --target /tmp/libtpu_pkg "libtpu==0.0.42.*"  # jax 0.10's pin; no TPU
  PYTHONPATH=/tmp/libtpu_pkg JAX_PLATFORMS=cpu python -m genie_jax.cli.aot \
      --config=configs/tokenizer.py --topology=v5p:2x4x4 --config.mesh.fsdp=-1 \
      --config.mesh.data=1

--topology is libtpu's name, TYPE:CHIPS (v4:2x2x4, v5p:2x4x4 = v5p-64, v5e:16x16 = v5e-256,
v6e:16x16); --num_slices > 1 compiles for that many such slices joined by DCN, with
config.mesh_dcn as the mesh of slices. libtpu (a PyPI wheel) is needed only to describe the
chips and compile for them: it runs offline without a TPU. The config goes through the
trainer's checks first, so a config that the trainer would refuse fails here too.
"""

from absl import flags
from ml_collections import config_flags

from genie_jax import cli
from genie_jax.training import aot


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Stage config file.", lock_config=True)
  flags.DEFINE_string("topology", None, "libtpu topology name, e.g. v5p:2x4x4.")
  flags.DEFINE_integer("num_slices", 1, "Slices joined by DCN.")
  flags.DEFINE_float("hbm_gib", 0.0, "HBM per device in GiB (0: by device kind).")
  flags.DEFINE_bool("rollout", False,
                    "Also compile the rollout (dynamics configs), batch 1, 4 frames.")
  flags.DEFINE_bool("evaluators", False, "Also compile every evaluator's per-batch functions.")
  flags.mark_flags_as_required(["config", "topology"])


def main() -> None:
  f = flags.FLAGS
  devices = aot.topology_devices(f.topology, f.num_slices)
  hbm_bytes = f.hbm_gib * 2**30 or None
  where = f"on {f.topology} x {f.num_slices} slice(s), {len(devices)} devices"
  report = aot.compile_for(f.config, devices, hbm_bytes)
  print(f"{f.config.stage} {where}: {report.summary()}")
  if f.rollout:
    report = aot.compile_rollout_for(f.config, devices, hbm_bytes=hbm_bytes)
    print(f"rollout {where}: {report.summary()}")
  if f.evaluators:
    for name, report in aot.compile_evaluators_for(f.config, devices, hbm_bytes).items():
      print(f"evaluator {name} {where}: {report.summary()}")


if __name__ == "__main__":
  cli.run(define_flags, main, processes="none")
