"""Original (CompVis / Stability "LDM") single-file key names -> diffusers key names.

An SD single-file checkpoint holds the UNet under `model.diffusion_model.`, the VAE
under `first_stage_model.` and the CLIP text encoder under `cond_stage_model.`. The
UNet and VAE use the openaimodel / taming module layout; this module renames those
keys to the diffusers layout, which `torch_layout` maps onto our Flax models. The
rename tables are derived from the model config (how many blocks, where attention
sits), so any SD-family UNet or VAE is covered, not only SD 1.5's shapes.
"""

import numpy as np

from videoldm_jax.models.unet import UNetConfig
from videoldm_jax.models.vae import VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
EMA_PREFIX = "model_ema."
# Non-parameter entries of LDM checkpoints: the training noise schedule buffers.
SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "model_ema.decay", "model_ema.num_updates"})

_UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1":
                "time_emb_proj", "out_layers.0": "norm2", "out_layers.3": "conv2",
                "skip_connection": "conv_shortcut"}
_VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
             "proj_out": "to_out.0"}


def split_single_file(sd: dict[str, np.ndarray], source: str, extract_ema: bool = False
                      ) -> dict[str, dict[str, np.ndarray]]:
  """Splits an LDM checkpoint into {'unet', 'vae', 'text_encoder'} with prefixes removed.

  With `extract_ema`, the UNet comes from the `model_ema.` copy (keys without dots).
  Unknown top-level keys are an error naming them.
  """
  parts = {"unet": {}, "vae": {}, "text_encoder": {}}
  unknown = []
  for key, value in sd.items():
    if key.startswith(UNET_PREFIX):
      parts["unet"][key[len(UNET_PREFIX):]] = value
    elif key.startswith(VAE_PREFIX):
      if not key.startswith(VAE_PREFIX + "loss."):  # the autoencoder's training losses
        parts["vae"][key[len(VAE_PREFIX):]] = value
    elif key.startswith(TEXT_PREFIX):
      parts["text_encoder"][key] = value
    elif key.startswith(EMA_PREFIX) or key in SCHEDULE_BUFFERS:
      continue
    else:
      unknown.append(key)
  if unknown:
    raise ValueError(f"{source}: keys outside the UNet ({UNET_PREFIX}), VAE ({VAE_PREFIX}) "
                     f"and text encoder ({TEXT_PREFIX}): {sorted(unknown)[:20]}")
  if extract_ema:
    ema = {}
    for key in parts["unet"]:
      ema_key = EMA_PREFIX + "diffusion_model" + key.replace(".", "")
      if ema_key not in sd:
        raise ValueError(f"{source}: --extract_ema but {ema_key} is missing "
                         f"(for {UNET_PREFIX}{key})")
      ema[key] = sd[ema_key]
    parts["unet"] = ema
  for name, prefix in (("unet", UNET_PREFIX), ("vae", VAE_PREFIX)):
    if not parts[name]:
      raise ValueError(f"{source}: no {name} keys (expected keys starting with {prefix})")
  return parts


def _rename(sd: dict[str, np.ndarray], table: list[tuple[str, str, dict]]
            ) -> dict[str, np.ndarray]:
  """Renames keys by the longest matching prefix in `table`; inner names of the rest
  of the key go through that entry's map. Keys matching nothing keep their name, so
  that the loader reports them as unmapped."""
  table = sorted(table, key=lambda e: -len(e[0]))
  return {_renamed(key, table): value for key, value in sd.items()}


def _renamed(key: str, table: list[tuple[str, str, dict]]) -> str:
  """`key` renamed by the first entry of `table` (longest prefixes first) it starts
  with; itself where none."""
  for old, new, inner in table:
    if key.startswith(old):
      rest = key[len(old):]
      for a, b in inner.items():
        if rest.startswith(a + "."):
          rest = b + rest[len(a):]
          break
      return new + rest
  return key


def ldm_key(key: str, table: list[tuple[str, str, dict]]) -> str:
  """The inverse of `_rename`: the original key that `table` renames to the diffusers
  key `key` (`key` itself where no entry gives it), for messages that name a key as
  the user's file holds it."""
  inverse = [(new, old, {b: a for a, b in inner.items()}) for old, new, inner in table]
  return _renamed(key, sorted(inverse, key=lambda e: -len(e[0])))


def unet_ldm_to_diffusers(sd: dict[str, np.ndarray], c: UNetConfig) -> dict[str, np.ndarray]:
  """openaimodel UNet keys (prefix removed) -> diffusers UNet2DConditionModel keys."""
  return _rename(sd, unet_key_table(c))


def unet_key_table(c: UNetConfig) -> list[tuple[str, str, dict]]:
  """The (openaimodel prefix, diffusers prefix, inner names) renames of `c`'s UNet."""
  lpb, n = c.layers_per_block, c.num_levels
  table = [("time_embed.0.", "time_embedding.linear_1.", {}),
           ("time_embed.2.", "time_embedding.linear_2.", {}),
           ("label_emb.", "class_embedding.", {}),
           ("input_blocks.0.0.", "conv_in.", {}),
           ("out.0.", "conv_norm_out.", {}), ("out.2.", "conv_out.", {}),
           ("middle_block.0.", "mid_block.resnets.0.", _UNET_RESNET),
           ("middle_block.1.", "mid_block.attentions.0.", {}),
           ("middle_block.2.", "mid_block.resnets.1.", _UNET_RESNET)]
  for level in range(n):
    for j in range(lpb):
      idx = 1 + level * (lpb + 1) + j
      table.append((f"input_blocks.{idx}.0.", f"down_blocks.{level}.resnets.{j}.",
                    _UNET_RESNET))
      table.append((f"input_blocks.{idx}.1.", f"down_blocks.{level}.attentions.{j}.", {}))
    if level < n - 1:
      idx = 1 + level * (lpb + 1) + lpb
      table.append((f"input_blocks.{idx}.0.op.", f"down_blocks.{level}.downsamplers.0.conv.",
                    {}))
  for up in range(n):
    level = n - 1 - up
    attn = c.attention_levels[level]
    for j in range(lpb + 1):
      k = up * (lpb + 1) + j
      table.append((f"output_blocks.{k}.0.", f"up_blocks.{up}.resnets.{j}.", _UNET_RESNET))
      if attn:
        table.append((f"output_blocks.{k}.1.", f"up_blocks.{up}.attentions.{j}.", {}))
    if level > 0:
      k = up * (lpb + 1) + lpb
      table.append((f"output_blocks.{k}.{2 if attn else 1}.conv.",
                    f"up_blocks.{up}.upsamplers.0.conv.", {}))
  return table


def vae_ldm_to_diffusers(sd: dict[str, np.ndarray], c: VAEConfig) -> dict[str, np.ndarray]:
  """taming-style autoencoder keys (prefix removed) -> diffusers AutoencoderKL keys.

  The decoder's `up` list is stored lowest resolution LAST (up.0 is the full-resolution
  level), the reverse of diffusers' `up_blocks`; the mid attention's q/k/v/proj_out are
  1x1 convolutions, squeezed here to the linear layers diffusers uses.
  """
  out = _rename(sd, vae_key_table(c))
  for key, value in out.items():
    # (Only 1x1 kernels: another shape is left for the loader to report with its key; a
    # reshape failed with NumPy's bare "cannot reshape array of size ...".)
    if (".mid_block.attentions.0.to_" in key and key.endswith(".weight")
        and value.ndim == 4 and value.shape[2:] == (1, 1)):
      out[key] = value.reshape(value.shape[:2])
  return out


def vae_key_table(c: VAEConfig) -> list[tuple[str, str, dict]]:
  """The (taming prefix, diffusers prefix, inner names) renames of `c`'s autoencoder."""
  n = len(c.block_out_channels)
  table = []
  for part in ("encoder", "decoder"):
    table += [(f"{part}.norm_out.", f"{part}.conv_norm_out.", {}),
              (f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", _VAE_RESNET),
              (f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", _VAE_RESNET),
              (f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", _VAE_ATTN)]
  for i in range(n):
    for j in range(c.layers_per_block):
      table.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.",
                    _VAE_RESNET))
    table.append((f"encoder.down.{i}.downsample.conv.",
                  f"encoder.down_blocks.{i}.downsamplers.0.conv.", {}))
    for j in range(c.layers_per_block + 1):
      table.append((f"decoder.up.{n - 1 - i}.block.{j}.",
                    f"decoder.up_blocks.{i}.resnets.{j}.", _VAE_RESNET))
    table.append((f"decoder.up.{n - 1 - i}.upsample.conv.",
                  f"decoder.up_blocks.{i}.upsamplers.0.conv.", {}))
  return table
