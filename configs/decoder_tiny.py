"""Decoder stage at toy scale (~0.1 s per step on 2 CPU cores): a tiny random image
model's f4 autoencoder (half the width of keyframe_tiny's) gets a video decoder whose
temporal layers learn 4-frame procedural dash-cam clips of 32x32 against a small 3-D
patch discriminator. Start from the autoencoder stage's export to fine-tune a trained
autoencoder:

  videoldm-train --config=configs/autoencoder_tiny.py --workdir=work/autoencoder_tiny
  videoldm-train --config=configs/decoder_tiny.py --workdir=work/decoder_tiny \\
      --config.image_model=work/autoencoder_tiny/export/step_400
"""

import ml_collections

from videoldm_jax.config_files import load_sibling


def get_config() -> ml_collections.ConfigDict:
  c = load_sibling(__file__, "decoder_base").get_config()
  c.random_image_model = load_sibling(__file__, "keyframe_tiny").get_config().random_image_model
  # Half keyframe_tiny's autoencoder width (f4 still): a step well under a second on CPU.
  c.random_image_model.vae.block_out_channels = (16, 16, 32)
  c.discriminator.update(base_channels=16, num_layers=2, norm_num_groups=8)
  c.loss.update(disc_start=100)
  c.data.update(tfds_config="tiny", batch_size=2, num_frames=4, height=32, width=32)
  c.optim.update(lr=3e-4, warmup_steps=20, total_steps=400, ema_decay=0.99)
  c.disc_optim.update(lr=3e-4, total_steps=400)
  c.train.update(num_steps=400, log_every=20, ckpt_every=100)
  c.sample.update(every=200)
  return c
