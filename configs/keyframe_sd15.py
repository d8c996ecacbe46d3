"""Key-frame stage on Stable Diffusion 1.5 (paper Sec. 4.2, text-to-video), TPU pod.

theta: SD 1.5 converted with videoldm-convert; phi: temporal ResBlocks (3,1,1) and
temporal attention after every spatial layer. 16 frames of 320x512 (40x64 latents),
bf16 compute with f32 master weights, per-block remat, FSDP over 16 chips x data.

  videoldm-convert --single_file=v1-5-pruned-emaonly.safetensors --preset=sd15 \\
      --tokenizer=TOKENIZER_DIR --output=/ckpt/sd15
  videoldm-train --config=configs/keyframe_sd15.py \\
      --config.image_model=/ckpt/sd15 --workdir=/mnt/shared/runs/keyframe_sd15
"""

import ml_collections

from videoldm_jax.config_files import load_sibling


def get_config() -> ml_collections.ConfigDict:
  c = load_sibling(__file__, "keyframe_base").get_config()
  c.image_model = "/ckpt/sd15"
  # Real training reads video_folder / WebVid or a latent cache; see configs/keyframe_base.py.
  c.data.update(batch_size=64, num_frames=16, height=320, width=512, worker_count=8)
  c.optim.update(lr=1e-4, warmup_steps=1000, total_steps=200_000)
  c.train.update(num_steps=200_000, compute_dtype="bfloat16", remat_policy="dots",
                 ckpt_every=2000, keep=3, keep_best=2)
  c.mesh = dict(data=-1, fsdp=16, tensor=1)
  return c
