"""Image LDM stage at toy scale: the whole tiny image UNet learns procedural_driving
frames (the paper trains its driving model's image LDM first, then adds temporal
layers). Its export is an image model for configs/keyframe_tiny.py:

  videoldm-train --config=configs/image_ldm_tiny.py --workdir=work/image_ldm_tiny
  videoldm-train --config=configs/keyframe_tiny.py \\
      --config.image_model=work/image_ldm_tiny/export/step_900 --workdir=work/keyframe_tiny
"""

import ml_collections

from videoldm_jax.config_files import load_sibling


def get_config() -> ml_collections.ConfigDict:
  c = load_sibling(__file__, "keyframe_tiny").get_config()
  c.stage = "image_ldm"
  c.mode = "full"
  # Every frame of the 4 clips is an image: 32 images of 32x32 per step. 900 steps
  # (~1 min on 2 cores): at 300 its samples were noise, at 900 they show the road.
  c.optim.update(lr=1e-3, warmup_steps=30, total_steps=900, ema_decay=0.99)
  c.train.update(num_steps=900, log_every=50, ckpt_every=300)
  c.sample.update(every=300)
  return c
