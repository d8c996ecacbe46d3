"""The temporally aligned upsampler: batch preparation (patches, per-video noise level),
training on patches, full-frame sampling with the same weights, the export format,
theta from an image upsampler, latent space, and the trainer loop with resume."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from videoldm_jax import sharding
from videoldm_jax import upsampler_model as um
from videoldm_jax.config_files import load_sibling
from videoldm_jax.models import partition
from videoldm_jax.pipelines import upsampling
from videoldm_jax.stages import upsampler
from videoldm_jax.train import step as step_lib

ROOT = Path(__file__).parents[1]
STEPS = 8


def tiny_config(**data):
  c = load_sibling(str(ROOT / "configs" / "x.py"), "upsampler_tiny").get_config()
  c.data.update({"kind": "procedural", "batch_size": 2, "num_frames": 4, **data})
  c.optim.update(lr=1e-3, warmup_steps=1, total_steps=100, ema_decay=0.5)
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """STEPS train steps of the tiny upsampler, at one UNet level, on one repeated batch of
  16x16 patches of 32x32 clips; the loss at fixed keys before and after."""
  config = tiny_config()
  # One UNet level (the tiny config's two are checked by
  # test_upsampler_config_checks_and_helpers_by_hand on its own model): what the tests
  # on this fixture check (the loss falls, patch-trained weights sample full frames, the
  # noise level is the class label, the export) is the same at one level, and every UNet
  # program they compile compiles faster (the train step 27 s of CPU instead of 45).
  config.unet.update(block_out_channels=(32,), attention_levels=(False,))
  setup = upsampler.setup(config, tmp_path_factory.mktemp("run"))
  params = setup.init_params()
  batch = setup.make_batch(next(setup.make_iterator()))
  tx = setup.optimizer
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  param_sh = sharding.shardings_for(setup.logical_axes, mesh, setup.abstract_params)
  state = step_lib.init_state(params, setup.stage, tx, step_lib.state_shardings(
      param_sh, setup.stage, tx, setup.abstract_params, mesh))
  loss_fn = setup.stage.loss_fn

  def loss_and_table_grad(p, batch, key, step):
    # ((loss, metrics), the gradient of the class-embedding table): one program for the
    # loss here and in test_image_examples_skip_the_upsamplers_temporal_layers and the
    # gradient test_the_noise_level_is_the_unets_class_label reads (a forward-only
    # loss and a gradient apart compiled 8 + 21 s of CPU, this 19 s).
    def of_table(table):
      unet = {**p["unet"], "class_embedding": {"embedding": table}}
      return loss_fn({**p, "unet": unet}, batch, key, step)
    return jax.value_and_grad(of_table, has_aux=True)(
        p["unet"]["class_embedding"]["embedding"])

  table_grad = jax.jit(loss_and_table_grad)
  loss = lambda *args: table_grad(*args)[0]
  keys = [jax.random.key(100 + i) for i in range(4)]
  # With explicit all-video flags (alpha where(False, 1, alpha) = alpha: the same loss):
  # the other tests call this compiled program with batches that hold image_only.
  flagged = dict(batch, image_only=jnp.zeros(batch["video"].shape[:2], bool))
  fixed_loss = lambda p: float(np.mean([loss(p, flagged, k, 0)[0] for k in keys]))
  before = fixed_loss(params)
  train_step = step_lib.build_train_step(setup.stage, tx, seed=0, ema_decay=0.5)
  metrics = []
  for _ in range(STEPS):
    state, m = train_step(state, batch)
    metrics.append(jax.device_get(m))
  params_after = jax.device_get(state.merged())
  return dict(config=config, setup=setup, batch=batch, flagged=flagged, loss=loss,
              table_grad=table_grad, before=before, after=fixed_loss(params_after),
              metrics=metrics, params=params_after, model=setup.extra["model"])


def test_batch_prep_patches_and_one_noise_level_per_video():
  config = tiny_config()
  model, _, _ = upsampler.build_model(config)
  model = model.replace(upsample_method="nearest")
  rng = np.random.default_rng(0)
  video = jnp.asarray(rng.integers(0, 256, (6, 4, 32, 32, 3), dtype=np.uint8))
  aug = model.schedules()[2]
  prep = upsampler.prepare_batch(model, aug, None, video, jax.random.key(1), 16)
  assert prep["x0"].shape == prep["cond"].shape == (6, 4, 16, 16, 3)
  assert prep["lowres"].shape == (6, 4, 8, 8, 3)
  level = np.asarray(prep["noise_level"])
  assert level.shape == (6,) and level.dtype == np.int32  # one level per video
  assert level.min() >= 0 and level.max() < model.max_noise_level
  assert len(set(level.tolist())) > 1
  # The conditioning patch is the noised low-res version of the very same window,
  # upsampled: noise drawn per low-res pixel, so constant over each 4 x 4 block (noise
  # drawn after upsampling would differ within a block, and the UNet could average it
  # away).
  cond_lr = um.area_downsample(prep["cond"], 4)
  np.testing.assert_allclose(prep["cond"], um.upsample(cond_lr, 4, "nearest"), atol=1e-6)
  # Every frame of a video is noised at its video's level: the implied noise is
  # standard normal over the video's 4 frames x 4 x 4 x 3 low-res values (a level
  # other than noise_level would rescale it; 192 samples: std error ~0.05).
  abar = np.asarray(aug.alphas_cumprod)[level].reshape(6, 1, 1, 1, 1)
  clean_lr = np.asarray(um.area_downsample(prep["x0"], 4))
  eps = (np.asarray(cond_lr) - np.sqrt(abar) * clean_lr) / np.sqrt(1 - abar)
  std = eps.reshape(6, -1).std(axis=-1)
  assert np.all(np.abs(std - 1.0) < 0.2), std
  # Exactly: with one key, noising x and noising zeros differ by alpha_s x (the same
  # levels and noise), so every frame of video b is scaled by sqrt(abar[level_b]).
  lowres = um.area_downsample(um.to_float(video), 4)
  key = jax.random.key(2)
  noisy, lv = upsampler.noise_augment(aug, lowres, key, model.max_noise_level)
  zero, lv0 = upsampler.noise_augment(aug, jnp.zeros_like(lowres), key, model.max_noise_level)
  np.testing.assert_array_equal(lv, lv0)
  alpha = np.sqrt(np.asarray(aug.alphas_cumprod)[np.asarray(lv)]).reshape(6, 1, 1, 1, 1)
  np.testing.assert_allclose(np.asarray(noisy - zero), alpha * np.asarray(lowres), atol=1e-5)
  # Levels are uniform over [0, max_noise_level): with a maximum of 2, 0 and 1 each about
  # half of 512 draws, never 2 (a class the UNet's table may not have).
  _, few = upsampler.noise_augment(aug, jnp.zeros((512, 1, 1, 1, 3)), key, 2)
  counts = np.bincount(np.asarray(few), minlength=3)
  assert counts[2] == 0 and 200 < counts[0] < 312, counts


def test_loss_finite_and_decreasing(trained):
  assert all(bool(m["finite"]) for m in trained["metrics"])
  assert trained["after"] < 0.9 * trained["before"], (trained["before"], trained["after"])


def test_patch_trained_weights_sample_full_frames_at_4x(trained):
  assert trained["config"].patch_size < trained["config"].data.height  # trained on patches
  model = trained["model"]
  lowres = np.random.default_rng(0).uniform(-1, 1, (1, 3, 8, 12, 3)).astype(np.float32)
  out = upsampling.upsample(model, trained["params"], lowres, steps=2, seed=0)
  assert out.shape == (1, 3, 32, 48, 3)  # other frame count and aspect than training
  assert np.all(np.isfinite(out))
  # The level is an input: 0 vs a high level, same seed, give different videos.
  lo = upsampling.upsample(model, trained["params"], lowres, noise_level=0, steps=2, seed=0)
  hi = upsampling.upsample(model, trained["params"], lowres, noise_level=300, steps=2, seed=0)
  assert float(jnp.max(jnp.abs(lo - hi))) > 1e-3
  again = upsampling.upsample(model, trained["params"], lowres, noise_level=0, steps=2, seed=0)
  np.testing.assert_array_equal(np.asarray(lo), np.asarray(again))
  # ... also where the UNet cannot tell the labels apart (row 300 of the class table
  # made row 0's): the condition itself is noised at the level asked for.
  params = trained["params"]
  table = jnp.asarray(params["unet"]["class_embedding"]["embedding"])
  same_rows = {**params, "unet": {**params["unet"], "class_embedding": {
      "embedding": table.at[300].set(table[0])}}}
  lo, hi = (upsampling.upsample(model, same_rows, lowres, noise_level=n, steps=2, seed=0)
            for n in (0, 300))
  assert float(jnp.max(jnp.abs(lo - hi))) > 1e-3
  # Levels the model never trained on (training draws [0, max_noise_level)) are refused.
  with pytest.raises(ValueError, match=r"noise_level must be in \[0, max_noise_level=350\)"):
    upsampling.upsample(model, trained["params"], lowres, noise_level=350, steps=2)
  # The scheduler config's sampling settings reach the sampler: with x_0 predictions
  # clipped to [-0.01, 0.01], DDIM's last step (to abar = 1: set_alpha_to_one) lands on
  # one of them.
  clipped = dataclasses.replace(model, scheduler={**model.scheduler, "clip_sample": True,
                                                  "clip_sample_range": 0.01,
                                                  "set_alpha_to_one": True})
  out = upsampling.upsample(clipped, trained["params"], lowres, steps=2, seed=0)
  assert float(jnp.max(jnp.abs(out))) <= 0.01 + 1e-6


def test_the_noise_level_is_the_unets_class_label(trained):
  # The augmentation level s enters the UNet as its class label (the SD x4 upscaler's
  # noise_level): in training, the class-embedding rows of the levels drawn for the
  # batch get gradients and no other row does; in sampling, the row of the level asked
  # for is the one read. (Label 0 in either place passed every other test.)
  model, params = trained["model"], trained["params"]
  key = jax.random.key(5)
  k_prep = jax.random.split(key)[0]  # (as the stage's loss_fn splits its key)
  # (Jitted: one small program, not each of the batch preparation's ops compiled apart;
  # the schedules are read outside the trace, as the stage does.)
  aug = model.schedules()[2]
  levels = jax.jit(lambda video, k: upsampler.prepare_batch(
      model, aug, params.get("vae"), video, k, trained["config"].patch_size)["noise_level"])(
          trained["batch"]["video"], k_prep)
  # The table's gradient of the stage's loss (the fixture's compiled program; its batch
  # flags every example as video, the loss of the bare batch).
  _, grad = trained["table_grad"](params, trained["flagged"], key, 0)
  rows = np.flatnonzero(np.abs(np.asarray(grad)).sum(axis=1))
  assert rows.tolist() == sorted(set(np.asarray(levels).tolist())), (rows, levels)

  # (The shape of test_patch_trained_weights_sample_full_frames_at_4x's clip: the same
  # compiled sampling programs.)
  lowres = np.random.default_rng(1).uniform(-1, 1, (1, 3, 8, 12, 3)).astype(np.float32)
  run = lambda p: np.asarray(upsampling.upsample(model, p, lowres, noise_level=123, steps=2,
                                                 seed=0))
  table = jnp.asarray(params["unet"]["class_embedding"]["embedding"])
  moved = lambda row: {**params, "unet": {**params["unet"], "class_embedding": {
      "embedding": table.at[row].add(1.0)}}}
  base = run(params)
  assert np.abs(run(moved(123)) - base).max() > 1e-3
  np.testing.assert_array_equal(run(moved(7)), base)


def test_chunks_share_the_noise_of_the_frames_they_share(trained):
  """With first_frame, a frame's initial and augmentation noise depend on its index in
  the video, not on the chunk: a frame-wise model (theta alone) upsamples a frame the
  same in two overlapping chunks."""
  model = dataclasses.replace(trained["model"], temporal=None)
  flat = traverse_util.flatten_dict(trained["params"]["unet"])
  params = {"unet": traverse_util.unflatten_dict(
      {k: v for k, v in flat.items() if not partition.is_temporal(k)})}
  # (Two videos: each frame's noise is its own video's, frame-major within it.)
  lowres = np.random.default_rng(1).uniform(-1, 1, (2, 6, 8, 8, 3)).astype(np.float32)
  up = lambda x, **kw: np.asarray(upsampling.upsample(model, params, x, steps=2, seed=3,
                                                      **kw))
  a, b = up(lowres[:, :4], first_frame=0), up(lowres[:, 2:], first_frame=2)
  np.testing.assert_allclose(a[:, 2:], b[:, :2], rtol=1e-5, atol=1e-5)
  # Inputs past [-1, 1] (decoded frames overshoot) are clipped as training saw them, and
  # so are the outputs.
  np.testing.assert_array_equal(up(1.5 * lowres[:, :4], first_frame=0),
                                up(np.clip(1.5 * lowres[:, :4], -1, 1), first_frame=0))
  assert np.abs(a).max() <= 1.0
  whole_clip = up(lowres[:, 2:])  # noise drawn for the chunk: other frames
  assert np.abs(a[:, 2:] - whole_clip[:, :2]).max() > 1e-2
  # DDPM's step noise: drawn from the chunk's first frame, so chunks do not repeat it
  # (every chunk of a long video drew the same step noise).
  keys = []
  real = upsampling.samplers.sample

  def spy(*args, key=None, **kw):
    keys.append(np.asarray(jax.random.key_data(key)))
    return real(*args, key=key, **kw)

  upsampling.samplers.sample = spy
  try:
    for first in (0, 4, 0):  # (the shape of a's chunks: their compiled UNet)
      up(lowres[:, :4], first_frame=first, sampler="ddpm")
  finally:
    upsampling.samplers.sample = real
  assert not np.array_equal(keys[0], keys[1]) and np.array_equal(keys[0], keys[2])


def test_export_round_trip(trained, tmp_path):
  trained["setup"].export(tmp_path / "ups", trained["params"])
  loaded = um.load(tmp_path / "ups")
  assert loaded.config.to_dict() == trained["model"].to_dict()
  assert loaded.config.noise_level == 20 and loaded.config.scheduler["prediction_type"] == (
      "v_prediction")
  assert loaded.training["stage"] == "upsampler" and loaded.training["num_frames"] == 4
  flat_a = traverse_util.flatten_dict(trained["params"])
  flat_b = traverse_util.flatten_dict(loaded.params)
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_b[k]), np.asarray(flat_a[k]))
  # Every field comes back, also those the config leaves at a non-default value (a
  # 'nearest' upsampler reloaded as bilinear otherwise).
  config = trained["model"].replace(upsample_method="nearest", max_noise_level=300,
                                    noise_level=7)
  um.save(tmp_path / "nearest", um.PretrainedUpsampler(config, trained["params"]))
  assert um.load(tmp_path / "nearest", read_params=False).config == config
  # A config its load would refuse is not saved.
  with pytest.raises(ValueError, match="noise_level"):
    um.save(tmp_path / "bad", um.PretrainedUpsampler(config.replace(noise_level=999),
                                                     trained["params"]))
  assert not (tmp_path / "bad").exists()
  # An index edited by hand is validated on load (an untrained noise level, here).
  index = tmp_path / "nearest" / um.INDEX
  index.write_text(index.read_text().replace('"noise_level": 7', '"noise_level": 999'))
  with pytest.raises(ValueError, match=r"noise_level must be in \[0, max_noise_level=300\)"):
    um.load(tmp_path / "nearest", read_params=False)
  # Damaged ones are named with the file (were a bare KeyError / TypeError).
  saved = json.loads(index.read_text())
  for change, said in (({"unet": None}, r"'unet' must be an object"),
                       ({"foo": 1}, r"unknown UpsamplerConfig fields \['foo'\]"),
                       ({"scale": "4"}, r"UpsamplerConfig.scale='4': expected int"),
                       ({"scheduler": [1]}, r"UpsamplerConfig.scheduler=\[1\]: expected dict")):
    index.write_text(json.dumps({**saved, **change}))
    with pytest.raises(ValueError, match=rf"{um.INDEX}: {said}"):
      um.load(tmp_path / "nearest", read_params=False)
  # A save with other parameter trees than the space needs is refused.
  with pytest.raises(ValueError, match=r"must hold exactly \['unet'\], got \['unet', 'vae'\]"):
    um.save(tmp_path / "extra", um.PretrainedUpsampler(config, {**trained["params"], "vae": {}}))


def test_a_failed_save_leaves_no_folder_and_a_retry_succeeds(tmp_path, monkeypatch):
  # Orbax failing after the index was written (disk full, a kill) left a folder with
  # the index alone: it loaded with read_params=False and a retry was refused as a
  # non-empty folder.
  import orbax.checkpoint as ocp
  model, _, _ = upsampler.build_model(tiny_config())
  ups = um.PretrainedUpsampler(model, {"unet": {"w": np.arange(3, dtype=np.float32)}})

  def fail(*args, **kwargs):
    raise OSError("No space left on device")
  with monkeypatch.context() as m:
    m.setattr(ocp.StandardCheckpointer, "save", fail)
    with pytest.raises(OSError, match="No space left"):
      um.save(tmp_path / "ups", ups)
  assert sorted(os.listdir(tmp_path)) == []  # neither the folder nor a hidden partial one
  um.save(tmp_path / "ups", ups)
  loaded = um.load(tmp_path / "ups")
  assert loaded.config == model
  np.testing.assert_array_equal(loaded.params["unet"]["w"], [0.0, 1.0, 2.0])


def test_upsampler_config_checks_and_helpers_by_hand():
  config, _, _ = upsampler.build_model(tiny_config())  # (configs only: nothing compiled)
  # uint8 0 and 255 are -1 and 1 exactly; float input passes through.
  np.testing.assert_array_equal(um.to_float(jnp.array([0, 255], jnp.uint8)), [-1.0, 1.0])
  np.testing.assert_allclose(um.to_float(jnp.array([51], jnp.uint8)), [51 / 127.5 - 1.0],
                             rtol=1e-6)
  levels = config.aug_levels()
  for bad, message in ((dict(noise_level=config.max_noise_level), "noise_level must be"),
                       (dict(max_noise_level=levels + 1), "max_noise_level must be in")):
    with pytest.raises(ValueError, match=message):
      config.replace(**bad).validate()
  # High-res sizes: multiples of the VAE factor x the UNet's 2^(levels - 1), and of
  # scale. Pixel space (factor 1), 2 levels: lcm(2, 4) = 4 at x4, lcm(2, 3) = 6 at x3.
  assert (config.space, config.unet.num_levels, config.scale) == ("pixel", 2, 4)
  assert (config.size_multiple, config.replace(scale=3).size_multiple) == (4, 6)
  # Bilinear with half-pixel centres (torch's align_corners=False): 0, 1 -> 0, .25, .75, 1.
  x = jnp.arange(2.0).reshape(1, 2, 1)  # (h, w, C): one row 0, 1
  np.testing.assert_allclose(np.asarray(um.upsample(x, 2, "bilinear"))[:, :, 0],
                             [[0, 0.25, 0.75, 1]] * 2, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(um.upsample(x, 2, "nearest"))[:, :, 0],
                                [[0, 0, 1, 1]] * 2)
  # The UNet input is [x_t, c] along channels, in that order.
  a, b = jnp.zeros((1, 1, 2, 2, 3)), jnp.ones((1, 1, 2, 2, 3))
  both = np.asarray(um.model_input(a, b))
  assert both.shape == (1, 1, 2, 2, 6)
  np.testing.assert_array_equal(both[..., :3], 0)
  np.testing.assert_array_equal(both[..., 3:], 1)


def test_patches_take_every_offset_of_non_square_frames():
  # 16 x 32 frames (the base config trains on 512 x 1024), patches of 8 on a grid of 4:
  # rows from {0, 4, 8}, columns from {0, 4, ..., 24}, each patch a window there.
  h, w = 16, 32
  where = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1)
  video = jnp.asarray(np.broadcast_to(where, (64, 2, h, w, 2)))
  (patches,) = upsampler.random_patches(jax.random.key(0), (video,), 8, 4)
  p = np.asarray(patches)
  assert p.shape == (64, 2, 8, 8, 2)
  assert set(p[:, 0, 0, 0, 0].tolist()) == {0, 4, 8}
  assert set(p[:, 0, 0, 0, 1].tolist()) == set(range(0, 25, 4))
  window = np.stack(np.meshgrid(np.arange(8), np.arange(8), indexing="ij"), -1)
  np.testing.assert_array_equal(p - p[:, :, :1, :1], np.broadcast_to(window, p.shape))
  np.testing.assert_array_equal(p[:, 0], p[:, 1])  # one window for all frames
  # Rows and columns drawn independently: on square frames too, not only the diagonal.
  square = jnp.asarray(np.broadcast_to(where[:16, :16], (64, 1, 16, 16, 2)))
  (patches,) = upsampler.random_patches(jax.random.key(1), (square,), 8, 4)
  corners = np.asarray(patches)[:, 0, 0, 0]
  assert len({tuple(c) for c in corners.tolist()}) == 9  # all 3 x 3 offsets


def test_the_stage_refuses_a_patch_the_unet_cannot_take(trained):
  with pytest.raises(ValueError, match="patch_size 18 must be a multiple of 4"):
    upsampler.make_stage(trained["model"], "full", 18)


def test_image_examples_skip_the_upsamplers_temporal_layers(trained):
  # batch['image_only'] reaches the UNet: all-image batches ignore phi.
  loss = trained["loss"]  # (the fixture's: compiled for batches with image_only)
  batch = dict(trained["batch"], image_only=jnp.ones(trained["batch"]["video"].shape[:2],
                                                     bool))
  params = trained["params"]
  flat = traverse_util.flatten_dict(params)
  moved = traverse_util.unflatten_dict(
      {k: v + 0.5 if partition.is_temporal(k) else v for k, v in flat.items()})
  key = jax.random.key(5)
  assert float(loss(params, batch, key, 0)[0]) == float(loss(moved, batch, key, 0)[0])
  video_batch = dict(batch, image_only=jnp.zeros_like(batch["image_only"]))
  assert float(loss(params, video_batch, key, 0)[0]) != float(
      loss(moved, video_batch, key, 0)[0])


def test_temporal_mode_takes_theta_from_an_image_upsampler(tmp_path):
  image_cfg = tiny_config()
  image_cfg.temporal_layers = False
  image_setup = upsampler.setup(image_cfg, tmp_path / "img")
  image_params = image_setup.init_params()
  assert not any(partition.is_temporal(p)
                 for p in traverse_util.flatten_dict(image_params["unet"]))
  image_setup.export(tmp_path / "image_upsampler", image_params)

  config = tiny_config()
  config.mode = "temporal"
  config.seed = 7
  config.image_upsampler = str(tmp_path / "image_upsampler")
  setup = upsampler.setup(config, tmp_path / "vid")
  params = traverse_util.flatten_dict(setup.init_params())
  theta = traverse_util.flatten_dict(image_params)
  for k, v in theta.items():
    np.testing.assert_array_equal(params[k], v)
  phi = [k for k in params if partition.is_temporal(k)]
  assert phi and set(params) == set(theta) | set(phi)
  assert all(setup.stage.is_trainable(k) == partition.is_temporal(k) for k in params)
  # videoldm-compile's setup reads configs only (the image upsampler's parameters were
  # read, a latent-space one's whole image LDM too): here a folder without them.
  import shutil
  from videoldm_jax.stages import base
  shutil.copytree(tmp_path / "image_upsampler", tmp_path / "config_only",
                  ignore=shutil.ignore_patterns("params"))
  config_only = config.copy_and_resolve_references()
  config_only.image_upsampler = str(tmp_path / "config_only")
  with base.abstract_setup():
    abstract = upsampler.setup(config_only, tmp_path / "abs")
  assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), abstract.abstract_params) == \
      jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), setup.abstract_params)
  # Levels past the image upsampler's would use its untrained (frozen) embeddings.
  trained = config.max_noise_level
  config.max_noise_level = trained + 1
  with pytest.raises(ValueError, match=rf"trained on levels \[0, {trained}\), and mode "
                     "'temporal' freezes"):
    upsampler.setup(config, tmp_path / "levels")
  config.max_noise_level = trained

  config.image_upsampler = ""
  with pytest.raises(ValueError, match="image upsampler"):
    upsampler.setup(config, tmp_path / "bad")
  # A patch larger than the (non-square) frames failed only once the step was traced.
  config = tiny_config(height=16, width=32)
  config.patch_size = 32
  with pytest.raises(ValueError, match=r"patch_size=32 must be in \[1, 16\] \(the 16x32 "):
    upsampler.setup(config, tmp_path / "patch")


def test_base_config_builds_a_pixel_space_video_upsampler():
  config = load_sibling(str(ROOT / "configs" / "x.py"), "upsampler_base").get_config()
  model, image, vae = upsampler.build_model(config)
  assert image is None and vae is None and model.space == "pixel"
  assert (model.unet.in_channels, model.unet.out_channels) == (6, 3)
  assert model.unet.num_class_embeds == 1000 and model.max_noise_level == 350
  assert model.schedules()[1].prediction_type == "v_prediction"
  assert config.data.height % model.size_multiple == 0
  assert config.patch_size % model.size_multiple == 0
  abstract = um.abstract_params(model)  # shapes only
  assert any(partition.is_temporal(p) for p in traverse_util.flatten_dict(abstract["unet"]))


def test_latent_space_upsampler(tmp_path, monkeypatch):
  config = tiny_config()
  config.space = "latent"  # random tiny f4 VAE (config.random_vae)
  setup = upsampler.setup(config, tmp_path)
  model = setup.extra["model"]
  assert model.unet.in_channels == 8 and model.unet.out_channels == 4
  params = setup.init_params()
  batch = setup.make_batch(next(setup.make_iterator()))
  # Traced, not compiled (the sampling below runs the VAE and UNet for real). The
  # high-res target is a posterior sample, the low-res condition the posterior mean,
  # as sampling encodes it (um.conditioning): a sample there would be a train / sample
  # mismatch.
  encoded, encode = [], um.encode
  def recording_encode(vae, vae_params, video, key):
    encoded.append(key is None)
    return encode(vae, vae_params, video, key)
  monkeypatch.setattr(um, "encode", recording_encode)
  loss, _ = jax.eval_shape(setup.stage.loss_fn, params, batch, jax.random.key(0), 0)
  assert loss.shape == () and loss.dtype == jnp.float32
  assert encoded == [False, True]
  monkeypatch.undo()
  # Decoding undoes the latent scaling (0.18215 here): the VAE's own reconstruction.
  from videoldm_jax.models.vae import AutoencoderKL
  frames = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 2, 16, 16, 3)),
                       jnp.float32)
  # (Jitted, one program: op by op each of the VAE's ops compiled apart.)
  decoded, own = jax.jit(lambda v, x: (
      um.decode(model.vae, v, um.encode(model.vae, v, x, None))[0],
      AutoencoderKL(model.vae).apply({"params": v}, x[0])))(params["vae"], frames)
  np.testing.assert_allclose(decoded, own, atol=1e-5)
  lowres = np.zeros((1, 2, 8, 8, 3), np.uint8)
  out = upsampling.upsample(model, params, lowres, steps=1)
  assert out.shape == (1, 2, 32, 32, 3)
  with pytest.raises(ValueError, match="multiple of 8"):  # f4 VAE x 2 UNet levels
    upsampling.upsample(model, params, lowres[:, :, :7], steps=1)
  with pytest.raises(ValueError, match=r"a latent-space upsampler needs its VAE: "
                     r"params\['vae'\] is missing"):
    upsampling.upsample(model, {"unet": params["unet"]}, lowres, steps=1)


def _train(workdir: Path, *flags: str) -> str:
  # (The resumed run loads its step from the session's compilation cache, conftest.)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-m", "videoldm_jax.cli.train", "--config=configs/upsampler_tiny.py",
       f"--workdir={workdir}", "--config.data.batch_size=2", "--config.data.num_frames=4",
       "--config.train.ckpt_every=2", "--config.train.log_every=1",
       # One UNet level: XLA's compile time grows with the op count, and the loop,
       # checkpoints and export are what this test is about.
       "--config.unet.block_out_channels=(32,)", "--config.unet.attention_levels=(False,)",
       # (Temporal resblocks alone: still a video UNet, 4 s of CPU less compiling.)
       "--config.temporal.attention=False", *flags],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stderr


def test_trainer_loop_checkpoints_resumes_and_exports(tmp_path):
  out = _train(tmp_path, "--config.train.num_steps=4", "--config.sample.every=0")
  assert "step 4: loss" in out and "upsampler: compiled" in out
  assert (tmp_path / "checkpoints" / "2").is_dir()
  out = _train(tmp_path, "--config.train.num_steps=6", "--config.sample.every=6",
               "--config.sample.num_clips=1", "--config.sample.steps=2")
  assert "resumed from" in out and "step 5: loss" in out and "step 6: loss" in out
  assert "step 4: loss" not in out
  assert (tmp_path / "samples" / "step_6.mp4").is_file()
  model = um.load(tmp_path / "export" / "step_6")
  assert model.config.temporal is not None and model.config.space == "pixel"
