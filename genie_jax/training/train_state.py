"""The train state, its shardings, and the sharded train step; shared by the trainer, the
evaluator and the benchmark.

State layout (a plain dict, so Orbax saves it as a tree):
  step         int32 scalar, replicated
  params,
  model_state  the model's variables, as genie_jax/model_spec.py lays them out
  opt_state    optax state; parameter-shaped parts sharded like the parameters
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from genie_jax import model_spec
from genie_jax import profiling
from genie_jax import sharding
from genie_jax.tasks.base import Task
from genie_jax.training import optim


@dataclasses.dataclass(frozen=True)
class StateSpec(model_spec.ModelSpec):
  """Everything needed to create, restore, shard and update a train state: the model's spec
  with the optimizer, and 'step' and 'opt_state' in `shardings` and `abstract`."""
  tx: optax.GradientTransformation = None
  schedule: optax.Schedule = None
  init: Callable[[jax.Array], dict[str, Any]] = None


def make_state_spec(task: Task, config: ml_collections.ConfigDict, mesh: Mesh) -> StateSpec:
  """Shapes and shardings of the train state, from jax.eval_shape (nothing is allocated)."""
  model = model_spec.make_model_spec(task, config, mesh)
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps)
  replicated = sharding.replicated(mesh)
  opt_shapes = jax.eval_shape(tx.init, model.abstract["params"])
  shardings = dict(
      model.shardings,
      step=replicated,
      opt_state=optax.tree_map_params(
          tx, lambda _, s: s, opt_shapes, model.shardings["params"],
          transform_non_params=lambda _: replicated,
          is_leaf=lambda x: isinstance(x, NamedSharding)),
  )
  abstract = dict(
      model.abstract,
      step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
      opt_state=jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             opt_shapes, shardings["opt_state"]))

  def create(key):
    graphdef, params, model_state = nnx.split(task.make_model(nnx.Rngs(key)), task.trainable,
                                              ...)
    del graphdef
    return dict(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                opt_state=tx.init(params))

  init = jax.jit(create, out_shardings=shardings)
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)}
  return StateSpec(**dict(fields, shardings=shardings, abstract=abstract), tx=tx,
                   schedule=schedule, init=init)


NONFINITE_POLICIES = ("stop", "skip")


def root_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """(init key, train key) of config.seed: the model's initialisation draws from the first,
  the train steps from the second, so no step reuses a key an initialiser drew from."""
  init_key, train_key = jax.random.split(jax.random.key(seed))
  return init_key, train_key


def step_keys(train_key: jax.Array, step: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(loss key, update key) of train step `step`."""
  loss_key, update_key = jax.random.split(jax.random.fold_in(train_key, step))
  return loss_key, update_key


def make_train_step(task: Task, spec: StateSpec, seed: int, nonfinite: str = "stop",
                    microbatches: int = 1):
  """The update for one global batch: loss, gradients, AdamW, then the task's post-update.

  Randomness is derived from (seed, step), so a resumed run draws the same numbers as an
  uninterrupted one.

  Args:
    task: the stage.
    spec: shapes, shardings and optimizer of the state.
    seed: config.seed.
    nonfinite: config.nonfinite. "stop": the update is applied whatever it is (the trainer
      stops on a non-finite loss or gradient norm). "skip": when the loss, the gradient norm
      or the updated parameters are not finite, the state keeps its model, model state and
      optimizer state (only `step` advances, so the batch is consumed), and the metric
      `skipped_updates` is 1. The choice is made on device, so no step waits for the host.
    microbatches: config.microbatches (`accumulate`); 1: the whole batch at once.
  """
  if nonfinite not in NONFINITE_POLICIES:
    raise ValueError(f"config.nonfinite={nonfinite!r}; choose one of {NONFINITE_POLICIES}")
  train_key = root_keys(seed)[1]

  # copy=True gives the merged model fresh Variables of the current trace, which the model
  # may then update (e.g. codebook usage).
  def loss_fn(params, model_state, batch, key):
    model = nnx.merge(spec.graphdef, params, model_state, copy=True)
    with sharding.activation_rules(spec.mesh, spec.rules):
      loss, metrics, aux = task.loss(model, batch, key)
    return loss, (metrics, aux, spec.split(model)[1])

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, batch):
    step = state["step"]
    loss_key, update_key = step_keys(train_key, step)
    if microbatches == 1:
      (loss, (metrics, aux, model_state)), grads = grad_fn(
          state["params"], state["model_state"], batch, loss_key)
    else:
      loss, metrics, aux, model_state, grads = accumulate(
          grad_fn, state["params"], state["model_state"], batch, loss_key, microbatches, spec)
    updates, opt_state = spec.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    model = nnx.merge(spec.graphdef, params, model_state, copy=True)
    metrics = dict(metrics, **task.after_update(model, aux, update_key))
    params, model_state = spec.split(model)
    grad_norm = optax.tree.norm(grads)
    new_state = dict(step=step + 1, params=params, model_state=model_state, opt_state=opt_state)
    if nonfinite == "skip":
      finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                & jnp.isfinite(optax.tree.norm(params)))
      kept = dict(state, step=step + 1)
      # A select rather than lax.cond: both candidates exist already (the old state's buffers
      # are donated), so the cost is one elementwise pass over the state and no host sync.
      new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, kept)
      metrics["skipped_updates"] = 1 - finite.astype(jnp.int32)
    metrics.update(loss=loss, grad_norm=grad_norm,
                   param_norm=optax.tree.norm(new_state["params"]),
                   learning_rate=spec.schedule(step))
    return new_state, metrics

  return train_step


def accumulate(grad_fn, params, model_state, batch, key: jax.Array, microbatches: int,
               spec: StateSpec):
  """`grad_fn` (value_and_grad of the loss with its aux) over the batch in `microbatches`
  equal parts, one after the other: (loss, metrics, aux, model_state, grads) as one call on
  the whole batch gives them, for a loss that averages over the batch's examples.

  Microbatch i holds the clips i, i + m, i + 2m, ... (m = microbatches): on every mesh the
  same clips, and where each device's share of the batch is a multiple of m, each device's
  part of a microbatch lies on that device (no data moves). Only one microbatch's
  activations are alive at a time, so the memory a step needs falls with m while the
  update stays that of the whole batch. Each microbatch draws from key folded with its
  index. Gradients (accumulated in float32), the loss and the metrics are the microbatches'
  means: a loss that is a ratio over the batch (the dynamics model's cross-entropy over its
  masked tokens) weighs each microbatch equally rather than each token. Every microbatch
  starts from the step's model state. A loss leaves the model state's parameters (frozen
  stages' weights) alone (`Task.loss`), so they pass through; of the rest, float state
  (codebook usage averages) moves by the mean of the microbatches' changes and other state
  (counters, which each microbatch moves alike) is the last one's. aux leaves must have the
  batch axis first; they are put back in batch order for the task's `after_update`.
  """
  size = jax.tree.leaves(batch)[0].shape[0]
  if size % microbatches:
    raise ValueError(f"config.microbatches={microbatches} does not divide the batch of {size}")
  part = size // microbatches

  def split(x):
    # (B, ...) -> (B/m, m, ...) -> (m, B/m, ...): row i holds clips i, i + m, ...
    parts = jnp.swapaxes(x.reshape(part, microbatches, *x.shape[1:]), 0, 1)
    return sharding.constrain(parts, (None, sharding.BATCH) + (None,) * (x.ndim - 1))

  def merge(x):
    if x.ndim < 2 or x.shape[1] != part:
      raise ValueError(f"with config.microbatches={microbatches} every leaf of the task's aux "
                       f"needs the batch ({part} clips per microbatch) as its first axis; "
                       f"got shape {x.shape[1:]}")
    return jnp.swapaxes(x, 0, 1).reshape(size, *x.shape[2:])

  frozen, moving = nnx.split_state(model_state, nnx.Param, ...)
  is_float = jax.tree.map(lambda x: jnp.issubdtype(x.dtype, jnp.inexact), moving)

  def body(carry, xs):
    grad_sum, delta_sum, _ = carry
    micro, index = xs
    (loss, (metrics, aux, new_state)), grads = grad_fn(params, model_state, micro,
                                                       jax.random.fold_in(key, index))
    new_moving = nnx.split_state(new_state, nnx.Param, ...)[1]
    grad_sum = jax.tree.map(lambda s, g: s + g.astype(jnp.float32), grad_sum, grads)
    delta_sum = jax.tree.map(
        lambda f, s, new, old: s + (new - old).astype(jnp.float32) if f else s,
        is_float, delta_sum, new_moving, moving)
    return (grad_sum, delta_sum, new_moving), (loss, metrics, aux)

  zeros = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)
  with sharding.activation_rules(spec.mesh, spec.rules):
    micro_batches = jax.tree.map(split, batch)
  (grad_sum, delta_sum, last_moving), (losses, metrics, aux) = jax.lax.scan(
      body, (zeros(params), zeros(moving), moving),
      (micro_batches, jnp.arange(microbatches)))
  grads = jax.tree.map(lambda s, p: (s / microbatches).astype(p.dtype), grad_sum, params)
  moving = jax.tree.map(
      lambda f, s, old, last: (old + s / microbatches).astype(old.dtype) if f else last,
      is_float, delta_sum, moving, last_moving)
  metrics = jax.tree.map(lambda m: jnp.mean(m.astype(jnp.float32), axis=0), metrics)
  return (jnp.mean(losses), metrics, jax.tree.map(merge, aux),
          nnx.merge_state(frozen, moving), grads)


def step_stats(lowered: Any, compiled: Any, task: Task, spec: StateSpec, seed: int,
               batch: Any, microbatches: int) -> dict[str, float]:
  """`profiling.compiled_stats` (per device) of a train step lowered on the abstract `batch`
  and compiled, with the FLOPs of `profiling.program_flops`. XLA's cost analysis counts a
  loop's body once, so a step in microbatches is counted as the same step lowered in one part
  (no FLOPs where the backend counts compiled programs only)."""
  stats = profiling.compiled_stats(compiled)
  stats.pop("flops", None)
  if microbatches > 1:
    lowered, compiled = jit_train_step(task, spec, seed).lower(spec.abstract, batch), None
  flops = profiling.program_flops(lowered, compiled, spec.mesh.size)
  if flops is not None:
    stats["flops"] = flops
  return stats


def jit_train_step(task: Task, spec: StateSpec, seed: int, nonfinite: str = "stop",
                   microbatches: int = 1):
  """jit with explicit shardings; the old state's buffers are donated to the new one."""
  return jax.jit(
      make_train_step(task, spec, seed, nonfinite, microbatches),
      in_shardings=(spec.shardings, spec.batch_sharding),
      out_shardings=(spec.shardings, sharding.replicated(spec.mesh)),
      donate_argnums=(0,),
  )


def abstract_batch(spec: StateSpec, local_batch: dict[str, Any]
                   ) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch that `local_batch` (this process's share) is part of."""
  return {k: jax.ShapeDtypeStruct((v.shape[0] * jax.process_count(),) + v.shape[1:], v.dtype,
                                  sharding=spec.batch_sharding)
          for k, v in local_batch.items()}
