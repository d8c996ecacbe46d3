"""SD 1.5 key-frame stage on one node of 8 x H100 80GB (launch/gpu_slurm.sbatch).

FSDP over the 8 GPUs, one 16-frame clip per GPU (global batch 8), bf16 compute, "dots"
remat. XLA cannot compile for GPUs without one; the CPU proxy compiles the same sharded
step for 8 CPU devices, traced as for GPUs, against an H100's 80 GB:

  videoldm-compile --config=configs/keyframe_sd15_8xh100.py --topology=h100:8 --cpu_devices=8

On 2026-12-02: FITS, peak 70.85 of 79.6 GiB per device (arguments 1.36 GiB, XLA CPU's
temporaries 69.49 GiB, an overestimate: the same step on a v5p chip needed 15.55 GiB).
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
