"""The shipped configs load, and the SD 1.5 key-frame config shards as it claims
(shapes only: nothing is allocated or compiled)."""

import math
import re

import jax
import ml_collections
import numpy as np
import pytest

from videoldm_jax import sharding
from videoldm_jax.config_files import load_sibling
from videoldm_jax.convert.presets import PRESETS
from videoldm_jax.models.temporal import TemporalConfig
from videoldm_jax.models.partition import is_temporal
from videoldm_jax.video_ldm import VideoLDM
from flax import traverse_util

CONFIGS = "configs/x.py"


ALL = sorted(p.stem for p in (__import__("pathlib").Path(__file__).parents[1] / "configs"
                              ).glob("*.py"))


def test_every_config_file_is_checked():
  assert len(ALL) >= 8 and "keyframe_sd15_v5e64" in ALL


@pytest.mark.parametrize("name", ALL)
def test_config_loads(name):
  c = load_sibling(CONFIGS, name).get_config()
  assert c is not None


def test_base_configs_hold_the_reference_settings():
  # The method's settings (../shared/notes/video_ldm_reference.md, sgm / taming where the
  # paper is silent); a drifting default would train another model, silently.
  key = load_sibling(CONFIGS, "keyframe_base").get_config()
  assert key.temporal.mix_init == 0.5  # sgm's m = 0.5: alpha = sigmoid(0.5) at init
  assert key.cond_drop_prob == 0.1  # classifier-free guidance's unconditional branch
  pred = load_sibling(CONFIGS, "predictor_base").get_config()
  probs = pred.predictor.num_context_probs  # S = 0, 1 or 2 context frames, all trained
  assert len(probs) == 3 and min(probs) > 0
  # The training-time sample extends a clip to twice data.num_frames, also when the
  # command line changes it (a reference, not the value at load time).
  pred.data.num_frames = 12
  assert pred.sample.num_frames == 24
  assert load_sibling(CONFIGS, "interpolator_base").get_config().interpolator.stride == 4
  image = load_sibling(CONFIGS, "image_tiny").get_config().scheduler  # SD's schedule
  assert (image.num_train_timesteps, image.beta_schedule, image.beta_start,
          image.beta_end) == (1000, "scaled_linear", 0.00085, 0.012)
  decoder = load_sibling(CONFIGS, "decoder_base").get_config()
  assert (decoder.optim.b1, decoder.optim.b2) == (0.5, 0.9)  # taming's GAN Adam
  assert (decoder.disc_optim.b1, decoder.disc_optim.b2) == (0.5, 0.9)
  assert decoder.vae_temporal.mix_init == 0.0  # sgm's merge_factor 0
  # A (3, 1, 1) Conv3d over the decoder's RGB output; temporal ResBlocks and attention in
  # the UNet, pure temporal kernels.
  assert decoder.vae_temporal.out_conv_kernel == (3, 1, 1)
  assert key.temporal.resblocks and key.temporal.attention
  assert tuple(key.temporal.conv_kernel) == (3, 1, 1)
  # Clips without any known frame train the unconditional branch of context guidance.
  assert load_sibling(CONFIGS, "interpolator_base").get_config() \
      .interpolator.context_drop_prob > 0
  # SD's x4 upscaler: the low-res input noised at a level in [0, 350) of its own schedule.
  up = load_sibling(CONFIGS, "upsampler_base").get_config()
  assert up.max_noise_level == 350
  assert (up.noise_aug_scheduler.num_train_timesteps, up.noise_aug_scheduler.beta_start,
          up.noise_aug_scheduler.beta_end) == (1000, 0.0001, 0.02)
  assert up.scheduler.prediction_type == "v_prediction"


@pytest.mark.parametrize("name", ["keyframe_sd15_v5p128", "keyframe_sd15_v5e64",
                                  "keyframe_sd15_8xh100"])
def test_hardware_configs_fill_the_topology_their_docstring_names(name):
  # Only a compile for that topology would show a mesh for another chip count.
  module = load_sibling(CONFIGS, name)
  topology = re.search(r"--topology=\w+:([\dx]+)", module.__doc__).group(1)
  mesh = dict(module.get_config().mesh)
  assert -1 not in mesh.values()
  assert math.prod(mesh.values()) == math.prod(int(n) for n in topology.split("x"))
  if name == "keyframe_sd15_v5e64":  # what its docstring says it needs to fit 16 GiB
    c = module.get_config()
    assert c.train.attention == "blocked" and c.data.kind == "latent_cache"


def test_keyframe_sd15_params_shard_over_fsdp():
  c = load_sibling(CONFIGS, "keyframe_sd15").get_config()
  # As its docstring says: 16 frames of 320 x 512, bf16, FSDP over 16 chips x data.
  assert (c.data.num_frames, c.data.height, c.data.width) == (16, 320, 512)
  assert c.train.compute_dtype == "bfloat16" and dict(c.mesh) == dict(data=-1, fsdp=16,
                                                                      tensor=1)
  sd = PRESETS["sd15"]
  ldm = VideoLDM(sd.unet, sd.vae, sd.text, sd.scheduler,
                 TemporalConfig.from_dict(dict(c.temporal)))
  abstract = ldm.abstract_params()
  unet = traverse_util.flatten_dict(abstract["unet"])
  theta = sum(int(np.prod(v.shape)) for k, v in unet.items() if not is_temporal(k))
  phi = sum(int(np.prod(v.shape)) for k, v in unet.items() if is_temporal(k))
  assert theta == 859_520_964  # SD 1.5's UNet, as diffusers counts it
  assert phi > 0
  # The config's rules on the 8 test devices as an 8-way FSDP mesh: every device holds
  # about 1/8 of the weights (small vectors that do not divide stay replicated).
  mesh = sharding.make_mesh({"fsdp": 8})
  shardings = sharding.shardings_for(ldm.logical_axes(), mesh, abstract,
                                     [tuple(r) for r in c.rules])
  total = per_device = 0
  for leaf, sh in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(shardings)):
    n = int(np.prod(leaf.shape)) * 4
    total += n
    per_device += int(np.prod(sh.shard_shape(leaf.shape))) * 4
  assert per_device <= 1.05 * total / 8, (per_device, total)


def _none_fields(cd, prefix=""):
  for k in cd.keys():
    v = cd._fields[k]
    if isinstance(v, ml_collections.ConfigDict):
      yield from _none_fields(v, f"{prefix}{k}.")
    elif v is None:
      yield prefix + k


@pytest.mark.parametrize("name", ALL)
def test_every_field_can_be_overridden_on_the_command_line(name):
  # ml_collections refuses `--config.x=...` for a field holding a plain None ("Type
  # NoneType ... is not supported for overriding"): optional fields must be typed
  # placeholders (config_dict.placeholder(float)).
  c = load_sibling(CONFIGS, name).get_config()
  assert list(_none_fields(c)) == []


def test_min_snr_gamma_from_the_command_line():
  import subprocess
  import sys
  script = ("import sys; from absl import flags; from ml_collections import config_flags; "
            "c = config_flags.DEFINE_config_file('config'); flags.FLAGS(sys.argv); "
            "print(c.value.get('min_snr_gamma'))")
  root = __import__("pathlib").Path(__file__).parents[1]
  for extra, expected in ((["--config.min_snr_gamma=5.0"], "5.0"), ([], "None")):
    out = subprocess.run([sys.executable, "-c", script, "--config=configs/keyframe_tiny.py",
                          *extra], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == expected, out.stderr[-2000:]


@pytest.mark.parametrize("name", ["keyframe_base", "decoder_base"])
def test_base_configs_without_an_image_model_say_which_field(name, tmp_path):
  # Their random_image_model is empty (they fine-tune a real model): this was
  # AttributeError "'unet'".
  from videoldm_jax.stages import keyframe
  config = load_sibling(CONFIGS, name).get_config()
  assert not config.image_model
  with pytest.raises(ValueError, match="set --config.image_model"):
    keyframe.load_image_model(config, tmp_path)
  # The pod configs' preset name (videoldm-compile's) trains from no folder: named.
  config.image_model = "sd15"
  with pytest.raises(FileNotFoundError, match="config.image_model='sd15': no such folder; "
                     "training starts from a converted model folder"):
    keyframe.load_image_model(config, tmp_path)


@pytest.mark.parametrize("name", ["keyframe_tiny", "predictor_tiny", "upsampler_tiny"])
def test_a_wrong_temporal_field_is_named_by_its_config_path(name, tmp_path):
  # --config.temporal.conv_kernel=3 (which ml_collections parses as (3,)) was "config:
  # TemporalConfig.conv_kernel=[3]" in the key-frame stage, a class where the user wrote
  # a flag; (3, 2, 1) was refused after the image model had been built.
  import importlib
  for value, message in (
      ((3,), r"^config\.temporal\.conv_kernel=\(3,\): expected tuple\[int, int, int\]$"),
      ((3, 2, 1),
       r"^config\.temporal\.conv_kernel must be three odd sizes, got \(3, 2, 1\)$")):
    config = load_sibling(CONFIGS, name).get_config()
    config.temporal.conv_kernel = value
    stage = importlib.import_module(f"videoldm_jax.stages.{config.stage}")
    with pytest.raises(ValueError, match=message):
      stage.setup(config, tmp_path)


SECTION_ERRORS = [
    # (config, field path, wrong value, expected error: the path a --config flag names)
    ("keyframe_tiny", "random_image_model.unet.block_out_channels", (32.5,),
     r"config\.random_image_model\.unet\.block_out_channels=\(32\.5,\): expected "
     r"tuple\[int, \.\.\.\]"),
    ("keyframe_tiny", "random_image_model.vae.scaling_factor", "0.18",
     r"config\.random_image_model\.vae\.scaling_factor='0\.18': expected float"),
    ("keyframe_tiny", "random_image_model.text_encoder.hidden_size", 16.5,
     r"config\.random_image_model\.text_encoder\.hidden_size=16\.5: expected int"),
    ("image_tiny", "unet.layers_per_block", 1.5,  # videoldm-init-random's config
     r"config\.unet\.layers_per_block=1\.5: expected int"),
    ("decoder_tiny", "vae_temporal.conv_kernel", (3,),
     r"config\.vae_temporal\.conv_kernel=\(3,\): expected tuple\[int, int, int\]"),
    ("decoder_tiny", "vae_temporal.out_conv_kernel", (3, 2, 1),
     r"config\.vae_temporal\.out_conv_kernel must be three odd sizes, got \(3, 2, 1\)"),
    ("decoder_tiny", "discriminator.num_layers", 2.5,
     r"config\.discriminator\.num_layers=2\.5: expected int"),
    ("autoencoder_tiny", "discriminator.num_layers", 0,
     r"config\.discriminator\.num_layers=0: expected >= 1"),
    ("autoencoder_tiny", "discriminator.base_channels", "8",
     r"config\.discriminator\.base_channels='8': expected int"),
    ("upsampler_tiny", "unet.layers_per_block", 1.5,
     r"config\.unet\.layers_per_block=1\.5: expected int"),
    ("upsampler_tiny", "random_vae.block_out_channels", (32, "64"),
     r"config\.random_vae\.block_out_channels=\(32, '64'\): expected tuple\[int, \.\.\.\]"),
]


# Each case built and under videoldm-compile's abstract setup, but for image_tiny's:
# videoldm-init-random has no abstract setup (it would run the same code twice).
SECTION_CASES = [(*case, abstract) for case in SECTION_ERRORS for abstract in (False, True)
                 if not (abstract and case[0] == "image_tiny")]


@pytest.mark.parametrize("name, field, value, message, abstract", SECTION_CASES,
                         ids=[f"{c[0]}:{c[1]}-{'abstract' if c[4] else 'built'}"
                              for c in SECTION_CASES])
def test_a_wrong_model_section_field_is_named_by_its_config_path(name, field, value,
                                                                 message, abstract,
                                                                 tmp_path):
  # These sections were "config.unet: UNetConfig.x=..." (for the key-frame stage's
  # config.random_image_model.unet) or "config.discriminator: DiscriminatorConfig.x=...";
  # now the path a --config override writes, before any model is built (also under
  # videoldm-compile's abstract setup).
  import importlib
  from videoldm_jax import pretrained
  from videoldm_jax.stages import base
  config = load_sibling(CONFIGS, name).get_config()
  if name == "upsampler_tiny":
    config.space = "latent"  # (config.random_vae is the latent space's VAE)
  *parents, key = field.split(".")
  section = config
  for p in parents:
    section = section[p]
  with section.ignore_type():
    section[key] = value
  if name == "image_tiny":
    build = lambda: pretrained.random_image_ldm(config)
  else:
    build = lambda: importlib.import_module(f"videoldm_jax.stages.{config.stage}").setup(
        config, tmp_path)
  with pytest.raises(ValueError, match=f"^{message}$"):
    if abstract:
      with base.abstract_setup():
        build()
    else:
      build()
