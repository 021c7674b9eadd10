"""Restoring a trained world model of either dynamics family for generation and play."""

from __future__ import annotations

import importlib

from genie_jax import config_lib
from genie_jax import paths

# config.stage of a world-model workdir -> "module:Class" of its generator (imported when
# used, so that one family's code loads only for its workdirs).
FAMILIES = {
    "dynamics": "genie_jax.inference.genie:Genie",
    "diffusion": "genie_jax.inference.diffusion:DiffusionGenie",
}


def load(workdir: str, *, step: int | None = None):
  """The generator (`genie.Genie` or `diffusion.DiffusionGenie`) of a world-model workdir.

  Raises:
    FileNotFoundError: naming the workdir when it or its config.json is missing.
    ValueError: naming the workdir when it holds a stage that is no world model, or the
      bucket of a gs:// workdir that does not exist.
  """
  if not paths.path(workdir).is_dir():
    paths.check_bucket(workdir, "workdir")
    raise FileNotFoundError(f"workdir {workdir!r} does not exist (train a world model there "
                            "first)")
  stage = config_lib.load_config(workdir).stage
  if stage not in FAMILIES:
    raise ValueError(f"workdir {workdir!r} holds a {stage!r} stage (config.stage in its "
                     f"config.json); generation needs a world model: one of {sorted(FAMILIES)}")
  module_name, class_name = FAMILIES[stage].split(":")
  return getattr(importlib.import_module(module_name), class_name).from_workdir(workdir,
                                                                               step=step)
