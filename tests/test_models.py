"""Model invariants: causality, positions added once, FFN width, VQ, sharding names, dtypes."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.extend import core as jax_core

from genie_jax import sharding
from genie_jax.evaluators import reconstruction
from genie_jax.models import layers
from genie_jax.models import tokenizer as tokenizer_lib
from genie_jax.models import vq as vq_lib

T, IMAGE = 4, 8


def tiny_config(**overrides):
  cfg = tokenizer_lib.default_config()
  cfg.update(dict(image_size=IMAGE, patch_size=4, max_frames=T, d_model=16, num_heads=2,
                  enc_layers=1, dec_layers=1, latent_dim=4, num_codes=8))
  cfg.update(overrides)
  return cfg


def random_video(seed=0, batch=2, frames=T):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, 256, (batch, frames, IMAGE, IMAGE, 3), dtype=np.uint8))


def params_of(model):
  return nnx.state(model, nnx.Param)


# Jitted, so that repeated calls on one tiny model compile once instead of running eagerly.
evaluate = nnx.jit(lambda model, video: model(video, train=False))


# --- Causality ----------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_tokenizer_is_causal_in_time(positions):
  model = tokenizer_lib.Tokenizer(tiny_config(temporal_positions=positions), rngs=nnx.Rngs(0))
  video = random_video()
  out = evaluate(model, video)
  for t in range(T - 1):
    changed = video.at[:, t + 1:].set(255 - video[:, t + 1:])
    out_changed = evaluate(model, changed)
    for key in ("z", "indices_BTN", "recon"):
      np.testing.assert_array_equal(out[key][:, :t + 1], out_changed[key][:, :t + 1])
    # The change is visible from frame t+1 on, so the check above is not vacuous.
    assert not np.allclose(out["z"][:, t + 1], out_changed["z"][:, t + 1])


def test_later_frames_see_earlier_ones():
  model = tokenizer_lib.Tokenizer(tiny_config(), rngs=nnx.Rngs(0))
  video = random_video()
  changed = video.at[:, 0].set(255 - video[:, 0])
  z, z_changed = evaluate(model, video)["z"], evaluate(model, changed)["z"]
  assert not np.allclose(z[:, -1], z_changed[:, -1])


def test_encoder_context_bounds_what_a_code_depends_on():
  video = random_video(batch=1)
  # Frame 1 = frame 0 with its two patch rows swapped; frame 0 changed alone afterwards.
  p = 4
  swapped = jnp.concatenate([video[:, 0, p:], video[:, 0, :p]], axis=1)
  video = video.at[:, 1].set(swapped)
  past_changed = video.at[:, 0].set(255 - video[:, 0])
  for context in ("clip", "frame", "patch"):
    model = tokenizer_lib.Tokenizer(tiny_config(encoder_context=context), rngs=nnx.Rngs(0))
    z, z_past = evaluate(model, video)["z"], evaluate(model, past_changed)["z"]
    # Frame 1's latents depend on frame 0 with the clip as context only.
    assert np.allclose(z[:, 1], z_past[:, 1]) == (context != "clip"), context
    # Tokens 0, 1 (top row) of frame 1 hold the patches of tokens 2, 3 of frame 0: equal
    # latents only when a code is its patch's alone (no positions, no neighbours).
    moved_equal = np.allclose(z[:, 1, :2], z[:, 0, 2:], atol=1e-5)
    assert moved_equal == (context == "patch"), context


def test_encoder_context_is_checked():
  with pytest.raises(ValueError, match="config.model.encoder_context='time'"):
    tokenizer_lib.Tokenizer(tiny_config(encoder_context="time"), rngs=nnx.Rngs(0))


def _attention(over, causal):
  return layers.Attention(16, 2, over=over, causal=causal, rngs=nnx.Rngs(0))


def test_temporal_attention_is_causal():
  attention = _attention("time", causal=True)
  x = jax.random.normal(jax.random.key(0), (2, T, 3, 16))
  for t in range(T - 1):
    changed = x.at[:, t + 1:].add(1.0)
    y, y_changed = attention(x), attention(changed)
    np.testing.assert_array_equal(y[:, :t + 1], y_changed[:, :t + 1])
    assert not np.allclose(y[:, t + 1:], y_changed[:, t + 1:])


def test_temporal_attention_stays_at_its_token():
  attention = _attention("time", causal=True)
  x = jax.random.normal(jax.random.key(0), (2, T, 3, 16))
  y, y_changed = attention(x), attention(x.at[:, :, 0].add(1.0))
  np.testing.assert_array_equal(y[:, :, 1:], y_changed[:, :, 1:])


def test_spatial_attention_sees_every_token_of_its_frame_only():
  attention = _attention("tokens", causal=False)
  x = jax.random.normal(jax.random.key(0), (2, T, 5, 16))
  y, y_changed = attention(x), attention(x.at[:, 1, -1].add(1.0))
  for n in range(5):  # Every token of frame 1, including earlier ones, sees the last one.
    assert not np.allclose(y[:, 1, n], y_changed[:, 1, n])
  np.testing.assert_array_equal(y[:, 0], y_changed[:, 0])
  np.testing.assert_array_equal(y[:, 2:], y_changed[:, 2:])


def test_grid_rope_scores_depend_on_the_offset_only():
  q, k = jax.random.normal(jax.random.key(0), (2, 16))
  positions = layers.grid_positions(1 + 5 * 4, 5, 4)
  np.testing.assert_array_equal(positions[:3], [[0, 0], [0, 0], [0, 1]])  # Leading token.
  rotated_q = lambda rc: layers.rope_2d(q[None, None], np.array([rc]))[0, 0]
  rotated_k = lambda rc: layers.rope_2d(k[None, None], np.array([rc]))[0, 0]
  score = lambda a, b: float(rotated_q(a) @ rotated_k(b))
  for shift in ((1, 0), (0, 3), (-2, 1)):
    moved = lambda rc: (rc[0] + shift[0], rc[1] + shift[1])
    for a, b in (((2, 1), (2, 0)), ((0, 0), (3, 2))):
      np.testing.assert_allclose(score(moved(a), moved(b)), score(a, b), rtol=1e-5)
  # Rows and columns are told apart (offsets (1, 0) and (0, 1) score differently).
  assert abs(score((1, 0), (0, 0)) - score((0, 1), (0, 0))) > 1e-3


def test_grid_rope_makes_spatial_attention_see_the_grid():
  plain = layers.Attention(16, 2, over="tokens", rngs=nnx.Rngs(0))
  grid = layers.Attention(16, 2, over="tokens", grid=(2, 2), num_tokens=5, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, T, 5, 16))
  relative = lambda a, b: float(jnp.abs(a - b).max() / jnp.abs(b).max())
  assert relative(grid(x), plain(x)) > 1e-2
  # Permuting the tokens permutes a position-free attention's output, not the grid's.
  perm = np.array([0, 2, 1, 4, 3])
  assert relative(plain(x[:, :, perm]), plain(x)[:, :, perm]) < 1e-5
  assert relative(grid(x[:, :, perm]), grid(x)[:, :, perm]) > 1e-2
  with pytest.raises(ValueError, match="head width divisible by 4"):
    layers.Attention(12, 2, over="tokens", grid=(2, 2), num_tokens=4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="does not fit"):
    layers.Attention(16, 2, over="tokens", grid=(3, 2), num_tokens=5, rngs=nnx.Rngs(0))


# --- Hand-written VJPs against plain autodiff -------------------------------------------


def _check_vjp(fn, reference, args, rtol=1e-5, atol=1e-5):
  @jax.jit
  def value_and_vjp(args, cotangent):
    out, vjp = jax.vjp(fn, *args)
    out_ref, vjp_ref = jax.vjp(reference, *args)
    return out, out_ref, vjp(cotangent), vjp_ref(cotangent)

  shape = jax.eval_shape(fn, *args)
  cotangent = jax.random.normal(jax.random.key(9), shape.shape, shape.dtype)
  out, out_ref, grads, grads_ref = value_and_vjp(args, cotangent)
  np.testing.assert_allclose(out, out_ref, rtol=rtol, atol=atol)
  for grad, grad_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(grad, grad_ref, rtol=rtol, atol=atol)


def test_layer_norm_vjp_matches_autodiff():
  def reference(x, scale, bias):
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.var(x, -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-6) * scale + bias

  keys = jax.random.split(jax.random.key(0), 3)
  x = 3.0 + 2.0 * jax.random.normal(keys[0], (2, 3, 5, 32))
  scale = 1.0 + jax.random.normal(keys[1], (32,))
  bias = jax.random.normal(keys[2], (32,))
  _check_vjp(lambda *a: layers.layer_norm(1e-6, *a), reference, (x, scale, bias), atol=1e-4)


@pytest.mark.parametrize("rows", [8, layers._TALL_MIN_ROWS])
def test_dense_with_a_tall_kernel_matches_matmul(rows):
  # A kernel with more rows than columns goes through its transposed copy on XLA:CPU once
  # x has enough rows; value and gradients are the plain matmul's either way.
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (2, rows // 2, 24))
  kernel = jax.random.normal(keys[1], (24, 8))
  bias = jax.random.normal(keys[2], (8,))
  reference = lambda x, kernel, bias: x @ kernel + bias
  _check_vjp(layers.dense, reference, (x, kernel, bias), atol=1e-4)
  lowered = jax.jit(layers.dense).lower(x, kernel, bias).as_text()
  assert ("optimization_barrier" in lowered) == (rows >= layers._TALL_MIN_ROWS)
  # Other platforms get the plain matmul.
  tpu = jax.export.export(jax.jit(layers.dense), platforms=["tpu"])(x, kernel, bias)
  assert "optimization_barrier" not in tpu.mlir_module()


@pytest.mark.parametrize("causal", [False, True])
def test_attention_core_vjp_matches_autodiff(causal):
  def reference(q, k, v):
    logits = jnp.einsum("...se,...te->...st", q, k)
    if causal:
      logits = jnp.where(jnp.tril(jnp.ones(logits.shape[-2:], bool)), logits, -1e30)
    return jnp.einsum("...st,...te->...se", jax.nn.softmax(logits, -1), v)

  q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 3, 7, 8))
  _check_vjp(lambda *a: layers.attention_core(causal, *a), reference, (3 * q, k, v))


@pytest.mark.parametrize("over,causal", [("tokens", False), ("time", True)])
def test_attention_matches_dot_product_attention(over, causal):
  attention = layers.Attention(16, 2, over=over, causal=causal, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 3, 5, 16))
  qkv = jnp.einsum("btnd,dkqe->qbtnke", x, attention.qkv_kernel[...]) + \
      jnp.moveaxis(attention.qkv_bias[...], 1, 0)[:, None, None, None]
  if over == "tokens":
    o = jax.nn.dot_product_attention(*(a.reshape(6, 5, 2, 8) for a in qkv))
    o = o.reshape(2, 3, 5, 2, 8)
  else:
    seq = [jnp.swapaxes(a, 1, 2).reshape(10, 3, 2, 8) for a in qkv]
    o = jnp.swapaxes(jax.nn.dot_product_attention(*seq, is_causal=True).reshape(2, 5, 3, 2, 8),
                     1, 2)
  expected = jnp.einsum("btnke,ked->btnd", o, attention.out_kernel[...]) + \
      attention.out_bias[...]
  np.testing.assert_allclose(attention(x), expected, rtol=1e-5, atol=1e-5)


# --- Architecture ---------------------------------------------------------------------------


def _transformer(num_layers):
  return layers.STTransformer(num_layers, 16, 2, num_tokens=5, max_frames=T,
                              rngs=nnx.Rngs(0))


def test_positions_are_added_once_before_the_blocks():
  model = _transformer(2)
  model.spatial_pos[...] = jax.random.normal(jax.random.key(1), model.spatial_pos.shape)
  model.temporal_pos[...] = jax.random.normal(jax.random.key(2), model.temporal_pos.shape)
  x = jax.random.normal(jax.random.key(0), (2, 3, 5, 16))
  pos = model.temporal_pos[:3, None] + model.spatial_pos[None]
  expected = model.final_norm(model.blocks[1](model.blocks[0](x + pos)))
  np.testing.assert_allclose(model(x), expected, rtol=1e-6, atol=1e-6)
  # No block owns positional parameters of its own.
  for block in model.blocks:
    shapes = [v.shape for v in jax.tree.leaves(params_of(block))]
    assert (5, 16) not in shapes and (T, 16) not in shapes


def test_zero_blocks_is_positions_and_norm():
  model = _transformer(0)
  x = jax.random.normal(jax.random.key(0), (2, T, 5, 16))
  pos = model.temporal_pos[:, None] + model.spatial_pos[None]
  np.testing.assert_allclose(model(x), model.final_norm(x + pos), rtol=1e-6, atol=1e-6)


def test_block_is_spatial_temporal_then_one_4x_feed_forward():
  block = layers.STBlock(16, 2, rngs=nnx.Rngs(0))
  assert block.spatial_attention.over == "tokens" and not block.spatial_attention.causal
  assert block.temporal_attention.over == "time" and block.temporal_attention.causal
  assert block.ffn.up_kernel.shape == (16, 64)
  assert block.ffn.down_kernel.shape == (64, 16)
  feed_forwards = [m for _, m in nnx.iter_graph(block) if isinstance(m, layers.FeedForward)]
  assert len(feed_forwards) == 1


def test_projections_are_lecun_normal_over_their_contracted_axes():
  # Variance 1/fan_in, fan_in the contracted axes' size (per-head kernels included), so a
  # unit-variance input gives unit-variance outputs at init.
  block = layers.STBlock(256, 4, rngs=nnx.Rngs(0))
  attention = block.spatial_attention
  kernels = {"qkv": (attention.qkv_kernel, 256), "out": (attention.out_kernel, 256),
             "up": (block.ffn.up_kernel, 256), "down": (block.ffn.down_kernel, 1024),
             "linear": (layers.Linear(512, 32, names=("embed", None),
                                      rngs=nnx.Rngs(1)).kernel, 512)}
  for name, (kernel, fan_in) in kernels.items():
    std = float(jnp.std(kernel[...])) * np.sqrt(fan_in)
    assert 0.9 < std < 1.1, (name, kernel.shape, std)


def test_patchify_roundtrip_and_order():
  video = jnp.arange(2 * 3 * 8 * 12 * 3, dtype=jnp.float32).reshape(2, 3, 8, 12, 3)
  patches = layers.patchify(video, 4)
  assert patches.shape == (2, 3, 6, 48)
  # Token 1 is the second patch of the first patch row.
  np.testing.assert_array_equal(patches[0, 0, 1], video[0, 0, :4, 4:8].reshape(-1))
  np.testing.assert_array_equal(layers.unpatchify(patches, 4, 8, 12), video)


def test_every_weight_matrix_has_logical_axis_names():
  model = tokenizer_lib.Tokenizer(tiny_config(qk_norm=True, qk_norm_kind="rmsnorm"), rngs=nnx.Rngs(0))
  known = dict(sharding.DEFAULT_RULES)
  checked = 0
  for path, var in nnx.to_flat_state(params_of(model)):
    if var.ndim < 2:
      continue
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var.ndim, (path, names)
    assert all(name in known for name in names), (path, names)
    checked += 1
  assert checked > 10
  # The trainer's path: shardings for every parameter on a (one-device) mesh.
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  abstract = nnx.eval_shape(lambda: params_of(
      tokenizer_lib.Tokenizer(tiny_config(), rngs=nnx.Rngs(0))))
  sharding.state_shardings(abstract, mesh, sharding.DEFAULT_RULES)


def test_config_errors_name_the_key():
  with pytest.raises(ValueError, match=r"config.model.patch_size=5 does not divide "
                     r"config.model.image_size=8"):
    tokenizer_lib.Tokenizer(tiny_config(patch_size=5), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"config.model.num_heads=3 does not divide "
                     r"config.model.d_model=16"):
    tokenizer_lib.Tokenizer(tiny_config(num_heads=3), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"config.model.attention_impl='flash'"):
    tokenizer_lib.Tokenizer(tiny_config(attention_impl="flash"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"config.model.sink_frames=1 needs temporal_positions"):
    tokenizer_lib.Tokenizer(tiny_config(sink_frames=1), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"config.model.temporal_positions='alibi'"):
    tokenizer_lib.Tokenizer(tiny_config(temporal_positions="alibi"), rngs=nnx.Rngs(0))
  with pytest.raises(AttributeError):  # Locked: a typo cannot add a key.
    tiny_config().pach_size = 2


def test_configs_saved_before_the_temporal_keys_build_genies_tokenizer():
  old = ml_collections.ConfigDict({k: v for k, v in tiny_config().items()
                                   if k not in ("temporal_positions", "sink_frames")})
  model = tokenizer_lib.Tokenizer(old, rngs=nnx.Rngs(0))
  assert model.decoder.temporal_positions == "learned" and model.sink_frames == 0
  # An image tokenizer (one frame) has no past: no sink check to fail.
  assert tokenizer_lib.Tokenizer(tiny_config(max_frames=1), rngs=nnx.Rngs(0)).sink_frames == 0


def test_default_config_is_genie_appendix_f():
  cfg = tokenizer_lib.default_config()
  assert (cfg.image_size, cfg.patch_size, cfg.d_model, cfg.num_heads) == (64, 4, 512, 8)
  assert (cfg.enc_layers, cfg.dec_layers, cfg.num_codes, cfg.latent_dim) == (8, 8, 1024, 32)
  assert cfg.attention_impl == "xla"


def test_uint8_and_unit_float_inputs_agree_and_encode_decode_match_call():
  model = tokenizer_lib.Tokenizer(tiny_config(), rngs=nnx.Rngs(0))
  video = random_video()
  out = evaluate(model, video)
  out_float = evaluate(model, video.astype(jnp.float32) / 255.0)
  np.testing.assert_allclose(out["recon"], out_float["recon"], atol=1e-6)
  assert out["recon"].dtype == jnp.float32 and out["recon"].shape == video.shape
  assert model.tokens_per_frame == 4 and out["indices_BTN"].shape == (2, T, 4)
  indices, zq = model.encode(video)
  np.testing.assert_array_equal(indices, out["indices_BTN"])
  assert zq.shape == (2, T, 4, 4)
  np.testing.assert_allclose(model.decode(indices), jnp.clip(out["recon"], 0, 1), atol=1e-6)


# --- Vector quantiser -----------------------------------------------------------------------


def _vq(**kwargs):
  return vq_lib.VectorQuantizer(16, 4, rngs=nnx.Rngs(0), **kwargs)


def test_nearest_code_search_asks_for_float32_products():
  # Accelerators round float32 matmuls by default (TPU bfloat16 passes, GPU TF32), which
  # would move latents to a code that is not the nearest; a CPU computes float32 anyway,
  # so what is checked is what the search asks for.
  vq = _vq()
  jaxpr = jax.make_jaxpr(lambda z: vq(z, train=False)[1])(jnp.ones((8, 4)))
  dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
  assert dots and all(e.params["precision"] == (jax.lax.Precision.HIGHEST,) * 2 for e in dots)


@pytest.mark.parametrize("normalize", [False, True])
def test_vq_picks_nearest_code_and_returns_it(normalize):
  vq = _vq(normalize=normalize)
  z = jax.random.normal(jax.random.key(1), (3, 5, 4))
  zq, indices, aux = vq(z, train=False)
  codes = vq.codes()
  zn = z / np.linalg.norm(z, axis=-1, keepdims=True) if normalize else z
  dist = np.sum((np.asarray(zn)[..., None, :] - np.asarray(codes)) ** 2, -1)
  np.testing.assert_array_equal(indices, np.argmin(dist, -1))
  np.testing.assert_allclose(zq, codes[indices], atol=1e-6)
  assert 0 < aux["usage"] <= 1 and 1 <= aux["perplexity"] <= 16


def test_vq_straight_through_gradient():
  vq = _vq()
  z = jax.random.normal(jax.random.key(1), (6, 4))
  weights = jax.random.normal(jax.random.key(2), (6, 4))
  downstream = lambda zq: jnp.sum(jnp.sin(zq) * weights)
  zq = vq(z, train=False)[0]
  grad_z = jax.grad(lambda z: downstream(vq(z, train=False)[0]))(z)
  np.testing.assert_allclose(grad_z, jax.grad(downstream)(zq), rtol=1e-6)


def test_vq_losses_reach_codebook_and_encoder_separately():
  vq = _vq()
  graphdef, params, rest = nnx.split(vq, nnx.Param, ...)
  z = jax.random.normal(jax.random.key(1), (6, 4))

  def grads(name):
    def loss(params, z):
      return nnx.merge(graphdef, params, rest, copy=True)(z, train=False)[2][name]
    return jax.grad(loss, argnums=(0, 1))(params, z)

  g_params, g_z = grads("codebook_loss")
  assert np.abs(g_params["codebook"][...]).sum() > 0 and np.abs(g_z).sum() == 0
  g_params, g_z = grads("commitment_loss")
  assert np.abs(g_params["codebook"][...]).sum() == 0 and np.abs(g_z).sum() > 0
  _, _, aux = vq(z, train=False)
  np.testing.assert_allclose(aux["loss"],
                             aux["codebook_loss"] + 0.25 * aux["commitment_loss"], rtol=1e-6)


def test_vq_usage_ema_updates_only_in_training():
  vq = _vq(usage_decay=0.5)
  z = jax.random.normal(jax.random.key(1), (40, 4))
  before = np.array(vq.usage[...])
  vq(z, train=False)
  np.testing.assert_array_equal(vq.usage[...], before)
  _, indices, _ = vq(z, train=True)
  freq = np.bincount(np.asarray(indices), minlength=16) / 40
  np.testing.assert_allclose(vq.usage[...], 0.5 * before + 0.5 * freq, rtol=1e-6)
  assert not isinstance(vq.usage, nnx.Param)


def test_restart_dead_codes_replaces_exactly_the_dead_rows():
  vq = _vq(dead_code_threshold=0.5)
  usage = np.full(16, 1 / 16, np.float32)
  dead = np.zeros(16, bool)
  dead[[2, 5, 11]] = True
  usage[dead] = 0.01 / 16
  vq.usage[...] = jnp.asarray(usage)
  before = np.array(vq.codebook[...])
  candidates = 100 + jax.random.normal(jax.random.key(3), (2, 20, 4))

  restarted = nnx.jit(lambda vq, c, key: vq.restart_dead_codes(c, key))(
      vq, candidates, jax.random.key(4))
  after = np.asarray(vq.codebook[...])
  assert int(restarted) == 3
  np.testing.assert_array_equal(after[~dead], before[~dead])
  flat = np.asarray(candidates).reshape(-1, 4)
  for row in after[dead]:
    assert np.any(np.all(flat == row, axis=-1))
  np.testing.assert_array_equal(vq.usage[...][~dead], usage[~dead])
  np.testing.assert_allclose(vq.usage[...][dead], 1 / 16)
  assert int(vq.restart_dead_codes(candidates, jax.random.key(5))) == 0


@pytest.mark.parametrize("sampling", ["uniform", "distance"])
def test_distance_restart_gives_rare_far_latents_a_code(sampling):
  """A rare content (2 latents in 400, far from every code) gets the dead codes under
  'distance' sampling nearly always; uniform draws land on the common cluster."""
  hits = 0
  for seed in range(20):
    vq = vq_lib.VectorQuantizer(4, 2, dead_code_threshold=0.5, restart_sampling=sampling,
                                rngs=nnx.Rngs(0))
    vq.codebook[...] = jnp.asarray([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.1, 0.1]])
    vq.usage[...] = jnp.asarray([0.5, 0.5, 0.0, 0.0])  # codes 2 and 3 are dead
    common = 0.05 * jax.random.normal(jax.random.key(seed), (398, 2))
    candidates = jnp.concatenate([common, jnp.asarray([[10.0, 10.0], [-10.0, 10.0]])])
    assert int(vq.restart_dead_codes(candidates, jax.random.key(100 + seed))) == 2
    new = np.asarray(vq.codebook[...])[2:]
    hits += int(np.all(np.abs(new).max(-1) > 2.0))
  if sampling == "distance":
    # Both far latents come first with probability ~(400 / 402) * (200 / 202).
    assert hits >= 18
  else:
    assert hits == 0


def test_restart_sampling_rejects_unknown_name():
  with pytest.raises(ValueError, match="restart_sampling='farthest'"):
    vq_lib.VectorQuantizer(4, 2, restart_sampling="farthest", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("normalize", [False, True])
def test_kmeans_init_puts_one_code_on_each_cluster(normalize):
  vq = vq_lib.VectorQuantizer(4, 4, normalize=normalize, rngs=nnx.Rngs(0))
  vq.usage[...] = jnp.asarray([0.7, 0.3, 0.0, 0.0])
  # Four tight clusters in different directions (so that they are clusters for cosine too).
  centres = np.array([[5, 0, 0, 0], [0, 5, 0, 0], [0, 0, 5, 0], [0, 0, 0, 5]], np.float32)
  points = centres[np.arange(80) % 4] + 0.05 * np.random.default_rng(0).normal(size=(80, 4))
  before = np.array(vq.codebook[...])
  init = nnx.jit(lambda vq, x, key, where: vq.init_from_kmeans(x, key, where=where))
  init(vq, jnp.asarray(points[None]), jax.random.key(0), False)
  np.testing.assert_array_equal(vq.codebook[...], before)
  init(vq, jnp.asarray(points[None]), jax.random.key(0), True)
  codes = np.asarray(vq.codes())
  expected = centres / np.linalg.norm(centres, axis=1, keepdims=True) if normalize else centres
  # Every cluster got its own code, at its centre.
  nearest = np.argmin(((expected[:, None] - codes[None]) ** 2).sum(-1), axis=1)
  assert sorted(nearest) == [0, 1, 2, 3]
  np.testing.assert_allclose(codes[nearest], expected, atol=0.05)
  np.testing.assert_allclose(vq.usage[...], 0.25)
  with pytest.raises(ValueError, match="at least 4 latents"):
    vq.init_from_kmeans(jnp.asarray(points[:3]), jax.random.key(0))


def test_vq_bypass_passes_the_latent_through_without_vq_loss():
  vq = _vq(normalize=True)
  z = jax.random.normal(jax.random.key(1), (10, 4))
  zq, indices, aux = vq(z, train=False, bypass=jnp.asarray(True))
  np.testing.assert_allclose(zq, z / np.linalg.norm(z, axis=-1, keepdims=True), rtol=1e-5)
  assert float(aux["loss"]) == 0.0
  zq2, indices2, aux2 = vq(z, train=False, bypass=jnp.asarray(False))
  np.testing.assert_array_equal(indices, indices2)
  np.testing.assert_allclose(zq2, np.asarray(vq.codes())[np.asarray(indices2)], rtol=1e-6)
  assert float(aux2["loss"]) > 0


# --- Training -------------------------------------------------------------------------------


def _loss_and_grads(model, video):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params):
    out = nnx.merge(graphdef, params, rest, copy=True)(video, train=False)
    target = tokenizer_lib.to_unit_interval(video)
    return jnp.mean(jnp.square(out["recon"] - target)) + out["vq_loss"]

  return jax.jit(jax.value_and_grad(loss_fn))(params)


def test_tiny_tokenizer_overfits_one_batch():
  model = tokenizer_lib.Tokenizer(tiny_config(d_model=32, num_codes=32), rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
  video = random_video(batch=2)
  target = tokenizer_lib.to_unit_interval(video)

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      out = model(video, train=True)
      return jnp.mean(jnp.square(out["recon"] - target)) + out["vq_loss"]
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(60)]
  assert losses[-1] < 0.3 * losses[0], losses[::10]


def test_bfloat16_compute_keeps_float32_params():
  model = tokenizer_lib.Tokenizer(tiny_config(dtype="bfloat16", qk_norm=True),
                                  rngs=nnx.Rngs(0))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params_of(model)))
  video = random_video()
  out = model(video, train=False)
  assert out["recon"].dtype == jnp.float32 and out["z"].dtype == jnp.float32
  loss, grads = _loss_and_grads(model, video)
  assert np.isfinite(float(loss))
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def _remat_policies(model, video) -> list:
  """The policy of every checkpoint (remat) in the jaxpr of the model's forward pass."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  forward = lambda params: nnx.merge(graphdef, params, rest, copy=True)(video, train=False)
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ("remat2", "checkpoint"):  # jax.checkpoint's, by version
        found.append(eqn.params["policy"])
      for sub in jax_core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(forward)(params).jaxpr)
  return found


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_same_loss_and_grads(remat):
  video = random_video()
  plain = tokenizer_lib.Tokenizer(tiny_config(enc_layers=2), rngs=nnx.Rngs(0))
  rematted = tokenizer_lib.Tokenizer(tiny_config(enc_layers=2, remat=True, remat_policy=remat), rngs=nnx.Rngs(0))
  loss, grads = _loss_and_grads(plain, video)
  loss_r, grads_r = _loss_and_grads(rematted, video)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               grads_r, grads)
  # Equal values would hold without any remat too: each of the 3 ST blocks (2 encoder, 1
  # decoder) must be checkpointed with the chosen policy, and none in the plain model.
  policy = layers.REMAT_POLICIES[remat]
  assert _remat_policies(rematted, video).count(policy) == 3
  assert policy not in _remat_policies(plain, video)


def test_cudnn_attention_runs_as_xla_off_a_gpu_and_needs_a_half_dtype():
  # A model set up for cuDNN's fused attention (trained on a GPU, say) is evaluated or played
  # on this CPU with the same weights and the 'xla' attention's outputs.
  video = random_video()
  recon = [tokenizer_lib.Tokenizer(tiny_config(dtype="bfloat16", attention_impl=impl),
                                   rngs=nnx.Rngs(0))(video, train=False)["recon"]
           for impl in ("xla", "cudnn")]
  np.testing.assert_array_equal(*recon)
  with pytest.raises(ValueError, match="config.model.attention_impl='cudnn' needs "
                                       "config.model.dtype 'bfloat16' or 'float16'"):
    tokenizer_lib.validate_config(tiny_config(attention_impl="cudnn"))


def test_code_stability_counts_only_tokens_whose_patch_did_not_change():
  # 2 frames of 4x4 pixels in 2x2 patches (4 tokens): patches 0 and 3 unchanged, 1 and 2 not.
  video = np.zeros((1, 2, 4, 4, 3), np.float32)
  video[0, 1, 0:2, 2:4] = 1.0  # Token 1 changes.
  video[0, 1, 3, 0] = 0.5      # Token 2 changes by one pixel.
  codes = np.array([[[5, 6, 7, 8], [5, 9, 7, 1]]])  # Token 0 kept, 3 not; 2 kept but moved.
  kept, static = reconstruction.code_stability_counts(jnp.asarray(codes), jnp.asarray(video))
  assert (float(kept), float(static)) == (1.0, 2.0)
  with pytest.raises(ValueError, match="do not tile"):
    reconstruction.code_stability_counts(jnp.zeros((1, 2, 3), jnp.int32), jnp.asarray(video))
