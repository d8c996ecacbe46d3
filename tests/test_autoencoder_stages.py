"""The autoencoder and decoder stages through the generic train step, and through the
trainer (`videoldm-train`): autoencoder -> export -> decoder -> checkpoint -> resume ->
export of a video decoder."""

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

from videoldm_jax import pretrained, sharding
from videoldm_jax.config_files import load_sibling
from videoldm_jax.data import inputs
from videoldm_jax.data.procedural import make_clip
from videoldm_jax.models import partition
from videoldm_jax.stages import autoencoder, decoder
from videoldm_jax.train import step as step_lib
from tests.test_video_decoder import _tiny_vgg_file

ROOT = Path(__file__).parents[1]
STAGES = {"autoencoder": autoencoder, "decoder": decoder}
# Test sizes: a 2-level autoencoder (f2), 2 clips of 2 frames of 16x16.
SMALL = ["--config.random_image_model.vae.block_out_channels=(8, 16)",
         "--config.random_image_model.vae.norm_num_groups=4",
         "--config.discriminator.base_channels=8", "--config.discriminator.num_layers=2",
         "--config.discriminator.norm_num_groups=4", "--config.data.num_frames=2",
         "--config.data.height=16", "--config.data.width=16", "--config.train.log_every=1",
         "--config.sample.every=0"]


def _config(stage: str):
  c = load_sibling(str(ROOT / "configs" / "x.py"), f"{stage}_tiny").get_config()
  c.random_image_model.vae.update(block_out_channels=(8, 16), norm_num_groups=4)
  c.discriminator.update(base_channels=8, num_layers=2, norm_num_groups=4)
  c.data.update(batch_size=2, num_frames=2, height=16, width=16)
  c.loss.disc_start = 2
  c.optim.update(lr=3e-3, warmup_steps=1)
  c.disc_optim.update(lr=3e-3)
  return c


def _batch(config):
  d = config.data
  video = np.stack([make_clip(i, d.num_frames, d.height, d.width)[0]
                    for i in range(d.batch_size)])
  return {"video": video}


def _leaves(tree):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _init_state(setup, config):
  """(TrainState at step 0 on one device, its shardings)."""
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  param_sh = sharding.shardings_for(setup.logical_axes, mesh, setup.abstract_params,
                                    [tuple(r) for r in config.rules])
  shardings = step_lib.state_shardings(param_sh, setup.stage, setup.optimizer,
                                       setup.abstract_params, mesh)
  return step_lib.init_state(setup.init_params(), setup.stage, setup.optimizer,
                             shardings), shardings


def _train_in_process(name, workdir, image_model="", perceptual_weights=""):
  """setup -> 5 steps of the generic train step on one repeated batch -> export.
  Returns (initial trainable and frozen leaves, final state, per-step metrics)."""
  config = _config(name)
  config.image_model = str(image_model)
  if perceptual_weights:
    config.loss.update(perceptual_weight=0.5, perceptual_weights_path=str(perceptual_weights))
  setup = STAGES[name].setup(config, workdir)
  stage, tx = setup.stage, setup.optimizer
  state, shardings = _init_state(setup, config)
  train0, frozen0 = _leaves(state.trainable), _leaves(state.frozen)
  train_step = step_lib.build_train_step(stage, tx, seed=0, ema_decay=0.9)
  batch = jax.device_put(setup.make_batch(_batch(config)), shardings.step)
  metrics, disc_after_2 = [], None
  for i in range(5):
    state, m = train_step(state, batch)
    metrics.append({k: float(v) for k, v in m.items()})
    if i == 1:
      disc_after_2 = _leaves(state.trainable["discriminator"])
  setup.export(workdir / "export", jax.tree_util.tree_map(np.asarray,
                                                          state.merged(use_ema=True)))
  return train0, frozen0, disc_after_2, state, metrics


@pytest.fixture(scope="module")
def autoencoder_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("autoencoder")
  _tiny_vgg_file(workdir / "vgg.safetensors")  # the perceptual term is on here
  return workdir / "export", _train_in_process("autoencoder", workdir,
                                               perceptual_weights=workdir / "vgg.safetensors")


def _check_training(train0, frozen0, disc_after_2, state, metrics):
  rec = [m["rec_loss"] for m in metrics]
  assert all(np.isfinite(m["loss"]) for m in metrics)
  assert np.mean(rec[-2:]) < rec[0], rec
  # disc_start = 2: zero discriminator gradient (and no update) for steps 0 and 1 ...
  assert [m["grad_norm/discriminator"] for m in metrics[:2]] == [0.0, 0.0]
  assert all(m["d_weight"] == 0.0 and m["d_loss"] == 0.0 for m in metrics[:2])
  for k, v in disc_after_2.items():
    np.testing.assert_array_equal(v, train0[("discriminator",) + k])
  # ... then both play.
  assert metrics[-1]["d_weight"] > 0 and metrics[-1]["grad_norm/discriminator"] > 0
  trained = _leaves(state.trainable)
  assert any(not np.array_equal(v, train0[k]) for k, v in trained.items()
             if k[0] == "discriminator")
  assert int(state.skipped) == 0
  for k, v in _leaves(state.frozen).items():
    np.testing.assert_array_equal(v, frozen0[k])


def test_autoencoder_stage_trains_all_of_it_and_exports_an_image_model(autoencoder_run,
                                                                       monkeypatch):
  export, (train0, frozen0, disc_after_2, state, metrics) = autoencoder_run
  # The whole autoencoder and its discriminator train; only the VGG16 weights are frozen.
  assert {k[0] for k in train0} == {"vae", "discriminator"}
  assert {k[0] for k in frozen0} == {"lpips"}
  _check_training(train0, frozen0, disc_after_2, state, metrics)
  assert all(m["perceptual_loss"] > 0 for m in metrics)
  model = pretrained.load(export)
  assert model.vae_temporal_config is None and model.vae_config.block_out_channels == (8, 16)
  assert set(model.params) == {"unet", "vae", "text_encoder"}
  ema = _leaves(state.ema["vae"])  # the export holds the EMA weights
  for k, v in _leaves(model.params["vae"]).items():
    np.testing.assert_array_equal(v, ema[k])
  # latent_normalization="std" (autoencoder_tiny): SD's 0.18215 gave this new
  # autoencoder's latents a std of ~0.33 (the demo's), a third of the unit variance the
  # diffusion schedule assumes. The export's factor makes the diffusion latents of its
  # statistics clips (the same posterior samples: clip j's frames drawn from
  # fold_in(key(seed), j)) unit-variance.
  config = _config("autoencoder")
  assert config.latent_normalization == "std" and model.vae_config.shift_factor == 0.0
  vae = autoencoder.AutoencoderKL(model.vae_config)
  encode = jax.jit(lambda x, k: vae.apply({"params": model.params["vae"]}, x, k,
                                          method=vae.encode_latents))
  it = inputs.make_iterator(config, export.parent, {}, alone=True)
  clips = np.concatenate([next(it)["video"] for _ in range(
      autoencoder.LATENT_STATISTICS_CLIPS // config.data.batch_size)])
  # Read alone on any process: no collective (the others are not reading; it would
  # wait for them for good), the same clips.
  with monkeypatch.context() as patch:
    patch.setattr(jax, "process_index", lambda *a: 1)
    patch.setattr(inputs.distributed, "wait_for_all",
                  lambda name: pytest.fail(f"a barrier in a read alone: {name}"))
    alone = inputs.make_iterator(config, export.parent, {}, alone=True)
    np.testing.assert_array_equal(next(alone)["video"], clips[:config.data.batch_size])
  z = np.concatenate([np.asarray(encode(
      autoencoder.frames_to_images(clip[None]),
      jax.random.fold_in(jax.random.key(config.seed), j))).ravel()
      for j, clip in enumerate(clips)])
  assert model.vae_config.scaling_factor != 0.18215 and abs(z.std() - 1) < 1e-4, z.std()
  # "mean_std" also shifts by the mean: the same samples, zero-mean and unit-variance
  # (the statistics are of the raw latents, whatever factors the config held before).
  config.latent_normalization = "mean_std"
  shifted = autoencoder.normalized_vae_config(config, export.parent, model.vae_config,
                                              model.params["vae"])
  assert shifted.shift_factor != 0.0
  vae = autoencoder.AutoencoderKL(shifted)
  encode = jax.jit(lambda x, k: vae.apply({"params": model.params["vae"]}, x, k,
                                          method=vae.encode_latents))
  z = np.concatenate([np.asarray(encode(
      autoencoder.frames_to_images(clip[None]),
      jax.random.fold_in(jax.random.key(config.seed), j)), np.float64).ravel()
      for j, clip in enumerate(clips)])
  assert abs(z.mean()) < 1e-4 and abs(z.std() - 1) < 1e-4, (z.mean(), z.std())


def test_decoder_stage_trains_temporal_layers_only_theta_bitwise_frozen(autoencoder_run,
                                                                        tmp_path):
  ae_export, _ = autoencoder_run
  train0, frozen0, disc_after_2, state, metrics = _train_in_process("decoder", tmp_path,
                                                                    ae_export)
  # Trainable: the decoder's temporal layers and the 3-D discriminator; the encoder and
  # the spatial decoder (theta, here the autoencoder stage's export) are frozen.
  assert all(k[0] == "discriminator" or (k[1] == "decoder" and partition.is_temporal(k))
             for k in train0)
  image = _leaves(pretrained.load(ae_export).params["vae"])
  assert {k[1:] for k in frozen0} == set(image)
  for k, v in frozen0.items():
    np.testing.assert_array_equal(v, image[k[1:]])
  _check_training(train0, frozen0, disc_after_2, state, metrics)
  model = pretrained.load(tmp_path / "export")
  assert model.vae_temporal_config == decoder.VAETemporalConfig()
  # The encoder is frozen: the decoder stage keeps the autoencoder's latent factors.
  assert model.vae_config == pretrained.load(ae_export).vae_config


def _env():
  # The resumed run compiles the same step: JAX's persistent cache saves it the time.
  # The session's (tests/conftest.py; its own folder when run otherwise): the trainer's
  # small programs (data placement, metrics, the matmul peak) are loaded from earlier
  # trainer runs of the session instead of compiled again.
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  env.pop("XLA_FLAGS", None)
  return env


def _train(config: str, workdir: Path, *flags: str) -> str:
  proc = subprocess.run(
      [sys.executable, "-m", "videoldm_jax.cli.train", f"--config=configs/{config}",
       f"--workdir={workdir}", *SMALL, *flags],
      cwd=ROOT, env=_env(), capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stderr


def _loss_at_disc_start(setup, config, derived=lambda loss_at, p: ()):
  """(params, batch, the loss and metrics at params, derived(loss_at, params)) of
  `setup`'s stage at step disc_start, where the adversarial terms are on (checked).
  loss_at(p, step=disc_start) -> (loss, metrics) is the stage's loss at the batch and key
  3; `derived` computes more from it (the tests' gradients) in the same program."""
  params = jax.tree_util.tree_map(jnp.asarray, setup.init_params())
  batch = jax.tree_util.tree_map(jnp.asarray, setup.make_batch(_batch(config)))
  key, step = jax.random.key(3), config.loss.disc_start
  loss_at = lambda p, s=step: setup.stage.loss_fn(p, batch, key, s)
  # One program (op by op it dispatched hundreds): with the loss's gradients in it too,
  # XLA computes the loss's forward pass, which they repeat, once (a loss program and
  # a gradient program apart compiled it twice).
  (loss, m), more = jax.jit(lambda p: (loss_at(p), derived(loss_at, p)))(params)
  assert float(m["d_weight"]) > 0
  assert float(m["disc_factor"]) == config.loss.get("disc_factor", 1.0)
  return params, batch, loss, m, more


def _posterior_sample(mean, logvar):
  """mean + exp(logvar / 2) eps, eps from key 3 (the key _loss_at_disc_start's loss took)."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(jax.random.key(3), mean.shape)


def test_autoencoder_loss_is_its_weighted_terms(tmp_path):
  # At step disc_start (on from there): loss = L1 + w_p LPIPS + lambda f L_G + w_kl KL +
  # L_D (f = loss.disc_factor, 0.5 here; the d_loss metric holds f times the hinge
  # loss), KL per pixel value; lambda from the last decoder kernel's gradients of the
  # reconstruction and generator losses; the discriminator's gradient is L_D's alone
  # (the generator term sees D through stop_gradient).
  from videoldm_jax.models.vae import AutoencoderKL, VAEConfig, kl_divergence
  from videoldm_jax.train import gan
  c = _config("autoencoder")
  _tiny_vgg_file(tmp_path / "vgg.safetensors")
  c.loss.update(perceptual_weight=0.5, perceptual_weights_path=str(tmp_path / "vgg.safetensors"),
                kl_weight=0.3, disc_weight=0.7, disc_factor=0.5)
  setup = autoencoder.setup(c, tmp_path / "run")

  def gradients(loss_at, p):
    # The gradients of two outputs each (one reverse pass per pair), and D's of d_loss
    # a step before disc_start.
    conv_out = p["vae"]["decoder"]["conv_out"]
    with_kernel = lambda w: {**p, "vae": {**p["vae"], "decoder": {
        **p["vae"]["decoder"], "conv_out": {**conv_out, "kernel": w}}}}

    def rec_and_gan(w):
      metrics = loss_at(with_kernel(w))[1]
      return metrics["reconstruction_loss"], metrics["g_loss"]

    def total_and_d(d):
      total, metrics = loss_at({**p, "discriminator": d})
      return total, metrics["d_loss"]

    before = lambda d: loss_at({**p, "discriminator": d}, c.loss.disc_start - 1)[1]["d_loss"]
    return (jax.jacrev(rec_and_gan)(conv_out["kernel"]),
            jax.jacrev(total_and_d)(p["discriminator"]),
            jax.grad(lambda v: loss_at({**p, "vae": v})[1]["d_loss"])(p["vae"]),
            jax.value_and_grad(before)(p["discriminator"]))

  params, batch, loss, m, ((g_rec, g_gan), (d_total, d_only), g_vae, (d_before, g_before)) = (
      _loss_at_disc_start(setup, c, gradients))
  np.testing.assert_allclose(float(m["reconstruction_loss"]),
                             float(m["rec_loss"] + 0.5 * m["perceptual_loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(loss), float(
      m["reconstruction_loss"] + m["d_weight"] * 0.5 * m["g_loss"] + 0.3 * m["kl_loss"]
      + m["d_loss"]), rtol=1e-6)
  x = autoencoder.frames_to_images(batch["video"])  # (B*T, H, W, 3)
  vae = AutoencoderKL(VAEConfig.from_dict(dict(c.random_image_model.vae)))
  from videoldm_jax.models.discriminator import DiscriminatorConfig, PatchDiscriminator
  disc = PatchDiscriminator(DiscriminatorConfig.from_dict(dict(c.discriminator)))

  def references(v, d):
    # The posterior; the decoded posterior sample z = mean + exp(logvar / 2) eps, eps
    # from the key; D's logits on the frames and on that reconstruction.
    mean, logvar = vae.apply({"params": v}, x, method=AutoencoderKL.encode)
    rec = vae.apply({"params": v}, _posterior_sample(mean, logvar),
                    method=AutoencoderKL.decode)
    return mean, logvar, rec, [disc.apply({"params": d}, y) for y in (x, rec)]

  # (the references jitted, one program: op by op each dispatched hundreds of small
  # programs, and the sampler drawn eagerly compiled apart)
  mean, logvar, rec, (real, fake) = jax.jit(references)(params["vae"], params["discriminator"])
  np.testing.assert_allclose(float(m["kl_loss"]), float(
      jnp.mean(kl_divergence(mean, logvar)) / np.prod(x.shape[1:])), rtol=1e-5)
  # L1 of the decoded posterior sample.
  np.testing.assert_allclose(float(m["rec_loss"]), float(jnp.mean(jnp.abs(x - rec))),
                             rtol=1e-5)
  # L_D = f times the hinge loss of D's logits on the frames and their reconstructions.
  np.testing.assert_allclose(float(m["d_loss"]), 0.5 * float(gan.hinge_d_loss(real, fake)),
                             rtol=1e-5)
  # Before disc_start: no adversarial term at all, D untouched (its gradient is 0).
  assert float(d_before) == 0.0
  assert not any(np.asarray(g).any() for g in jax.tree_util.tree_leaves(g_before))
  # lambda from the last decoder kernel's gradients, other leaves held (as taming).
  np.testing.assert_allclose(float(m["d_weight"]),
                             float(gan.adaptive_weight(g_rec, g_gan, 0.7)), rtol=1e-4)
  # D's gradient: L_D's alone.
  for a, b in zip(jax.tree_util.tree_leaves(d_total), jax.tree_util.tree_leaves(d_only)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  # ... and L_D reaches no VAE weight (the reconstruction enters it through
  # stop_gradient: else it would push the decoder towards looking fake).
  assert not any(np.asarray(g).any() for g in jax.tree_util.tree_leaves(g_vae))


def test_decoder_loss_shows_clips_to_the_3d_discriminator_and_weights_its_last_layer(
    tmp_path):
  # One clip of three frames (B != T, so a B/T mix-up in folding frames back into clips
  # changes what the 3-D discriminator sees): its logits on the real clip are the
  # discriminator's on the batch as recorded; loss = L1 + lambda f L_G + L_D (no KL: the
  # encoder is frozen), lambda from temporal_conv_out's kernel (LAST_LAYER) times
  # disc_weight.
  from videoldm_jax.models.discriminator import DiscriminatorConfig, VideoPatchDiscriminator
  from videoldm_jax.train import gan
  c = _config("decoder")
  c.data.update(batch_size=1, num_frames=3)
  c.loss.disc_weight = 0.7
  assert decoder.LAST_LAYER[:2] == ("decoder", "temporal_conv_out")

  def rec_and_gan_grads(loss_at, p):
    vp = p["vae"]

    def rec_and_gan(w):
      metrics = loss_at({**p, "vae": autoencoder.with_leaf(vp, decoder.LAST_LAYER, w)})[1]
      return metrics["reconstruction_loss"], metrics["g_loss"]
    return jax.jacrev(rec_and_gan)(autoencoder.get_leaf(vp, decoder.LAST_LAYER))

  params, batch, loss, m, (g_rec, g_gan) = _loss_at_disc_start(
      decoder.setup(c, tmp_path / "run"), c, rec_and_gan_grads)
  disc = VideoPatchDiscriminator(DiscriminatorConfig.from_dict(dict(c.discriminator)))
  # The frozen encoder's posterior is sampled (mean + exp(logvar / 2) eps, eps from the
  # step's key) and decoded through the temporal layers: the L1 of that reconstruction.
  from videoldm_jax.models.temporal import Frames
  from videoldm_jax.models.vae import AutoencoderKL, VAETemporalConfig
  vae = AutoencoderKL(autoencoder.image_model_vae(c, tmp_path / "run")[0],
                      VAETemporalConfig.from_dict(dict(c.vae_temporal)))
  x = autoencoder.frames_to_images(batch["video"])

  def references(v, d):
    # D's logits on the real clip; the decoded posterior sample.
    real = disc.apply({"params": d}, batch["video"].astype(jnp.float32) / 127.5 - 1.0)
    mean, logvar = vae.apply({"params": v}, x, method=AutoencoderKL.encode)
    return real, vae.apply({"params": v}, _posterior_sample(mean, logvar), Frames(3),
                           method=AutoencoderKL.decode)

  # (the references jitted, one program: op by op each dispatched hundreds of small
  # programs)
  real, rec = jax.jit(references)(params["vae"], params["discriminator"])
  np.testing.assert_allclose(float(m["logits_real"]), float(jnp.mean(real)), rtol=1e-5)
  np.testing.assert_allclose(float(loss), float(
      m["reconstruction_loss"] + m["d_weight"] * m["g_loss"] + m["d_loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(m["d_weight"]),
                             float(gan.adaptive_weight(g_rec, g_gan, 0.7)), rtol=1e-4)
  np.testing.assert_allclose(float(m["rec_loss"]), float(jnp.mean(jnp.abs(x - rec))),
                             rtol=1e-5)


def test_gan_stages_refuse_configs_that_cannot_train(tmp_path):
  # Frames the discriminator reduces to an empty logits map: NaN loss at every step.
  c = _config("decoder")
  c.data.update(height=8, width=8)
  with pytest.raises(ValueError, match=r"8x8 frames are too small for the discriminator "
                     r"\(config.discriminator.num_layers=2\)"):
    decoder.setup(c, tmp_path)
  # Not multiples of the VAE factor (2 here): a shape error inside the traced step.
  for stage in (decoder, autoencoder):
    c = _config(stage.__name__.rsplit(".", 1)[-1])
    c.data.update(height=30, width=63)
    with pytest.raises(ValueError, match="30x63 frames: height and width must be multiples "
                       "of the autoencoder's factor 2"):
      stage.setup(c, tmp_path)
  c = _config("autoencoder")
  c.data.update(height=12, width=12)
  c.loss.update(perceptual_weight=0.5, perceptual_weights_path="vgg.safetensors")
  for h, w in ((12, 12), (12, 256)):  # (the shorter side decides: MIN_SIZE 16)
    c.data.update(height=h, width=w)
    with pytest.raises(ValueError, match="too small for the perceptual loss"):
      autoencoder.setup(c, tmp_path)
  # Still images stacked into clips would be shown to the 3-D discriminator as videos.
  c = _config("decoder")
  c.data.image_fraction = 0.25
  with pytest.raises(ValueError, match="decoder stage trains on videos only"):
    decoder.setup(c, tmp_path)
  c = _config("decoder")
  c.train.remat_policy = "bogus"
  with pytest.raises(ValueError, match="remat_policy must be one of"):
    decoder.setup(c, tmp_path)
  c = _config("autoencoder")
  c.latent_normalization = "unit"  # checked at setup, not at the export after training
  with pytest.raises(ValueError, match=r"config.latent_normalization='unit': expected one "
                     r"of \('keep', 'std', 'mean_std'\)"):
    autoencoder.setup(c, tmp_path)


def test_decoder_stage_trainable_parts():
  # Temporal layers and the discriminator; with train_spatial_decoder also the spatial
  # decoder and post_quant_conv; never the encoder or quant_conv.
  paths = [("discriminator", "conv_in", "kernel"), ("vae", "decoder", "up_blocks_0",
           "temporal_res_blocks_0", "conv1", "kernel"), ("vae", "decoder", "conv_out", "kernel"),
           ("vae", "post_quant_conv", "kernel"), ("vae", "encoder", "conv_in", "kernel"),
           ("vae", "quant_conv", "kernel")]
  assert [decoder.is_trainable_fn(False)(p) for p in paths] == [True, True, False, False,
                                                                False, False]
  assert [decoder.is_trainable_fn(True)(p) for p in paths] == [True, True, True, True,
                                                               False, False]


@pytest.mark.parametrize("stage", [autoencoder, decoder], ids=["autoencoder", "decoder"])
def test_gan_stages_log_each_optimisers_learning_rate(stage, tmp_path):
  # metrics lr (config.optim) and lr/discriminator (config.disc_optim), told apart here
  # by their warm-ups and peaks.
  from videoldm_jax.train import optim
  c = _config(stage.__name__.rsplit(".", 1)[-1])
  c.optim.update(lr=1e-3, warmup_steps=0)
  c.disc_optim.update(lr=7e-4, warmup_steps=4)
  schedules = stage.setup(c, tmp_path).lr_schedule
  assert set(schedules) == {"lr", "lr/discriminator"}
  for name, field in (("lr", c.optim), ("lr/discriminator", c.disc_optim)):
    expected = optim.learning_rate(field)
    np.testing.assert_array_equal([schedules[name](s) for s in (0, 2, 7)],
                                  [expected(s) for s in (0, 2, 7)], err_msg=name)
  assert float(schedules["lr/discriminator"](2)) == pytest.approx(3.5e-4)  # half-way up


def test_decoder_stage_remat_policy_recomputes_same_loss(tmp_path):
  # train.remat_policy used to be ignored by the GAN stages. Rematerialised levels show
  # in the program as recomputed convolutions (whether XLA then uses less memory is
  # the backend's business: XLA:CPU's temp bytes did not drop at these sizes, 78.0 vs
  # 82.3 MB at 64x64; the TPU / GPU compilers schedule for memory).
  convs, losses = {}, {}
  for policy in ("none", "full"):
    c = _config("decoder")
    c.train.remat_policy = policy
    setup = decoder.setup(c, tmp_path)
    # The step and batch placement of _train_in_process: policy "none" is then the program
    # test_decoder_stage_trains_temporal_layers_only_theta_bitwise_frozen compiled (a load
    # from the persistent cache); ema_decay plays no part in the loss or the program's
    # convolutions.
    train_step = step_lib.build_train_step(setup.stage, setup.optimizer, seed=0,
                                           ema_decay=0.9)
    state, shardings = _init_state(setup, c)
    batch = jax.device_put(setup.make_batch(_batch(c)), shardings.step)
    # Traced once: the program counted is the one that runs.
    lowered = train_step.lower(state, batch)
    text = lowered.as_text()
    convs[policy] = text.count("stablehlo.convolution") + text.count("custom_call")
    losses[policy] = float(lowered.compile()(state, batch)[1]["loss"])
  assert convs["full"] > convs["none"], convs
  np.testing.assert_allclose(losses["full"], losses["none"], rtol=1e-5)


def test_decoder_stage_through_the_trainer_checkpoints_and_resumes(autoencoder_run,
                                                                   tmp_path):
  ae_export, _ = autoencoder_run
  # On-the-fly procedural clips (resumable like the TFDS pipeline, no dataset to build).
  flags = ["--config.data.kind=procedural", f"--config.image_model={ae_export}",
           "--config.train.ckpt_every=2", "--config.loss.disc_start=3",
           "--config.train.keep_best=1"]
  log = _train("decoder_tiny.py", tmp_path, *flags, "--config.train.num_steps=4",
               "--config.train.export=false")
  assert "step 4: loss" in log and (tmp_path / "checkpoints" / "2").is_dir()
  # keep_best ranks by the reconstruction loss logged since the previous checkpoint,
  # not by the total, which jumps by the discriminator's loss at disc_start.
  lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  rec = {m["step"]: m["reconstruction_loss"] for m in lines}
  assert lines[-1]["loss"] > lines[-1]["reconstruction_loss"] + 0.5  # + d_loss after 3
  ranked = json.loads((tmp_path / "checkpoints" / "4" / "metrics" / "metrics").read_text())
  np.testing.assert_allclose(ranked["loss"], (rec[3] + rec[4]) / 2, rtol=1e-6)
  log = _train("decoder_tiny.py", tmp_path, *flags, "--config.train.num_steps=6")
  assert "resumed from" in log and "start at step 4" in log and "step 6: loss" in log
  video = pretrained.load(tmp_path / "export" / "step_6")
  assert video.vae_temporal_config is not None
  spatial, temporal = partition.split(video.params["vae"])
  assert ("decoder", "temporal_conv_out", "conv", "kernel") in traverse_util.flatten_dict(
      temporal)
  # The frozen encoder and spatial decoder are the autoencoder stage's, bitwise.
  image = _leaves(pretrained.load(ae_export).params["vae"])
  for k, v in _leaves(spatial).items():
    np.testing.assert_array_equal(v, image[k])


def test_export_runs_no_collective(tmp_path, monkeypatch):
  # The trainer exports on process 0 alone while the others wait for it: a collective
  # inside the export (the random image model's "tokenizer written" sync) hung every
  # multi-process autoencoder / decoder run at its end.
  # The autoencoder's latent statistics read the data there too.
  from videoldm_jax import distributed
  setups = {name: STAGES[name].setup(_config(name), tmp_path / name)  # (tokenizers)
            for name in ("decoder", "autoencoder")}

  def collective(*_):
    raise AssertionError("a barrier on one process hangs a multi-process run")
  monkeypatch.setattr(distributed, "wait_for_all", collective)
  for name, setup in setups.items():
    setup.export(tmp_path / name / "export",
                 jax.tree_util.tree_map(np.asarray, setup.init_params()))
  assert pretrained.load(tmp_path / "decoder" / "export").vae_temporal_config is not None
  assert pretrained.load(tmp_path / "autoencoder" / "export").vae_config.scaling_factor != (
      _config("autoencoder").random_image_model.vae.scaling_factor)


def test_a_decoder_export_keeps_the_unet_training_record_apart(tmp_path):
  # A decoder stage on a key-frame export writes a folder that holds both models: its
  # own record went to `training`, which the chain reads as the UNet's (the key-frame
  # calls were checked against the decoder's clip length).
  from videoldm_jax.stages import keyframe
  config = _config("decoder")
  image = pretrained.random_image_ldm(keyframe._random_image_model(config))
  unet_record = {"stage": "keyframe", "num_frames": 8, "frame_stride": 1, "height": 32,
                 "width": 32}
  image.training = unet_record
  keyframe.write_byte_level_tokenizer(str(tmp_path / "tokenizer"))
  config.image_model = str(pretrained.save(tmp_path / "keyframe", image, tmp_path / "tokenizer"))
  setup = decoder.setup(config, tmp_path / "run")
  setup.export(tmp_path / "export", jax.tree_util.tree_map(np.asarray, setup.init_params()))
  out = pretrained.load(tmp_path / "export")
  assert out.training == unet_record
  assert out.decoder_training == pretrained.training_record(config)
  assert out.decoder_training["stage"] == "decoder" and out.decoder_training["num_frames"] == 2
  # The key-frame stage on that folder drops the video decoder, and its record with it.
  config.image_model = str(tmp_path / "export")
  again = keyframe.load_image_model(config, tmp_path)[0]
  assert again.vae_temporal_config is None and again.decoder_training == {}
  # Folders of earlier versions wrote the decoder's record as `training`.
  index_path = tmp_path / "export" / "model_index.json"
  index = json.loads(index_path.read_text())
  index["training"] = index.pop("decoder_training")
  index_path.write_text(json.dumps(index))
  older = pretrained.load(tmp_path / "export")
  assert older.training == {} and older.decoder_training["stage"] == "decoder"
  # ... as did the autoencoder stage's.
  index["training"]["stage"] = "autoencoder"
  index_path.write_text(json.dumps(index))
  older = pretrained.load(tmp_path / "export")
  assert older.training == {} and older.decoder_training["stage"] == "autoencoder"


def test_a_decoder_export_continues_in_the_decoder_stage_and_feeds_a_latent_upsampler(
    tmp_path):
  # The decoder stage started from a decoder-stage export re-initialised its trained
  # temporal layers (the image model's video decoder was dropped for every stage); a
  # latent-space upsampler on such an export failed with a pytree structure error.
  config = _config("decoder")
  setup = decoder.setup(config, tmp_path / "a")
  params = jax.tree_util.tree_map(np.asarray, setup.init_params())
  trained = {k: v + 1.0 if partition.is_temporal(k) else v
             for k, v in traverse_util.flatten_dict(params["vae"]).items()}
  params["vae"] = traverse_util.unflatten_dict(trained)
  setup.export(tmp_path / "export", params)
  config.image_model = str(tmp_path / "export")
  again = traverse_util.flatten_dict(decoder.setup(config, tmp_path / "b").init_params()["vae"])
  temporal = [k for k in trained if partition.is_temporal(k)]
  assert temporal and all(np.array_equal(again[k], trained[k]) for k in temporal)
  # mix_init is only the start of the blend: the export's trained factors are kept
  # (exported at their init + 1; 2.0 differs from both).
  config.vae_temporal.mix_init = 2.0
  again = traverse_util.flatten_dict(decoder.setup(config, tmp_path / "c").init_params()["vae"])
  mixes = [k for k in trained if k[-1] == "mix_factor"]
  assert mixes and all(np.array_equal(again[k], trained[k]) for k in mixes)
  config.vae_temporal.conv_kernel = (3, 3, 3)  # another layout than the export's
  with pytest.raises(ValueError, match="holds a video decoder with vae_temporal .* set them "
                     "equal"):
    decoder.setup(config, tmp_path / "d")
  # The autoencoder stage on it fine-tunes the image autoencoder: the temporal layers go.
  ae = _config("autoencoder")
  ae.image_model = str(tmp_path / "export")
  ae_setup = autoencoder.setup(ae, tmp_path / "ae")
  image_vae = traverse_util.flatten_dict(ae_setup.init_params()["vae"])
  assert set(image_vae) == {k for k in trained if not partition.is_temporal(k)}
  assert all(np.array_equal(v, trained[k]) for k, v in image_vae.items())
  assert jax.tree_util.tree_structure(ae_setup.abstract_params["vae"]) == \
      jax.tree_util.tree_structure(traverse_util.unflatten_dict(image_vae))

  from videoldm_jax.stages import upsampler
  up = load_sibling(str(ROOT / "configs" / "x.py"), "upsampler_tiny").get_config()
  up.update(space="latent", image_model=str(tmp_path / "export"))
  up.data.update(height=16, width=16, num_frames=2, batch_size=2)
  up.patch_size = 16
  up_setup = upsampler.setup(up, tmp_path / "up")
  state, _ = _init_state(up_setup, up)
  assert not any(partition.is_temporal(k) for k in
                 traverse_util.flatten_dict(jax.device_get(state.frozen)["vae"]))
