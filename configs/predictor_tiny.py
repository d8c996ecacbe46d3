"""Prediction-model stage at toy scale: runs in a few minutes on 2 CPU cores.

Same tiny random text-to-image LDM and procedural dash-cam clips (8 frames, 32x32
pixels -> 8x8 latents) as configs/keyframe_tiny.py. Best started from its export:

  videoldm-train --config=configs/keyframe_tiny.py --workdir=work/keyframe_tiny
  videoldm-train --config=configs/predictor_tiny.py --workdir=work/predictor_tiny \\
      --config.init_from=work/keyframe_tiny/export/step_200
"""

import ml_collections

from videoldm_jax.config_files import load_sibling


def get_config() -> ml_collections.ConfigDict:
  c = load_sibling(__file__, "predictor_base").get_config()
  tiny = load_sibling(__file__, "keyframe_tiny").get_config()
  for field in ("random_image_model", "data", "optim", "train"):
    c[field] = tiny[field]
  c.sample.update(every=100, steps=20, num_frames=16)
  return c
