"""diffusers `config.json` dicts -> our model configs, refusing what we do not implement.

Every field that changes the computation is either translated or checked against the
value we implement; an unsupported value is an error naming the file and the field,
never a silently different model.
"""

from typing import Any

from videoldm_jax.models.unet import UNetConfig
from videoldm_jax.models.vae import VAEConfig


def _require(d: dict, field: str, allowed, source: str):
  value = d.get(field, allowed[0])
  if value not in allowed:
    raise ValueError(f"{source}: unsupported {field}={value!r}; videoldm-jax implements "
                     f"{allowed!r}")


_UNET_FIXED = {
    "act_fn": ("silu",), "time_embedding_type": ("positional",),
    "resnet_time_scale_shift": ("default",), "conv_in_kernel": (3,), "conv_out_kernel": (3,),
    "addition_embed_type": (None,), "class_embed_type": (None,),
    "only_cross_attention": (False,), "dual_cross_attention": (False,),
    "center_input_sample": (False,), "encoder_hid_dim": (None,),
    "time_cond_proj_dim": (None,), "timestep_post_act": (None,),
    "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1.0, 1),
    "downsample_padding": (1,), "attention_type": ("default",),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",), "mid_block_scale_factor": (1, 1.0),
    "time_embedding_dim": (None,), "time_embedding_act_fn": (None,),
    "class_embeddings_concat": (False,), "projection_class_embeddings_input_dim": (None,),
    "reverse_transformer_layers_per_block": (None,), "cross_attention_norm": (None,),
    "addition_time_embed_dim": (None,), "encoder_hid_dim_type": (None,),
}

# UNet2DConditionModel.__init__'s defaults, which diffusers' from_config fills in for a
# config.json that leaves these fields out.
_UNET_DEFAULT_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
_UNET_DEFAULT_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
_UNET_DEFAULT_CHANNELS = (320, 640, 1280, 1280)


def unet_config_from_diffusers(d: dict[str, Any], source: str = "unet/config.json"
                               ) -> UNetConfig:
  """Translates a diffusers `UNet2DConditionModel` config."""
  for field, allowed in _UNET_FIXED.items():
    _require(d, field, allowed, source)
  down = list(d.get("down_block_types", _UNET_DEFAULT_DOWN))
  up = list(d.get("up_block_types", _UNET_DEFAULT_UP))
  down_kinds = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
  up_kinds = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
  for kind in down:
    if kind not in down_kinds:
      raise ValueError(f"{source}: unsupported down block {kind!r} in down_block_types")
  for kind in up:
    if kind not in up_kinds:
      raise ValueError(f"{source}: unsupported up block {kind!r} in up_block_types")
  attention = tuple(down_kinds[k] for k in down)
  if tuple(up_kinds[k] for k in reversed(up)) != attention:
    raise ValueError(f"{source}: up_block_types {up} are not the mirror of "
                     f"down_block_types {down}")
  if isinstance(d.get("cross_attention_dim", 1280), (list, tuple)):
    raise ValueError(f"{source}: per-block cross_attention_dim is not supported")
  if isinstance(d.get("layers_per_block", 2), (list, tuple)):
    raise ValueError(f"{source}: per-block layers_per_block is not supported")
  # diffusers' historical naming: `attention_head_dim` holds the NUMBER of heads unless
  # `num_attention_heads` is given (see UNet2DConditionModel.__init__).
  heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
  return UNetConfig(
      in_channels=d.get("in_channels", 4), out_channels=d.get("out_channels", 4),
      block_out_channels=tuple(d.get("block_out_channels", _UNET_DEFAULT_CHANNELS)),
      layers_per_block=d.get("layers_per_block", 2), attention_levels=attention,
      num_heads=tuple(heads) if isinstance(heads, (list, tuple)) else heads,
      head_dim=None,
      transformer_depth=(tuple(d["transformer_layers_per_block"])
                         if isinstance(d.get("transformer_layers_per_block"), (list, tuple))
                         else d.get("transformer_layers_per_block", 1)),
      cross_attention_dim=d.get("cross_attention_dim", 1280),
      use_linear_projection=d.get("use_linear_projection", False),
      norm_num_groups=d.get("norm_num_groups", 32), norm_eps=d.get("norm_eps", 1e-5),
      flip_sin_to_cos=d.get("flip_sin_to_cos", True), freq_shift=d.get("freq_shift", 0),
      num_class_embeds=d.get("num_class_embeds"),
  ).validate()


def vae_config_from_diffusers(d: dict[str, Any], source: str = "vae/config.json"
                              ) -> VAEConfig:
  """Translates a diffusers `AutoencoderKL` config."""
  _require(d, "act_fn", ("silu",), source)
  channels = tuple(d.get("block_out_channels", (64,)))
  for field, kind in (("down_block_types", "DownEncoderBlock2D"),
                      ("up_block_types", "UpDecoderBlock2D")):
    for k in d.get(field, [kind]):
      if k != kind:
        raise ValueError(f"{source}: unsupported {field} entry {k!r} (expected {kind!r})")
    if field in d and len(d[field]) != len(channels):
      # (diffusers builds one block per entry: the weights then have other levels)
      raise ValueError(f"{source}: {field} has {len(d[field])} entries, block_out_channels "
                       f"{list(channels)} {len(channels)}: one block per level")
  if d.get("latents_mean") is not None:
    raise ValueError(f"{source}: per-channel latents_mean/std are not supported")
  return VAEConfig(
      in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3),
      block_out_channels=channels,
      layers_per_block=d.get("layers_per_block", 1),
      latent_channels=d.get("latent_channels", 4),
      norm_num_groups=d.get("norm_num_groups", 32),
      scaling_factor=d.get("scaling_factor", 0.18215),
      shift_factor=d.get("shift_factor") or 0.0,
      use_quant_conv=d.get("use_quant_conv", True),
      use_post_quant_conv=d.get("use_post_quant_conv", True),
      mid_block_add_attention=d.get("mid_block_add_attention", True),
  )
