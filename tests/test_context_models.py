"""Context frames (Video LDM eq. 3): the conditioning input, the UNet's context encoder,
context guidance, and the prediction / interpolation samplers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from videoldm_jax.diffusion.schedules import SamplingConfig, make_schedule
from videoldm_jax.models import params as params_lib
from videoldm_jax.models import partition
from videoldm_jax.models.context_encoder import first_frames_mask, masked_cond, strided_mask
from videoldm_jax.models.temporal import TemporalConfig
from videoldm_jax.models.unet import UNet, UNetConfig
from videoldm_jax.pipelines import context_sampling as cs
from videoldm_jax.stages import interpolator, predictor

CONFIG = UNetConfig(block_out_channels=(16, 32), layers_per_block=1,
                    attention_levels=(True, True), num_heads=2, cross_attention_dim=8,
                    norm_num_groups=8)
KEYFRAME = UNet(CONFIG, TemporalConfig())
CONTEXT = UNet(CONFIG, TemporalConfig(context_frames=True))
SHAPE = (2, 4, 4, 4, 4)  # (B, T, h, w, C)


def _inputs(seed=0):
  # (NumPy draws: jax.random.normal compiled a sampler per new shape, ~1.5 s each.)
  rng = np.random.default_rng(seed)
  draw = lambda shape: jnp.asarray(rng.standard_normal(shape, np.float32))
  return draw(SHAPE), jnp.array([17, 901]), draw((2, 3, 8)), draw(SHAPE)


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


@pytest.fixture(scope="module")
def params():
  """Context-model params with EVERY leaf (zero-initialised projections included)
  moved off its init, so that no zero can hide a leak of the context."""
  x, t, ctx, _ = _inputs()
  p = params_lib.init_params(CONTEXT, 0, x, t, ctx)
  rng = np.random.default_rng(1)
  return jax.tree_util.tree_map(lambda a: a + 0.1 * rng.standard_normal(a.shape, np.float32), p)


@pytest.fixture(scope="module")
def model(params):
  """A ContextModel on `params` (one jitted apply shared by the sampler tests)."""
  return cs.ContextModel(jax.jit(CONTEXT.apply), params, make_schedule("scaled_linear"),
                         SamplingConfig())


def _is_context_leaf(path) -> bool:
  return any("context" in p for p in path)


def test_context_params_are_phi_and_theta_is_the_image_model():
  x, t, ctx, _ = _inputs()
  video = params_lib.abstract_params(CONTEXT, x, t, ctx)
  image = params_lib.abstract_params(UNet(CONFIG), x[:, 0], t, ctx)
  spatial, temporal = partition.split(video)
  partition.check_same_structure(image, spatial, what="spatial", source="context model")
  new = [k for k in traverse_util.flatten_dict(temporal) if _is_context_leaf(k)]
  # Encoder: conv_in, conv_0, down_1, conv_1; one projection per temporal layer: 8
  # ResBlocks (2 down, 2 mid, 4 up) and 7 transformer blocks; no biases anywhere.
  assert len(new) == 4 + 8 + 7 and all(k[-1] == "kernel" for k in new)
  assert sum(k[0] == "temporal_context_encoder" for k in new) == 4


def test_no_context_is_exactly_the_model_without_context(params):
  x, t, ctx, z = _inputs()
  cond0 = masked_cond(z, first_frames_mask(jnp.zeros(2, jnp.int32), 4))
  np.testing.assert_array_equal(np.asarray(cond0), 0.0)  # S = 0: nothing leaks in
  # Eager (op by op): every op sees bitwise the same inputs in all three models. (Under
  # jit the extra zero addends change XLA's fusion, which may round differently.)
  with_zero_cond = CONTEXT.apply({"params": params}, x, t, ctx, None, None, cond=cond0)
  without_cond = CONTEXT.apply({"params": params}, x, t, ctx)
  np.testing.assert_array_equal(np.asarray(with_zero_cond), np.asarray(without_cond))
  # ... and the key-frame model with the same phi (no context encoder, no projections).
  keyframe = traverse_util.unflatten_dict(
      {k: v for k, v in traverse_util.flatten_dict(params).items() if not _is_context_leaf(k)})
  ref = KEYFRAME.apply({"params": keyframe}, x, t, ctx)
  np.testing.assert_array_equal(np.asarray(without_cond), np.asarray(ref))


def test_known_frames_reach_their_own_video_through_every_projection(params):
  # Each video's known latents condition that video alone (a (t b) frame order gave
  # video 0 frames of video 1), and both kinds of temporal layer read them: zeroing the
  # transformer blocks' or the ResBlocks' projections alone changes the output.
  x, t, ctx, z = _inputs()
  mask = first_frames_mask(jnp.full(2, 2, jnp.int32), 4)
  run = lambda p, latents: np.asarray(CONTEXT.apply({"params": p}, x, t, ctx, None, None,
                                                    cond=masked_cond(latents, mask)))
  base = run(params, z)
  other = run(params, z.at[1].add(1.0))  # video 1's known frames only
  np.testing.assert_array_equal(other[0], base[0])  # (eager: bitwise per video)
  assert np.abs(other[1] - base[1]).max() > 1e-3
  flat = traverse_util.flatten_dict(params)
  for kind in ("temporal_transformer_blocks", "temporal_resnets"):
    zeroed = traverse_util.unflatten_dict({
        k: (np.zeros_like(v) if "context_proj" in k and any(kind in n for n in k) else v)
        for k, v in flat.items()})
    assert np.abs(run(zeroed, z) - base).max() > 1e-4, kind


def test_at_init_known_frames_change_nothing():
  # The projections of the context features start at zero: a context model built from a
  # key-frame model is that model at init, whatever frames it is given (eq. 3's new
  # layers start as no-ops), though its context encoder's features are not zero.
  x, t, ctx, z = _inputs()
  fresh = params_lib.init_params(CONTEXT, 0, x, t, ctx)
  projections = [v for k, v in traverse_util.flatten_dict(fresh).items()
                 if "context_proj" in k]
  assert len(projections) == 8 + 7 and all(not np.any(v) for v in projections)
  cond2 = masked_cond(z, first_frames_mask(jnp.full(2, 2, jnp.int32), 4))
  with_frames = CONTEXT.apply({"params": fresh}, x, t, ctx, None, None, cond=cond2)
  keyframe = traverse_util.unflatten_dict(
      {k: v for k, v in traverse_util.flatten_dict(fresh).items() if not _is_context_leaf(k)})
  np.testing.assert_array_equal(np.asarray(with_frames),
                                np.asarray(KEYFRAME.apply({"params": keyframe}, x, t, ctx)))


@pytest.mark.parametrize("s", [0, 1, 2])
def test_cond_holds_exactly_the_known_latents_and_the_mask(s):
  z = jax.random.normal(jax.random.key(3), SHAPE)
  mask = first_frames_mask(jnp.full((2,), s), 4)
  np.testing.assert_array_equal(np.asarray(mask), np.array([[1.0] * s + [0.0] * (4 - s)] * 2))
  cond = np.asarray(masked_cond(z, mask))
  assert cond.shape == SHAPE[:-1] + (5,)
  np.testing.assert_array_equal(cond[:, :s, ..., :4], np.asarray(z)[:, :s])
  np.testing.assert_array_equal(cond[:, s:, ..., :4], 0.0)
  np.testing.assert_array_equal(cond[:, :s, ..., 4], 1.0)
  np.testing.assert_array_equal(cond[:, s:, ..., 4], 0.0)
  # A NaN / inf in an unknown frame (any values there, as documented) stays out.
  bad = np.asarray(masked_cond(z.at[:, s:].set(jnp.nan).at[:, -1, 0].set(jnp.inf), mask))
  np.testing.assert_array_equal(bad, cond)


def test_context_encoder_is_its_written_out_definition():
  # Level 0: conv3x3 - SiLU - conv3x3; each further level: SiLU - stride-2 conv3x3 -
  # SiLU - conv3x3 (padding 1, no biases), on the previous level's output.
  from videoldm_jax.models.context_encoder import ContextEncoder
  encoder = ContextEncoder((8, 16, 16))
  x = _normal(0, (2, 8, 6, 5))
  # (NumPy noise: jax.random.normal compiled a sampler per kernel shape, ~6 s here.)
  rng = np.random.default_rng(2)
  p = jax.tree_util.tree_map(lambda a: a + 0.1 * rng.standard_normal(a.shape, np.float32),
                             params_lib.init_params(encoder, 1, x))
  assert all(set(v) == {"kernel"} for v in p.values())  # bias-free
  conv = lambda h, name, stride=1: jax.lax.conv_general_dilated(
      h, p[name]["kernel"], (stride, stride), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest")
  h = conv(jax.nn.silu(conv(x, "conv_in")), "conv_0")
  want = [h]
  for level in (1, 2):
    h = conv(jax.nn.silu(conv(jax.nn.silu(h), f"down_{level}", 2)), f"conv_{level}")
    want.append(h)
  got = encoder.apply({"params": p}, x)
  assert [g.shape for g in got] == [(2, 8, 6, 8), (2, 4, 3, 16), (2, 2, 2, 16)]
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def test_training_masks():
  # Predictor: prefixes of S frames, S drawn from the given probabilities per clip.
  fn = predictor.mask_fn((1 / 3, 1 / 3, 1 / 3))
  m = np.asarray(fn(jax.random.key(0), 600, 5))
  s = m.sum(axis=1).astype(int)
  np.testing.assert_array_equal(m, np.asarray(first_frames_mask(s, 5)))
  counts = np.bincount(s, minlength=3)
  assert len(counts) == 3 and all(150 < c < 250 for c in counts), counts
  # (The batch sizes of the draws below repeat: each new one compiled the draw again.)
  only_two = np.asarray(predictor.mask_fn((0.0, 0.0, 1.0))(jax.random.key(1), 600, 5))
  np.testing.assert_array_equal(only_two, np.asarray(first_frames_mask(jnp.full(600, 2), 5)))
  # Interpolator: frames 0, 4, 8 of 12 known; whole clips dropped at the given rate.
  m = np.asarray(interpolator.mask_fn(4)(jax.random.key(2), 400, 12))
  np.testing.assert_array_equal(m, np.tile([1.0, 0, 0, 0], 3)[None].repeat(400, 0))
  m = np.asarray(interpolator.mask_fn(4, 0.5)(jax.random.key(3), 400, 12))
  dropped = m.sum(axis=1) == 0
  assert 150 < dropped.sum() < 250
  np.testing.assert_array_equal(m[~dropped], np.asarray(strided_mask(int((~dropped).sum()),
                                                                     12, 4)))


def test_masks_refuse_bad_shapes_and_strides():
  # A scalar count would broadcast to the wrong batch; stride 0 would divide by zero.
  with pytest.raises(ValueError, match=r"num_known has shape \(\), expected \(B,\)"):
    first_frames_mask(jnp.asarray(2), 4)
  for stride in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match="stride .* expected a whole number >= 1"):
      strided_mask(2, 8, stride)
  np.testing.assert_array_equal(strided_mask(1, 3, np.int64(1)), np.ones((1, 3)))


def test_context_guidance(model, params):
  # Every UNet call here has batch 2, so the test compiles the model once.
  x, t, ctx, z = _inputs()
  cond = masked_cond(z, first_frames_mask(jnp.array([1, 2]), 4))
  f = lambda x, t, c, text: model.apply_fn({"params": params}, x, t, text, None, None, cond=c)
  # Scale 1 (context and text): the plain conditional prediction, bit for bit.
  opts = cs.ContextSampleOptions(context_scale=1.0, guidance_scale=1.0)
  out = cs.guided_context_fn(model, cond, opts, ctx, jnp.zeros_like(ctx))(x, t)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(f(x, t, cond, ctx)))
  # s = 3: f(z) + s (f(z, c_S) - f(z)), f(z) being the S = 0 branch (an all-zero cond),
  # both branches in one batched call.
  x1, c1, ctx1 = x[1:], cond[1:], ctx[1:]
  out = cs.guided_context_fn(model, c1, cs.ContextSampleOptions(context_scale=3.0), ctx1)(
      x1, t[1:])
  both = f(jnp.concatenate([x1, x1]), jnp.concatenate([t[1:], t[1:]]),
           jnp.concatenate([jnp.zeros_like(c1), c1]),
           jnp.concatenate([ctx1, ctx1]))
  uncond, conditional = both[:1], both[1:]
  np.testing.assert_allclose(np.asarray(out), np.asarray(uncond + 3.0 * (conditional - uncond)),
                             rtol=1e-6, atol=1e-6)
  # The known frames change the prediction of every frame (temporal layers mix them).
  assert np.abs(np.asarray(conditional - uncond)).mean(axis=(0, 2, 3, 4)).min() > 1e-3
  # Text guidance, s_t = 2: f(c, empty) + 2 (f(c, text) - f(c, empty)), "empty" being
  # uncond_text (here zeros), not the prompt again.
  empty = jnp.zeros_like(ctx1)
  out = cs.guided_context_fn(model, c1, cs.ContextSampleOptions(guidance_scale=2.0), ctx1,
                             empty)(x1, t[1:])
  both = f(jnp.concatenate([x1, x1]), jnp.concatenate([t[1:], t[1:]]),
           jnp.concatenate([c1, c1]), jnp.concatenate([empty, ctx1]))
  np.testing.assert_allclose(np.asarray(out), np.asarray(both[:1] + 2.0 * (both[1:] - both[:1])),
                             rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(both[1:] - both[:1])).max() > 1e-3
  # Text guidance without the empty prompt's embedding: refused (the text was dropped).
  with pytest.raises(ValueError, match="needs uncond_text"):
    cs.guided_context_fn(model, c1, cs.ContextSampleOptions(guidance_scale=2.0), ctx1)


def test_interpolation_reproduces_key_frames_and_runs_twice(model):
  _, _, text, _ = _inputs()
  keys = _normal(4, (2, 1, 4, 4, 4))
  opts = cs.ContextSampleOptions(num_steps=2)
  once = cs.interpolate(model, keys, 4, opts, text=text)
  assert once.shape == (2, 4, 4, 4, 4) and np.isfinite(np.asarray(once)).all()
  np.testing.assert_array_equal(np.asarray(once[:, 0]), np.asarray(keys[:, 0]))
  twice = cs.interpolate_twice(model, keys, 4, opts, text=text)
  assert twice.shape == (2, 16, 4, 4, 4) and np.isfinite(np.asarray(twice)).all()
  # The second pass keeps the first pass's four frames (the same draw) at 0, 4, 8, 12.
  np.testing.assert_array_equal(np.asarray(twice[:, ::4]), np.asarray(once))
  # A caller's key: the first pass draws from it, the second from other noise (it was
  # handed the same key, and drew the first pass's noise again).
  k = jax.random.key(9)
  twice_k = cs.interpolate_twice(model, keys, 4, opts, text=text, key=k)
  once_k = cs.interpolate(model, keys, 4, opts, text=text, key=k)
  np.testing.assert_array_equal(np.asarray(twice_k[:, ::4]), np.asarray(once_k))
  same_noise = cs.interpolate(model, once_k, 4, opts, text=text, key=k)
  assert np.abs(np.asarray(twice_k - same_noise)).max() > 1e-2
  # Without a key, seed s's second pass drew seed s + 1's first-pass noise (consecutive
  # seeds correlated); now it is seed s's key folded, as with a caller's key.
  seed1 = dataclasses.replace(opts, seed=1)
  second_of_0 = cs.interpolate(model, once, 4, seed1, text=text)
  assert np.abs(np.asarray(twice - second_of_0)).max() > 1e-2
  np.testing.assert_array_equal(
      np.asarray(twice), np.asarray(cs.interpolate_twice(model, keys, 4, opts, text=text,
                                                         key=jax.random.key(0))))
  np.testing.assert_array_equal(  # key(options.seed) for another seed too
      np.asarray(cs.interpolate_twice(model, keys, 4, seed1, text=text)),
      np.asarray(cs.interpolate_twice(model, keys, 4, opts, text=text, key=jax.random.key(1))))
  # A second model (the paper's second interpolator) runs the second pass alone.
  other = dataclasses.replace(model, params=jax.tree_util.tree_map(lambda a: a * 1.05,
                                                                   model.params))
  by_two = cs.interpolate_twice(model, keys, 4, opts, text=text, second_model=other)
  np.testing.assert_array_equal(
      np.asarray(by_two), np.asarray(cs.interpolate(other, once, 4, opts, text=text,
                                                    key=jax.random.fold_in(
                                                        jax.random.key(0), 2))))
  assert np.abs(np.asarray(by_two - twice)).max() > 1e-2
  for stride in (1, 0):  # (1 returned the key frames unchanged)
    with pytest.raises(ValueError, match=f"stride must be an integer >= 2, got {stride}"):
      cs.interpolate(model, keys, stride, opts, text=text)
  with pytest.raises(ValueError, match="no x_T"):  # (a shape error in the second pass)
    cs.interpolate_twice(model, keys, 4, opts, text=text, x_T=jnp.zeros((2, 4, 4, 4, 4)))


def test_autoregressive_extension(model):
  _, _, text, _ = _inputs()
  context = _normal(5, (2, 2, 4, 4, 4))
  opts = cs.ContextSampleOptions(num_steps=2)
  video = cs.extend(model, context, num_frames=7, clip_frames=4, num_context=2, options=opts,
                    text=text)
  assert video.shape == (2, 7, 4, 4, 4) and np.isfinite(np.asarray(video)).all()
  np.testing.assert_array_equal(np.asarray(video[:, :2]), np.asarray(context))
  # Each round continues from the last two frames: round 1 predicts frames 4, 5 from 2, 3.
  clip = cs.predict(model, video[:, 2:4], 4, opts, key=jax.random.fold_in(jax.random.key(0), 1),
                    text=text)
  np.testing.assert_array_equal(np.asarray(clip[:, 2:]), np.asarray(video[:, 4:6]))
  np.testing.assert_array_equal(np.asarray(clip[:, :2]), np.asarray(video[:, 2:4]))  # known
  # No context at all (S0 = 0): the first round is an unconditional clip, all of it
  # kept; round 1 continues from its last two frames.
  none = jnp.zeros((2, 0, 4, 4, 4))
  video = cs.extend(model, none, num_frames=6, clip_frames=4, num_context=2, options=opts,
                    text=text)
  first = cs.predict(model, none, 4, opts, key=jax.random.fold_in(jax.random.key(0), 0),
                     text=text)
  np.testing.assert_array_equal(np.asarray(video[:, :4]), np.asarray(first))
  clip = cs.predict(model, video[:, 2:4], 4, opts, key=jax.random.fold_in(jax.random.key(0), 1),
                    text=text)
  np.testing.assert_array_equal(np.asarray(video[:, 4:]), np.asarray(clip[:, 2:]))
  # A caller's key replaces key(seed) (it was a TypeError); x_T is refused (every round
  # would start from the same noise).
  keyed = cs.extend(model, none, num_frames=4, clip_frames=4, num_context=2, options=opts,
                    text=text, key=jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(keyed), np.asarray(cs.predict(
      model, none, 4, opts, key=jax.random.fold_in(jax.random.key(3), 0), text=text)))
  # Without a key: key(options.seed), seed 3 here.
  np.testing.assert_array_equal(np.asarray(keyed), np.asarray(cs.extend(
      model, none, num_frames=4, clip_frames=4, num_context=2,
      options=dataclasses.replace(opts, seed=3), text=text)))
  with pytest.raises(ValueError, match="no x_T"):
    cs.extend(model, none, num_frames=4, clip_frames=4, options=opts, text=text,
              x_T=jnp.zeros((2, 4, 4, 4, 4)))
  # num_context=0 after given frames: each round is a clip of its own, conditioned on no
  # frame (the given ones are kept in front, not handed to the model again): round 0 is
  # `first`, the unconditional clip of key(0)'s round 0. (Clips of 4 frames, as above: 3
  # compiled the UNet and a noise sampler once more.)
  given = context[:, :1]
  video = cs.extend(model, given, num_frames=5, clip_frames=4, num_context=0, options=opts,
                    text=text)
  np.testing.assert_array_equal(np.asarray(video[:, :1]), np.asarray(given))
  np.testing.assert_array_equal(np.asarray(video[:, 1:]), np.asarray(first))


def test_context_guidance_without_known_frames_runs_one_branch(model):
  # S = 0 (an unconditional first clip, num_context=0): the guided and unguided branches
  # are the same, and both ran (twice the UNet batch) for the unguided result.
  _, _, text, _ = _inputs()
  batches = []
  apply_fn = model.apply_fn

  def counting(params, x, *args, **kwargs):
    batches.append(x.shape[0])
    return apply_fn(params, x, *args, **kwargs)

  context = jnp.zeros((2, 0, 4, 4, 4))
  plain = cs.predict(model, context, 4, cs.ContextSampleOptions(num_steps=2), text=text)
  counted = dataclasses.replace(model, apply_fn=counting)
  guided = cs.predict(counted, context, 4, cs.ContextSampleOptions(num_steps=2,
                                                                 context_scale=2.0),
                      text=text)
  assert batches == [2, 2]  # one branch of batch 2 per step
  np.testing.assert_array_equal(np.asarray(guided), np.asarray(plain))
  # With known frames in some videos (every prediction round), both branches run. Only
  # the batch is checked: the UNet is traced at it (its shapes must agree), not compiled
  # (a program of batch 4 that nothing else here runs, ~6 s).
  batches.clear()

  def traced(params, x, *args, **kwargs):
    batches.append(x.shape[0])
    out = jax.eval_shape(apply_fn, params, x, *args, **kwargs)
    return jnp.zeros(out.shape, out.dtype)

  cs.sample_clip(dataclasses.replace(model, apply_fn=traced), jnp.zeros((2, 4, 4, 4, 4)),
                 first_frames_mask(jnp.array([1, 0]), 4),
                 cs.ContextSampleOptions(num_steps=2, context_scale=2.0), text=text)
  assert batches == [4, 4]
  with pytest.raises(ValueError, match="4 context frames leave nothing to predict in 4"):
    cs.predict(model, jnp.zeros((2, 4, 4, 4, 4)), 4, text=text)


def test_initial_and_step_noise_come_from_two_keys(model, monkeypatch):
  # sample_clip draws x_T from fold_in(key, 0) and hands the sampler fold_in(key, 1) for
  # its step noise (DDPM, eta > 0): one key for both correlated them, unseen by the
  # deterministic-DDIM tests.
  seen = {}
  original = cs.samplers.sample

  def sample(denoise, x_T, *args, key=None, **kwargs):
    seen.update(x_T=x_T, key=key)
    return original(denoise, x_T, *args, key=key, **kwargs)

  monkeypatch.setattr(cs.samplers, "sample", sample)
  _, _, text, z = _inputs()
  k = jax.random.key(11)
  cs.sample_clip(model, z, first_frames_mask(jnp.array([1, 2]), 4),
                 cs.ContextSampleOptions(num_steps=1, sampler="ddpm"), text=text, key=k)
  np.testing.assert_array_equal(
      np.asarray(seen["x_T"]), np.asarray(jax.random.normal(jax.random.fold_in(k, 0), SHAPE)))
  np.testing.assert_array_equal(np.asarray(jax.random.key_data(seen["key"])),
                                np.asarray(jax.random.key_data(jax.random.fold_in(k, 1))))
  # Without a key: key(options.seed) (the stages' training samples pass only a seed).
  cs.sample_clip(model, z, first_frames_mask(jnp.array([1, 2]), 4),
                 cs.ContextSampleOptions(num_steps=1, sampler="ddpm", seed=11), text=text)
  np.testing.assert_array_equal(
      np.asarray(seen["x_T"]), np.asarray(jax.random.normal(jax.random.fold_in(k, 0), SHAPE)))
