"""Optimizer and learning-rate schedules from `config.optimizer`."""

from __future__ import annotations

import jax
import ml_collections
import optax

SCHEDULES = ("constant", "warmup_cosine", "wsd")


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Warmup then constant, cosine decay, or warmup-stable-decay (WSD).

  WSD holds the peak rate and decays linearly to `end_lr` over the last `decay_fraction` of
  training; it lets a run be extended (or stopped early with a short decay) without retuning.
  """
  check_config(cfg)
  warmup = min(int(cfg.warmup_steps), total_steps)
  if cfg.schedule == "constant":
    return optax.warmup_constant_schedule(0.0, cfg.lr, max(warmup, 1))
  if cfg.schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, max(warmup, 1), max(total_steps, warmup + 1), end_value=cfg.end_lr)
  decay = int(round(total_steps * cfg.decay_fraction))
  stable = max(total_steps - warmup - decay, 0)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)),
       optax.constant_schedule(cfg.lr),
       optax.linear_schedule(cfg.lr, cfg.end_lr, max(decay, 1))],
      boundaries=[warmup, warmup + stable])


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """Fails naming the key where `config.optimizer` holds a value that would not train, or
  would train backwards (a negative rate or clipping norm turns the update around)."""
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f"config.optimizer.schedule={cfg.schedule!r}; choose one of {SCHEDULES}")
  ranges = (("lr", cfg.lr > 0, "must be positive"),
            ("end_lr", cfg.end_lr >= 0, "must not be negative"),
            ("b1", 0 <= cfg.b1 < 1, "must be in [0, 1)"),
            ("b2", 0 <= cfg.b2 < 1, "must be in [0, 1)"),
            ("eps", cfg.eps > 0, "must be positive"),
            ("weight_decay", cfg.weight_decay >= 0, "must not be negative"),
            ("warmup_steps", cfg.warmup_steps >= 0, "must not be negative"),
            ("decay_fraction", 0 <= cfg.decay_fraction <= 1, "must be in [0, 1]"),
            ("grad_clip_norm", cfg.grad_clip_norm >= 0, "must not be negative (0: no clipping)"))
  for key, ok, why in ranges:
    if not ok:
      raise ValueError(f"config.optimizer.{key}={cfg[key]!r} {why}")


def decay_mask(params):
  """True for the weights that weight decay applies to: matmul kernels only.

  Biases, norms, position tables and the VQ codebook (whose entries must stay where the
  encoder puts its latents) are not decayed.
  """
  def is_kernel(path, _):
    last = path[-1] if path else None
    # nnx states end paths in the Variable's attribute name; plain dicts in the key.
    name = str(getattr(last, "key", getattr(last, "name", last)))
    if name == "value" and len(path) > 1:  # A Variable's own pytree key.
      last = path[-2]
      name = str(getattr(last, "key", getattr(last, "name", last)))
    return name.endswith("kernel")
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> tuple[
    optax.GradientTransformation, optax.Schedule]:
  """AdamW (Genie: b1=b2=0.9, wd 1e-4) with global-norm clipping and a schedule."""
  schedule = learning_rate_schedule(cfg, total_steps)
  chain = []
  if cfg.grad_clip_norm:
    chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  chain.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  return optax.chain(*chain), schedule


def default_config() -> ml_collections.ConfigDict:
  """Genie App. F tokenizer optimizer."""
  return ml_collections.ConfigDict(dict(
      lr=3e-4, end_lr=0.0, b1=0.9, b2=0.9, eps=1e-8, weight_decay=1e-4,
      schedule="warmup_cosine", warmup_steps=10_000, decay_fraction=0.2, grad_clip_norm=1.0))
