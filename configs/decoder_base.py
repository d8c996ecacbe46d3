"""Shared defaults of the autoencoder stages: `decoder` (Video LDM Sec. 3.1, the video
decoder fine-tuned against a 3-D-conv patch discriminator) and `autoencoder` (the image
KL autoencoder with a 2-D patch discriminator). Every field is documented here once;
configs/decoder_tiny.py and configs/autoencoder_tiny.py override some.

  videoldm-train --config=configs/decoder_base.py --config.image_model=/ckpt/sd15 \\
      --workdir=/mnt/shared/runs/decoder
"""

import ml_collections

from videoldm_jax.config_files import load_sibling


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "decoder"
  c.seed = 0
  # The image model whose autoencoder is trained (a converted folder, or the export of
  # the autoencoder stage); "" = a random one from random_image_model (as
  # configs/image_tiny.py). The export is this model with the trained autoencoder.
  c.image_model = ""
  c.random_image_model = ml_collections.ConfigDict()
  # decoder stage: the video decoder's temporal layers (models/vae.py VAETemporalConfig).
  # mix_init is the logit of alpha = sigmoid(m), the weight of the TEMPORAL branch
  # (sgm's decoder convention; 0 -> alpha 0.5).
  c.vae_temporal = dict(conv_kernel=(3, 1, 1), out_conv_kernel=(3, 1, 1), mix_init=0.0)
  # decoder stage: False = only the temporal layers (and the discriminator) train, as
  # the paper; True = the spatial decoder and post_quant_conv train too. The encoder is
  # always frozen, so latents of the latent models stay valid.
  c.train_spatial_decoder = False
  # Patch discriminator (models/discriminator.py): 2-D for the autoencoder stage, 3-D
  # (Conv3d k4 s2) for the decoder stage. Defaults: taming's NLayerDiscriminator.
  c.discriminator = dict(in_channels=3, base_channels=64, num_layers=3, max_mult=8,
                         norm_num_groups=32)
  # Loss (stages/autoencoder.py): L1 + perceptual_weight * LPIPS (VGG16 weights from the
  # safetensors file perceptual_weights_path; see models/perceptual.py, nothing is
  # downloaded) + kl_weight * KL (autoencoder stage only) + adaptive-weighted hinge GAN.
  # disc_start: step from which the adversarial terms count (before it they are
  # multiplied by 0 and the discriminator gets no gradient and no update, weight decay
  # included: it starts from its initialisation); disc_weight: factor on the adaptive
  # weight; disc_factor: factor on both adversarial terms once on.
  c.loss = dict(kl_weight=1e-6, perceptual_weight=0.0, perceptual_weights_path="",
                disc_start=5_000, disc_weight=0.5, disc_factor=1.0)
  # Input (videoldm_jax/data/inputs.py): any pixel source (not latent_cache).
  # batch_size is global, in clips; the autoencoder stage sees B * num_frames images.
  c.data = dict(kind="procedural_driving", tfds_config="small", data_dir="",
                batch_size=8, num_frames=8, frame_stride=1, height=256, width=256,
                crop="random", hflip=False, image_fraction=0.0, worker_count=0,
                cache_dir="", tfds_name="", split="train")
  # Generator (autoencoder) and discriminator optimisers, each clipped and stepped on
  # its own (train/optim.py make_grouped_optimizer). Adam betas (0.5, 0.9) as taming.
  c.optim = dict(lr=1e-4, warmup_steps=500, total_steps=50_000, final_lr_fraction=0.0,
                 weight_decay=0.0, b1=0.5, b2=0.9, eps=1e-8, grad_clip=1.0,
                 ema_decay=0.999)
  c.disc_optim = dict(lr=1e-4, warmup_steps=0, total_steps=50_000, final_lr_fraction=1.0,
                      weight_decay=0.0, b1=0.5, b2=0.9, eps=1e-8, grad_clip=1.0)
  c.train = dict(num_steps=50_000, grad_accum=1, log_every=50, ckpt_every=1000, keep=3,
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
  # Reconstructions (top: fixed procedural clips, bottom: decoded) every N steps and at
  # the end (0 = never), written to WORKDIR/samples and TensorBoard.
  c.sample = dict(every=0, num_clips=2)
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.dcn_mesh = dict(data=1, fsdp=1, tensor=1)
  c.batch_axes = ("data", "fsdp")
  c.rules = load_sibling(__file__, "keyframe_base").DEFAULT_RULES
  return c
