"""MaskGIT dynamics model (Genie stage 3, section 2.1).

tokens_BTN (some replaced by [MASK]) + latent actions -> embeddings -> causal ST-transformer
-> logits_BTNV over the V tokenizer codes.

Action alignment. `actions_BT[:, t]` was taken at frame t and produced frame t+1 (the
dataset's convention; the last column is unused). Frame t+1 is conditioned on
actions[:, t]; frame 0, caused by nothing in the clip, gets a learned 'no action' embedding
(index A of the action table). `frame_actions` does this shift once, so every later use
speaks of "the action that caused frame t". With causal temporal attention the logits of
frame t then depend on frames <= t and on the actions that caused them, never on later
actions.

Two ways in for the action (config.model.action_conditioning):
  'additive' (Genie): its embedding is added to every token of the frame it caused.
  'prepend' (Jasmine): one extra token per frame holds it, in front of the N tokens, so
    spatial attention reads it like a token (N + 1 tokens per frame; logits only for the N
    real ones). Jasmine found this needed for faithful CoinRun rollouts.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from genie_jax import sharding
from genie_jax.models import layers

CONDITIONINGS = ("additive", "prepend")
BLOCK_ORDERS = ("spatial_first", "temporal_first")
OUTPUT_HEADS = ("linear", "tied")

_ACT_BTNV = ("act_batch", "act_time", "act_tokens", "act_vocab")
_EMBED_STDDEV = 0.02

# The settings of every world model's dynamics transformer, this family's and the diffusion
# family's (`default_config` says what each means).
WORLD_MODEL_DEFAULTS = dict(
    num_layers=12,
    d_model=512,
    num_heads=8,
    mlp_ratio=4,
    tokens_per_frame=0,
    num_actions=0,
    max_frames=16,
    action_conditioning="additive",
    temporal_positions="learned",
    sink_frames=0,
    spatial_rope=False,
    block_order="spatial_first",
    **layers.TRANSFORMER_DEFAULTS,
)


def default_config() -> ml_collections.ConfigDict:
  """config.model for the dynamics model; defaults are Genie App. F (CoinRun) shapes.

  Keys:
    num_layers: ST blocks (App. F: 12).
    d_model, num_heads, mlp_ratio, qk_norm, qk_norm_kind, dtype, param_dtype, remat,
      remat_policy, attention_impl: as in `genie_jax.models.tokenizer.default_config`.
    num_codes: V, the tokenizer's codebook size.
    tokens_per_frame: N, the tokenizer's tokens per frame.
    num_actions: A, the LAM's number of latent actions.
      (0 for these three means: take it from the stage-1/2 workdirs; the dynamics task
      fills them in before the model is built.)
    max_frames: the longest clip T the model sees at once (a rollout's window).
    action_conditioning: 'additive' or 'prepend' (see the module docstring).
    temporal_positions: 'learned' (Genie: a table added to the tokens) or 'rope' (rotary
      angles in temporal attention; `genie_jax.models.layers.STTransformer`). Decides what a
      rollout past max_frames does: under 'learned' each frame's keys depend on its place
      in the window, so every later frame recomputes the window's past frames; under 'rope'
      the cache keeps its frames and rolls (`genie_jax.inference.genie`).
    sink_frames: under 'rope', how many first frames (the prompt's) the rolling cache keeps
      for good, as an attention sink, besides the latest max_frames - 1 - sink_frames.
    spatial_rope: also rotate spatial attention's queries and keys by each token's row and
      column (2-D RoPE, `genie_jax.models.layers.rope_2d`) on top of the learned spatial
      table; needs a square token grid and a head width divisible by 4.
    block_order: 'spatial_first' (Genie's ST block) or 'temporal_first' (temporal attention
      before spatial attention in every block; `genie_jax.models.layers.STBlock`).
    output_head: 'linear' (a matrix of its own maps the transformer's output to the V
      logits) or 'tied' (MaskGIT's: the logits are the output's dot products with the input
      token embeddings, plus a bias; d_model x V fewer parameters).
  """
  cfg = ml_collections.ConfigDict(dict(num_codes=0, output_head="linear",
                                       **WORLD_MODEL_DEFAULTS))
  cfg.lock()
  return cfg


def validate_world_model_config(cfg: ml_collections.ConfigDict, sizes: tuple[str, ...]
                                ) -> None:
  """The checks of `WORLD_MODEL_DEFAULTS`' keys, and that each of `sizes` (keys filled in
  from the stages a model builds on) is positive; ValueError naming the config.model key."""
  layers.validate_transformer_config(cfg)
  for key in sizes + ("tokens_per_frame", "num_actions", "max_frames"):
    if cfg[key] < 1:
      raise ValueError(f"config.model.{key}={cfg[key]} must be positive")
  if cfg.num_layers < 0:
    raise ValueError(f"config.model.num_layers={cfg.num_layers} must not be negative")
  if cfg.action_conditioning not in CONDITIONINGS:
    raise ValueError(f"config.model.action_conditioning={cfg.action_conditioning!r}; "
                     f"expected one of {list(CONDITIONINGS)}")
  if cfg.get("block_order", "spatial_first") not in BLOCK_ORDERS:
    raise ValueError(f"config.model.block_order={cfg.block_order!r}; expected one of "
                     f"{list(BLOCK_ORDERS)}")
  layers.validate_temporal_settings(cfg)
  grid = token_grid(cfg)
  if grid is not None:
    if grid[0] * grid[1] != cfg.tokens_per_frame:
      raise ValueError(f"config.model.spatial_rope needs a square token grid; "
                       f"tokens_per_frame={cfg.tokens_per_frame} is not a square")
    if (cfg.d_model // cfg.num_heads) % 4:
      raise ValueError(f"config.model.spatial_rope needs a head width divisible by 4; "
                       f"d_model={cfg.d_model} / num_heads={cfg.num_heads} is not")


def validate_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError, naming the config.model key, for a config the model cannot use."""
  validate_world_model_config(cfg, ("num_codes",))
  if cfg.get("output_head", "linear") not in OUTPUT_HEADS:
    raise ValueError(f"config.model.output_head={cfg.output_head!r}; expected one of "
                     f"{list(OUTPUT_HEADS)}")


def token_grid(cfg: ml_collections.ConfigDict) -> tuple[int, int] | None:
  """(rows, cols) of the token grid under spatial_rope, else None (also for configs saved
  before the key existed)."""
  if not cfg.get("spatial_rope", False):
    return None
  side = math.isqrt(cfg.tokens_per_frame)
  return side, side


def caused_by(actions_BT: jax.Array, no_action: int) -> jax.Array:
  """The action that caused each frame: caused_BT[:, 0] = no_action and
  caused_BT[:, t] = actions_BT[:, t - 1] (actions_BT's last column is dropped)."""
  b = actions_BT.shape[0]
  first_B1 = jnp.full((b, 1), no_action, jnp.int32)
  return jnp.concatenate([first_B1, actions_BT[:, :-1].astype(jnp.int32)], axis=1)


class DynamicsModel(nnx.Module):
  """Masked token prediction conditioned on latent actions; config keys: `default_config`."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    validate_config(cfg)
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.num_codes = cfg.num_codes
    self.num_actions = cfg.num_actions
    self.tokens_per_frame = cfg.tokens_per_frame
    self.prepend = cfg.action_conditioning == "prepend"
    positions, self.sink_frames = layers.temporal_settings(cfg)
    self.dtype = dtype
    d = cfg.d_model
    embed_init = jax.nn.initializers.normal(_EMBED_STDDEV)
    # V codes + [MASK] (index V); A actions + 'no action' (index A).
    self.token_embed = layers.param(rngs, embed_init, (cfg.num_codes + 1, d),
                                    ("vocab", "embed"), param_dtype)
    self.action_embed = layers.param(rngs, embed_init, (cfg.num_actions + 1, d),
                                     ("vocab", "embed"), param_dtype)
    self.transformer = layers.STTransformer(
        cfg.num_layers, d, cfg.num_heads,
        num_tokens=cfg.tokens_per_frame + int(self.prepend), max_frames=cfg.max_frames,
        mlp_ratio=cfg.mlp_ratio, qk_norm=cfg.qk_norm_kind if cfg.qk_norm else None,
        dtype=dtype, param_dtype=param_dtype, attention_impl=cfg.attention_impl,
        temporal_positions=positions, grid=token_grid(cfg),
        remat=cfg.remat_policy if cfg.remat else None,
        temporal_first=cfg.get("block_order", "spatial_first") == "temporal_first", rngs=rngs)
    # Configs saved before the key existed have their own output matrix.
    self.tied = cfg.get("output_head", "linear") == "tied"
    if self.tied:
      self.logits_bias = nnx.Param(jnp.zeros((cfg.num_codes,), param_dtype))
    else:
      self.to_logits = layers.Linear(d, cfg.num_codes, names=("embed", "vocab"), dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)

  @property
  def mask_token(self) -> int:
    """Index of the [MASK] embedding (= V)."""
    return self.num_codes

  @property
  def no_action(self) -> int:
    """Index of the 'no action' embedding (= A), which frame 0 gets."""
    return self.num_actions

  def frame_actions(self, actions_BT: jax.Array) -> jax.Array:
    """The action that caused each frame (`caused_by`)."""
    return caused_by(actions_BT, self.no_action)

  def embed(self, tokens_BTN: jax.Array, mask_BTN: jax.Array, caused_BT: jax.Array
            ) -> jax.Array:
    """Transformer input x_BTMD (M = N, or N + 1 with 'prepend': the action token first).

    Args:
      tokens_BTN: int codes in [0, V).
      mask_BTN: bool, True where the token is replaced by [MASK].
      caused_BT: int, the action that caused each frame (see `frame_actions`), in [0, A].
    """
    n = self.tokens_per_frame
    if tokens_BTN.ndim != 3 or tokens_BTN.shape[2] != n:
      raise ValueError(f"tokens must be (B, T, {n}) for config.model.tokens_per_frame={n}; "
                       f"got {tokens_BTN.shape}")
    if mask_BTN.shape != tokens_BTN.shape or caused_BT.shape != tokens_BTN.shape[:2]:
      raise ValueError(f"mask {mask_BTN.shape} must match tokens {tokens_BTN.shape} and "
                       f"actions {caused_BT.shape} their (B, T)")
    ids_BTN = jnp.where(mask_BTN, self.mask_token, tokens_BTN.astype(jnp.int32))
    x_BTND = jnp.take(self.token_embed[...], ids_BTN, axis=0).astype(self.dtype)
    a_BT1D = jnp.take(self.action_embed[...], caused_BT, axis=0)[:, :, None, :]
    a_BT1D = a_BT1D.astype(self.dtype)
    if self.prepend:
      return jnp.concatenate([a_BT1D, x_BTND], axis=2)
    return x_BTND + a_BT1D

  def embed_context(self, tokens_BTN: jax.Array, caused_BT: jax.Array) -> jax.Array:
    """`embed` of final frames, as a generated frame's past reads them: nothing masked."""
    return self.embed(tokens_BTN, jnp.zeros_like(tokens_BTN, bool), caused_BT)

  def readout(self, y_BTMD: jax.Array) -> jax.Array:
    """float32 logits_BTNV of the N real tokens from transformer outputs y_BTMD."""
    if self.prepend:
      y_BTMD = y_BTMD[:, :, 1:]
    if self.tied:
      # The V code embeddings (the [MASK] row is not an output).
      codes_VD = self.token_embed[...][:self.num_codes].astype(self.dtype)
      logits_BTNV = (jnp.einsum("btnd,vd->btnv", y_BTMD.astype(self.dtype), codes_VD)
                     + self.logits_bias[...].astype(self.dtype)).astype(jnp.float32)
    else:
      logits_BTNV = self.to_logits(y_BTMD).astype(jnp.float32)
    return sharding.constrain(logits_BTNV, _ACT_BTNV)

  def __call__(self, tokens_BTN: jax.Array, mask_BTN: jax.Array, actions_BT: jax.Array
               ) -> jax.Array:
    """Logits of every token position: float32 logits_BTNV.

    Args:
      tokens_BTN: int codes in [0, V); masked positions may hold anything.
      mask_BTN: bool, True where the token is hidden (replaced by [MASK]).
      actions_BT: int latent actions in [0, A); actions_BT[:, t] was taken at frame t and
        produced frame t+1 (the last column is unused).
    """
    x_BTMD = self.embed(tokens_BTN, mask_BTN, self.frame_actions(actions_BT))
    return self.readout(self.transformer(x_BTMD))


class WorldModel(nnx.Module):
  """What stage 3 trains and later stages load: the tokenizer and the LAM (frozen, or the
  LAM co-trained) with the dynamics model that works on their tokens and actions."""

  def __init__(self, tokenizer: nnx.Module, lam: nnx.Module, dynamics: DynamicsModel):
    self.tokenizer = tokenizer
    self.lam = lam
    self.dynamics = dynamics
