"""SD 1.5 key-frame stage on one node of 8 x H100 80GB (launch/gpu_slurm.sbatch).

FSDP over the 8 GPUs, one 16-frame clip per GPU (global batch 8), bf16 compute, "dots"
remat. XLA cannot compile for GPUs without one; `videoldm-compile --topology=cpu:8
--cpu_devices=8` gives the per-device state and activation bytes of the same sharding.
"""

import ml_collections

from videoldm_jax.config_files import load_sibling


def get_config() -> ml_collections.ConfigDict:
  c = load_sibling(__file__, "keyframe_sd15").get_config()
  c.image_model = "sd15"
  c.data.update(batch_size=8, worker_count=4)
  c.train.update(remat_policy="dots")
  c.mesh = dict(data=1, fsdp=8, tensor=1)
  return c
