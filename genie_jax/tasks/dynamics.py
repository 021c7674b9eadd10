"""Stage 3: the MaskGIT dynamics model on frozen stage-1/2 models (Genie section 2.1).

It builds on a tokenizer and a LAM (`depends_on`): the config names their workdirs, both
models are rebuilt from the model configs saved there (kept in config.tokenizer_model and
config.lam_model by `tasks.resolve_config`) and their weights grafted into a fresh train
state (`stages.init_from_dependencies`). They live in the train state's model_state (no
gradient, no optimizer state), unless config.cotrain_lam makes the LAM trainable alongside
the dynamics model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from genie_jax import metrics as metrics_lib
from genie_jax import reductions
from genie_jax.models import dynamics as dynamics_lib
from genie_jax.models import lam as lam_lib
from genie_jax.models import tokenizer as tokenizer_lib
from genie_jax.tasks import base
from genie_jax.tasks import lam as lam_task_lib

# Frames of every dataset are RGB.
_DATA_CHANNELS = 3
# MaskGIT training mask rates (Genie): one rate per example, drawn from U[0.5, 1].
MIN_MASK_RATE, MAX_MASK_RATE = 0.5, 1.0
# What draws its own mask rate: each example (Genie), each frame of each example, each
# example with a whole past before its first masked frame ('suffix'), or each example with
# every other frame whole ('alternate').
MASK_RATES_PER = ("example", "frame", "suffix", "alternate")


def sample_mask(rng: jax.Array, shape: tuple[int, int, int], *, per: str = "example",
                min_rate: float = MIN_MASK_RATE) -> tuple[jax.Array, jax.Array]:
  """The training mask: (mask_BTN bool, rate float32 of shape (B,) or (B, T)).

  per='example' (Genie): each example draws its own rate r ~ U[min_rate, 1] (one rate per
  batch would raise the variance of the gradient) and hides each token of every frame with
  probability r. Every past frame of a masked frame is then as masked as it is, while in a
  rollout the past frames are whole: a model that moves content from frame t-1 to frame t
  rarely sees frame t-1 in training.
  per='frame': each frame draws its own rate (diffusion forcing's independent noise level
  per frame, for masks), so a masked frame's past is sometimes nearly whole, as in a rollout.
  per='suffix': each example draws its rate r and a frame k uniformly from 1..T-1; frames
  before k are whole and frames k.. are hidden at rate r, so frame k is predicted from a
  whole past, as in a rollout, and the later frames as in Genie.
  per='alternate': each example draws its rate r and a parity; the frames of that parity
  (from frame 1) are hidden at rate r and the others are whole, so every hidden frame is
  predicted from a whole previous frame, as in a rollout, for half the frames' tokens.
  Frame 0 is never hidden, so there is always a context frame.
  """
  if per not in MASK_RATES_PER:
    raise ValueError(f"mask rates per {per!r}; expected one of {MASK_RATES_PER}")
  b, t, n = shape
  rate_key, token_key = jax.random.split(rng)
  rate_shape = (b, t) if per == "frame" else (b,)
  rate = jax.random.uniform(rate_key, rate_shape, jnp.float32, min_rate, MAX_MASK_RATE)
  # (B, 1, 1) or (B, T, 1): broadcasts over the frames (per example) and the tokens.
  mask_BTN = jax.random.uniform(token_key, (b, t, n)) < rate.reshape(b, -1, 1)
  if per == "suffix":
    first_B = jax.random.randint(jax.random.fold_in(rate_key, 1), (b,), 1, max(t, 2))
    mask_BTN &= (jnp.arange(t)[None, :] >= first_B[:, None])[:, :, None]
  if per == "alternate":
    parity_B = jax.random.bernoulli(jax.random.fold_in(rate_key, 2), 0.5, (b,))
    mask_BTN &= (jnp.arange(t)[None, :] % 2 == parity_B[:, None])[:, :, None]
  return mask_BTN.at[:, 0].set(False), rate


def corrupt_context(rng: jax.Array, tokens_BTN: jax.Array, mask_BTN: jax.Array,
                    max_rate: float, num_codes: int) -> jax.Array:
  """The tokens with some of the visible ones replaced by random codes: each example draws
  a rate from U[0, max_rate] and replaces each visible token with that probability.

  In a rollout every context frame after the prompt is the model's own sample, errors
  included; trained only on the tokenizer's clean codes the model copies those errors
  forward. Trained to predict the clean masked tokens from a corrupted context, it learns
  not to trust every visible token. The targets (the masked tokens) stay clean.
  """
  b, t, n = tokens_BTN.shape
  rate_key, where_key, code_key = jax.random.split(rng, 3)
  rate_B = jax.random.uniform(rate_key, (b,), jnp.float32, 0.0, max_rate)
  replace_BTN = jax.random.uniform(where_key, (b, t, n)) < rate_B[:, None, None]
  random_BTN = jax.random.randint(code_key, (b, t, n), 0, num_codes, tokens_BTN.dtype)
  return jnp.where(replace_BTN & ~mask_BTN, random_BTN, tokens_BTN)


def masked_token_metrics(logits_BTNV: jax.Array, tokens_BTN: jax.Array, mask_BTN: jax.Array,
                         token_weight_BTN: jax.Array | None = None) -> dict[str, jax.Array]:
  """Cross-entropy and accuracy over the masked positions only, and the masked fraction of
  frames 1..T-1; with `token_weight_BTN` (e.g. `rarity_weights`) also 'weighted_loss', the
  cross-entropy averaged with those weights."""
  ce_BTN = optax.softmax_cross_entropy_with_integer_labels(logits_BTNV, tokens_BTN)
  weight_BTN = mask_BTN.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(weight_BTN), 1.0)
  correct_BTN = metrics_lib.masked_correct(logits_BTNV, tokens_BTN, mask_BTN)
  metrics = dict(dynamics_loss=jnp.sum(ce_BTN * weight_BTN) / count,
                 masked_accuracy=jnp.sum(correct_BTN) / count,
                 mask_fraction=jnp.mean(weight_BTN[:, 1:]))
  if token_weight_BTN is not None:
    metrics["weighted_loss"] = (jnp.sum(ce_BTN * token_weight_BTN)
                                / jnp.maximum(jnp.sum(token_weight_BTN), 1e-6))
  return metrics


def rarity_weights(tokens_BTN: jax.Array, mask_BTN: jax.Array, num_codes: int, alpha: float
                   ) -> jax.Array:
  """Loss weights of the masked tokens (0 elsewhere): each code's frequency in the batch to
  the power -alpha. A code on 1% of the tokens (a small sprite) weighs 10x one on 100% at
  alpha 0.5, instead of contributing next to nothing to the loss."""
  freq_V = jnp.bincount(tokens_BTN.reshape(-1), length=num_codes) / tokens_BTN.size
  return jax.lax.stop_gradient(
      jnp.power(jnp.maximum(freq_V[tokens_BTN], 1e-6), -alpha) * mask_BTN)


def check_stage_fits_data(config: ml_collections.ConfigDict, name: str) -> None:
  """The stage `name` (a dependency of a dynamics-like stage, its model config in
  config.<name>_model) fits the data: frame size, channels and (the tokenizer, whose latents
  depend on the whole past) clip length."""
  data = config.data
  model = config[f"{name}_model"]
  where = f"config.{name}_workdir={config.get(f'{name}_workdir')!r}"
  if model.image_size != data.image_size:
    raise ValueError(
        f"{where}: its {name} has model.image_size={model.image_size} but "
        f"config.data.image_size={data.image_size}; use a {name} trained on frames of "
        f"this size")
  # The LAM, whose actions depend on a transition's frames only, may see the clip in
  # windows (`LatentActionModel.infer_actions`).
  if name == "tokenizer" and model.max_frames < data.clip_len:
    raise ValueError(
        f"{where}: its {name} has model.max_frames={model.max_frames} < "
        f"config.data.clip_len={data.clip_len}; use shorter clips or a {name} trained on "
        f"clips this long")
  if model.channels != _DATA_CHANNELS:
    raise ValueError(
        f"{where}: its {name} has model.channels={model.channels} but "
        f"config.data.name={data.name!r} frames have {_DATA_CHANNELS}")


def check_world_model_config(config: ml_collections.ConfigDict, quantizer: str, why: str
                             ) -> None:
  """What every world-model stage checks of its resolved config: the stages it builds on fit
  the data, the tokenizer has `quantizer` (`why` says why), the clips fit the model."""
  for name in ("tokenizer", "lam"):
    check_stage_fits_data(config, name)
  found = tokenizer_lib.quantizer(config.tokenizer_model)
  if found != quantizer:
    raise ValueError(
        f"config.tokenizer_workdir={config.tokenizer_workdir!r} holds a tokenizer with "
        f"model.quantizer={found!r}; the {config.stage!r} stage needs a {quantizer!r} "
        f"tokenizer ({why})")
  if config.data.clip_len > config.model.max_frames:
    raise ValueError(
        f"config.data.clip_len={config.data.clip_len} exceeds config.model.max_frames="
        f"{config.model.max_frames} (the temporal position table); raise max_frames")
  if config.data.clip_len < 2:
    raise ValueError(f"config.data.clip_len={config.data.clip_len}: the dynamics model "
                     f"needs clips of at least 2 frames")


class DynamicsTask(base.Task):
  """Loss = cross-entropy of the masked tokens (+ lam_loss_weight * the LAM's own loss when
  co-trained).

  Config keys (besides the trainer's): tokenizer_workdir, tokenizer_step, lam_workdir,
  lam_step (0: latest checkpoint), tokenizer_model and lam_model (filled in from the
  workdirs; leave empty: `base.Dependency`), cotrain_lam, lam_loss_weight, context_noise
  (the largest rate of `corrupt_context`; 0: Genie's clean context), mask_rate_per and
  min_mask_rate (the training mask, `sample_mask`), rare_token_weight (alpha of
  `rarity_weights`; 0: Genie's plain cross-entropy); model: see
  `genie_jax.models.dynamics.default_config`.
  """

  depends_on = (base.Dependency("tokenizer", "tokenizer"), base.Dependency("lam", "lam"))

  @classmethod
  def derive_config(cls, config, upstream):
    del config
    tokenizer, lam = upstream["tokenizer"], upstream["lam"]
    return {"model.num_codes": tokenizer.num_codes,
            "model.tokens_per_frame": (tokenizer.image_size // tokenizer.patch_size) ** 2,
            "model.num_actions": lam.num_actions}

  def __init__(self, config):
    super().__init__(config)
    # Dynamics workdirs saved before the key existed trained on a clean context.
    self.context_noise = config.get("context_noise", 0.0)
    self.mask_rate_per = config.get("mask_rate_per", "example")
    self.min_mask_rate = config.get("min_mask_rate", MIN_MASK_RATE)
    self.rare_token_weight = config.get("rare_token_weight", 0.0)
    if config.cotrain_lam:
      self.trainable = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("tokenizer")))
    else:
      self.trainable = nnx.All(nnx.Param, nnx.PathContains("dynamics"))
    # Its loss reads config.model only.
    self._lam_task = lam_task_lib.LatentActionTask(
        ml_collections.ConfigDict(dict(stage="lam", model=config.lam_model.to_dict())))

  def validate(self) -> None:
    config = self.config
    check_world_model_config(config, "vq", "MaskGIT predicts tokens; the 'diffusion' stage "
                             "works on continuous latents")
    if config.cotrain_lam and config.lam_model.max_frames < config.data.clip_len:
      raise ValueError(
          f"config.cotrain_lam=True needs a LAM for clips of config.data.clip_len="
          f"{config.data.clip_len} frames, but config.lam_workdir={config.lam_workdir!r} has "
          f"model.max_frames={config.lam_model.max_frames}")
    if config.lam_loss_weight < 0:
      raise ValueError(f"config.lam_loss_weight={config.lam_loss_weight} must not be negative")
    if not 0.0 <= self.context_noise < 1.0:
      raise ValueError(f"config.context_noise={self.context_noise} must be in [0, 1)")
    if self.mask_rate_per not in MASK_RATES_PER:
      raise ValueError(f"config.mask_rate_per={self.mask_rate_per!r}; expected one of "
                       f"{list(MASK_RATES_PER)}")
    if not 0.0 <= self.rare_token_weight <= 1.0:
      raise ValueError(f"config.rare_token_weight={self.rare_token_weight} must be in [0, 1] "
                       "(0: plain cross-entropy)")
    if not 0.0 <= self.min_mask_rate <= MAX_MASK_RATE:
      raise ValueError(f"config.min_mask_rate={self.min_mask_rate} must be in [0, "
                       f"{MAX_MASK_RATE}]")
    dynamics_lib.validate_config(config.model)

  def make_model(self, rngs):
    return dynamics_lib.WorldModel(
        tokenizer=tokenizer_lib.Tokenizer(self.config.tokenizer_model, rngs=rngs),
        lam=lam_lib.LatentActionModel(self.config.lam_model, rngs=rngs),
        dynamics=dynamics_lib.DynamicsModel(self.config.model, rngs=rngs))

  def tokens_and_actions(self, model: dynamics_lib.WorldModel, video_BTHWC: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
    """Tokenizer codes tokens_BTN and LAM actions_BT (dataset convention: [:, t] caused
    frame t+1; the last column is 0 and unused) of a clip; no gradient flows into either."""
    tokens_BTN, _ = model.tokenizer.encode(video_BTHWC)
    # A LAM trained on shorter clips reads this one in windows of its own length.
    actions_BT = model.lam.infer_actions(video_BTHWC)
    actions_BT = jnp.pad(actions_BT, ((0, 0), (0, 1)))
    return jax.lax.stop_gradient(tokens_BTN), jax.lax.stop_gradient(actions_BT)

  def loss(self, model, batch, rng):
    mask_key, lam_key = jax.random.split(rng)
    tokens_BTN, actions_BT = self.tokens_and_actions(model, batch["video"])
    mask_BTN, _ = sample_mask(mask_key, tokens_BTN.shape, per=self.mask_rate_per,
                              min_rate=self.min_mask_rate)
    inputs_BTN = tokens_BTN
    if self.context_noise > 0:
      # A key of its own, so that the masks and the LAM's keys are those of a clean run.
      inputs_BTN = corrupt_context(jax.random.fold_in(rng, 1), tokens_BTN, mask_BTN,
                                   self.context_noise, self.config.model.num_codes)
    logits_BTNV = model.dynamics(inputs_BTN, mask_BTN, actions_BT)
    weights_BTN = rarity_weights(tokens_BTN, mask_BTN, self.config.model.num_codes,
                                 self.rare_token_weight) if self.rare_token_weight else None
    metrics = masked_token_metrics(logits_BTNV, tokens_BTN, mask_BTN, weights_BTN)
    loss = metrics["weighted_loss"] if self.rare_token_weight else metrics["dynamics_loss"]
    aux = None
    if self.config.cotrain_lam:
      # The LAM keeps learning from its own loss; the dynamics loss never reaches it (its
      # actions are integers), so its codebook moves only through the LAM's VQ loss.
      lam_loss, lam_metrics, aux = self._lam_task.loss(model.lam, batch, lam_key)
      loss = loss + self.config.lam_loss_weight * lam_loss
      metrics.update({f"lam_{k}": v for k, v in lam_metrics.items()}, lam_loss=lam_loss)
    return loss, metrics, aux

  def after_update(self, model, aux, rng):
    if not self.config.cotrain_lam:
      return {}
    return {f"lam_{k}": v for k, v in self._lam_task.after_update(model.lam, aux, rng).items()}

  def predict_masked(self, model: dynamics_lib.WorldModel, batch, rng: jax.Array
                     ) -> dict[str, jax.Array]:
    """One-step (argmax) predictions of the tokens hidden by a training-like mask.

    Returns 'tokens_BTN' (the tokenizer's), 'mask_BTN', 'pred_BTN' (the true tokens where
    not masked, the argmax prediction where masked), 'logits_BTNV'.
    """
    tokens_BTN, actions_BT = self.tokens_and_actions(model, batch["video"])
    mask_BTN, _ = sample_mask(rng, tokens_BTN.shape)
    logits_BTNV = model.dynamics(tokens_BTN, mask_BTN, actions_BT)
    pred_BTN = jnp.where(mask_BTN, reductions.argmax(logits_BTNV), tokens_BTN)
    return dict(tokens_BTN=tokens_BTN, mask_BTN=mask_BTN, pred_BTN=pred_BTN,
                logits_BTNV=logits_BTNV)

  def visualize(self, model, batch):
    out = self.predict_masked(model, batch, jax.random.key(0))
    return [tokenizer_lib.to_unit_interval(batch["video"]),
            model.tokenizer.decode(out["tokens_BTN"]),
            model.tokenizer.decode(out["pred_BTN"])]
