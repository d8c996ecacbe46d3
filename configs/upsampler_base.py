"""Shared defaults of the temporally aligned upsampler stage (Video LDM Sec. 3.4).

A 4x super-resolution diffusion model on video: the video UNet takes the noisy
high-res clip concatenated with the noise-augmented, upsampled low-res clip, the
augmentation level enters as the UNet's class label, and the objective is
v-prediction. It trains on random patches and samples full frames. By default in
pixel space (the paper's driving upsampler); `space="latent"` puts it in the latent
space of a frozen VAE. Derived configs (upsampler_tiny.py) load this file and
override fields; every field is documented here once. Sizes below are a plausible
real-scale setting (512x1024 driving frames from 128x256), not a reproduced run.

  videoldm-train --config=configs/upsampler_base.py --workdir=WORKDIR \\
      --config.data.kind=video_folder --config.data.data_dir=DATA_DIR
"""

import ml_collections

from videoldm_jax.config_files import load_sibling


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "upsampler"
  c.seed = 0
  # "full": train the whole UNet; "temporal": only the temporal layers phi, theta frozen
  # and taken from `image_upsampler` (required then).
  c.mode = "full"
  # An upsampler folder (what this stage exports) whose spatial UNet is theta, e.g. a
  # run of this stage with temporal_layers=False. When set, the architecture fields
  # below (space, scale, upsample_method, unet, schedules, VAE) are that folder's.
  c.image_upsampler = ""
  # True: the video UNet with temporal layers `temporal`; False: an image upsampler
  # (frames upsampled independently), the theta for a later mode="temporal" run.
  c.temporal_layers = True
  c.temporal = dict(resblocks=True, attention=True, conv_kernel=(3, 1, 1),
                    cross_attention=False, mix_init=0.5)
  # "pixel": model RGB frames in [-1, 1]; "latent": the latents of a frozen VAE (the
  # low-res conditioning is then the VAE latent of the upsampled low-res clip).
  c.space = "pixel"
  # Latent space only: the VAE of this converted image-LDM folder (videoldm-convert),
  # or, when empty, a random VAE with the VAEConfig fields of `random_vae`.
  c.image_model = ""
  c.random_vae = dict(block_out_channels=(128, 256, 512), layers_per_block=2,
                      latent_channels=4, norm_num_groups=32, scaling_factor=0.18215)
  c.scale = 4                     # spatial upsampling factor
  # How the low-res clip is brought back to the high-res grid: bilinear | nearest.
  c.upsample_method = "bilinear"
  # Training: random windows of patch_size x patch_size high-res pixels (one per video,
  # the same for all its frames); a multiple of the scale, the UNet's downsampling and
  # (latent space) the VAE factor. Sampling always runs on full frames.
  c.patch_size = 128
  # Noise augmentation: levels drawn uniformly in [0, max_noise_level) of the
  # augmentation schedule, one per video; `noise_level` is the fixed level used at
  # sampling (the exported model's default; SD's x4 upscaler samples at 20).
  c.max_noise_level = 350
  c.noise_level = 20
  # UNet architecture (UNetConfig fields). in_channels (2C), out_channels (C) and
  # num_class_embeds (one per augmentation level) are derived; no text context, so
  # attention layers attend to their own tokens. Attention only at the lowest level:
  # global attention over high-res full frames would be slow and would see much
  # larger token sets at sampling than on training patches.
  c.unet = dict(block_out_channels=(128, 256, 384, 512), layers_per_block=2,
                attention_levels=(False, False, False, True), num_heads=8,
                transformer_depth=1, use_linear_projection=True, norm_num_groups=32)
  # Diffusion schedule (diffusers scheduler-config fields) with v-prediction, and the
  # augmentation schedule; both 1000 steps, betas = linspace(sqrt(1e-4), sqrt(0.02))^2
  # (the original LDM code's "linear", diffusers' "scaled_linear").
  c.scheduler = dict(num_train_timesteps=1000, beta_schedule="scaled_linear",
                     beta_start=0.0001, beta_end=0.02, prediction_type="v_prediction",
                     steps_offset=1, timestep_spacing="leading", set_alpha_to_one=False,
                     clip_sample=False)
  c.noise_aug_scheduler = dict(num_train_timesteps=1000, beta_schedule="scaled_linear",
                               beta_start=0.0001, beta_end=0.02)
  # e.g. 5.0 for min-SNR weighting; a typed placeholder (None) so that
  # --config.min_snr_gamma=5.0 can set it
  c.min_snr_gamma = ml_collections.config_dict.placeholder(float)
  # Input (videoldm_jax/data/inputs.py): high-res clips; the low-res input is made from
  # them. kind procedural_driving | video_folder | tfds | procedural (no latent_cache).
  # batch_size is global (split over processes); height / width are the full frames.
  c.data = dict(kind="procedural_driving", tfds_config="small", data_dir="",
                batch_size=32, num_frames=8, frame_stride=1, height=512, width=1024,
                crop="random", hflip=False, image_fraction=0.0, worker_count=0,
                cache_dir="", tfds_name="", split="train")
  c.optim = dict(lr=1e-4, warmup_steps=1000, total_steps=200_000, final_lr_fraction=0.0,
                 weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0,
                 ema_decay=0.9999)
  c.train = dict(num_steps=200_000, grad_accum=1, log_every=50, ckpt_every=2000, keep=3,
                 keep_best=0, compute_dtype="bfloat16", remat_policy="none", export=True,
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
  # Samples from the EMA weights (every N steps and at the end; 0 = never): num_clips
  # held-out procedural clips of num_frames full frames, downsampled and upsampled
  # again, shown as [low-res | upsampled | ground truth] in WORKDIR/samples.
  c.sample = dict(every=0, num_clips=2, num_frames=8, steps=50, sampler="ddim")
  c.mesh = dict(data=-1, fsdp=1, tensor=1)   # within a slice (ICI); one size may be -1
  c.dcn_mesh = dict(data=1, fsdp=1, tensor=1)  # across slices (multi-slice TPU / DCN)
  c.batch_axes = ("data", "fsdp")
  c.rules = load_sibling(__file__, "keyframe_base").DEFAULT_RULES
  return c
