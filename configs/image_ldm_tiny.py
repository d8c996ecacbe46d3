"""Image LDM stage at toy scale: the whole tiny image UNet learns procedural_driving
frames (the paper trains its driving model's image LDM first, then adds temporal
layers). Its export is an image model for configs/keyframe_tiny.py:

  videoldm-train --config=configs/image_ldm_tiny.py --workdir=work/image_ldm_tiny
  videoldm-train --config=configs/keyframe_tiny.py \\
      --config.image_model=work/image_ldm_tiny/export/step_300 --workdir=work/keyframe_tiny
"""

import ml_collections

from videoldm_jax.config_files import load_sibling


def get_config() -> ml_collections.ConfigDict:
  c = load_sibling(__file__, "keyframe_tiny").get_config()
  c.stage = "image_ldm"
  c.mode = "full"
  # Every frame of the 4 clips is an image: 32 images of 32x32 per step.
  c.optim.update(lr=1e-3, warmup_steps=30, total_steps=300, ema_decay=0.99)
  c.train.update(num_steps=300, log_every=25, ckpt_every=100)
  c.sample.update(every=150)
  return c
