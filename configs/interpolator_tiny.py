"""Interpolation-model stage at toy scale: runs in a few minutes on 2 CPU cores.

Same tiny random text-to-image LDM and procedural dash-cam clips (32x32 pixels ->
8x8 latents) as configs/keyframe_tiny.py; 8-frame clips with frames 0 and 4 known.

  videoldm-train --config=configs/interpolator_tiny.py --workdir=work/interpolator_tiny \\
      --config.init_from=work/keyframe_tiny/export/step_200
"""

import ml_collections

from videoldm_jax.config_files import load_sibling


def get_config() -> ml_collections.ConfigDict:
  c = load_sibling(__file__, "interpolator_base").get_config()
  tiny = load_sibling(__file__, "keyframe_tiny").get_config()
  for field in ("random_image_model", "data", "optim", "train"):
    c[field] = tiny[field]
  c.data.update(num_frames=8)
  c.sample.update(every=100, steps=20, num_frames=8)
  return c
