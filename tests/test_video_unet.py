"""The video UNet is the image UNet plus temporal layers (Video LDM Sec. 3.1)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from einops import rearrange
from flax import traverse_util

from videoldm_jax.models import attention as attention_lib
from videoldm_jax.models import layers
from videoldm_jax.models import params as params_lib
from videoldm_jax.models import partition
from videoldm_jax.models.temporal import (Frames, TemporalConfig, TemporalResBlock,
                                          TemporalTransformerBlock, mix)
from videoldm_jax.models.unet import UNet, UNetConfig

CONFIG = UNetConfig(block_out_channels=(16, 32), layers_per_block=1,
                    attention_levels=(True, True), num_heads=2, cross_attention_dim=8,
                    norm_num_groups=8, transformer_depth=(1, 2))
IMAGE = UNet(CONFIG)
VIDEO = UNet(CONFIG, TemporalConfig())
VIDEO_3D = UNet(CONFIG, TemporalConfig(conv_kernel=(3, 3, 3), cross_attention=True))
# One jitted apply per model, shared by the tests: calls of the same shapes reuse one
# compiled UNet (a `jax.jit(VIDEO.apply)` per call site compiles it again, and a jitted
# lambda closing over the parameters bakes them in as constants: ~2x its compile time).
IMAGE_APPLY, VIDEO_APPLY, VIDEO_3D_APPLY = (jax.jit(m.apply) for m in (IMAGE, VIDEO, VIDEO_3D))


def _inputs(batch=2, frames=8, seed=0):
  # (NumPy draws: jax.random.normal compiles a sampler per shape, for frame counts 1,
  # 2, 3, 4, 8 and 24; the file took 100 s alone with them, 92 s without.)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((batch, frames, 8, 8, 4), np.float32))
  ctx = jnp.asarray(rng.standard_normal((batch, 3, 8), np.float32))
  return x, jnp.array([17, 901])[:batch], ctx


def _perturb(params, seed=1, scale=0.1):
  """Moves every leaf (zero-initialised convs and mixing logits included) off its init."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda p: p + scale * rng.standard_normal(p.shape, np.float32), params)


@pytest.fixture(scope="module")
def video_params():
  x, t, ctx = _inputs(frames=2)
  return _perturb(params_lib.init_params(VIDEO, 0, x, t, ctx))


def _image_frames(params, x, t, ctx):
  """The image UNet on every frame, as a batch of B*T images."""
  b, f = x.shape[:2]
  spatial, _ = partition.split(params)
  out = IMAGE_APPLY({"params": spatial}, x.reshape(b * f, *x.shape[2:]), jnp.repeat(t, f),
                    jnp.repeat(ctx, f, axis=0))
  return out.reshape(x.shape[:2] + out.shape[1:])


@pytest.mark.parametrize("frames", [1, 8])
def test_alpha_one_gives_the_image_model_bitwise(video_params, frames):
  x, t, ctx = _inputs(frames=frames)
  ref = _image_frames(video_params, x, t, ctx)
  apply = VIDEO_APPLY
  # alpha = 1 through the image-only indicator ...
  out = apply({"params": video_params}, x, t, ctx, None, jnp.ones(x.shape[:2], bool))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  # ... and through saturated mixing logits, sigmoid(+inf) = 1.
  flat = traverse_util.flatten_dict(video_params)
  saturated = traverse_util.unflatten_dict(
      {k: jnp.full_like(v, jnp.inf) if k[-1] == "mix_factor" else v for k, v in flat.items()})
  out = apply({"params": saturated}, x, t, ctx)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  # The image-only flag acts per frame: flagged frames are image frames.
  flags = jnp.zeros(x.shape[:2], bool).at[:, 0].set(True)
  mixed = apply({"params": video_params}, x, t, ctx, None, flags)
  np.testing.assert_array_equal(np.asarray(mixed[:, 0]), np.asarray(ref[:, 0]))
  if frames > 1:
    assert not np.allclose(mixed[:, 1:], ref[:, 1:])


def test_at_init_temporal_resblocks_are_identities_and_attention_acts_only_via_mixing():
  x, t, ctx = _inputs(frames=4)
  params = params_lib.init_params(VIDEO_3D, 3, x, t, ctx)
  # Theta as a real image checkpoint would be (nothing zero), phi exactly at init.
  spatial, temporal = partition.split(params)
  params = partition.merge(_perturb(spatial), temporal)
  ref = _image_frames(params, x, t, ctx)
  flat = traverse_util.flatten_dict(params)
  # Block only the attention sites (alpha = 1 there): the resblocks left active are
  # identities at init, so the image model comes out exactly.
  attn_off = traverse_util.unflatten_dict(
      {k: jnp.full_like(v, jnp.inf) if k[-1] == "mix_factor" and
       any(p.startswith("temporal_transformer") for p in k) else v for k, v in flat.items()})
  out = VIDEO_3D_APPLY({"params": attn_off}, x, t, ctx)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  # With the mixing logits at their init (alpha = sigmoid(0.5)) attention changes it.
  out = VIDEO_3D_APPLY({"params": params}, x, t, ctx)
  assert np.max(np.abs(np.asarray(out) - np.asarray(ref))) > 1e-3
  mix = [v for k, v in flat.items() if k[-1] == "mix_factor"]
  # ResBlock sites: 2 down + 2 mid + 4 up; transformer blocks (depth 1, 2 by level):
  # 1 + 2 down + 2 mid + 2 * 2 + 2 * 1 up.
  assert len(mix) == 8 + 11
  assert all(float(m[0]) == 0.5 for m in mix)



def test_temporal_cross_attention_reads_the_context():
  # TemporalConfig(cross_attention=True): the temporal blocks have an attn2 that reads
  # the text context. With every spatial attn2 blind to it (zero key / value kernels),
  # another context changes the output through the temporal layers alone.
  # (4 frames, as in the test above: the same compiled UNet)
  x, t, ctx = _inputs(frames=4)
  params = _perturb(params_lib.init_params(VIDEO_3D, 3, x, t, ctx))
  flat = traverse_util.flatten_dict(params)
  temporal_attn2 = [k for k in flat if "attn2" in k and partition.is_temporal(k)]
  assert temporal_attn2, "no temporal cross-attention"
  blind = traverse_util.unflatten_dict(
      {k: jnp.zeros_like(v) if "attn2" in k and not partition.is_temporal(k)
       and k[-2] in ("to_k", "to_v") else v for k, v in flat.items()})
  apply = VIDEO_3D_APPLY
  other = jnp.asarray(np.random.default_rng(77).standard_normal(ctx.shape, np.float32))
  assert np.abs(np.asarray(apply({"params": blind}, x, t, ctx)
                           - apply({"params": blind}, x, t, other))).max() > 1e-4
  spatial_only = traverse_util.unflatten_dict(
      {k: jnp.zeros_like(v) if "attn2" in k and k[-2] in ("to_k", "to_v") else v
       for k, v in flat.items()})
  np.testing.assert_allclose(np.asarray(apply({"params": spatial_only}, x, t, ctx)),
                             np.asarray(apply({"params": spatial_only}, x, t, other)),
                             rtol=1e-6, atol=1e-6)


def test_more_frames_than_in_training(video_params):
  x, t, ctx = _inputs(frames=24)
  out = VIDEO_APPLY({"params": video_params}, x, t, ctx)
  assert out.shape == x.shape and np.isfinite(np.asarray(out)).all()
  # Every frame has its own position: given 24 identical frames, the temporal
  # attention block (no convolution, whose zero padding would tell the ends apart) has
  # only the frame-index encoding to tell frames 4 and 12 apart; an encoding that
  # wrapped after 8 frames, a table of the training length, would make them equal.
  # (Host init, NumPy draws and one jitted apply: run op by op, the block compiled ~60
  # programs.)
  block = TemporalTransformerBlock(TemporalConfig(), 2)
  same = jnp.broadcast_to(np.random.default_rng(5).standard_normal((1, 1, 6, 16), np.float32),
                          (2, 24, 6, 16)).reshape(48, 6, 16)
  frames = Frames(num_frames=24)
  p = _perturb(params_lib.init_params(block, 6, same, None, frames))
  out = np.asarray(jax.jit(block.apply)({"params": p}, same, None, frames)
                   ).reshape(2, 24, 6, 16)
  assert np.abs(out[:, 4] - out[:, 12]).max() > 1e-3


def test_spatial_subtree_is_exactly_the_image_model():
  x, t, ctx = _inputs(frames=2)
  video = params_lib.abstract_params(VIDEO, x, t, ctx)
  image = params_lib.abstract_params(IMAGE, x[:, 0], t, ctx)
  spatial, temporal = partition.split(video)
  partition.check_same_structure(image, spatial, what="spatial", source="video model")
  assert temporal and all(partition.is_temporal(k)
                          for k in traverse_util.flatten_dict(temporal))
  labels = traverse_util.flatten_dict(partition.labels(video))
  assert {v for k, v in labels.items() if "temporal_resnets_0" in k} == {"temporal"}
  assert labels[("conv_in", "kernel")] == "spatial"
  # resblocks / attention=False leave their kind of temporal layer out, only it.
  for fields, absent, present in ((dict(resblocks=False), "temporal_resnets",
                                   "temporal_transformer"),
                                  (dict(attention=False), "temporal_transformer",
                                   "temporal_resnets")):
    names = {n for k in traverse_util.flatten_dict(params_lib.abstract_params(
        UNet(CONFIG, TemporalConfig(**fields)), x, t, ctx)) for n in k}
    assert not any(absent in n for n in names) and any(present in n for n in names), fields


def test_image_checkpoint_plugs_in_as_theta_and_mismatch_is_named(video_params):
  x, t, ctx = _inputs(frames=2)
  image = params_lib.init_params(IMAGE, 9, x[:, 0], t, ctx)
  merged = partition.with_image_params(video_params, image, "dreambooth.ckpt")
  spatial, temporal = partition.split(merged)
  for a, b in zip(jax.tree_util.tree_leaves(spatial), jax.tree_util.tree_leaves(image)):
    np.testing.assert_array_equal(a, b)
  _, phi = partition.split(video_params)
  for a, b in zip(jax.tree_util.tree_leaves(temporal), jax.tree_util.tree_leaves(phi)):
    np.testing.assert_array_equal(a, b)
  bad = jax.tree_util.tree_map(lambda v: v, image)
  bad["conv_in"]["kernel"] = jnp.zeros((3, 3, 5, 16))
  with pytest.raises(ValueError, match=r"conv_in/kernel is \(3, 3, 5, 16\) in "
                                       r"dreambooth.ckpt, the model expects \(3, 3, 4, 16\)"):
    partition.with_image_params(video_params, bad, "dreambooth.ckpt")
  # Leaves the model does not have, or lacks, are named too (they rode along before).
  extra = {**image, "extra": {"kernel": jnp.zeros((1,))}}
  with pytest.raises(ValueError, match=r"unexpected: extra/kernel shape \(1,\)"):
    partition.with_image_params(video_params, extra, "dreambooth.ckpt")
  fewer = {k: v for k, v in image.items() if k != "conv_in"}
  with pytest.raises(ValueError, match=r"missing: conv_in/kernel \(expected shape "
                     r"\(3, 3, 4, 16\)\)"):
    partition.with_image_params(video_params, fewer, "dreambooth.ckpt")
  # A tree holding temporal leaves too is not theta: merging would overwrite phi.
  with pytest.raises(ValueError, match="spatial and temporal trees share paths"):
    partition.merge(video_params, temporal)


@pytest.mark.parametrize("implementation,max_period", [("auto", 10000.0), ("plain", 100.0)])
@pytest.mark.parametrize("cross_attention", [False, True])
def test_temporal_block_is_attention_over_each_pixels_frames(implementation, max_period,
                                                             cross_attention):
  """The temporal transformer block works in the frames-major (B, T, S, C) layout; its
  output equals the block written on per-pixel sequences (B*S, T, C), with the context
  of each video's first frame repeated for every pixel (the layout before 2026-12-04),
  built here from the same parameters and the 3-D `Attention`."""
  b, t, s, c, heads = 2, 3, 5, 16, 2
  config = TemporalConfig(cross_attention=cross_attention, max_period=max_period)
  # (NumPy draws and host init: eager jax.random and Module.init compile a program per
  # shape and per leaf.)
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((b * t, s, c), np.float32))
  ctx = jnp.asarray(rng.standard_normal((b * t, 4, 8), np.float32))
  frames = Frames(num_frames=t)
  before = attention_lib.implementation()
  attention_lib.set_implementation(implementation)
  try:
    block = TemporalTransformerBlock(config, heads)
    p = jax.tree_util.tree_map(jnp.asarray, _perturb(
        params_lib.init_params(block, 4, x, ctx, frames), seed=5))
    out = block.apply({"params": p}, x, ctx, frames)

    dense = lambda name, y: y @ p[name]["kernel"] + p[name]["bias"]
    ln = lambda name, y: nn.LayerNorm(1e-5).apply({"params": p[name]}, y)
    attn = lambda name, *a: attention_lib.Attention(heads).apply({"params": p[name]}, *a)
    pos = layers.timestep_embedding(jnp.arange(t), c, True, 0.0, config.max_period)
    pos = dense("pos_linear_2", jax.nn.silu(dense("pos_linear_1", pos)))
    h = rearrange(x, "(b t) s c -> (b s) t c", t=t) + pos[None]
    h = h + attn("attn1", ln("norm1", h))
    if cross_attention:
      first = rearrange(ctx, "(b t) l e -> b t l e", t=t)[:, 0]
      h = h + attn("attn2", ln("norm2", h), jnp.repeat(first, s, axis=0))
    h = h + attention_lib.FeedForward().apply({"params": p["ff"]}, ln("norm3", h))
    reference = mix(x, rearrange(h, "(b s) t c -> (b t) s c", b=b), p["mix_factor"], None)
  finally:
    attention_lib.set_implementation(*before)
  assert "attn2" in p or not cross_attention
  np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)


def _group_norm_video(v, scale, bias, groups, eps):
  """GroupNorm of (B, T, H, W, C) with statistics over each video's T, H, W and group."""
  g = v.reshape(v.shape[:-1] + (groups, v.shape[-1] // groups))
  mean = g.mean(axis=(1, 2, 3, 5), keepdims=True)
  var = ((g - mean) ** 2).mean(axis=(1, 2, 3, 5), keepdims=True)
  return ((g - mean) / jnp.sqrt(var + eps)).reshape(v.shape) * scale + bias


def _conv3d_same(v, p):
  return jax.lax.conv_general_dilated(v, p["kernel"], (1, 1, 1), "SAME",
                                      dimension_numbers=("NDHWC", "DHWIO", "NDHWC")) + p["bias"]


@pytest.mark.parametrize("kernel", [(3, 1, 1), (3, 3, 3)])
def test_temporal_resblock_equals_its_definition(kernel):
  """The temporal ResBlock on perturbed parameters (conv2 and the mixing logit off their
  zero init, so the branch shows) against its definition: GroupNorm over each video's
  (T, H, W, group), SiLU, Conv3d, plus each frame's projected timestep embedding,
  GroupNorm, SiLU, Conv3d, residual, blend. Per-frame statistics, or the timestep
  embedding left out, passed every other test (alpha = 1 or conv2 = 0 hide the branch)."""
  b, t, c, groups = 2, 6, 8, 4
  config = TemporalConfig(conv_kernel=kernel)
  rng = np.random.default_rng(5)  # (NumPy draws, host init: see the test above)
  x = jnp.asarray(rng.standard_normal((b * t, 4, 5, c), np.float32)
                  * np.arange(1, b * t + 1, dtype=np.float32)[:, None, None, None])
  temb = jnp.asarray(rng.standard_normal((b * t, 16), np.float32))
  block = TemporalResBlock(config, norm_num_groups=groups)
  # With context features (a context model): their projection joins the branch's input,
  # residual stream included (so it is trained from the first step: conv2 starts at 0).
  context = jnp.asarray(rng.standard_normal((b * t, 4, 5, 3), np.float32))
  frames = Frames(num_frames=t, context=context)
  p = jax.tree_util.tree_map(jnp.asarray, _perturb(
      params_lib.init_params(block, 6, x, temb, frames), seed=7))
  out = block.apply({"params": p}, x, temb, frames)

  v = rearrange(x + context @ p["context_proj"]["kernel"], "(b t) h w c -> b t h w c", t=t)
  gn = lambda name, y: _group_norm_video(y, p[name]["scale"], p[name]["bias"], groups, 1e-5)
  h = _conv3d_same(jax.nn.silu(gn("norm1", v)), p["conv1"])
  e = jax.nn.silu(temb) @ p["time_emb_proj"]["kernel"] + p["time_emb_proj"]["bias"]
  h = h + rearrange(e, "(b t) c -> b t 1 1 c", t=t)
  h = _conv3d_same(jax.nn.silu(gn("norm2", h)), p["conv2"])
  reference = mix(x, rearrange(v + h, "b t h w c -> (b t) h w c"), p["mix_factor"], None)
  np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)


def test_each_temporal_transformer_block_follows_its_spatial_block():
  # The sgm / SVD placement: spatial block i, then temporal block i. Swapped, the
  # parameter tree is the same (and alpha = 1 hides the temporal branch), so a trained
  # checkpoint loaded as is would give another model, silently.
  from videoldm_jax.models.transformer2d import SpatialTransformer
  block = SpatialTransformer(num_heads=2, depth=2, norm_num_groups=4,
                             temporal=TemporalConfig())
  x, ctx = jnp.ones((4, 2, 2, 8)), jnp.ones((4, 3, 8))
  frames = Frames(num_frames=2)
  # Shapes only (the order of the calls is what counts): run eagerly, init and apply
  # compiled ~110 programs op by op.
  params = jax.eval_shape(block.init, jax.random.key(0), x, ctx, frames)
  called = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and "transformer_blocks" in str(context.module.name):
      called.append(context.module.name)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(block.apply, params, x, ctx, frames)
  assert called == ["transformer_blocks_0", "temporal_transformer_blocks_0",
                    "transformer_blocks_1", "temporal_transformer_blocks_1"]


def test_temporal_config_values_that_cannot_work_are_refused_by_field():
  # max_period <= 0 made the frame encoding NaN and, through alpha x + (1 - alpha) NaN,
  # every output NaN (image-only frames too); a scalar conv_kernel a bare TypeError.
  for fields, message in (
      (dict(max_period=0.0), r"max_period must be a finite number > 1, got 0.0"),
      (dict(max_period=-1.0), r"max_period must be a finite number > 1"),
      (dict(max_period=1.0), r"max_period must be a finite number > 1"),  # (all freqs 1)
      (dict(mix_init=float("nan")), r"mix_init must be finite"),
      (dict(conv_kernel=3), r"conv_kernel=3: expected tuple\[int, int, int\]"),
      (dict(conv_kernel=(3, 2, 1)), r"conv_kernel must be three odd sizes"),
      (dict(context_frames=True, context_channels=(0, 8)),
       r"context_channels must be positive widths"),
      (dict(context_channels=(8, 8)), r"context_channels is set but context_frames is False"),
      # (the temporal cross-attention is part of the temporal attention block: without
      # it the flag added no layer, silently)
      (dict(cross_attention=True, attention=False), r"cross_attention needs attention=True")):
    with pytest.raises(ValueError, match=r"TemporalConfig\." + message):
      TemporalConfig.from_dict(fields).validate()
  TemporalConfig.from_dict(dict(conv_kernel=[3, 3, 3], max_period=100.0)).validate()
  # Checked where the stages build their models too.
  from tests.test_generate import tiny_image_config
  from videoldm_jax import pretrained
  from videoldm_jax.video_ldm import VideoLDM
  image = pretrained.random_image_ldm(tiny_image_config())
  with pytest.raises(ValueError, match=r"TemporalConfig\.max_period must be a finite"):
    VideoLDM.from_pretrained(image, TemporalConfig(max_period=0.0))


def test_unet_heads_that_do_not_split_a_levels_channels_are_refused_by_level():
  # 3 heads on 64 channels failed inside the attention's reshape, naming no field. A
  # level without attention may hold any count (its heads are never used), except the
  # last: the middle block always has a transformer.
  base = dict(block_out_channels=(64, 96), attention_levels=(True, False),
              norm_num_groups=32)
  with pytest.raises(ValueError, match=r"num_heads at level 0 must be a positive divisor "
                     r"of its 64 channels, got 3"):
    UNetConfig(**base, num_heads=3).validate()
  with pytest.raises(ValueError, match=r"num_heads at level 1 .* 96 channels, got 5"):
    UNetConfig(**base, num_heads=(4, 5)).validate()
  assert UNetConfig(**base, num_heads=(4, 6)).validate().heads_per_level() == (4, 6)
  assert UNetConfig(block_out_channels=(64, 96, 96), attention_levels=(True, False, True),
                    num_heads=(4, 5, 6)).validate().heads_per_level() == (4, 5, 6)


def test_unet_sizes_its_levels_cannot_halve_are_refused():
  # 10x6 latents on 3 levels: the way up could not concatenate a skip (TypeError).
  config = UNetConfig(block_out_channels=(32, 32, 32), attention_levels=(False,) * 3,
                      num_heads=2, cross_attention_dim=32)
  for h, w in ((10, 6), (8, 6)):  # (8 x 6: the width alone)
    with pytest.raises(ValueError, match=rf"UNet input of {h}x{w} latents: both must be "
                       r"multiples of 4"):
      jax.eval_shape(lambda: UNet(config).init(jax.random.key(0), jnp.zeros((1, h, w, 4)),
                                                jnp.zeros((1,)), jnp.zeros((1, 3, 32))))


def test_a_class_conditional_unet_called_without_labels_says_so():
  # (It failed inside the embedding lookup, naming no cause.)
  config = UNetConfig(block_out_channels=(32,), attention_levels=(False,), num_heads=2,
                      cross_attention_dim=32, num_class_embeds=3)
  with pytest.raises(ValueError, match=r"class-conditional \(num_class_embeds=3\): pass "
                     "class_labels"):
    jax.eval_shape(lambda: UNet(config).init(jax.random.key(0), jnp.zeros((1, 8, 8, 4)),
                                              jnp.zeros((1,)), jnp.zeros((1, 3, 32))))


def test_video_inputs_of_other_batch_shapes_are_named_or_broadcast(video_params):
  # image_only was flattened unchecked: (B,) and (B, T + 1) failed deep in the first
  # temporal layer as a broadcasting TypeError, a transposed (T, B) array put the flags
  # on other frames; a context for all videos ((1, S, E), as the image model takes it)
  # was repeated to T rows instead of B * T.
  x, t, ctx = _inputs(batch=2, frames=4)
  shape = lambda **kw: jax.eval_shape(
      lambda: VIDEO.apply({"params": video_params}, x, kw.get("t", t), kw.get("ctx", ctx),
                          None, kw.get("image_only")))
  for bad in ((2,), (2, 5), (4, 2)):
    with pytest.raises(ValueError, match=rf"UNet image_only: expected \(B, T\) = \(2, 4\), "
                       rf"got \({bad[0]},"):
      shape(image_only=jnp.zeros(bad, bool))
  with pytest.raises(ValueError, match=r"UNet context: leading size 3, expected 2 \(per "
                     r"video\), 8 \(per frame\) or 1"):
    shape(ctx=jnp.zeros((3, 3, 8)))
  with pytest.raises(ValueError, match=r"UNet timesteps: expected one per video, \(2,\), "
                     r"or one for all, got shape \(8,\)"):
    shape(t=jnp.zeros((8,)))
  # (Run on 8 frames, with the shared jitted applies: the per-video calls are those of
  # test_alpha_one_gives_the_image_model_bitwise[8], the image model's of its [1].)
  x, t, ctx = _inputs(batch=2, frames=8)
  one = lambda c: VIDEO_APPLY({"params": video_params}, x, t, c)
  np.testing.assert_array_equal(one(ctx[:1]), one(jnp.concatenate([ctx[:1]] * 2)))
  # Per video, each video's context reaches its own frames (video-major, not tiled).
  assert np.abs(np.asarray(ctx[0] - ctx[1])).max() > 0.1
  np.testing.assert_array_equal(one(ctx), one(jnp.repeat(ctx, 8, axis=0)))
  spatial, _ = partition.split(video_params)
  # The image model takes one context for every image too.
  image = lambda c: IMAGE_APPLY({"params": spatial}, x[:, 0], t, c)
  np.testing.assert_array_equal(image(ctx[:1]), image(jnp.concatenate([ctx[:1]] * 2)))
  with pytest.raises(ValueError, match=r"UNet context: leading size 3, expected 2 \(per "
                     r"image\) or 1"):
    jax.eval_shape(lambda: IMAGE.apply({"params": spatial}, x[:, 0], t, jnp.zeros((3, 3, 8))))
