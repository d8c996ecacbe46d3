"""The video decoder is the image decoder plus temporal layers (Video LDM Sec. 3.1); the
3-D patch discriminator sees time; the GAN loss pieces (train/gan.py)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from videoldm_jax.models import discriminator as disc_lib
from videoldm_jax.models.vae import kl_divergence
from videoldm_jax.models import params as params_lib
from videoldm_jax.models import partition
from videoldm_jax.models import perceptual
from videoldm_jax.models import vae as vae_lib
from videoldm_jax.models.vae import AutoencoderKL, VAEConfig, VAETemporalConfig
from videoldm_jax.train import gan

CONFIG = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
IMAGE = AutoencoderKL(CONFIG)
VIDEO = AutoencoderKL(CONFIG, VAETemporalConfig())
DISC = disc_lib.DiscriminatorConfig(base_channels=8, num_layers=2, norm_num_groups=4)


def _perturb(params, seed=1, scale=0.1):
  """Moves every leaf (zero-initialised convs and mixing logits included) off its init."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda p: p + scale * rng.standard_normal(p.shape, np.float32), params)


def _set_mix(params, value):
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {k: jnp.full_like(v, value) if k[-1] == "mix_factor" else v for k, v in flat.items()})


@pytest.fixture(scope="module")
def video_params():
  return _perturb(params_lib.init_params(VIDEO, 0, *vae_lib.example_inputs(CONFIG, video=True)))


@pytest.fixture(scope="module")
def decoders():
  """(image decode, video decode) jitted once for the module."""
  image = jax.jit(lambda p, z: IMAGE.apply({"params": p}, z, method=AutoencoderKL.decode))
  video = jax.jit(lambda p, z, flags: VIDEO.apply({"params": p}, z, flags,
                                                  method=AutoencoderKL.decode_video))
  return image, video


# Batch 1: GroupNorms of a single instance sum in row blocks (layers.POSITION_SPLITS).
@pytest.mark.parametrize("batch,frames", [(2, 1), (2, 4), (1, 1), (1, 4)])
def test_spatial_branch_everywhere_gives_the_image_decoder_bitwise(video_params, decoders,
                                                                   batch, frames):
  image, video = decoders
  z = jax.random.normal(jax.random.key(frames), (batch, frames, 4, 4, 4))
  spatial, _ = partition.split(video_params)
  ref = image(spatial, z.reshape((-1,) + z.shape[2:])).reshape(z.shape[:2] + (8, 8, 3))
  # The image-only override on every frame ...
  out = video(video_params, z, jnp.ones(z.shape[:2], bool))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  # ... and saturated logits: alpha = sigmoid(-inf) = 0 on the temporal branch.
  out = video(_set_mix(video_params, -jnp.inf), z, jnp.zeros(z.shape[:2], bool))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  # The override acts per frame: flagged frames are image frames, the others are not.
  flags = jnp.zeros(z.shape[:2], bool).at[:, 0].set(True)
  out = np.asarray(video(video_params, z, flags))
  np.testing.assert_array_equal(out[:, 0], np.asarray(ref)[:, 0])
  if frames > 1:
    assert np.max(np.abs(out[:, 1:] - np.asarray(ref)[:, 1:])) > 1e-3
  if batch == 2 and frames > 1:
    # ... and per video: video 1 flags its last frame instead.
    flags = flags.at[1, 0].set(False).at[1, frames - 1].set(True)
    out = np.asarray(video(video_params, z, flags))
    np.testing.assert_array_equal(out[1, -1], np.asarray(ref)[1, -1])
    np.testing.assert_array_equal(out[0, 0], np.asarray(ref)[0, 0])
    assert np.max(np.abs(out[1, 0] - np.asarray(ref)[1, 0])) > 1e-3


def test_video_decode_refuses_flags_of_another_layout(video_params):
  z = jnp.zeros((2, 3, 4, 4, 4))
  with pytest.raises(ValueError, match=r"decode_video image_only: expected \(B, T\) = "
                     r"\(2, 3\), got \(3, 2\)"):
    VIDEO.apply({"params": video_params}, z, jnp.ones((3, 2), bool),
                method=AutoencoderKL.decode_video)


def test_latent_shift_and_scale_are_undone_by_decode(video_params):
  # latent_normalization="mean_std" writes a shift_factor: latents are (z - shift) *
  # scale, and every decode path undoes both (a sign slip offset every sampled video).
  import dataclasses
  shifted = dataclasses.replace(CONFIG, shift_factor=0.5, scaling_factor=0.3)
  spatial, _ = partition.split(video_params)
  x = jax.random.uniform(jax.random.key(1), (3, 8, 8, 3), minval=-1, maxval=1)
  for model, params in ((AutoencoderKL(shifted), spatial),
                        (AutoencoderKL(shifted, VAETemporalConfig()), video_params)):
    mean, _ = model.apply({"params": params}, x, method=AutoencoderKL.encode)
    z = model.apply({"params": params}, x, method=AutoencoderKL.encode_latents)
    np.testing.assert_allclose(np.asarray(z), (np.asarray(mean) - 0.5) * 0.3, rtol=1e-6,
                               atol=1e-6)
    if model.temporal is None:
      np.testing.assert_allclose(
          np.asarray(model.apply({"params": params}, z, method=AutoencoderKL.decode_latents)),
          np.asarray(model.apply({"params": params}, mean, method=AutoencoderKL.decode)),
          rtol=1e-5, atol=1e-5)
    else:
      np.testing.assert_allclose(
          np.asarray(model.apply({"params": params}, z[None],
                                 method=AutoencoderKL.decode_video_latents)),
          np.asarray(model.apply({"params": params}, mean[None],
                                 method=AutoencoderKL.decode_video)), rtol=1e-5, atol=1e-5)


def test_at_init_the_temporal_layers_are_identities(decoders):
  """Zero-initialised ResBlock convs and the identity-initialised output Conv3d: with
  the mixing logits at their init (alpha 0.5) the video decoder starts as the image
  decoder, so fine-tuning starts from it."""
  image, video = decoders
  params = params_lib.init_params(VIDEO, 3, *vae_lib.example_inputs(CONFIG, video=True))
  spatial, temporal = partition.split(params)
  params = partition.merge(_perturb(spatial), temporal)
  z = jax.random.normal(jax.random.key(0), (2, 4, 4, 4, 4))  # shapes compiled above
  ref = image(partition.split(params)[0], z.reshape((-1,) + z.shape[2:]))
  out = video(params, z, jnp.zeros((2, 4), bool)).reshape(ref.shape)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)
  mix = [float(v[0]) for k, v in traverse_util.flatten_dict(params).items()
         if k[-1] == "mix_factor"]
  # Temporal ResBlocks: 2 in the mid block, (layers_per_block + 1) per up level; + conv_out.
  assert mix == [0.0] * (2 + 2 * 2 + 1)


@pytest.mark.parametrize("kernel", [(3, 1, 1), (3, 3, 3)])
def test_temporal_resblock_3d_equals_its_definition(kernel):
  # On perturbed parameters (conv2 and the merge logit off their init): GroupNorm over
  # each video's (T, H, W, group) at the autoencoder's 1e-6, SiLU, Conv3d twice,
  # residual, then alpha * temporal + (1 - alpha) * spatial. Per-frame statistics passed
  # every other test (alpha = 0 or conv2 = 0 hide the branch).
  from einops import rearrange
  from videoldm_jax.models.temporal import Frames
  from tests.test_video_unet import _conv3d_same, _group_norm_video
  t, groups = 5, 4
  x = jax.random.normal(jax.random.key(8), (2 * t, 4, 3, 8)) * jnp.arange(
      1, 2 * t + 1)[:, None, None, None]
  block = vae_lib.TemporalResBlock3D(VAETemporalConfig(conv_kernel=kernel),
                                     norm_num_groups=groups)
  frames = Frames(num_frames=t)
  p = _perturb(nn.meta.unbox(block.init(jax.random.key(9), x, frames))["params"], seed=3)
  out = block.apply({"params": p}, x, frames)
  v = rearrange(x, "(b t) h w c -> b t h w c", t=t)
  gn = lambda name, y: _group_norm_video(y, p[name]["scale"], p[name]["bias"], groups, 1e-6)
  h = _conv3d_same(jax.nn.silu(gn("norm1", v)), p["conv1"])
  h = _conv3d_same(jax.nn.silu(gn("norm2", h)), p["conv2"])
  reference = vae_lib.mix_temporal(x, rearrange(v + h, "b t h w c -> (b t) h w c"),
                                   p["mix_factor"], None)
  np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)


def test_spatial_subtree_is_exactly_the_image_autoencoder():
  video = params_lib.abstract_params(VIDEO, *vae_lib.example_inputs(CONFIG, video=True))
  image = params_lib.abstract_params(IMAGE, *vae_lib.example_inputs(CONFIG))
  spatial, temporal = partition.split(video)
  partition.check_same_structure(image, spatial, what="spatial", source="video decoder")
  paths = list(traverse_util.flatten_dict(temporal))
  assert paths and all(p[0] == "decoder" for p in paths)  # the encoder stays per frame
  assert ("decoder", "temporal_conv_out", "conv", "kernel") in paths
  assert ("decoder", "up_blocks_1", "temporal_resnets_1", "conv2", "kernel") in paths
  # Every new parameter carries logical axis names.
  axes = traverse_util.flatten_dict(partition.split(
      params_lib.logical_axes(VIDEO, *vae_lib.example_inputs(CONFIG, video=True)))[1])
  assert tuple(axes[("decoder", "temporal_conv_out", "conv", "kernel")]) == (
      "conv_kt", "conv_kh", "conv_kw", "conv_in", "conv_out")
  assert all(len(a) == len(traverse_util.flatten_dict(temporal)[k].shape)
             for k, a in axes.items())


def test_3d_discriminator_sees_time_2d_is_per_frame():
  video_d = disc_lib.VideoPatchDiscriminator(DISC)
  image_d = disc_lib.PatchDiscriminator(DISC)
  p3 = params_lib.init_params(video_d, 0, *disc_lib.example_inputs(DISC, True))
  p2 = params_lib.init_params(image_d, 0, *disc_lib.example_inputs(DISC, False))
  x = jax.random.uniform(jax.random.key(0), (2, 4, 16, 16, 3), minval=-1, maxval=1)
  order = jnp.array([2, 0, 3, 1])
  shuffled = x[:, order]
  d3 = jax.jit(lambda v: video_d.apply({"params": p3}, v))
  assert d3(x).shape == (2, 1, 2, 2, 1)
  assert float(jnp.max(jnp.abs(d3(shuffled) - d3(x)))) > 1e-4
  # A per-frame 2-D discriminator only permutes its outputs.
  d2 = jax.jit(lambda v: image_d.apply({"params": p2}, v.reshape((-1,) + v.shape[2:]))
               .reshape(v.shape[:2] + (2, 2, 1)))
  np.testing.assert_allclose(np.asarray(d2(shuffled)), np.asarray(d2(x))[:, order],
                             rtol=0, atol=1e-6)
  # Clips shorter than the temporal reduction still give logits.
  assert d3(x[:, :1]).shape == (2, 1, 2, 2, 1)


def _taming_discriminator(torch, config, video: bool):
  """taming-transformers' NLayerDiscriminator, rebuilt in torch with GroupNorm for its
  BatchNorm; video: Conv3d, with the stride-1 layers' time kernel 3 (see the module)."""
  conv = torch.nn.Conv3d if video else torch.nn.Conv2d
  pad, k1 = ((1, 1, 1), (3, 4, 4)) if video else (1, 4)
  ch = lambda n: config.base_channels * min(2 ** n, 8)  # taming's ndf * nf_mult
  seq = [conv(config.in_channels, ch(0), 4, 2, pad), torch.nn.LeakyReLU(0.2)]
  for n in range(1, config.num_layers + 1):
    last = n == config.num_layers
    seq += [conv(ch(n - 1), ch(n), k1 if last else 4, 1 if last else 2, pad, bias=False),
            torch.nn.GroupNorm(config.norm_num_groups, ch(n), eps=1e-5),
            torch.nn.LeakyReLU(0.2)]
  return torch.nn.Sequential(*seq, conv(ch(config.num_layers), 1, k1, 1, pad))


@pytest.mark.parametrize("video", [False, True], ids=["2d", "3d"])
def test_discriminator_is_tamings_nlayer_discriminator(torch_cpu, video):
  # Kernel 4, padding 1, stride 2 then 1, channel multipliers capped at 8 (max_mult),
  # LeakyReLU(0.2), bias only without a norm, a 1-channel conv_out; 4 layers reach
  # the cap (4 * min(2^4, 8) channels). Measured ~1e-6.
  torch = torch_cpu
  config = disc_lib.DiscriminatorConfig(base_channels=4, num_layers=4, norm_num_groups=4)
  disc = (disc_lib.VideoPatchDiscriminator if video else disc_lib.PatchDiscriminator)(config)
  shape = (1, 32, 64, 64, 3) if video else (2, 64, 64, 3)
  x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
  params = _perturb(params_lib.init_params(disc, 0, *disc_lib.example_inputs(config, video)))
  ours = np.asarray(jax.jit(disc.apply)({"params": params}, x))
  ref = _taming_discriminator(torch, config, video)
  convs = [m for m in ref if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
  names = [f"conv_{i}" for i in range(len(convs) - 1)] + ["conv_out"]
  to_torch = lambda a: torch.from_numpy(np.moveaxis(np.asarray(a), (-1, -2), (0, 1)).copy())
  with torch.no_grad():
    for m, name in zip(convs, names):
      m.weight.copy_(to_torch(params[name]["kernel"]))
      if m.bias is not None:
        m.bias.copy_(torch.from_numpy(np.asarray(params[name]["bias"])))
    for n, m in enumerate((m for m in ref if isinstance(m, torch.nn.GroupNorm)), 1):
      m.weight.copy_(torch.from_numpy(np.asarray(params[f"norm_{n}"]["scale"])))
      m.bias.copy_(torch.from_numpy(np.asarray(params[f"norm_{n}"]["bias"])))
    want = np.moveaxis(ref(torch.from_numpy(np.moveaxis(x, -1, 1).copy())).numpy(), 1, -1)
  assert ours.shape == want.shape
  np.testing.assert_allclose(ours, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_discriminator_time_padding_is_xlas_same():
  # As lax's "SAME": ceil(t / stride) outputs, the odd pixel of padding at the end.
  for t in (1, 2, 3, 4, 5, 8):
    for kernel, stride in ((4, 2), (3, 1), (4, 1)):
      want = jax.lax.padtype_to_pads((t,), (kernel,), (stride,), "SAME")[0]
      assert disc_lib._time_padding(t, kernel, stride) == tuple(want), (t, kernel, stride)
  assert disc_lib._time_padding(3, 4, 2) == (1, 2)


def test_discriminator_config_refuses_sizes_below_one():
  # num_layers = 0 built a discriminator without taming's normalised stride-1 conv.
  for field in ("in_channels", "base_channels", "num_layers", "max_mult",
                "norm_num_groups"):
    with pytest.raises(ValueError, match=f"DiscriminatorConfig.{field}=0: expected >= 1"):
      dataclasses.replace(DISC, **{field: 0}).validate()
  with pytest.raises(ValueError, match=r"config.discriminator: 48 channels \(layer 1\) are "
                     "not divisible by norm_num_groups=5"):
    disc_lib.DiscriminatorConfig(base_channels=24, norm_num_groups=5).validate(
        "config.discriminator")
  assert DISC.validate() is DISC


def test_a_vae_without_mid_block_attention_has_none():
  # mid_block_add_attention=False (diffusers' option): no mid_block/attentions_0 weights.
  import dataclasses
  config = dataclasses.replace(CONFIG, mid_block_add_attention=False)
  params = params_lib.abstract_params(AutoencoderKL(config), *vae_lib.example_inputs(config))
  paths = ["/".join(k) for k in traverse_util.flatten_dict(params)]
  assert not [p for p in paths if "mid_block/attentions" in p]
  assert [p for p in paths if "mid_block/resnets_1" in p]
  with_attention = traverse_util.flatten_dict(params_lib.abstract_params(
      IMAGE, *vae_lib.example_inputs(CONFIG)))
  assert [k for k in with_attention if "attentions_0" in k and "mid_block" in k]


def test_stride_two_conv_equals_a_strided_conv():
  import flax.linen as nn
  # Odd sizes and uneven padding: a trailing row no output reads is dropped.
  x = jax.random.normal(jax.random.key(0), (1, 1, 9, 8, 3))
  pad = ((1, 2), (1, 1), (1, 1))
  m = disc_lib.StrideTwoConv(5, pad)
  p = _perturb(nn.unbox(jax.jit(m.init)(jax.random.key(1), x)))
  ref = jax.jit(nn.Conv(5, (4, 4, 4), strides=2, padding=pad).apply)(p, x)
  np.testing.assert_allclose(np.asarray(jax.jit(m.apply)(p, x)), np.asarray(ref), atol=1e-5)


def test_hinge_losses_and_disc_factor():
  real, fake = jnp.array([2.0, 0.5]), jnp.array([-2.0, 0.0])
  assert float(gan.hinge_d_loss(real, fake)) == pytest.approx(0.5 * (0.25 + 0.5))
  assert float(gan.generator_loss(fake)) == pytest.approx(1.0)
  assert float(gan.disc_factor(jnp.int32(4), 5, 0.7)) == 0.0
  assert float(gan.disc_factor(jnp.int32(5), 5, 0.7)) == pytest.approx(0.7)


def test_adaptive_weight_clips_before_disc_weight():
  # As taming: clamp(|g_rec| / |g_gan|, 0, MAX) * disc_weight; a flat discriminator
  # (zero generator gradient) hits the clamp.
  w = gan.adaptive_weight(np.ones(3, np.float32), np.zeros(3, np.float32), 0.5)
  assert float(w) == pytest.approx(0.5 * gan.MAX_WEIGHT)


def test_adaptive_weight_matches_direct_gradients():
  rng = np.random.default_rng(0)
  feats, w = rng.standard_normal((6, 5), np.float32), rng.standard_normal((5, 3), np.float32)
  target, v = rng.standard_normal((6, 3), np.float32), rng.standard_normal((3,), np.float32)
  head = lambda w: jnp.tanh(feats @ w)
  rec = lambda r: jnp.mean(jnp.abs(r - target))
  g = lambda r: -jnp.mean(jnp.tanh(r) @ v)

  @jax.jit
  def both(w):
    d_rec = jax.grad(lambda w: rec(head(w)))(w)
    d_g = jax.grad(lambda w: g(head(w)))(w)
    expected = 0.5 * jnp.linalg.norm(d_rec) / (jnp.linalg.norm(d_g) + 1e-4)
    got = gan.last_layer_weight(head, w, lambda r: (rec(r), g(r)), factor=0.5)
    # No gradient flows through the weight.
    no_grad = jax.grad(lambda w: gan.last_layer_weight(head, w, lambda r: (rec(r), g(r))))(w)
    return expected, got, no_grad

  expected, got, no_grad = both(w)
  np.testing.assert_allclose(float(got), float(expected), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(no_grad), 0.0)
  # Clipped to [0, 1e4].
  assert float(gan.adaptive_weight(np.ones(3, np.float32), np.zeros(3, np.float32))) == \
      gan.MAX_WEIGHT


def _tiny_vgg_file(path, seed=0):
  """A VGG16-shaped network (torchvision layout, 4-8 channels) saved as safetensors."""
  from safetensors.numpy import save_file
  rng = np.random.default_rng(seed)
  tensors, cin = {}, 3
  for s, stage in enumerate(perceptual.STAGES):
    cout = (4, 6, 8, 8, 8)[s]
    for i in stage:
      tensors[f"features.{i}.weight"] = rng.standard_normal((cout, cin, 3, 3)).astype(
          np.float32) * 0.3
      tensors[f"features.{i}.bias"] = rng.standard_normal((cout,)).astype(np.float32) * 0.1
      cin = cout
  save_file(tensors, str(path))
  return tensors


def test_perceptual_distance_from_a_torchvision_layout_file(tmp_path, torch_cpu):
  torch = torch_cpu
  tensors = _tiny_vgg_file(tmp_path / "vgg.safetensors")
  params = perceptual.load_vgg16(tmp_path / "vgg.safetensors")
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  y = np.clip(x + 0.3 * rng.standard_normal(x.shape), -1, 1).astype(np.float32)
  distance = jax.jit(perceptual.distance)
  d = distance(params, x, y)
  assert d.shape == (2,) and bool(jnp.all(d > 0))
  np.testing.assert_allclose(np.asarray(distance(params, x, x)), 0.0, atol=1e-6)
  # Reference: the same stack in PyTorch (NCHW, OIHW weights, max-pools between stages).
  def feats(img):
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    h = (torch.from_numpy(img).permute(0, 3, 1, 2) - shift) / scale
    out = []
    for s, stage in enumerate(perceptual.STAGES):
      if s:
        h = torch.nn.functional.max_pool2d(h, 2)
      for i in stage:
        h = torch.relu(torch.nn.functional.conv2d(
            h, torch.from_numpy(tensors[f"features.{i}.weight"]),
            torch.from_numpy(tensors[f"features.{i}.bias"]), padding=1))
      out.append(h)
    return out
  def reference(x, y):
    ref = 0
    for a, b in zip(feats(x), feats(y)):
      a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
      b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
      ref = ref + (a - b).pow(2).sum(1).mean((1, 2))
    return ref.numpy()
  np.testing.assert_allclose(np.asarray(d), reference(x, y), rtol=1e-4)
  # Sides no power of 2 divides (24 -> 12 -> 6 -> 3 -> 1 row: torch's pooling drops
  # an odd last row, as VALID does).
  x, y = (np.pad(a, ((0, 0), (0, 8), (0, 4), (0, 0)), mode="reflect") for a in (x, y))
  np.testing.assert_allclose(np.asarray(distance(params, x, y)), reference(x, y), rtol=1e-4)
  with pytest.raises(ValueError, match="features.28.weight"):
    from safetensors.numpy import save_file
    save_file({k: v for k, v in tensors.items() if "28" not in k},
              str(tmp_path / "bad.safetensors"))
    perceptual.load_vgg16(tmp_path / "bad.safetensors")
  # Wrong shapes are named at load time (they failed at the first traced step naming
  # nothing, and a (1,) bias broadcast silently).
  from safetensors.numpy import save_file
  lins = {f"lin{k}.model.1.weight": np.ones((1, c, 1, 1), np.float32)
          for k, c in enumerate((4, 6, 8, 8, 8))}
  save_file({**tensors, **lins}, str(tmp_path / "ok.safetensors"))
  assert perceptual.load_vgg16(tmp_path / "ok.safetensors")["lin_4"]["kernel"].shape == (8,)
  for name, shape, message in (
      ("features.5.weight", (6, 3, 3, 3), r"features.5.weight has shape \(6, 3, 3, 3\), "
       r"expected \(out, 4, 3, 3\)"),
      ("features.0.bias", (1,), r"features.0.bias has shape \(1,\), expected \(4,\)"),
      ("lin1.model.1.weight", (1, 3, 1, 1), r"lin1.model.1.weight has shape \(1, 3, 1, 1\)")):
    bad = {**tensors, **lins, name: np.ones(shape, np.float32)}
    save_file(bad, str(tmp_path / "shapes.safetensors"))
    with pytest.raises(ValueError, match=message):
      perceptual.load_vgg16(tmp_path / "shapes.safetensors")
  # lpips' learned channel weights weight each stage's squared differences,
  # sum_c w_c (a - b)^2 averaged over pixels (ones above equal a plain sum).
  weights = {k: rng.uniform(0, 1, v.shape).astype(np.float32) for k, v in lins.items()}
  save_file({**tensors, **weights}, str(tmp_path / "weighted.safetensors"))
  weighted = perceptual.load_vgg16(tmp_path / "weighted.safetensors")
  ref = 0
  for k, (a, b) in enumerate(zip(feats(x), feats(y))):
    a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    w = torch.from_numpy(weights[f"lin{k}.model.1.weight"])
    ref = ref + ((a - b).pow(2) * w).sum(1).mean((1, 2))
  np.testing.assert_allclose(np.asarray(distance(weighted, x, y)), ref.numpy(), rtol=1e-4)
  save_file({**tensors, **{k: v for k, v in weights.items() if "lin4" not in k}},
            str(tmp_path / "partial.safetensors"))
  with pytest.raises(ValueError, match="some but not all"):
    perceptual.load_vgg16(tmp_path / "partial.safetensors")


def test_sampling_decodes_videos_with_the_models_video_decoder(video_params):
  # A decoder-stage export built on a key-frame export holds the temporal UNet and the
  # video decoder: videoldm-sample decoded its clips frame by frame all the same.
  from videoldm_jax import pretrained
  from videoldm_jax.pipelines import sampling
  model = pretrained.PretrainedLDM(None, CONFIG, None, {}, {"vae": video_params},
                                   vae_temporal_config=VAETemporalConfig())
  z = jax.random.normal(jax.random.key(5), (1, 4, 4, 4, 4))
  out = np.asarray(sampling.decode(model, z))
  video = sampling.decode_fn(CONFIG, VAETemporalConfig())(video_params, z)
  np.testing.assert_array_equal(out, np.asarray(video))
  frame_wise = sampling.decode_fn(CONFIG, None)(partition.split(video_params)[0], z)
  assert np.max(np.abs(out - np.asarray(frame_wise))) > 1e-3
  # Images (4-D latents) stay frame-wise (a batch of 1 against one of 4 frames: the
  # GroupNorm sums split otherwise, so equal to float32 rounding).
  np.testing.assert_allclose(np.asarray(sampling.decode(model, z[:, 0])),
                             np.asarray(frame_wise)[:, 0], rtol=1e-5, atol=1e-5)


def test_kl_divergence_is_the_closed_form_per_example():
  # KL(N(m, s^2) || N(0, 1)) = 0.5 (m^2 + s^2 - 1 - ln s^2) per value, summed per
  # example: m = 1, s^2 = 2 over 12 values gives 12 * 0.5 * (2 - ln 2) = 7.8411.
  mean = jnp.ones((2, 3, 4))
  logvar = jnp.full((2, 3, 4), np.log(2.0))
  np.testing.assert_allclose(kl_divergence(mean, logvar), [6 * (2 - np.log(2))] * 2,
                             rtol=1e-6)
  np.testing.assert_array_equal(kl_divergence(jnp.zeros((1, 5)), jnp.zeros((1, 5))), [0.0])
