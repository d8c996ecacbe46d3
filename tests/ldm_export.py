"""Test fixture: write diffusers UNet/VAE weights in the original LDM single-file layout.

diffusers ships importers from the LDM layout but no exporter, so the tests build the
single file by renaming keys here. This table is written independently of
`videoldm_jax.convert.ldm_keys` (regex rules in the opposite direction), and the tests
prove it right by feeding the result back through diffusers' OWN importer
(`convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint`) and requiring the
original state dict back, key for key.
"""

import re

import numpy as np

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"),
           ("time_emb_proj", "emb_layers.1"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]


def _resnet_inner(rest: str) -> str:
  for a, b in _RESNET:
    if rest.startswith(a + "."):
      return b + rest[len(a):]
  return rest


def unet_to_ldm(sd: dict, layers_per_block: int, attention_levels) -> dict:
  """diffusers UNet keys -> `model.diffusion_model.*` keys."""
  n = len(attention_levels)
  out = {}
  for key, v in sd.items():
    k = key
    k = k.replace("time_embedding.linear_1", "time_embed.0")
    k = k.replace("time_embedding.linear_2", "time_embed.2")
    k = k.replace("class_embedding.", "label_emb.")
    k = re.sub(r"^conv_in\.", "input_blocks.0.0.", k)
    k = re.sub(r"^conv_norm_out\.", "out.0.", k)
    k = re.sub(r"^conv_out\.", "out.2.", k)
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", k)
    if m:
      lvl, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
      rest = _resnet_inner(rest) if kind == "resnets" else rest
      k = f"input_blocks.{1 + lvl * (layers_per_block + 1) + j}.{0 if kind == 'resnets' else 1}.{rest}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", k)
    if m:
      k = f"input_blocks.{(int(m[1]) + 1) * (layers_per_block + 1)}.0.op.{m[2]}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", k)
    if m:
      rest = _resnet_inner(m[3]) if m[1] == "resnets" else m[3]
      k = f"middle_block.{1 if m[1] == 'attentions' else 2 * int(m[2])}.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", k)
    if m:
      up, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
      rest = _resnet_inner(rest) if kind == "resnets" else rest
      k = f"output_blocks.{up * (layers_per_block + 1) + j}.{0 if kind == 'resnets' else 1}.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", k)
    if m:
      up = int(m[1])
      sub = 2 if attention_levels[n - 1 - up] else 1
      k = f"output_blocks.{up * (layers_per_block + 1) + layers_per_block}.{sub}.conv.{m[2]}"
    out["model.diffusion_model." + k] = v
  return out


def vae_to_ldm(sd: dict, num_levels: int) -> dict:
  """diffusers AutoencoderKL keys -> `first_stage_model.*` keys (attention as 1x1 convs)."""
  out = {}
  for key, v in sd.items():
    k = key
    k = re.sub(r"(encoder|decoder)\.conv_norm_out", r"\1.norm_out", k)
    k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2", k)
    k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", k)
    k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)",
               lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.block.{m[2]}", k)
    k = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
               lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.upsample", k)
    k = re.sub(r"mid_block\.resnets\.0", "mid.block_1", k)
    k = re.sub(r"mid_block\.resnets\.1", "mid.block_2", k)
    k = re.sub(r"mid_block\.attentions\.0", "mid.attn_1", k)
    k = k.replace("conv_shortcut", "nin_shortcut")
    if ".mid.attn_1." in k:
      for a, b in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                   ("to_out.0", "proj_out")):
        k = k.replace(f".mid.attn_1.{a}.", f".mid.attn_1.{b}.")
      if k.endswith("weight") and v.ndim == 2 and not k.endswith("norm.weight"):
        v = v.reshape(*v.shape, 1, 1)
    out["first_stage_model." + k] = v
  return out


def as_numpy(sd) -> dict:
  return {k: v.detach().numpy().copy() if hasattr(v, "detach") else np.asarray(v)
          for k, v in sd.items()}
