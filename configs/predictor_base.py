"""Shared defaults of the prediction-model stage (Video LDM Sec. 3.3, eq. 3).

The key-frame stage's fields (configs/keyframe_base.py: data, optim, train, mesh,
rules, ...) plus the fields below. The prediction model is the key-frame video UNet
with a context encoder: it learns to continue a clip given its first S = 0, 1 or 2
frames, and extends videos autoregressively (pipelines/context_sampling.py `extend`).
Only phi trains (temporal layers + context encoder); theta, VAE, text encoder frozen.

  videoldm-train --config=configs/predictor_base.py \\
      --config.init_from=WORKDIR_OF_KEYFRAME/export/step_N --workdir=work/predictor
"""

import ml_collections

from videoldm_jax.config_files import load_sibling


def get_config() -> ml_collections.ConfigDict:
  c = load_sibling(__file__, "keyframe_base").get_config()
  c.stage = "predictor"
  # A key-frame export folder (WORKDIR/export/step_N of the key-frame stage): its theta,
  # phi, VAE, text encoder and temporal config are reused and only the context encoder
  # is new. "" = start from config.image_model / config.random_image_model with a new
  # phi (config.temporal).
  c.init_from = ""
  # Widths of the context encoder per UNet level; () = the UNet's block_out_channels, or
  # those of an init_from export that has a context encoder already.
  c.context_channels = ()
  # P(S = 0), P(S = 1), P(S = 2) per clip; S = 0 is context guidance's unconditional branch.
  c.predictor = dict(num_context_probs=(1 / 3, 1 / 3, 1 / 3))
  # Training-time samples: an unconditional clip of data.num_frames extended to
  # sample.num_frames from its last num_context frames; context_scale is s of
  # f(z) + s (f(z, c_S) - f(z)). num_context is checked at setup: at most the largest S
  # of nonzero weight above, and below data.num_frames. (A reference: twice the
  # data.num_frames the command line gives, until sample.num_frames is set itself.)
  c.sample.update(num_frames=c.data.get_ref("num_frames") * 2, num_context=2,
                  context_scale=1.0)
  return c
