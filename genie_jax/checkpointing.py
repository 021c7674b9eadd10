"""Orbax checkpoints holding, in one step directory, the train state (model, optimizer, step),
the Grain iterator state of every process and the config as JSON.

The config is also written to workdir/config.json so that later stages and `evaluate` rebuild
the model from what was trained, not from flags retyped by hand.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

CONFIG_FILE = "config.json"


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes workdir/config.json (process 0 only)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, CONFIG_FILE + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(config_to_dict(config), f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(workdir, CONFIG_FILE))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with, locked so that typos in overrides fail."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} not found: {workdir!r} is not a genie_jax workdir (train there first, or "
        "pass the workdir that holds config.json and checkpoints/)")
  with open(path, encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.lock()
  return config


# Keys that may differ between a run and its continuation: how often things happen, how long to
# train, where data is read from and how fast, and the mesh (checkpoints restore onto any mesh).
RESUMABLE_KEYS = ("total_steps", "log_every_steps", "images_every_steps", "num_images",
                  "eval_every_steps", "evals", "checkpoint", "mesh", "data.data_dir",
                  "data.worker_count", "data.read_threads", "data.prefetch")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def check_resume_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses to continue a workdir with a config that changes what was trained.

  Raises:
    ValueError: listing the keys that differ from workdir/config.json, other than
      RESUMABLE_KEYS; nothing in the workdir is touched.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    saved = _flatten(json.load(f))
  new = _flatten(config_to_dict(config))
  changed = sorted(
      key for key in set(saved) | set(new)
      if saved.get(key) != new.get(key)
      and not any(key == k or key.startswith(k + ".") for k in RESUMABLE_KEYS))
  if changed:
    details = "; ".join(f"config.{k}: {saved.get(k)!r} -> {new.get(k)!r}" for k in changed)
    raise ValueError(
        f"{workdir} was trained with another config ({details}). Use a new --workdir, or "
        f"the original values, to continue it.")


class Checkpointer:
  """Thin wrapper over ocp.CheckpointManager with the items genie_jax saves."""

  def __init__(self, workdir: str, cfg: ml_collections.ConfigDict,
               config: ml_collections.ConfigDict | None = None, *, read_only: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._config_dict = config_to_dict(config) if config is not None else None
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.max_to_keep,
        keep_period=cfg.keep_period or None,
        save_interval_steps=1,  # The trainer decides when to save.
        enable_async_checkpointing=cfg.async_save,
        create=not read_only,
        read_only=read_only,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any | None = None, *,
           force: bool = False) -> bool:
    """Starts a (possibly asynchronous) save of state, iterator state and config."""
    items = {"state": ocp.args.StandardSave(state)}
    if self._config_dict is not None:
      items["config"] = ocp.args.JsonSave(self._config_dict)
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      logging.info("Saving checkpoint for step %d to %s", step, self.directory)
    return saved

  def restore(self, step: int | None, abstract_state: Any,
              data_iterator: Any | None = None) -> tuple[int, Any]:
    """Restores `step` (default latest) onto the shardings in `abstract_state`.

    `abstract_state` is a tree of jax.ShapeDtypeStruct with `.sharding` set for the current
    mesh, so a checkpoint written on one mesh restores onto another. The data iterator, if
    given, is restored in place.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    other_count_state = None
    if data_iterator is not None:
      other_count_state = self._iterator_state_of_other_process_count(step)
      if other_count_state is None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if other_count_state is not None:
      data_iterator.set_state(other_count_state)
    logging.info("Restored checkpoint of step %d from %s", step, self.directory)
    return step, restored["state"]

  def _iterator_state_of_other_process_count(self, step: int) -> dict[str, Any] | None:
    """The iterator state saved by another number of processes, or None if this number's
    files are there (Grain then restores them).

    Grain saves one file per process, named after the process count. The training pipeline's
    state does not depend on the process count (input_pipeline), so when every process saved
    the same state it is this process's state too.

    Raises:
      ValueError: the saved states differ, so none of them is this process's state.
    """
    data_dir = os.path.join(self.directory, str(step), "data")
    own = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if not os.path.isdir(data_dir) or os.path.exists(os.path.join(data_dir, own)):
      return None
    states = {}
    for name in sorted(os.listdir(data_dir)):
      if name.startswith("process_") and name.endswith(".json"):
        with open(os.path.join(data_dir, name), encoding="utf-8") as f:
          states[name] = json.load(f)
    if not states or any(s != next(iter(states.values())) for s in states.values()):
      raise ValueError(
          f"{data_dir} holds the data iterator states {sorted(states)}, not {own}, and they "
          "differ, so the input stream cannot continue with "
          f"{jax.process_count()} process(es); resume with the process count that wrote it")
    logging.info("Data iterator state of step %d written by another process count (%s); all "
                 "processes saved the same state, so it is used here.", step, sorted(states))
    return next(iter(states.values()))

  def restore_model(self, step: int | None, abstract_model: Any) -> tuple[int, Any]:
    """Restores only the model part of a train state: `abstract_model` is a sub-tree of
    it (e.g. its 'params' and 'model_state'), with shardings as in `restore`. The optimizer
    state and the data iterator are not read."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_model)
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        abstract_model, restore_args=restore_args, partial_restore=True)))
    logging.info("Restored the model of step %d from %s", step, self.directory)
    return step, restored["state"]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
