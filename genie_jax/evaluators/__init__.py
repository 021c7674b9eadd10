"""Evaluators, picked by `config.evals.<name>.type` (as in big_vision).

An evaluator is built once (datasets, jitted functions) and run on a train state any number of
times; `run` returns (scalars, images) and is called on every process.
"""

from __future__ import annotations

import importlib

import ml_collections

_EVALUATORS = {
    "controllability": "genie_jax.evaluators.controllability:ControllabilityEvaluator",
    "reconstruction": "genie_jax.evaluators.reconstruction:ReconstructionEvaluator",
    "latent_actions": "genie_jax.evaluators.latent_actions:LatentActionEvaluator",
}


def _evaluator_class(name: str, eval_cfg: ml_collections.ConfigDict):
  if eval_cfg.type not in _EVALUATORS:
    raise ValueError(f"config.evals.{name}.type={eval_cfg.type!r} is unknown; "
                     f"choose one of {sorted(_EVALUATORS)}")
  module_name, class_name = _EVALUATORS[eval_cfg.type].split(":")
  return getattr(importlib.import_module(module_name), class_name)


def check_configs(config: ml_collections.ConfigDict) -> None:
  """Checks the evaluator settings of `config` without building anything (no data, no
  model): unknown types, and whatever an evaluator's static `check_config` rejects."""
  for name, eval_cfg in config.evals.items():
    cls = _evaluator_class(name, eval_cfg)
    if hasattr(cls, "check_config"):
      cls.check_config(name, eval_cfg, config)


def build_evaluators(config: ml_collections.ConfigDict, task, spec, *, only: str | None = None):
  """Instantiates the evaluators of `config.evals` (all, or the one named `only`)."""
  evaluators = []
  for name, eval_cfg in config.evals.items():
    if only is not None and name != only:
      continue
    cls = _evaluator_class(name, eval_cfg)
    evaluators.append(cls(name, eval_cfg, config, task, spec))
  return evaluators
