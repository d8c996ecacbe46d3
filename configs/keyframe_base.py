"""Shared defaults of the key-frame stage (Video LDM Sec. 3.1, eq. 2).

Derived configs (keyframe_tiny.py, keyframe_sd15.py) load this file and override
fields. Every field is documented here once.
"""

import ml_collections

# Logical axis -> mesh axis rules (see videoldm_jax/models/layers.py for the names).
# Weights are split over "fsdp" along output channels / model width and over "tensor"
# along heads and MLP width. Batches are split over config.batch_axes below.
DEFAULT_RULES = (
    ("conv_kt", None), ("conv_kh", None), ("conv_kw", None), ("conv_in", None),
    ("conv_out", "fsdp"),
    ("embed", "fsdp"),
    ("mlp", "tensor"), ("heads", "tensor"), ("vocab", "tensor"),
    ("norm", None), ("scalar", None),
)


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "keyframe"
  c.seed = 0
  # "temporal": train phi only (the paper); "full": the whole UNet.
  c.mode = "temporal"
  # A converted image LDM folder (videoldm-convert); "" = random_image_model below.
  c.image_model = ""
  c.random_image_model = ml_collections.ConfigDict()
  c.temporal = dict(resblocks=True, attention=True, conv_kernel=(3, 1, 1),
                    cross_attention=False, mix_init=0.5)
  # With probability cond_drop_prob a clip's caption -> the empty prompt and its class
  # label -> null_class_label (both at once): the unconditional branch of
  # classifier-free guidance. null_class_label: a class-conditional UNet's row for "no
  # class" (e.g. K for K data classes and unet.num_class_embeds = K + 1); unset, the
  # image model's own (recorded by the stage that trained it), else labels are kept.
  c.cond_drop_prob = 0.1
  c.null_class_label = ml_collections.config_dict.placeholder(int)
  # e.g. 5.0 for min-SNR weighting; a typed placeholder (None) so that
  # --config.min_snr_gamma=5.0 can set it
  c.min_snr_gamma = ml_collections.config_dict.placeholder(float)
  # Input (videoldm_jax/data/inputs.py): kind procedural_driving | video_folder | tfds |
  # latent_cache | procedural. batch_size is global (split over processes). kind tfds
  # reads the TFDS dataset tfds_name (e.g. webvid_local, ucf101_local/split_1), split
  # `split`, from data_dir (default WORKDIR/tfds). label_field: the integer field fed
  # as class labels to a class-conditional UNet (unet.num_class_embeds), e.g. UCF-101's.
  c.data = dict(kind="procedural_driving", tfds_config="small", data_dir="",
                batch_size=8, num_frames=8, frame_stride=1, height=256, width=256,
                crop="random", hflip=False, image_fraction=0.0, worker_count=0,
                cache_dir="", tfds_name="", split="train", label_field="label")
  c.optim = dict(lr=1e-4, warmup_steps=500, total_steps=100_000, final_lr_fraction=0.0,
                 weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0,
                 ema_decay=0.9999)
  c.train = dict(num_steps=100_000, grad_accum=1, log_every=50, ckpt_every=1000, keep=3,
                 keep_best=0, compute_dtype="float32", remat_policy="none", export=True,
                 # models/attention.py IMPLEMENTATIONS: auto | plain | blocked | native | splash
                 attention="auto",
                 # False: checkpoints leave out the frozen parameters (a resume loads
                 # them again and checks their digests; train/frozen.py).
                 save_frozen=False,
                 # A jax.profiler trace of steps profile_start + 1 .. + profile_steps
                 # in WORKDIR/profile (0 steps: none).
                 profile_start=10, profile_steps=0,
                 # Steps queued on the device while the host makes the next batch (more
                 # smooths a bursty input pipeline; each holds its batch in device memory).
                 max_steps_in_flight=2)
  # Videos sampled from the EMA weights during training (every N steps and at the end;
  # 0 = never), written to WORKDIR/samples and TensorBoard.
  c.sample = dict(every=0, prompts=("a dash-cam view of a road by day",
                                    "a dash-cam view of a road at night"),
                  num_frames=8, steps=25, guidance_scale=5.0,
                  # Class-conditional models: a label per prompt; empty = sample i
                  # gets class i mod num_class_embeds.
                  class_labels=())
  c.mesh = dict(data=-1, fsdp=1, tensor=1)   # within a slice (ICI); one size may be -1
  c.dcn_mesh = dict(data=1, fsdp=1, tensor=1)  # across slices (multi-slice TPU / DCN)
  c.batch_axes = ("data", "fsdp")  # the mesh axes the global batch is split over
  c.rules = DEFAULT_RULES
  return c
