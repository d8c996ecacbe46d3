"""SD 2.x single files: the OpenCLIP text encoder (`cond_stage_model.model.*`).

A tiny transformers CLIPTextModel (gelu, as OpenCLIP ViT-H) with every weight
perturbed is written in OpenCLIP layout, plus what SD 2.x files carry beyond the 23
layers SD 2.x uses: one more resblock (the last one of ViT-H, skipped because SD 2.x
reads the penultimate layer), text_projection and logit_scale. diffusers' own importer
(`convert_open_clip_checkpoint`) is run on the same dict to prove that the layout
written here is the one diffusers reads, then ours must give transformers'
last_hidden_state.
"""

import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import ldm_export
from tests.conftest import max_rel_err, perturb_all_weights
from videoldm_jax.convert import image_models, pipeline_import
from videoldm_jax.convert.clip_keys import clip_params_from_torch, clip_state_dict_from_ldm
from videoldm_jax.convert.torch_layout import ConversionError
from videoldm_jax.models.clip_text import CLIPTextConfig, CLIPTextModel

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

_TINY = dict(vocab_size=1000, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
             num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
             bos_token_id=998, eos_token_id=999, pad_token_id=999)
_P = "cond_stage_model.model."
_D, _F, _LAYERS = _TINY["hidden_size"], _TINY["intermediate_size"], _TINY["num_hidden_layers"]


def _to_openclip(sd: dict, rng: np.random.Generator) -> dict:
  """transformers CLIPTextModel state dict (no `text_model.` prefix) -> OpenCLIP keys
  under `cond_stage_model.model.`, with one extra resblock and the contrastive head."""
  out = {_P + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
         _P + "positional_embedding": sd["embeddings.position_embedding.weight"],
         _P + "ln_final.weight": sd["final_layer_norm.weight"],
         _P + "ln_final.bias": sd["final_layer_norm.bias"]}
  for i in range(_LAYERS):
    src, dst = f"encoder.layers.{i}.", f"{_P}transformer.resblocks.{i}."
    for kind in ("weight", "bias"):
      # nn.MultiheadAttention's packed projection: rows q, k, v -> (3D, D) / (3D,).
      out[dst + f"attn.in_proj_{kind}"] = np.concatenate(
          [sd[f"{src}self_attn.{n}_proj.{kind}"] for n in "qkv"], axis=0)
      for theirs, ours in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                           ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                           ("mlp.c_proj", "mlp.fc2")):
        out[f"{dst}{theirs}.{kind}"] = sd[f"{src}{ours}.{kind}"]
  # The last layer of the OpenCLIP tower, which SD 2.x does not use: random, so that
  # using it by mistake would show in the outputs.
  extra = {"attn.in_proj_weight": (3 * _D, _D), "attn.in_proj_bias": (3 * _D,),
           "attn.out_proj.weight": (_D, _D), "attn.out_proj.bias": (_D,),
           "ln_1.weight": (_D,), "ln_1.bias": (_D,), "ln_2.weight": (_D,), "ln_2.bias": (_D,),
           "mlp.c_fc.weight": (_F, _D), "mlp.c_fc.bias": (_F,),
           "mlp.c_proj.weight": (_D, _F), "mlp.c_proj.bias": (_D,)}
  for leaf, shape in extra.items():
    out[f"{_P}transformer.resblocks.{_LAYERS}.{leaf}"] = (
        rng.standard_normal(shape).astype(np.float32))
  out[_P + "text_projection"] = rng.standard_normal((_D, 16)).astype(np.float32)
  out[_P + "logit_scale"] = np.asarray(4.6, np.float32)
  return out


class _Case:
  """The perturbed transformers model, its OpenCLIP-layout file and the Flax model."""

  def __init__(self, tmp_dir):
    from safetensors.numpy import load_file, save_file
    torch.manual_seed(0)
    self.torch_model = perturb_all_weights(
        transformers.CLIPTextModel(transformers.CLIPTextConfig(**_TINY)).eval(), torch)
    # transformers >= 5 names the keys without `text_model.`; older ones with it.
    self.hf_sd = {k.removeprefix("text_model."): v.numpy() for k, v in
                  self.torch_model.state_dict().items() if not k.endswith("position_ids")}
    openclip = _to_openclip(self.hf_sd, np.random.default_rng(1))
    # A whole-file context: the UNet / VAE keys must not disturb the text encoder.
    openclip["model.diffusion_model.out.2.weight"] = np.zeros((4, 4, 3, 3), np.float32)
    save_file(openclip, str(tmp_dir / "sd2-tiny.safetensors"))
    self.file_sd = load_file(str(tmp_dir / "sd2-tiny.safetensors"))
    self.config = CLIPTextConfig.from_transformers_config(self.torch_model.config.to_dict())
    self.model = CLIPTextModel(self.config)
    self.abstract = flax.core.meta.unbox(jax.eval_shape(
        self.model.init, jax.random.key(0), jnp.zeros((1, 77), jnp.int32))["params"])
    ids = np.random.default_rng(0).integers(0, 998, size=(2, 77))
    ids[:, 0] = 998
    ids[0, 12:] = 999
    ids[1, -1] = 999
    self.ids = ids.astype(np.int32)
    with torch.no_grad():
      self.ref_hidden = self.torch_model(
          input_ids=torch.from_numpy(self.ids).long()).last_hidden_state.numpy()

  def hidden_error(self, text_sd) -> float:
    params = clip_params_from_torch(self.abstract, text_sd, source="sd2-tiny.safetensors")
    hidden = jax.jit(lambda p, x: self.model.apply({"params": p}, x))(params, self.ids)
    return max_rel_err(hidden, self.ref_hidden)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
  return _Case(tmp_path_factory.mktemp("openclip"))


def test_written_layout_is_what_diffusers_imports(case):
  """diffusers' importer on our OpenCLIP dict gives back the transformers weights, so
  the layout the other tests convert from is the real one."""
  su = pytest.importorskip("diffusers.loaders.single_file_utils")
  ckpt = {k: torch.from_numpy(np.array(v)) for k, v in case.file_sd.items()}
  theirs = su.convert_open_clip_checkpoint(case.torch_model, ckpt)
  # diffusers drops the last block by its hard-coded ViT-H index (23); ours is index 3.
  extra = {k for k in theirs if k.startswith(f"text_model.encoder.layers.{_LAYERS}.")}
  assert len(extra) == 16  # 10 one-to-one tensors + in_proj split into 3 weights, 3 biases
  theirs = {k.removeprefix("text_model."): v.numpy() for k, v in theirs.items()
            if k not in extra}
  assert theirs.keys() == case.hf_sd.keys()
  for k, v in case.hf_sd.items():
    np.testing.assert_array_equal(theirs[k], v, err_msg=k)
  # ... and our converter agrees with diffusers' tensor for tensor.
  ours = clip_state_dict_from_ldm(case.file_sd, num_layers=_LAYERS)
  assert {k.removeprefix("text_model.") for k in ours} == theirs.keys()
  for k, v in ours.items():
    np.testing.assert_array_equal(v, theirs[k.removeprefix("text_model.")], err_msg=k)


def test_parity_with_transformers(case):
  sd = dict(case.file_sd)
  # Also ignored: the causal-mask buffer and an image tower, if a file kept them.
  sd[_P + "attn_mask"] = np.triu(np.full((77, 77), -np.inf, np.float32), 1)
  sd[_P + "visual.proj"] = np.zeros((64, _D), np.float32)
  text_sd = clip_state_dict_from_ldm(sd, num_layers=_LAYERS)
  assert not any(f"layers.{_LAYERS}." in k for k in text_sd)
  err = case.hidden_error(text_sd)
  print(f"OpenCLIP single file -> Flax, last_hidden_state max rel err: {err:.2e}")
  assert err < 1e-4, err


def test_num_layers_is_required_for_openclip(case):
  with pytest.raises(ValueError, match="OpenCLIP.*num_layers"):
    clip_state_dict_from_ldm(case.file_sd)


def test_missing_resblock_is_named(case):
  sd = {k: v for k, v in case.file_sd.items()
        if not k.startswith(_P + "transformer.resblocks.1.")}
  with pytest.raises(ConversionError) as info:
    clip_state_dict_from_ldm(sd, num_layers=_LAYERS)
  msg = str(info.value)
  assert f"missing: {_P}transformer.resblocks.1.attn.in_proj_weight" in msg
  assert f"missing: {_P}transformer.resblocks.1.mlp.c_proj.bias" in msg
  assert "resblocks.0." not in msg and "resblocks.2." not in msg
  # A file with fewer layers than the config uses (e.g. a wrong preset) fails alike.
  with pytest.raises(ConversionError, match=f"4 resblocks in the file, the config uses 5"
                                            f"(.|\n)*missing: {_P}transformer.resblocks.4.ln_1"):
    clip_state_dict_from_ldm(case.file_sd, num_layers=_LAYERS + 2)


def test_bad_in_proj_and_unknown_keys_are_reported(case):
  sd = dict(case.file_sd)
  sd[_P + "transformer.resblocks.0.attn.in_proj_bias"] = np.zeros((97,), np.float32)
  with pytest.raises(ConversionError, match="resblocks.0.attn.in_proj_bias has \\(97,\\)"):
    clip_state_dict_from_ldm(sd, num_layers=_LAYERS)
  sd = dict(case.file_sd)
  sd[_P + "transformer.resblocks.0.attn.bias_k"] = np.zeros((1, 1, _D), np.float32)
  sd[_P + "token_embedding.extra"] = np.zeros((2,), np.float32)
  text_sd = clip_state_dict_from_ldm(sd, num_layers=_LAYERS)
  with pytest.raises(ConversionError, match="unmapped: token_embedding.extra(.|\n)*"
                                            "unmapped: transformer.resblocks.0.attn.bias_k"):
    clip_params_from_torch(case.abstract, text_sd, source="x")


def test_from_single_file_passes_num_layers(case, tmp_path):
  """The whole single-file route with a tiny UNet / VAE and a preset JSON: the file has
  4 resblocks, the preset's text encoder 3."""
  diffusers = pytest.importorskip("diffusers")
  from safetensors.numpy import save_file
  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
      block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=_D,
      attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
  vae = diffusers.AutoencoderKL(
      block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
      down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2).eval()
  unet.save_pretrained(tmp_path / "unet")
  vae.save_pretrained(tmp_path / "vae")
  unet_config, _ = image_models.load_diffusers_unet(tmp_path / "unet")
  vae_config, _ = image_models.load_diffusers_vae(tmp_path / "vae")
  preset = {"unet": unet_config.to_dict(), "vae": vae_config.to_dict(),
            "text_encoder": case.config.to_dict(),
            "scheduler": {"num_train_timesteps": 1000, "prediction_type": "v_prediction"}}
  (tmp_path / "preset.json").write_text(json.dumps(preset))
  sd = {k: v for k, v in case.file_sd.items() if k.startswith(_P)}
  sd.update(ldm_export.unet_to_ldm(ldm_export.as_numpy(unet.state_dict()), 1, (True, False)))
  sd.update(ldm_export.vae_to_ldm(ldm_export.as_numpy(vae.state_dict()), 2))
  save_file(sd, str(tmp_path / "sd2.safetensors"))
  model = pipeline_import.from_single_file(tmp_path / "sd2.safetensors",
                                           str(tmp_path / "preset.json"))
  assert model.text_config.num_hidden_layers == _LAYERS
  hidden = CLIPTextModel(model.text_config).apply(
      {"params": model.params["text_encoder"]}, case.ids)
  assert max_rel_err(hidden, case.ref_hidden) < 1e-4
