"""Model configs of the public Stable Diffusion releases, for single-file checkpoints.

A diffusers folder carries its own config.json files; an LDM single file does not, so
`videoldm-convert --single_file` takes one of these presets and then corrects the
fields that the weights themselves reveal (input/output channels, context width,
conv or linear projections, label embedding), so that variants such as SD inpainting
(9 input channels) convert with the base preset.
"""

import dataclasses
import json
from pathlib import Path

import numpy as np

from videoldm_jax.models.clip_text import CLIPTextConfig
from videoldm_jax.models.unet import UNetConfig
from videoldm_jax.models.vae import VAEConfig


@dataclasses.dataclass(frozen=True)
class Preset:
  unet: UNetConfig
  vae: VAEConfig
  text: CLIPTextConfig | None
  scheduler: dict


# The release scheduler configs (no timestep_spacing: each sampler then takes its
# diffusers default, as the diffusers-folder route does; "leading" here made dpmpp_2m
# sample other timesteps than the same weights converted from their folder).
_SD_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear",
                     beta_start=0.00085, beta_end=0.012, prediction_type="epsilon",
                     steps_offset=1, set_alpha_to_one=False, clip_sample=False)
_SD2_UNET = UNetConfig(num_heads=None, head_dim=64, cross_attention_dim=1024,
                       use_linear_projection=True)
# OpenCLIP ViT-H/14 as SD 2.x uses it: the penultimate layer's output, i.e. 23 layers.
_SD2_TEXT = CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                           num_attention_heads=16, hidden_act="gelu")

PRESETS = {
    "sd15": Preset(UNetConfig(), VAEConfig(), CLIPTextConfig(), _SD_SCHEDULER),
    "sd21": Preset(_SD2_UNET, VAEConfig(), _SD2_TEXT,
                   {**_SD_SCHEDULER, "prediction_type": "v_prediction"}),
    "sd21-base": Preset(_SD2_UNET, VAEConfig(), _SD2_TEXT, _SD_SCHEDULER),
}


def unet_config_from_weights(base: UNetConfig, unet_sd: dict[str, np.ndarray]) -> UNetConfig:
  """Corrects `base` with what the LDM-layout UNet weights (prefix removed) show."""
  updates = {}
  if "input_blocks.0.0.weight" in unet_sd:
    updates["in_channels"] = int(unet_sd["input_blocks.0.0.weight"].shape[1])
  if "out.2.weight" in unet_sd:
    updates["out_channels"] = int(unet_sd["out.2.weight"].shape[0])
  to_k = sorted(k for k in unet_sd if k.endswith("attn2.to_k.weight"))
  if to_k:
    updates["cross_attention_dim"] = int(unet_sd[to_k[0]].shape[1])
  proj_in = sorted(k for k in unet_sd if k.endswith(".proj_in.weight"))
  if proj_in:
    updates["use_linear_projection"] = unet_sd[proj_in[0]].ndim == 2
  if "label_emb.weight" in unet_sd:
    updates["num_class_embeds"] = int(unet_sd["label_emb.weight"].shape[0])
  return dataclasses.replace(base, **updates).validate()


def resolve(name_or_path: str) -> Preset:
  """A preset by name, or by a JSON file with `unet`, `vae`, `text_encoder`, `scheduler`
  objects (the schema of a converted model's model_index.json), for custom models."""
  if name_or_path in PRESETS:
    return PRESETS[name_or_path]
  path = Path(name_or_path)
  if not path.is_file():
    raise ValueError(f"--preset={name_or_path!r} is neither a known preset "
                     f"({sorted(PRESETS)}) nor a JSON file")
  d = json.loads(path.read_text())
  missing = [k for k in ("unet", "vae", "scheduler") if k not in d]
  if missing:
    raise ValueError(f"{path}: missing {missing} (expected the model_index.json schema)")
  text = d.get("text_encoder")
  return Preset(UNetConfig.from_dict(d["unet"], f"{path}: unet"),
                VAEConfig.from_dict(d["vae"], f"{path}: vae"),
                None if text is None else CLIPTextConfig.from_dict(text, f"{path}: text"),
                dict(d["scheduler"]))
