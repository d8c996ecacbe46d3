"""Parity of our Flax UNet and VAE with diffusers (PyTorch, CPU) on tiny random models.

EVERY torch weight is perturbed before export, so a layer that is zero-initialised
in diffusers cannot hide a wrong mapping. Both import routes are exercised: the
diffusers folder (`save_pretrained`, safetensors) and the original LDM single file.
Metric: max |ours - torch| / max |torch| < PARITY in float32: 1e-5, a tenth of the
project's 1e-4 (measured ~1e-6 to 2e-6): at 1e-4 a GroupNorm with the UNet's epsilon
in the VAE (1e-5 for 1e-6, errors ~5e-5) passed.
"""

import jax
import numpy as np
import pytest

from tests import ldm_export
from tests.conftest import max_rel_err, perturb_all_weights
from videoldm_jax.convert import diffusers_config, image_models, ldm_keys
from videoldm_jax.convert.torch_layout import ConversionError
from videoldm_jax.models.unet import UNet
from videoldm_jax.models.vae import AutoencoderKL

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

PARITY = 1e-5

SD1_STYLE = dict(  # conv proj_in/out, the same number of heads at every level
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(32, 32, 64), norm_num_groups=8, cross_attention_dim=24,
    attention_head_dim=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SD2_STYLE = dict(  # linear proj_in/out, per-level heads, deeper transformer, labels
    sample_size=16, in_channels=7, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 32, 64), norm_num_groups=8, cross_attention_dim=40,
    attention_head_dim=(2, 4, 8), use_linear_projection=True,
    transformer_layers_per_block=(1, 1, 2), num_class_embeds=10,  # (mid block: 2 too)
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"))
# SD1_STYLE cut to two levels of one layer: still every block type (with and without
# cross-attention, down and up, the middle block), attention at level 0, in half the ops.
# For tests of one setting or attention path, a UNet compile each; the whole structure is
# test_unet_parity_diffusers_folder_and_single_file's. (The three long attention paths
# took 32 s of CPU with SD1_STYLE, 17 s with this.)
SD1_SMALL = dict(SD1_STYLE, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
VAE_TINY = dict(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
                block_out_channels=(16, 32, 32), layers_per_block=2,
                down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3, scaling_factor=0.3)


def _torch_unet(cfg, seed):
  torch.manual_seed(seed)
  return perturb_all_weights(diffusers.UNet2DConditionModel(**cfg).eval(), torch, seed)


def _unet_inputs(cfg, seed=0, size=16):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, size, size, cfg["in_channels"]), dtype=np.float32)
  t = np.array([10, 777], np.int64)
  ctx = rng.standard_normal((2, 5, cfg["cross_attention_dim"]), dtype=np.float32)
  labels = np.array([3, 7]) if cfg.get("num_class_embeds") else None
  return x, t, ctx, labels


def _torch_unet_out(model, x, t, ctx, labels):
  with torch.no_grad():
    out = model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                encoder_hidden_states=torch.from_numpy(ctx),
                class_labels=None if labels is None else torch.from_numpy(labels)).sample
  return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("cfg", [SD1_STYLE, SD2_STYLE], ids=["sd1_conv_proj", "sd2_linear_proj"])
def test_unet_parity_diffusers_folder_and_single_file(cfg, tmp_path):
  model = _torch_unet(cfg, seed=1)
  model.save_pretrained(tmp_path / "unet", safe_serialization=True)
  inputs = _unet_inputs(cfg)
  ref = _torch_unet_out(model, *inputs)

  config, params = image_models.load_diffusers_unet(tmp_path / "unet")
  apply = jax.jit(UNet(config).apply)
  x, t, ctx, labels = inputs
  ours = apply({"params": params}, x, t, ctx, labels)
  assert max_rel_err(ours, ref) < PARITY

  # Single-file route: LDM layout, verified against diffusers' own importer first.
  sd = ldm_export.as_numpy(model.state_dict())
  ldm = ldm_export.unet_to_ldm(sd, cfg["layers_per_block"], config.attention_levels)
  from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
  back = convert_ldm_unet_checkpoint({k: torch.from_numpy(v) for k, v in ldm.items()},
                                     dict(model.config))
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k].numpy().reshape(sd[k].shape), sd[k], err_msg=k)
  parts = ldm_keys.split_single_file(
      {**ldm, **ldm_export.vae_to_ldm({"encoder.conv_in.weight": np.zeros((1,))}, 1)},
      "test")
  params2 = image_models.unet_from_ldm(config, parts["unet"], "test.safetensors")
  ours2 = apply({"params": params2}, x, t, ctx, labels)
  assert max_rel_err(ours2, ref) < PARITY


@pytest.fixture(scope="module")
def long_attention_unet(tmp_path_factory):
  """(our config, params, inputs at 32 x 32, diffusers' output) of SD1_SMALL: one
  torch model, folder and reference for every attention path."""
  model = _torch_unet(SD1_SMALL, seed=2)
  folder = _save(model, tmp_path_factory.mktemp("long_attention"))
  inputs = _unet_inputs(SD1_SMALL, seed=3, size=32)
  config, params = image_models.load_diffusers_unet(folder)
  return config, params, inputs, _torch_unet_out(model, *inputs)


@pytest.mark.parametrize("implementation, platform", [("auto", "cpu"), ("blocked", "cpu"),
                                                     ("blocked", "tpu")])
def test_unet_parity_with_long_attention_paths(long_attention_unet, monkeypatch,
                                              implementation, platform):
  # 32 x 32 latents: 1024 x 1024 self-attention logits per head at the first level take
  # a long-sequence path: on a CPU by default the C++ kernel (models/native_attention.py),
  # with attention="blocked" XLA's blocked loop in its CPU layout (one batch x head at a
  # time), and traced for a TPU the accelerator layout (heads in a loop, the batch
  # vmapped); each must still be diffusers' UNet to 1e-4.
  from videoldm_jax.models import attention, blocked_attention, native_attention
  config, params, inputs, ref = long_attention_unet
  called = set()
  for name in ("blocked_attention", "blocked_attention_batched"):
    original = getattr(blocked_attention, name)
    monkeypatch.setattr(blocked_attention, name, lambda *a, _f=original, _n=name: (
        called.add(_n), _f(*a))[1])
  attention.set_implementation(implementation, platform)
  try:
    kernel = implementation == "auto" and native_attention.available()
    assert attention.attention_path(32 * 32, 32 * 32) == ("native" if kernel else "blocked")
    ours = jax.jit(UNet(config).apply)({"params": params}, *inputs)
  finally:
    attention.set_implementation("auto")
  assert max_rel_err(ours, ref) < PARITY
  if implementation == "blocked":  # the layout the platform's path takes was traced
    assert called == {"blocked_attention_batched" if platform == "tpu"
                      else "blocked_attention"}, called


def _diffusers_vae(tmp_path, seed: int, img_shape, z_shape, **changes):
  """A perturbed diffusers VAE (VAE_TINY with `changes`) saved to tmp_path / "vae",
  random inputs and its outputs, channels-last: (model, img, z, mean, logvar, decoded).

  The decoder's conv_in and first mid ResBlock's conv2 are `_quiet`, so the mid-block
  ResBlock's norm1 and the attention's GroupNorm see per-group variance ~4e-7, where
  their epsilon matters: the attention's at 1e-5 instead of diffusers' 1e-6 (resnet_eps)
  moved `decoded` by 0.6-0.75 of its maximum, and passed at unit variance (4e-6).
  """
  torch.manual_seed(seed)
  model = perturb_all_weights(diffusers.AutoencoderKL(**{**VAE_TINY, **changes}).eval(),
                              torch, seed=seed)
  _quiet(model.decoder.conv_in, model.decoder.mid_block.resnets[0].conv2)
  model.save_pretrained(tmp_path / "vae", safe_serialization=True)
  rng = np.random.default_rng(seed - 2)
  img = rng.uniform(-1, 1, img_shape).astype(np.float32)
  z = rng.standard_normal(z_shape).astype(np.float32)
  nhwc = lambda x: x.permute(0, 2, 3, 1).numpy()
  with torch.no_grad():
    dist = model.encode(torch.from_numpy(img).permute(0, 3, 1, 2)).latent_dist
    decoded = model.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample
  return model, img, z, nhwc(dist.mean), nhwc(dist.logvar), nhwc(decoded)


def test_vae_without_quant_convs_matches_diffusers(tmp_path):
  # SD3 / Flux-style VAEs have no quant_conv / post_quant_conv. (Two levels of one layer:
  # the rest of the VAE is test_vae_parity_encode_decode_both_routes's; compiled in 3.8 s,
  # VAE_TINY's three levels of two in 5.1 s.)
  _, img, z, ref_mean, _, ref_dec = _diffusers_vae(
      tmp_path, 3, (1, 16, 16, 3), (1, 4, 4, 4), use_quant_conv=False,
      use_post_quant_conv=False, block_out_channels=(16, 32), layers_per_block=1,
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
  config, params = image_models.load_diffusers_vae(tmp_path / "vae")
  assert not {"quant_conv", "post_quant_conv"} & set(params)
  vae = AutoencoderKL(config)
  # (Jitted: op by op, the VAE compiled 133 small programs, 2 s of CPU more.)
  mean, _ = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=AutoencoderKL.encode))(
      params, img)
  assert max_rel_err(mean, ref_mean) < PARITY
  dec = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=AutoencoderKL.decode))(
      params, z)
  assert max_rel_err(dec, ref_dec) < PARITY


def test_vae_parity_encode_decode_both_routes(tmp_path):
  model, img, z, ref_mean, ref_logvar, ref_dec = _diffusers_vae(
      tmp_path, 2, (2, 32, 24, 3), (2, 8, 6, 4))

  config, params = image_models.load_diffusers_vae(tmp_path / "vae")
  assert config.scaling_factor == 0.3
  vae = AutoencoderKL(config)
  encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=AutoencoderKL.encode))
  decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=AutoencoderKL.decode))
  mean, logvar = encode(params, img)
  assert max_rel_err(mean, ref_mean) < PARITY
  assert max_rel_err(logvar, ref_logvar) < PARITY
  assert max_rel_err(decode(params, z), ref_dec) < PARITY

  sd = ldm_export.as_numpy(model.state_dict())
  ldm = ldm_export.vae_to_ldm(sd, len(VAE_TINY["block_out_channels"]))
  from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
  back = convert_ldm_vae_checkpoint({k: torch.from_numpy(v) for k, v in ldm.items()},
                                    dict(model.config))
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k].numpy().reshape(sd[k].shape), sd[k], err_msg=k)
  vae_sd = {k[len("first_stage_model."):]: v for k, v in ldm.items()}
  params2 = image_models.vae_from_ldm(config, vae_sd, "test.safetensors")
  assert max_rel_err(encode(params2, img)[0], ref_mean) < PARITY
  assert max_rel_err(decode(params2, z), ref_dec) < PARITY


def test_vae_posterior_logvar_is_clamped_as_diffusers():
  # diffusers' DiagonalGaussianDistribution clamps logvar to [-30, 20]; random weights
  # never reach the bounds, so quant_conv's bias pushes two logvar channels past them
  # (without the clamp: logvar ~ +-1e3 and exp(logvar / 2) overflows to inf).
  torch.manual_seed(8)
  model = perturb_all_weights(diffusers.AutoencoderKL(**VAE_TINY).eval(), torch, seed=8)
  latent = VAE_TINY["latent_channels"]
  with torch.no_grad():
    model.quant_conv.bias[latent] += 1e3
    model.quant_conv.bias[latent + 1] -= 1e3
  # (test_vae_parity_encode_decode_both_routes's image shape: its encoder program, loaded
  # from the compilation cache, not compiled again)
  img = np.random.default_rng(8).uniform(-1, 1, (2, 32, 24, 3)).astype(np.float32)
  with torch.no_grad():
    dist = model.encode(torch.from_numpy(img).permute(0, 3, 1, 2)).latent_dist
  ref_logvar = dist.logvar.permute(0, 2, 3, 1).numpy()
  assert ref_logvar[..., 0].min() == 20.0 and ref_logvar[..., 1].max() == -30.0
  config = diffusers_config.vae_config_from_diffusers(dict(model.config))
  params = image_models.vae_params_from_torch(
      config, ldm_export.as_numpy(model.state_dict()), "test")
  _, logvar = jax.jit(lambda p, x: AutoencoderKL(config).apply(
      {"params": p}, x, method=AutoencoderKL.encode))(params, img)
  assert max_rel_err(logvar, ref_logvar) < PARITY


def _quiet(*layers):
  """Scales the weights and biases of torch `layers` by 1e-3: what follows them sees
  activations of variance ~1e-6, where a norm's epsilon (1e-6 / 1e-5) moves the output
  by percents; at unit variance the two epsilons differ by ~5e-6, under PARITY."""
  with torch.no_grad():
    for layer in layers:
      layer.weight.mul_(1e-3)
      layer.bias.mul_(1e-3)


def test_unet_resblock_norm_epsilon_is_the_config_norm_eps():
  # conv_in's output feeds the first ResBlock's GroupNorm (norm_eps 1e-5 in SD): ResBlocks
  # with diffusers' ResnetBlock2D default of 1e-6 instead were 0.68 off here.
  model = _torch_unet(SD1_STYLE, seed=4)
  _quiet(model.conv_in)
  inputs = _unet_inputs(SD1_STYLE, seed=5)
  config = diffusers_config.unet_config_from_diffusers(dict(model.config))
  params = image_models.unet_params_from_torch(
      config, ldm_export.as_numpy(model.state_dict()), "test")
  ours = jax.jit(UNet(config).apply)({"params": params}, *inputs)
  assert max_rel_err(ours, _torch_unet_out(model, *inputs)) < PARITY


def test_unet_timestep_embedding_and_norm_settings_reach_their_layers():
  # Non-default values (LDM-derived checkpoints set them): diffusers uses norm_eps in every
  # ResBlock and conv_norm_out (the transformers keep 1e-6 and 1e-5), and
  # flip_sin_to_cos / freq_shift in the time projection. 0.1 is far from either default.
  cfg = dict(SD1_SMALL, flip_sin_to_cos=False, freq_shift=1, norm_eps=0.1)
  model = _torch_unet(cfg, seed=6)
  inputs = _unet_inputs(cfg, seed=7)
  config = diffusers_config.unet_config_from_diffusers(dict(model.config))
  assert (config.flip_sin_to_cos, config.freq_shift, config.norm_eps) == (False, 1, 0.1)
  params = image_models.unet_params_from_torch(
      config, ldm_export.as_numpy(model.state_dict()), "test")
  ours = jax.jit(UNet(config).apply)({"params": params}, *inputs)
  assert max_rel_err(ours, _torch_unet_out(model, *inputs)) < PARITY


@pytest.mark.parametrize("linear", [False, True], ids=["conv_proj", "linear_proj"])
def test_spatial_transformer_norm_epsilons_match_diffusers(linear):
  # The spatial transformer's GroupNorm (1e-6) sees the quiet input x and the first
  # block's LayerNorm (1e-5) the quiet proj_in output: swapping either epsilon for the
  # other moved the output by 1.5e-2 / 1.6e-1 of its maximum (measured 4e-7 as is).
  from flax.core import meta
  from videoldm_jax.convert.torch_layout import load_state_dict
  from videoldm_jax.models.transformer2d import SpatialTransformer
  torch.manual_seed(6)
  model = perturb_all_weights(diffusers.Transformer2DModel(
      num_attention_heads=2, attention_head_dim=16, in_channels=32, norm_num_groups=8,
      cross_attention_dim=24, use_linear_projection=linear).eval(), torch, seed=6)
  _quiet(model.proj_in)
  rng = np.random.default_rng(6)
  x = rng.standard_normal((2, 6, 6, 32), dtype=np.float32) * 1e-3
  ctx = rng.standard_normal((2, 5, 24), dtype=np.float32)
  with torch.no_grad():
    ref = model(torch.from_numpy(x).permute(0, 3, 1, 2),
                encoder_hidden_states=torch.from_numpy(ctx)).sample.permute(0, 2, 3, 1)
  ours_module = SpatialTransformer(num_heads=2, use_linear_projection=linear,
                                   norm_num_groups=8)
  abstract = meta.unbox(jax.eval_shape(ours_module.init, jax.random.key(0), x, ctx))
  params = load_state_dict(abstract["params"], ldm_export.as_numpy(model.state_dict()),
                           what="Transformer2DModel", source="test")
  # (Jitted: op by op, the two cases compiled 61 programs.)
  ours = jax.jit(ours_module.apply)({"params": params}, x, ctx)
  assert max_rel_err(ours, ref.numpy()) < PARITY


def test_unet_shape_mismatch_and_unmapped_keys_are_named(tmp_path):
  model = _torch_unet(SD1_STYLE, seed=3)
  sd = ldm_export.as_numpy(model.state_dict())
  config, _ = image_models.load_diffusers_unet(_save(model, tmp_path))
  bad = dict(sd)
  bad["conv_in.weight"] = np.zeros((32, 5, 3, 3), np.float32)
  bad["extra.weight"] = np.zeros((2,), np.float32)
  bad["foo"] = np.zeros((3,), np.float32)  # (a key without a dot: no module of its own)
  del bad["conv_out.bias"]
  with pytest.raises(ConversionError) as e:
    image_models.unet_params_from_torch(config, bad, "bad.safetensors")
  msg = str(e.value)
  assert "conv_in.weight has (32, 5, 3, 3)" in msg and "expects (3, 3, 4, 32)" in msg
  assert "unmapped: extra.weight" in msg and "unmapped: foo (3,)" in msg
  assert "missing: conv_out.bias" in msg
  assert "bad.safetensors" in msg


def _save(model, tmp_path):
  model.save_pretrained(tmp_path / "unet", safe_serialization=True)
  return tmp_path / "unet"


@pytest.mark.parametrize("dim, flip, shift", [(32, True, 0), (32, False, 1), (33, True, 0)])
def test_timestep_embedding_matches_diffusers(torch_cpu, dim, flip, shift):
  # The parity models use diffusers' defaults (flip, shift 0); configs may set others.
  from diffusers.models.embeddings import get_timestep_embedding
  from videoldm_jax.models import layers
  t = np.array([0, 1, 250, 999], np.float32)
  ref = get_timestep_embedding(torch_cpu.from_numpy(t), dim, flip_sin_to_cos=flip,
                               downscale_freq_shift=shift).numpy()
  ours = layers.timestep_embedding(jax.numpy.asarray(t), dim, flip, shift)
  assert max_rel_err(ours, ref) < 1e-4  # (float32 sin of arguments up to ~1000)
