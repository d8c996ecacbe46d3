"""A tiny randomly initialised text-to-image LDM: the demo's and the tests' model.

Same architecture family as Stable Diffusion 1.x (conv proj_in, CLIP text encoder,
f4 VAE here to keep images small), about 2M parameters, so that sampling a 64x64
image takes seconds on 2 CPU cores. Random weights draw noise-like images; the point
is the full path (tokenizer -> CLIP -> UNet + CFG -> sampler -> VAE -> PNG).

  videoldm-init-random --config=configs/image_tiny.py --output=work/tiny_ldm
  videoldm-sample-image --model=work/tiny_ldm --prompt="a road at night" --height=64

`--config=configs/image_tiny.py:classes=N` gives a class-conditional model of N classes
(`unet.num_class_embeds`) without a text encoder instead, e.g. N = 3 for the
procedural_driving `time_of_day` labels (0 day, 1 night) plus a null class 2 for
classifier-free guidance (README, "Class-conditional models").
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  """variant: "" (text-to-image) or "classes=N" (class-conditional, no text encoder)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.unet = dict(in_channels=4, out_channels=4, block_out_channels=(32, 64),
                layers_per_block=1, attention_levels=(True, True), num_heads=2,
                transformer_depth=1, cross_attention_dim=64,
                use_linear_projection=False, norm_num_groups=8)
  c.vae = dict(block_out_channels=(32, 32, 64), layers_per_block=1, latent_channels=4,
               norm_num_groups=8, scaling_factor=0.18215)
  c.text_encoder = dict(vocab_size=514, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=2,
                        max_position_embeddings=77, hidden_act="quick_gelu")
  # SD's training schedule (diffusers scheduler_config.json fields).
  c.scheduler = dict(num_train_timesteps=1000, beta_schedule="scaled_linear",
                     beta_start=0.00085, beta_end=0.012, prediction_type="epsilon",
                     steps_offset=1, timestep_spacing="leading", set_alpha_to_one=False,
                     clip_sample=False)
  if variant:
    name, _, value = variant.partition("=")
    if name != "classes" or not value.isdigit() or int(value) < 2:
      raise ValueError(f"configs/image_tiny.py:{variant}: expected 'classes=N', N >= 2")
    del c.text_encoder
    c.unet.num_class_embeds = int(value)
  return c
