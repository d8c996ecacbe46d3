"""The prediction and interpolation stages: set-up (from a key-frame export or from
scratch), the generic train step on them (phi learns, theta stays bitwise), and the
trainer loop with a checkpoint and a resume."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from videoldm_jax import pretrained, sharding, video_io
from videoldm_jax.config_files import load_sibling
from videoldm_jax.models import partition
from videoldm_jax.models.temporal import TemporalConfig
from videoldm_jax.models.tokenizer import write_byte_level_tokenizer
from videoldm_jax.stages import interpolator, predictor
from videoldm_jax.train.state import merge
from videoldm_jax.train import step as step_lib
from videoldm_jax.video_ldm import VideoLDM

ROOT = Path(__file__).parents[1]
TINY = dict(
    seed=0,
    # One level (the mid block still has attention): small programs compile fast.
    unet=dict(block_out_channels=(16,), layers_per_block=1, attention_levels=(False,),
              num_heads=2, cross_attention_dim=16, norm_num_groups=8),
    vae=dict(block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=8),
    text_encoder=dict(vocab_size=514, hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16),
    scheduler=dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                   prediction_type="epsilon"))


@pytest.fixture(scope="module")
def keyframe_export(tmp_path_factory):
  """A key-frame export folder (what the key-frame stage writes): a random tiny image
  LDM with a random phi and a byte-level tokenizer."""
  root = tmp_path_factory.mktemp("keyframe")
  image = pretrained.random_image_ldm(ml_collections.ConfigDict(TINY))
  ldm = VideoLDM.from_pretrained(image, TemporalConfig())
  phi = ldm.init_unet_params(7, where=partition.is_temporal)
  params = {**image.params, "unet": merge(image.params["unet"], phi)}
  write_byte_level_tokenizer(str(root / "tok"))
  model = pretrained.PretrainedLDM(image.unet_config, image.vae_config, image.text_config,
                                   image.scheduler, params, temporal_config=TemporalConfig())
  return pretrained.save(root / "export", model, root / "tok")


def _config(name: str, **data) -> ml_collections.ConfigDict:
  c = load_sibling(str(ROOT / "configs" / "x.py"), name).get_config()
  c.random_image_model = ml_collections.ConfigDict(TINY)
  c.data.update(kind="procedural", batch_size=2, height=8, width=8, **data)
  c.optim.update(lr=3e-3, warmup_steps=1, total_steps=100)
  return c


def _train_repeatedly(setup, params: dict, batch: dict, steps: int):
  """Runs `steps` train steps on one batch, each with the step-0 key (the same tau,
  noise and mask: a fixed objective that must decrease). Returns (losses, state0, state)."""
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  param_sh = sharding.shardings_for(setup.logical_axes, mesh, setup.abstract_params)
  shardings = step_lib.state_shardings(param_sh, setup.stage, setup.optimizer,
                                       setup.abstract_params, mesh)
  state = step_lib.init_state(params, setup.stage, setup.optimizer, shardings)
  state0 = jax.tree_util.tree_map(np.asarray, state)
  fn = step_lib.build_train_step(setup.stage, setup.optimizer, seed=0, shardings=shardings,
                                 batch_sharding=shardings.step)
  losses = []
  for _ in range(steps):
    state = state.replace(step=jnp.zeros_like(state.step))
    state, metrics = fn(state, batch)
    losses.append(float(metrics["loss"]))
  return losses, state0, state


def _check_theta_frozen_and_phi_trained(state0, state):
  for a, b in zip(jax.tree_util.tree_leaves(state.frozen),
                  jax.tree_util.tree_leaves(state0.frozen)):
    np.testing.assert_array_equal(np.asarray(a), b)
  trained = traverse_util.flatten_dict(state.trainable)
  assert all(p[0] == "unet" and partition.is_temporal(p) for p in trained)
  assert any(p[1] == "temporal_context_encoder" for p in trained)
  before = traverse_util.flatten_dict(state0.trainable)
  # The zero-initialised projections learn (the encoder follows once they are non-zero).
  projections = [k for k in trained if k[-2] == "context_proj"]
  assert projections and all(not np.array_equal(np.asarray(trained[k]), before[k])
                             for k in projections)


def _batch(frames: int, seed: int = 0) -> dict:
  """Cached-style batch: scaled latents (2, frames, 4, 4, 4) and text embeddings."""
  rng = np.random.default_rng(seed)
  return {"latents": rng.standard_normal((2, frames, 4, 4, 4), np.float32),
          "context": rng.standard_normal((2, 16, 16), np.float32)}


def test_predictor_from_a_keyframe_export_trains_phi_only(keyframe_export, tmp_path, caplog):
  config = _config("predictor_tiny", num_frames=4)
  config.init_from = str(keyframe_export)
  config.temporal.conv_kernel = (3, 3, 3)  # ignored: the export's temporal config wins
  config.image_model = str(tmp_path / "sd15")  # ignored too, and said so
  with caplog.at_level("WARNING"):
    setup = predictor.setup(config, tmp_path)
  assert f"config.image_model={tmp_path / 'sd15'} is ignored" in caplog.text
  ldm = setup.extra["ldm"]
  assert ldm.temporal_config == TemporalConfig(context_frames=True)
  # theta and phi come from the export; only the context parameters are new, and the
  # projections start at zero (the model starts as the key-frame model).
  exported = traverse_util.flatten_dict(pretrained.load(keyframe_export).params["unet"])
  full = setup.init_params()  # (callable once: it hands over its host copy)
  params = traverse_util.flatten_dict(full["unet"])
  new = params.keys() - exported.keys()
  assert new and all(any("context" in p for p in k) for k in new)
  for k, v in exported.items():
    np.testing.assert_array_equal(params[k], v)
  projections = [k for k in new if k[-2] == "context_proj"]
  assert projections and all(not params[k].any() for k in projections)

  losses, state0, state = _train_repeatedly(setup, full, _batch(4), 6)
  assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
  _check_theta_frozen_and_phi_trained(state0, state)


def test_interpolator_from_scratch_trains_phi_only(tmp_path):
  config = _config("interpolator_tiny", num_frames=8)
  config.interpolator.context_drop_prob = 0.0
  setup = interpolator.setup(config, tmp_path)
  assert setup.extra["ldm"].temporal_config.context_frames
  assert setup.stage.name == "interpolator"
  losses, state0, state = _train_repeatedly(setup, setup.init_params(), _batch(8), 6)
  assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
  _check_theta_frozen_and_phi_trained(state0, state)


def _train_cli(workdir: Path, keyframe_export: Path, steps: int) -> str:
  # (The resumed run loads its programs from the session's compilation cache, conftest.)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-m", "videoldm_jax.cli.train", "--config=configs/predictor_tiny.py",
       f"--config.init_from={keyframe_export}", f"--workdir={workdir}",
       f"--config.train.num_steps={steps}", "--config.train.ckpt_every=2",
       "--config.train.log_every=1", "--config.sample.every=0", "--config.data.kind=procedural",
       "--config.data.num_frames=4", "--config.data.height=8", "--config.data.width=8",
       "--config.data.batch_size=2"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stderr


def test_trainer_runs_checkpoints_resumes_and_exports_a_context_model(keyframe_export,
                                                                       tmp_path):
  out = _train_cli(tmp_path, keyframe_export, 4)
  assert "predictor: compiled" in out and "step 4: loss" in out and "known_frames" in out
  assert (tmp_path / "checkpoints" / "2").is_dir() and (tmp_path / "checkpoints" / "4").is_dir()
  out = _train_cli(tmp_path, keyframe_export, 6)
  assert "resumed from" in out and "step 5: loss" in out and "step 6: loss" in out
  model = pretrained.load(tmp_path / "export" / "step_6")
  assert model.temporal_config == TemporalConfig(context_frames=True)
  # The export's theta is the key-frame model's, unchanged by training.
  theta, _ = partition.split(model.params["unet"])
  ref, _ = partition.split(pretrained.load(keyframe_export).params["unet"])
  for a, b in zip(jax.tree_util.tree_leaves(theta), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_array_equal(a, b)


def test_training_samples_of_class_conditional_models(tmp_path):
  # The trainer's samplers gave class-conditional UNets no labels: a UCF-101 run died
  # at its first sample step. Labels come from config.sample.class_labels, else sample
  # i gets class i mod num_class_embeds.
  from videoldm_jax.stages import keyframe
  tiny = {**TINY, "unet": {**TINY["unet"], "num_class_embeds": 3}}
  # sample.num_frames, not the training clips' (the interpolator ignored it). The
  # interpolator samples 4 frames of the predictor's 4-frame clips (one key frame): its
  # UNet calls are the predictor's compiled programs (6 frames from 8 compiled two more);
  # the key-frame model's 4 frames draw the same noise shape as both.
  for name, module, frames, sample_frames in (
      ("keyframe_tiny", keyframe, 6, 4), ("predictor_tiny", predictor, 4, 6),
      ("interpolator_tiny", interpolator, 8, 4)):
    config = _config(name, num_frames=frames)
    config.random_image_model = ml_collections.ConfigDict(tiny)
    config.sample.update(steps=1, num_frames=sample_frames, prompts=("a", "b"))
    setup = module.setup(config, tmp_path / name)
    assert keyframe.sample_labels(setup.extra["ldm"].unet_config, config) == [0, 1]
    videos = setup.sample(setup.init_params(), 0)
    assert videos.shape == (2, sample_frames, 8, 8, 3) and videos.dtype == np.uint8, \
        (name, videos.shape)
  # Cyclic over the classes, skipping a null class (the unconditional branch).
  unet_config = setup.extra["ldm"].unet_config
  config.sample.prompts = ("a",) * 5
  assert keyframe.sample_labels(unet_config, config) == [0, 1, 2, 0, 1]
  assert keyframe.sample_labels(unet_config, config, null_label=0) == [1, 2, 1, 2, 1]
  config.sample.prompts = ("a", "b")
  config.sample.class_labels = (2, 3)
  with pytest.raises(ValueError, match=r"class_labels=\(2, 3\): expected one label in "
                     r"\[0, 3\) per prompt"):
    keyframe.sample_labels(unet_config, config)


@pytest.mark.parametrize("labels, error", [
    ((2, 0), r"class_labels=\(2, 0\): 2 is the model's null class \(null_class_label"),
    ((0, 5), r"class_labels=\(0, 5\): expected one label in \[0, 3\) per prompt")],
    ids=["null_class", "out_of_range"])
def test_sample_class_labels_are_refused_at_setup(labels, error, tmp_path):
  # config.sample.class_labels holding the null class gave unconditional samples, logged
  # as that class's (guidance: both branches took it); any bad label surfaced only at the
  # first sample step, after sample.every steps of training.
  from videoldm_jax.stages import keyframe
  config = _config("keyframe_tiny", num_frames=4)
  config.random_image_model = ml_collections.ConfigDict(
      {**TINY, "unet": {**TINY["unet"], "num_class_embeds": 3}})
  config.update(null_class_label=2, cond_drop_prob=0.1)
  config.sample.update(every=10, prompts=("a", "b"), class_labels=labels)
  with pytest.raises(ValueError, match=error):
    keyframe.setup(config, tmp_path)
  config.sample.class_labels = (1, 0)
  assert keyframe.setup(config, tmp_path).extra["ldm"].null_class_label == 2


def test_image_examples_in_video_stages_take_each_frames_caption(tmp_path):
  # An image example's frames come from different clips; the key-frame stage (whose
  # text_context and batch_maker the context stages share) conditioned all of them on
  # frame 0's caption.
  from videoldm_jax.stages import keyframe
  host = {"video": np.random.default_rng(0).integers(0, 256, (2, 3, 8, 8, 3), np.uint8),
          "caption": np.array(["a cat", "a dog"]),
          "frame_caption": np.array([["a cat"] * 3, ["a dog", "a car", "rain"]]),
          "image_only": np.array([[False] * 3, [True] * 3])}
  plain = keyframe.setup(_config("keyframe_tiny", num_frames=3), tmp_path / "plain")
  assert "frame_tokens" not in plain.make_batch(host)
  setup = keyframe.setup(_config("keyframe_tiny", num_frames=3, image_fraction=0.5),
                         tmp_path / "mixed")
  batch = setup.make_batch(host)
  assert batch["frame_tokens"].shape == (2, 3) + batch["tokens"].shape[1:]
  # (Without the flags the still images went through the temporal layers, alpha < 1.)
  np.testing.assert_array_equal(batch["image_only"], host["image_only"])
  ldm, tokenizer = setup.extra["ldm"], setup.extra["tokenizer"]
  length = batch["tokens"].shape[1]
  uncond = tokenizer([""], max_length=length)[0]
  params, text = setup.init_params(), ldm.text_encoder()
  # Jitted, the drop rate an argument, and six captions a call: op by op, each shape
  # compiled the text encoder's ops one by one (~3 s).
  encode_fn = jax.jit(lambda p, tokens: text.apply({"params": p}, tokens))
  encode = lambda captions: np.asarray(encode_fn(params["text_encoder"],
                                                 tokenizer(captions, max_length=length)))
  context_fn = jax.jit(lambda p, drop, key: keyframe.text_context(text, p, batch, uncond, drop,
                                                                  key, jnp.float32))
  context = lambda drop, seed=0: np.asarray(context_fn(params, drop, jax.random.key(seed)))
  np.testing.assert_allclose(context(0.0), encode(["a cat"] * 3 + ["a dog", "a car", "rain"]),
                             rtol=1e-5, atol=1e-6)
  # Dropped per video: a video's frames are all captioned or all empty.
  empty = encode([""] * 6)[0]
  dropped = [[np.allclose(c, empty, atol=1e-6) for c in context(0.5, s)] for s in range(12)]
  assert all(d[:3] in ([True] * 3, [False] * 3) and d[3:] in ([True] * 3, [False] * 3)
             for d in dropped)
  assert {tuple(d) for d in dropped} >= {(True,) * 3 + (False,) * 3, (False,) * 3 + (True,) * 3}
  loss, _ = jax.jit(setup.stage.loss_fn)(params, jax.tree_util.tree_map(jnp.asarray, batch),
                                         jax.random.key(0))
  assert np.isfinite(float(loss))


def test_a_video_export_as_image_model_gives_the_layers_the_stage_has(keyframe_export,
                                                                     tmp_path, capsys):
  # The image_ldm stage on a key-frame export crashed in the trainer with a pytree
  # error (the export's temporal layers), as did the key-frame stage on a predictor's.
  from videoldm_jax.stages import image_ldm, keyframe
  exported = traverse_util.flatten_dict(pretrained.load(keyframe_export).params["unet"])
  config = _config("image_ldm_tiny", num_frames=2)
  config.image_model = str(keyframe_export)
  setup = image_ldm.setup(config, tmp_path / "image")
  # Its examples are frames (samples/s counts them); the key-frame stage's are clips.
  assert setup.samples_per_step == config.data.batch_size * 2
  params = traverse_util.flatten_dict(setup.init_params()["unet"])
  assert params.keys() == traverse_util.flatten_dict(setup.abstract_params["unet"]).keys()
  assert not any(partition.is_temporal(k) for k in params)
  for k, v in params.items():
    np.testing.assert_array_equal(v, exported[k])
  assert re.search(r"note: .*: \d+ UNet parameters the stage's model "
                   r"does not have are left out \(e.g. .*temporal_", capsys.readouterr().err)
  # The key-frame stage keeps an export's phi where its config.temporal has its shapes.
  config = _config("keyframe_tiny", num_frames=2)
  config.image_model = str(keyframe_export)
  kf = keyframe.setup(config, tmp_path / "kf")
  assert kf.samples_per_step == config.data.batch_size
  params = traverse_util.flatten_dict(kf.init_params()["unet"])
  assert params.keys() == exported.keys()
  for k, v in params.items():
    np.testing.assert_array_equal(v, exported[k])
  config.temporal.conv_kernel = (3, 3, 3)
  with pytest.raises(ValueError, match=r"shape mismatch: .*temporal_.* is \(3, 1, 1, \d+, "
                     r"\d+\) in .*, the model expects \(3, 3, 3, "):
    keyframe.setup(config, tmp_path / "kf3").init_params()


def test_predictor_context_counts_follow_the_nonzero_weights(tmp_path):
  # A trailing zero weight draws nothing: the export recorded max_context 2 (the chain
  # then accepted 2 context frames), and 2-frame clips were refused.
  assert predictor.max_context((0.5, 0.5, 0.0)) == 1
  assert predictor.max_context((1 / 3,) * 3) == 2 and predictor.max_context((1.0,)) == 0
  masks = predictor.mask_fn((0.5, 0.5, 0.0))(jax.random.key(0), 64, 2)
  assert masks.shape == (64, 2) and set(np.asarray(masks.sum(1)).tolist()) == {0.0, 1.0}
  # S = T would leave no frame to predict: the mask function itself refuses it.
  with pytest.raises(ValueError, match="S up to 2 context frames needs clips longer than 2"):
    predictor.mask_fn((0.0, 0.0, 1.0))(jax.random.key(0), 4, 2)
  assert np.asarray(predictor.mask_fn((0.0, 0.0, 1.0))(jax.random.key(0), 4, 3)).tolist() \
      == [[1.0, 1.0, 0.0]] * 4
  # Weights that draw nothing (their normalisation: NaN), and strides that leave no
  # frame to interpolate.
  with pytest.raises(ValueError, match="non-negative weights"):
    predictor.mask_fn((0.0, 0.0, 0.0))
  for stride in (1, 0):
    with pytest.raises(ValueError, match=f"stride must be >= 2, got {stride}"):
      interpolator.mask_fn(stride)
  config = _config("predictor_tiny", num_frames=4)
  config.predictor.num_context_probs = (0.5, 0.5, 0.0)
  assert pretrained.training_record(config)["max_context"] == 1
  # How often a clip trained without context (the branch context guidance subtracts):
  # the weights are normalised ((1, 1, 2): a quarter).
  assert pretrained.training_record(config)["no_context_prob"] == 0.5
  weights = config.copy_and_resolve_references()
  weights.predictor.num_context_probs = (1.0, 1.0, 2.0)
  weights.data.update(height=8, width=16)  # (and the record keeps the frame's shape)
  record = pretrained.training_record(weights)
  assert record["no_context_prob"] == 0.25 and (record["height"], record["width"]) == (8, 16)
  interp = _config("interpolator_tiny", num_frames=8)
  assert pretrained.training_record(interp)["no_context_prob"] == \
      interp.interpolator.context_drop_prob
  # A drop probability past [0, 1] trained every clip with (< 0) or without (> 1) its
  # key frames, silently.
  for p in (-0.1, 1.5):
    with pytest.raises(ValueError, match=rf"interpolator.context_drop_prob must be in "
                       rf"\[0, 1\], got {p}"):
      interpolator.mask_fn(4, p)
  # 4T + 1 frames trained the last frame known; the chain samples T key frames followed
  # by stride * T - 1 new frames.
  interp.interpolator.stride = 0  # (a ZeroDivisionError of the multiple check)
  with pytest.raises(ValueError, match=r"interpolation stride must be >= 2, got 0"):
    interpolator.setup(interp, tmp_path)
  interp.interpolator.stride = 4
  interp.data.num_frames = 4 * interp.interpolator.stride + 1
  with pytest.raises(ValueError, match=r"config.data.num_frames=\d+ must be a multiple of "
                     r"interpolator.stride"):
    interpolator.setup(interp, tmp_path)
  # Training-time samples extended from 2 frames: the run failed at its first sample
  # step (2-frame clips) or conditioned on a count it never trained.
  config.sample.update(every=2, num_context=2)
  with pytest.raises(ValueError, match=r"config.sample.num_context=2: the predictor trains "
                     r"with at most 1 context frames .* set it to at most 1"):
    predictor.setup(config, tmp_path)
  config.sample.num_context = 1
  predictor.check_sample_context(config)
  # Unset: the samples extend from SAMPLE_CONTEXT = 2 frames, checked as such.
  unset = config.copy_and_resolve_references()
  del unset.sample["num_context"]
  assert predictor.sample_context(unset) == predictor.SAMPLE_CONTEXT == 2
  with pytest.raises(ValueError, match=r"config.sample.num_context=2: "):
    predictor.check_sample_context(unset)
  # Clips no longer than the largest S: refused at setup, not at the step's trace.
  short = _config("predictor_tiny", num_frames=2)
  short.sample.every = 0
  with pytest.raises(ValueError, match=r"config.data.num_frames=2: the predictor draws up "
                     r"to 2 context frames"):
    predictor.setup(short, tmp_path / "short")
  config.sample.every = 0  # no samples: nothing to check
  config.sample.num_context = 5
  predictor.check_sample_context(config)


def test_a_video_model_folder_keeps_its_temporal_config(keyframe_export, tmp_path):
  # Every field of the temporal layers' config survives a save and a load (the layer
  # layout and the mixing / frame-encoding settings sampling depends on).
  import dataclasses
  model = pretrained.load(keyframe_export)
  changed = dataclasses.replace(model.temporal_config, mix_init=1.5, max_period=500.0)
  assert changed != TemporalConfig()
  folder = pretrained.save(tmp_path / "copy", dataclasses.replace(
      model, temporal_config=changed), keyframe_export / "tokenizer")
  assert pretrained.load(folder).temporal_config == changed
  # A tokenizer swapped into a folder with ids past its text encoder's table (NaN
  # embeddings) is refused by name where the folder is loaded with its tokenizer.
  (folder / "tokenizer" / "added_tokens.json").write_text(json.dumps({"<new>": 600}))
  with pytest.raises(ValueError, match=r"copy: the tokenizer has token id 600 \('<new>'\) "
                     r"but the text encoder's vocab_size is 514"):
    pretrained.load_with_tokenizer(folder)


def test_a_context_export_keeps_its_context_encoder_widths(keyframe_export, tmp_path):
  # The interpolator started from a predictor with context_channels=(8,) was built with
  # the config's default widths and failed on the first parameter's shape.
  from videoldm_jax.stages import context
  folder = tmp_path / "predictor"
  shutil.copytree(keyframe_export, folder)
  index = json.loads((folder / "model_index.json").read_text())
  index["temporal"] = {**index["temporal"], "context_frames": True, "context_channels": [8]}
  (folder / "model_index.json").write_text(json.dumps(index))
  config = _config("interpolator_tiny", num_frames=8)
  config.init_from = str(folder)
  assert context.context_temporal_config(config).context_channels == (8,)
  config.context_channels = (16,)  # set: it wins
  assert context.context_temporal_config(config).context_channels == (16,)
  config.init_from = str(keyframe_export)  # a key-frame export: the config's widths
  config.context_channels = ()
  assert context.context_temporal_config(config).context_channels == ()


def test_frame_size_the_unet_cannot_take_is_refused(tmp_path):
  # Each UNet level halves the latents: 9 pixels at the VAE's factor 2 failed deep in
  # XLA (skip connections of different sizes).
  from videoldm_jax.stages import keyframe
  config = _config("keyframe_tiny", num_frames=4)
  config.data.height = 9
  with pytest.raises(ValueError, match=r"config.data.height and width must be multiples "
                     r"of 2 .* got 9x8"):
    keyframe.setup(config, tmp_path)


def test_sample_cli_takes_class_labels(tmp_path):
  from videoldm_jax import cli
  assert cli.class_labels(3, 0, 2, "m") == [0, 0]  # class 0 is a label, not "none given"
  assert cli.class_labels(None, None, 2, "m") is None
  tiny = {**TINY, "unet": {**TINY["unet"], "num_class_embeds": 3}}
  image = pretrained.random_image_ldm(ml_collections.ConfigDict(tiny))
  # An autoencoder export is one no UNet stage trained on since (sample-image notes it).
  ae = dataclasses.replace(image, decoder_training={"stage": "autoencoder"}, training={})
  assert cli.autoencoder_export(ae)
  assert not cli.autoencoder_export(dataclasses.replace(ae, training={"stage": "image_ldm"}))
  ldm = VideoLDM.from_pretrained(image, TemporalConfig())
  params = {**image.params, "unet": merge(image.params["unet"],
                                          ldm.init_unet_params(7, where=partition.is_temporal))}
  write_byte_level_tokenizer(str(tmp_path / "tok"))
  model = pretrained.PretrainedLDM(image.unet_config, image.vae_config, image.text_config,
                                   image.scheduler, params, temporal_config=TemporalConfig())
  folder = pretrained.save(tmp_path / "model", model, tmp_path / "tok")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}

  def sample(*flags, model=folder):
    return subprocess.run(
        [sys.executable, "-m", "videoldm_jax.cli.sample", f"--model={model}",
         "--num_frames=2", "--height=8", "--width=8", "--steps=1",
         f"--output={tmp_path / 'out.mp4'}", *flags],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  # The label is checked before the weights are read (a copy without them).
  configs_only = shutil.copytree(folder, tmp_path / "configs only",
                                 ignore=shutil.ignore_patterns("params"))
  proc = sample(model=configs_only)
  assert proc.returncode != 0 and "class-conditional (3 classes): pass --class_label" in \
      proc.stderr, proc.stderr[-2000:]
  proc = sample("--class_label=3", model=configs_only)
  assert proc.returncode != 0 and "--class_label=3: expected 0..2" in proc.stderr
  proc = sample("--class_label=2", "--fps=12.5", "--num_videos=2", "--seed=5",
                "--sampler=dpmpp_2m", f"--output={tmp_path / 'out.MP4'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "guidance_scale=5.0 ignored" not in proc.stderr  # it has a text encoder
  # Two clips side by side (a 2-pixel gutter); --sampler and --seed reach the options
  # sampled with (an ignored flag sampled the default: the same files' shapes).
  assert video_io.read_video(str(tmp_path / "out.MP4")).shape == (2, 8, 18, 3)
  assert "(2 clips of 2 frames, 8x8; dpmpp_2m, 1 steps, seed 5)" in proc.stderr, \
      proc.stderr[-2000:]
  # --fps reaches both files: the mp4's stream rate, the GIF's delay (100 / 12.5 = 8
  # hundredths of a second).
  import av
  from PIL import Image
  with av.open(str(tmp_path / "out.MP4")) as container:
    assert container.streams.video[0].average_rate == 12.5
  with Image.open(tmp_path / "out.gif") as im:
    assert im.info["duration"] == 80
  # videoldm-sample-image took any label: -1 wrapped to the last class, 3 gave NaN.
  proc = subprocess.run(
      [sys.executable, "-m", "videoldm_jax.cli.sample_image", f"--model={folder}",
       "--class_label=-1", f"--output={tmp_path / 'out.png'}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode != 0 and "--class_label=-1: expected 0..2" in proc.stderr, \
      proc.stderr[-2000:]


def test_sampling_clis_check_their_flags_before_loading_the_model(tmp_path):
  # Each failed after the whole sampling run (a ZeroDivisionError, FFmpeg's "Could not
  # determine output format"), or dropped words of an unquoted prompt.
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}

  def cli(name, *flags):
    proc = subprocess.run([sys.executable, "-m", f"videoldm_jax.cli.{name}", *flags],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0, proc.stderr[-2000:]
    return proc.stderr + proc.stdout

  absent = f"--model={tmp_path / 'absent'}"  # never read: the checks come first
  assert "--num_videos must be >= 1, got 0" in cli("sample", absent, "--num_videos=0")
  assert "expected an .mp4 path" in cli("sample", absent, f"--output={tmp_path / 'a.gif'}")
  assert "--fps: sample.mp4: fps must be a positive number of at least 1/1001, got 0.0" in \
      cli("sample", absent, "--fps=0")
  # 1/1000 fps suits the mp4 but not the GIF beside it (its delay would overflow): both
  # failed after the sampling.
  assert "out.gif: fps 0.001 is slower than a GIF can show" in cli(
      "sample", absent, "--fps=0.001", f"--output={tmp_path / 'out.mp4'}")
  assert "unexpected arguments: ['road']" in cli("sample", absent, "--prompt=a", "road")
  # A misspelt sampler is a flag error (not one raised after the model has loaded).
  for name in ("sample", "sample_image"):
    assert "flag --sampler=dpmpp2m: value should be one of <ddim|ddpm|dpmpp_2m>" in cli(
        name, absent, "--sampler=dpmpp2m")
  # (JAX keys keep a seed's low 32 bits: 2^32 drew seed 0's noise; 2^63 overflowed after
  # the model had loaded)
  assert "--seed must be in [0, 2^32), got -1" in cli("sample", absent, "--seed=-1")
  assert "--seed must be in [0, 2^32), got 4294967296" in cli("sample_image", absent,
                                                              "--seed=4294967296")
  assert "--height must be >= 1, got 0" in cli("sample_image", absent, "--height=0")
  for name in ("noext", "a.psd"):  # (Pillow reads .psd but cannot write it)
    assert "not an image file name" in cli("sample_image", absent,
                                           f"--output={tmp_path / name}")
  assert "unexpected arguments: ['road']" in cli("sample_image", absent, "--prompt=a",
                                                 "road")
  image = pretrained.random_image_ldm(ml_collections.ConfigDict(TINY))
  write_byte_level_tokenizer(str(tmp_path / "tok"))
  folder = pretrained.save(tmp_path / "image", image, tmp_path / "tok")
  shutil.rmtree(folder / "params")  # the refusal comes before the weights are read
  assert "an image model (no temporal layers; videoldm-sample-image samples it)" in cli(
      "sample", f"--model={folder}")
  # An autoencoder-stage export's UNet never saw its latents: said (its images are noise).
  import dataclasses
  ae = pretrained.save(tmp_path / "ae", dataclasses.replace(
      image, decoder_training={"stage": "autoencoder"}), tmp_path / "tok")
  assert "an autoencoder-stage export (an image model whose UNet has not been trained on " \
      "its latents: train the image_ldm stage on it)" in cli("sample", f"--model={ae}")
  proc = subprocess.run([sys.executable, "-m", "videoldm_jax.cli.sample_image",
                         f"--model={ae}", "--steps=1", "--width=16", "--sampler=ddpm",
                         "--eta=0.3", "--seed=7", f"--output={tmp_path / 'ae.png'}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and "is an autoencoder-stage export: its UNet was not " \
      "trained on this autoencoder's latents" in proc.stderr, proc.stderr[-2000:]
  from PIL import Image
  # The height defaults to 64 x the VAE factor (2 here); --sampler and --seed reach the
  # options sampled with.
  assert Image.open(tmp_path / "ae.png").size == (16, 128)
  assert "1 image(s) of 128x16; ddpm, 1 steps, seed 7" in proc.stderr, proc.stderr[-2000:]
  assert "note: --eta=0.3 ignored: only --sampler=ddim takes it" in proc.stderr
  # videoldm-export reuses videoldm-train's --config and --workdir: --help lists them,
  # and a bare step number is refused, not ignored.
  proc = subprocess.run([sys.executable, "-m", "videoldm_jax.cli.export", "--help"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert "--config" in proc.stdout and "--workdir" in proc.stdout and "--step" in proc.stdout
  assert "--num_processes" in proc.stdout and "--stopped_exit_code" not in proc.stdout
  assert "unexpected arguments: ['10']" in cli(
      "export", "--config=configs/keyframe_tiny.py", f"--workdir={tmp_path}", "10")
  # Every command: a second --fake entry without its flag was dropped silently.
  assert "unexpected arguments: ['B']" in cli("evaluate", "--fake", "A", "B")
  assert "unexpected arguments: ['x']" in cli("convert", "--single_file=a", "x")
  # An upsampler export passed where a latent diffusion model goes.
  (tmp_path / "up").mkdir()
  (tmp_path / "up" / "upsampler_index.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="an upsampler export .* --upsampler_model"):
    pretrained.load(tmp_path / "up")


def test_sampling_clis_say_guidance_does_nothing_without_a_text_encoder(capsys):
  from videoldm_jax.cli import note_unguided
  note_unguided(False, 5.0)
  note_unguided(True, 5.0)   # text model: guided
  note_unguided(False, 1.0)  # guidance off anyway
  note_unguided(False, 0.0)  # (below 1 is a setting too)
  assert capsys.readouterr().err == "".join(
      f"note: --guidance_scale={s} ignored: the model has no text encoder and no null "
      "class (no classifier-free guidance without one)\n" for s in (5.0, 0.0))


def test_context_samplers_reuse_one_jitted_unet(keyframe_export):
  # Each training-time sample of the context stages jitted a new UNet apply: a fresh
  # compile of the whole UNet at every sample step.
  import dataclasses
  from videoldm_jax.pipelines import context_sampling
  model = dataclasses.replace(pretrained.load(keyframe_export),
                              temporal_config=TemporalConfig(context_frames=True))
  a, b = (context_sampling.ContextModel.from_pretrained(model) for _ in range(2))
  assert a.apply_fn is b.apply_fn


@pytest.mark.parametrize("name", ["predictor", "interpolator"])
def test_context_masks_and_condition_dropout_draw_from_their_own_keys(name, tmp_path,
                                                                     monkeypatch):
  # The known-frame mask and the caption / label dropout come from different keys. One
  # key would nest the two events (every clip that loses its context frames would lose
  # its caption too, or the other way round), so one of the four conditioning
  # combinations that context guidance needs would hardly ever train.
  # The diffusion noise has its own key too, and the model's condition is built from the
  # drawn mask (all frames given: the model learned to copy them), whose mean count per
  # clip is the known_frames metric.
  from videoldm_jax.stages import context, keyframe
  module = {"predictor": predictor, "interpolator": interpolator}[name]
  keys = {"mask": [], "drop": [], "noise": []}
  record = lambda what, k: keys[what].append(np.asarray(jax.random.key_data(k)))
  real_mask_fn, real_dropped = module.mask_fn, keyframe._dropped
  real_loss, real_cond = context.denoising_loss, context.masked_cond
  drawn, given = [], []

  def mask_fn(*args):
    mask = real_mask_fn(*args)
    return lambda k, b, t: (record("mask", k), drawn.append(mask(k, b, t)))[1] or drawn[-1]

  monkeypatch.setattr(module, "mask_fn", mask_fn)
  monkeypatch.setattr(keyframe, "_dropped",
                      lambda k, p, n: (record("drop", k), real_dropped(k, p, n))[1])
  monkeypatch.setattr(context, "denoising_loss",
                      lambda fn, x0, k, *a: (record("noise", k), real_loss(fn, x0, k, *a))[1])
  monkeypatch.setattr(context, "masked_cond",
                      lambda z, m: (given.append(m), real_cond(z, m))[1])
  config = _config(f"{name}_tiny", num_frames=4)
  config.cond_drop_prob = 0.5
  setup = module.setup(config, tmp_path)
  tokens = setup.extra["tokenizer"](["a car", "rain"], max_length=16)
  # Latents of the pixel clips' shape below (8 x 8 -> 4 x 4): op by op, every shape
  # compiles each of the UNet's ops again (1 x 1 latents cost ~8 s more).
  batch = {"latents": jnp.zeros((2, 4, 4, 4, 4)), "tokens": jnp.asarray(tokens)}
  params = setup.init_params()
  loss, metrics = setup.stage.loss_fn(params, batch, jax.random.key(0))  # eager
  assert np.isfinite(float(loss)) and len(keys["mask"]) == 1 and keys["drop"], keys
  assert not any(np.array_equal(keys["mask"][0], k) for k in keys["drop"]), keys
  assert not np.array_equal(keys["mask"][0], keys["noise"][0])
  mask = np.asarray(drawn[0])
  assert 0 < mask.sum() < mask.size  # (this key draws some context, not all frames)
  np.testing.assert_array_equal(np.asarray(given[0]), mask)
  np.testing.assert_allclose(float(metrics["known_frames"]), mask.sum(axis=1).mean())
  # Pixel clips are encoded to a posterior sample (as in the key-frame stage), from a key
  # of its own.
  vae_keys, real_encode = [], keyframe.encode_video
  monkeypatch.setattr(keyframe, "encode_video", lambda vae, p, video, k: (
      vae_keys.append(k), real_encode(vae, p, video, k))[1])
  video = np.random.default_rng(1).integers(0, 256, (2, 4, 8, 8, 3), np.uint8)
  pixels = {"video": jnp.asarray(video), "tokens": batch["tokens"]}
  assert np.isfinite(float(setup.stage.loss_fn(params, pixels, jax.random.key(0))[0]))
  assert vae_keys[0] is not None
  vae_key = np.asarray(jax.random.key_data(vae_keys[0]))
  assert not any(np.array_equal(vae_key, k[0]) for k in (keys["mask"], keys["noise"]))
  # Still images (image_only) skip the temporal layers: with phi off its init (where the
  # layers change nothing), the same batch and key give another loss.
  rng = np.random.default_rng(0)
  params["unet"] = traverse_util.unflatten_dict({
      k: v + 0.1 * rng.standard_normal(v.shape).astype(v.dtype)
      if partition.is_temporal(k) else v
      for k, v in traverse_util.flatten_dict(params["unet"]).items()})
  still = {**batch, "image_only": jnp.ones((2, 4), bool)}
  assert float(setup.stage.loss_fn(params, batch, jax.random.key(0))[0]) != \
      float(setup.stage.loss_fn(params, still, jax.random.key(0))[0])
