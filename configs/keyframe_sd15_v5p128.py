"""SD 1.5 key-frame stage on a TPU v5p-128 slice (64 chips x 95 GiB HBM, 4x4x4).

With 95 GiB per chip the state needs little sharding: FSDP over 16 chips inside
data-parallel groups of 4 keeps the all-gathers short; two 16-frame clips per chip
(global batch 128) with "dots" remat (matmul outputs kept, the rest recomputed).

  videoldm-compile --config=configs/keyframe_sd15_v5p128.py --topology=v5p:4x4x4

On 2026-12-02 (libtpu 0.0.42, this repository's 2-core CPU machine): FITS, peak 27.69 of
95 GiB per chip (arguments 0.70 GiB, temporaries 26.99 GiB), compiled in 1072 s.
"""

import ml_collections

from videoldm_jax.config_files import load_sibling


def get_config() -> ml_collections.ConfigDict:
  c = load_sibling(__file__, "keyframe_sd15").get_config()
  c.image_model = "sd15"
  c.data.update(batch_size=128)
  c.train.update(remat_policy="dots")
  c.mesh = dict(data=4, fsdp=16, tensor=1)
  return c
