"""Orbax checkpoints holding, in one step directory, the train state (model, optimizer, step),
the Grain iterator state of every process and the config as JSON.

The trainer also writes the config to workdir/config.json (`config_lib.save_config`), so that
later stages and `evaluate` rebuild the model from what was trained, not from flags retyped by
hand; a continuation is checked against it here (`check_resume_config`).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from genie_jax import config_lib
from genie_jax import paths

# Checkpoints that could not be restored are renamed to this prefix + "<step>_<UTC time>" in
# the checkpoints directory; Orbax does not list such names as steps.
SET_ASIDE_PREFIX = "unreadable_step_"


class IncompatibleCheckpointError(ValueError):
  """The checkpoint is readable but cannot continue this run (not a damaged checkpoint)."""


class ChecksumMismatchError(RuntimeError):
  """Arrays restored from a checkpoint differ from the ones that were saved."""


# A checkpoint item beside the state: one checksum per saved array (`array_checksums`).
CHECKSUMS_ITEM = "checksums"


def _as_uint32(x: jax.Array) -> jax.Array:
  """The bits of every element of x, as uint32 (narrower types zero-extended)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(x.dtype.itemsize)
  if unsigned is None:
    raise TypeError(f"no checksum for dtype {x.dtype}")
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
  # sum_i bits_i * (2 i + 1) mod 2^32: changing one element by d changes the sum by
  # d * (2 i + 1), never 0 mod 2^32 for d != 0 since 2 i + 1 is odd, so any change of a
  # single element (every flipped bit within it) is caught. Integer sums do not depend on
  # the order of the reduction, so any sharding and process count gives the same value.
  bits = _as_uint32(x)
  # The row-major index of every element, built without reshaping a sharded array.
  index = jnp.zeros(bits.shape, jnp.uint32)
  for axis, size in enumerate(bits.shape):
    index = index * jnp.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis)
  return jnp.sum(bits * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


@jax.jit
def _checksums(tree: Any) -> Any:
  return jax.tree.map(_checksum, tree)


def array_checksums(tree: Any) -> dict[str, int]:
  """{key path: uint32 checksum} of every array in `tree`, computed where the arrays are
  (sharded or not, one or several processes), in one compiled pass."""
  flat, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(_checksums(tree)))
  return {jax.tree_util.keystr(path): int(value) for path, value in flat}


def verify_checksums(tree: Any, saved: dict[str, int], where: str) -> None:
  """Raises ChecksumMismatchError naming the arrays of `tree` whose checksum is not the
  saved one (arrays the checkpoint has no checksum for are not checked)."""
  now = array_checksums(tree)
  bad = sorted(k for k, v in now.items() if k in saved and saved[k] != v)
  if bad:
    raise ChecksumMismatchError(
        f"{where}: {len(bad)} restored array(s) differ from what was saved (checksums): "
        f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")


# Keys that may differ between a run and its continuation: how often things happen, how long to
# train, where data is read from and how fast, the mesh (checkpoints restore onto any mesh), the
# microbatches a batch is computed in (e.g. more on a machine with less memory), and what to do
# with non-finite updates (e.g. "skip" to get past a run stopped by one), and how attention
# and rematerialisation are computed (same weights: e.g. a run moved from GPUs to TPUs). Not
# data.worker_count: the saved iterator state's layout depends on it.
RESUMABLE_KEYS = ("total_steps", "log_every_steps", "images_every_steps", "num_images",
                  "eval_every_steps", "evals", "checkpoint", "mesh", "mesh_dcn",
                  "data.data_dir", "data.read_threads", "data.prefetch", "nonfinite",
                  "microbatches", "profile", "wandb", "model.attention_impl", "model.remat",
                  "model.remat_policy")


# Model and task keys added after some workdirs were written, with the value such a workdir's
# run had (the model or task reads a missing key as this): a saved config without the key
# matches a new config that holds this value.
LATER_KEYS = {
    "model.temporal_positions": "learned", "model.sink_frames": 0,
    "model.encoder_context": "clip", "model.code_restart_sampling": "uniform",
    "model.spatial_rope": False, "model.block_order": "spatial_first",
    "model.output_head": "linear", "model.quantizer": "vq", "model.kl_weight": 1e-4,
    "context_noise": 0.0, "mask_rate_per": "example", "min_mask_rate": 0.5,
    "rare_token_weight": 0.0, "unbias_sampling": True, "clean_frame_fraction": 0.0}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def has_checkpoint(workdir: str) -> bool:
  """Whether workdir/checkpoints holds a finished step: a folder named by its number (Orbax
  renames it into place when complete; on Cloud Storage, where it cannot, it marks it with
  commit_success.txt instead)."""
  folder = paths.path(workdir) / "checkpoints"
  remote = paths.is_remote(folder)
  return folder.is_dir() and any(
      p.name.isdigit() and (not remote or (p / "commit_success.txt").exists())
      for p in folder.iterdir())


def check_resume_config(workdir: str, config: ml_collections.ConfigDict,
                        derived_keys: Sequence[str] = ()) -> None:
  """Refuses to continue a workdir with a config that changes what was trained.

  `derived_keys` (`tasks.derived_keys`: what a stage takes from the stages it builds on) are
  compared only where both configs hold them, so that a workdir written before they were
  saved still matches.

  Raises:
    ValueError: listing the keys that differ from workdir/config.json, other than
      RESUMABLE_KEYS; nothing in the workdir is touched.
  """
  saved = config_lib.read_saved(workdir)
  if saved is None or not has_checkpoint(workdir):
    # Without a checkpoint nothing was trained (a run stopped before its first save, e.g. by
    # a config error found at compile time): its config.json binds nothing.
    return
  saved = _flatten(saved)
  new = _flatten(config_lib.config_to_dict(config))
  under = lambda key, k: key == k or key.startswith(k + ".")
  skip = list(RESUMABLE_KEYS) + [
      k for k in derived_keys
      if not (any(under(key, k) for key in saved) and any(under(key, k) for key in new))]
  was = lambda key: saved.get(key, LATER_KEYS.get(key))
  changed = sorted(key for key in set(saved) | set(new)
                   if was(key) != new.get(key) and not any(under(key, k) for k in skip))
  if changed:
    details = "; ".join(f"config.{k}: {was(k)!r} -> {new.get(k)!r}" for k in changed)
    raise ValueError(
        f"{workdir} was trained with another config ({details}). Use a new --workdir, or "
        f"the original values, to continue it.")


class Checkpointer:
  """Thin wrapper over ocp.CheckpointManager with the items genie_jax saves."""

  def __init__(self, workdir: str, cfg: ml_collections.ConfigDict,
               config: ml_collections.ConfigDict | None = None, *, read_only: bool = False):
    self.directory = paths.join(paths.path(workdir), "checkpoints")
    self._read_only = read_only
    self._config_dict = config_lib.config_to_dict(config) if config is not None else None
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
    items = {"state": ocp.args.StandardSave(state),
             CHECKSUMS_ITEM: ocp.args.JsonSave(array_checksums(state))}
    if self._config_dict is not None:
      items["config"] = ocp.args.JsonSave(self._config_dict)
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    with self._writing():
      saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      logging.info("Saving checkpoint for step %d to %s", step, self.directory)
    return saved

  def restore(self, step: int | None, abstract_state: Any,
              data_iterator: Any | None = None) -> tuple[int, Any]:
    """Restores `step`, by default the latest readable one, onto the shardings in
    `abstract_state`.

    `abstract_state` is a tree of jax.ShapeDtypeStruct with `.sharding` set for the current
    mesh, so a checkpoint written on one mesh restores onto another. The data iterator, if
    given, is restored in place. With step=None, damaged checkpoints are skipped
    (`_restore_latest_readable`).
    """
    def restore_step(step):
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      other_count_state = None
      if data_iterator is not None:
        other_count_state = self._iterator_state_of_other_process_count(step)
        if other_count_state is None:
          items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      restored = self._restore_verified(step, items)
      if other_count_state is not None:
        data_iterator.set_state(other_count_state)
      return restored["state"]

    step, state = self._restore_latest_readable(step, restore_step)
    logging.info("Restored checkpoint of step %d from %s", step, self.directory)
    return step, state

  def _restore_latest_readable(self, step: int | None,
                               restore_step: Callable[[int], Any]) -> tuple[int, Any]:
    """restore_step(step), or with step=None that of the latest step that restores.

    Orbax writes a checkpoint into a temporary directory and renames it once complete, so a
    save cut short (kill -9, a lost host) is never listed as a step. A listed checkpoint can
    still be damaged afterwards (files deleted or truncated by hand or by a full disk): its
    restore fails. Then a warning names its directory and the next older step is tried. Once
    one restores, the newer damaged ones are renamed to SET_ASIDE_PREFIX<step>_<time> (unless
    read-only), so that the run can save those steps again; nothing is deleted. If none
    restores, nothing is renamed and the latest one's error is raised.

    Several processes agree on every step's outcome (one small all-gather per try). A damage
    only some processes read fails inside Orbax's restore barrier instead, after its timeout.

    Raises:
      FileNotFoundError: no checkpoint at all.
      RuntimeError: no checkpoint restores (chained to the latest one's error).
    """
    if step is not None:
      return step, restore_step(step)
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    damaged: list[tuple[int, Exception]] = []
    for candidate in steps:
      error = None
      try:
        result = restore_step(candidate)
      except IncompatibleCheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        # Tensorstore, JSON and file errors all mean "this step cannot be read back".
        error = e
      if jax.process_count() > 1:
        restored_everywhere = multihost_utils.process_allgather(np.int32(error is None))
        if error is None and not np.all(restored_everywhere):
          error = RuntimeError("another process could not restore it")
      if error is None:
        for bad_step, _ in damaged:
          self._set_aside(bad_step)
        return candidate, result
      message = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
      logging.warning("Checkpoint %s cannot be restored (%s: %s); trying the previous one",
                      self._step_dir(candidate), type(error).__name__,
                      message)
      damaged.append((candidate, error))
    raise RuntimeError(
        f"none of the checkpoints {steps} in {self.directory} can be restored; nothing was "
        "renamed or deleted (the latest one's error is chained below)") from damaged[0][1]

  def _step_dir(self, step: int) -> str:
    return paths.join(self.directory, str(step))

  def _restore_verified(self, step: int, items: dict[str, Any]) -> dict[str, Any]:
    """manager.restore of `items`, with the step's array checksums in the same call when it
    has them (checkpoints written before they existed do not), checked against
    items['state'] as restored."""
    checked = (paths.path(self._step_dir(step)) / CHECKSUMS_ITEM).exists()
    if checked:
      items = {**items, CHECKSUMS_ITEM: ocp.args.JsonRestore()}
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if checked:
      verify_checksums(restored["state"], restored[CHECKSUMS_ITEM], self._step_dir(step))
    return restored

  def _set_aside(self, step: int) -> None:
    """Renames a damaged step directory out of Orbax's sight (process 0; all wait)."""
    step_dir = self._step_dir(step)
    if self._read_only:
      logging.warning("Read-only: %s left in place", step_dir)
      return
    now = int(time.time())
    if jax.process_count() > 1:  # Every process names the same target.
      # Two int32 halves: without jax_enable_x64 an int64 would be cut to 32 bits.
      high, low = multihost_utils.broadcast_one_to_all(
          np.array([now >> 16, now & 0xFFFF], np.int32))
      now = (int(high) << 16) | int(low)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    target = paths.join(self.directory, f"{SET_ASIDE_PREFIX}{step}_{stamp}")
    failure = None
    if jax.process_index() == 0:
      try:
        paths.move_tree(step_dir, target)
      except Exception as e:  # pylint: disable=broad-except
        failure = e
    moved = failure is None
    if jax.process_count() > 1:
      # Also the barrier: every process learns whether process 0 moved it, and none waits
      # for a process that failed.
      moved = bool(multihost_utils.broadcast_one_to_all(np.array(moved, np.int32)))
    if failure is not None:
      raise failure
    if not moved:
      raise OSError(f"process 0 could not move the unreadable checkpoint {step_dir} to "
                    f"{target} (its log says why)")
    self.manager.reload()
    logging.warning("Moved the unreadable checkpoint %s to %s (nothing deleted); this run "
                    "continues from an earlier step and will save step %d again", step_dir,
                    target, step)

  def _iterator_state_of_other_process_count(self, step: int) -> dict[str, Any] | None:
    """The iterator state saved by another number of processes, or None if this number's
    files are there (Grain then restores them).

    Grain saves one file per process, named after the process count. The training pipeline's
    state does not depend on the process count (input_pipeline), so when every process saved
    the same state it is this process's state too.

    Raises:
      IncompatibleCheckpointError: the saved states differ, so none of them is this
        process's state.
      FileNotFoundError: the step has no iterator state at all (a damaged checkpoint).
    """
    data_dir = paths.path(self.directory) / str(step) / "data"
    own = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if not data_dir.is_dir() or (data_dir / own).exists():
      return None
    states = {}
    for file in sorted(data_dir.iterdir(), key=lambda f: f.name):
      if file.name.startswith("process_") and file.name.endswith(".json"):
        states[file.name] = json.loads(file.read_text())
    if not states:
      raise FileNotFoundError(f"{data_dir} holds no data iterator state ({own} expected)")
    if any(s != next(iter(states.values())) for s in states.values()):
      raise IncompatibleCheckpointError(
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
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_model)

    def restore_step(step):
      return self._restore_verified(step, dict(state=ocp.args.PyTreeRestore(
          abstract_model, restore_args=restore_args, partial_restore=True)))["state"]

    step, model = self._restore_latest_readable(step, restore_step)
    logging.info("Restored the model of step %d from %s", step, self.directory)
    return step, model

  def close(self) -> None:
    try:
      with self._writing():
        self.manager.wait_until_finished()
    finally:
      self.manager.close()

  @contextlib.contextmanager
  def _writing(self):
    # An asynchronous save's failure (e.g. an upload session a storage outage lost, which
    # gcsfs does not retry) surfaces at the next save or at close as the storage client's
    # own error, naming an upload URL at best: the note names the folder and what to do.
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      e.add_note(f"could not write {self.directory}: a checkpoint save failed (this one or "
                 "an earlier asynchronous one). If the storage failed, the same command run "
                 "again resumes from the newest complete checkpoint.")
      raise
