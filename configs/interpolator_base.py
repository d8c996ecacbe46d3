"""Shared defaults of the interpolation-model stage (Video LDM Sec. 3.3): T -> 4T.

The key-frame stage's fields (configs/keyframe_base.py) plus the fields below. Clips
have data.num_frames = 4T frames, of which 0, stride, 2 stride, ... are given and the
rest generated; applied twice it gives 4T -> 16T (pipelines/context_sampling.py
`interpolate`, `interpolate_twice`). Only phi trains; theta, VAE, text encoder frozen.
The paper samples its key frames at a low frame rate and trains the interpolator on
clips at 4x that rate: set data.frame_stride accordingly.

  videoldm-train --config=configs/interpolator_base.py \\
      --config.init_from=WORKDIR_OF_KEYFRAME/export/step_N --workdir=work/interpolator
"""

import ml_collections

from videoldm_jax.config_files import load_sibling


def get_config() -> ml_collections.ConfigDict:
  c = load_sibling(__file__, "keyframe_base").get_config()
  c.stage = "interpolator"
  # A key-frame export folder to start from ("" = image model + new phi); see
  # configs/predictor_base.py.
  c.init_from = ""
  c.context_channels = ()         # context encoder widths per level; () = the UNet's
  # (or those of an init_from export that has a context encoder already)
  # stride: known frames every `stride` frames (4: T -> 4T). context_drop_prob: clips
  # without any known frame, the unconditional branch of context guidance.
  c.interpolator = dict(stride=4, context_drop_prob=0.1)
  c.data.update(num_frames=16)    # 4T with T = 4 key frames
  c.sample.update(num_frames=16, context_scale=1.0)
  return c
