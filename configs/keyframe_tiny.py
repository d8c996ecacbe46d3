"""Key-frame stage at toy scale: runs in a few minutes on 2 CPU cores.

A random tiny text-to-image LDM (as configs/image_tiny.py) gets temporal layers and
learns procedural dash-cam clips (8 frames, 32x32 pixels -> 8x8 latents).

  videoldm-train --config=configs/keyframe_tiny.py --workdir=work/keyframe_tiny
"""

import ml_collections

from videoldm_jax.config_files import load_sibling


def get_config() -> ml_collections.ConfigDict:
  c = load_sibling(__file__, "keyframe_base").get_config()
  c.random_image_model = load_sibling(__file__, "image_tiny").get_config()
  c.random_image_model.unet.block_out_channels = (32, 64)
  c.random_image_model.vae.block_out_channels = (32, 32, 64)  # f4
  c.data.update(tfds_config="tiny", batch_size=4, num_frames=8, height=32, width=32)
  c.optim.update(lr=3e-4, warmup_steps=20, total_steps=200, ema_decay=0.99)
  c.train.update(num_steps=200, log_every=10, ckpt_every=50)
  c.sample.update(every=100, steps=20)
  return c
