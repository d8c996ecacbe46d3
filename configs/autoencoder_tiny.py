"""Autoencoder stage at toy scale (~0.1 s per step on 2 CPU cores): the tiny random
image model's f4 KL autoencoder (as configs/decoder_tiny.py) learns procedural dash-cam
frames (2 clips x 4 frames of 32x32 per step) with a small 2-D patch discriminator.
Its export is the image model with the trained autoencoder, for the latent stages and
the decoder stage:

  videoldm-train --config=configs/autoencoder_tiny.py --workdir=work/autoencoder_tiny
  videoldm-train --config=configs/image_ldm_tiny.py \\
      --config.image_model=work/autoencoder_tiny/export/step_400 --workdir=work/image_ldm

Fields are documented in configs/decoder_base.py.
"""

import ml_collections

from videoldm_jax.config_files import load_sibling


def get_config() -> ml_collections.ConfigDict:
  c = load_sibling(__file__, "decoder_tiny").get_config()
  c.stage = "autoencoder"
  del c.vae_temporal, c.train_spatial_decoder  # decoder stage only
  c.optim.update(lr=1e-3)
  # The latent factors of the export's VAE config (the diffusion models' inputs are
  # scaling_factor * (z - shift_factor)): "std" sets scaling_factor = 1 / std of the new
  # autoencoder's latents, as the LDM paper rescales them (SD's 0.18215 fits only SD's
  # autoencoder); "mean_std" also shifts by their mean; "keep" (the default without
  # this field) keeps the image model's, for an autoencoder fine-tuned under an
  # existing UNet. Estimated at the export from 64 clips of the training data.
  c.latent_normalization = "std"
  return c
