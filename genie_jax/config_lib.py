"""Trainer defaults shared by every stage's config, and config-argument parsing.

Stage configs (configs/<stage>.py) start from `base_config()` and fill in `stage`, `model`,
`data` and `evals`. The result is locked, so `--config.<key>=...` with a misspelt key fails.
"""

from __future__ import annotations

import ml_collections

from genie_jax import optim
from genie_jax import sharding


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'runlocal,variant=x' style config arguments (big_vision convention).

  A bare word sets a boolean to True; `key=value` takes the type of the default.
  """
  parsed = ml_collections.ConfigDict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, _, value = part.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    default = defaults[key]
    if not value:
      parsed[key] = True
    elif isinstance(default, bool):
      parsed[key] = value.lower() in ("1", "true", "yes")
    else:
      parsed[key] = type(default)(value)
  return parsed


def base_config() -> ml_collections.ConfigDict:
  """Everything the shared trainer reads, with production defaults."""
  config = ml_collections.ConfigDict()
  config.stage = ""
  config.seed = 0
  config.batch_size = 48  # Global, across all devices and processes.
  config.total_steps = 300_000

  # Mesh axes (outer to inner) and the logical-axis rules: DP, FSDP or TP is the mesh shape.
  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  config.sharding = ml_collections.ConfigDict()
  config.sharding.rules = [list(rule) for rule in sharding.DEFAULT_RULES]

  config.optimizer = optim.default_config()

  config.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=1000, max_to_keep=3, keep_period=0, async_save=True))

  config.log_every_steps = 50
  config.images_every_steps = 2000
  config.num_images = 4
  config.eval_every_steps = 5000
  config.evals = ml_collections.ConfigDict()
  return config
