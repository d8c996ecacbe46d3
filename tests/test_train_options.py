"""Train-step options on a minimal unconditional video UNet fed latents directly:
remat policies, gradient accumulation and bfloat16 compute."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import traverse_util

from videoldm_jax import pretrained
from videoldm_jax.models import partition
from videoldm_jax.models.temporal import TemporalConfig
from videoldm_jax.stages import keyframe
from videoldm_jax.train import optim
from videoldm_jax.train import step as step_lib
from videoldm_jax.video_ldm import VideoLDM

# One UNet level: what these tests check (remat, accumulation, EMA, bf16, the stage's
# loss, labels) is the same at every level; a second level compiled each train step ~35%
# longer. The test that needs levels of two widths sets them itself.
MINI = ml_collections.ConfigDict(dict(
    seed=0, text_encoder=None,
    unet=dict(block_out_channels=(16,), layers_per_block=1, attention_levels=(True,),
              num_heads=2, norm_num_groups=4,
              # No text encoder: attn2 attends to x itself (as diffusers does without
              # a context), so its key width is the channel width at that level.
              cross_attention_dim=16),
    vae=dict(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4),
    scheduler=dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)))
OPTIM = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=1, total_steps=10,
                                       weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
                                       grad_clip=1.0))
IMAGE = pretrained.random_image_ldm(MINI)
LATENTS = np.random.default_rng(0).standard_normal((4, 3, 4, 4, 4)).astype(np.float32)


def _params(ldm, image=IMAGE):
  phi = ldm.init_unet_params(1, where=partition.is_temporal)
  unet = {**traverse_util.flatten_dict(image.params["unet"]), **traverse_util.flatten_dict(phi)}
  return {**image.params, "unet": traverse_util.unflatten_dict(unet)}


def _setup(compute_dtype="float32", remat="none", grad_accum=1, image=IMAGE):
  """(stage, params, initial state, jitted step), trained by SGD at lr 1.

  SGD, not AdamW: the tests of these options compare or read the step's loss, gradients
  and weights, not the optimiser's (the optimiser tests below do), and AdamW's update
  added ~20% to each step's compile. At lr 1 the new weights are w - g: equal weights
  are equal gradients (Adam's first update, ~ -lr sign(g), hid a gradient's size)."""
  ldm = VideoLDM.from_pretrained(image, TemporalConfig(), compute_dtype, remat)
  stage = keyframe.make_stage(ldm, keyframe.KeyframeOptions(), None)
  tx = optax.sgd(1.0)
  params = _params(ldm, image)
  trainable, frozen = step_lib.split(params, stage.is_trainable)
  state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                              frozen=frozen, opt_state=tx.init(trainable), ema=trainable,
                              skipped=jnp.zeros((), jnp.int32))
  fn = step_lib.build_train_step(stage, tx, seed=0, grad_accum=grad_accum)
  return stage, params, jax.tree_util.tree_map(jnp.asarray, state), fn


def _one_step(**kw):
  return _one_step_and_ops(**kw)[0]


def _one_step_and_ops(**kw):
  """((stage, params, state after one step, metrics), the number of convolutions, dots
  and C++ kernel calls in the step's lowered program): traced once, the program counted
  is the one that ran."""
  stage, params, state, fn = _setup(**kw)
  batch = {"latents": jnp.asarray(LATENTS)}
  lowered = fn.lower(state, batch)
  text = lowered.as_text()
  ops = sum(text.count(op) for op in ("stablehlo.convolution", "stablehlo.dot_general",
                                      "custom_call"))
  new_state, metrics = lowered.compile()(state, batch)
  return (stage, params, new_state, metrics), ops


@pytest.fixture(scope="module")
def reference_and_ops():
  return _one_step_and_ops()


@pytest.fixture(scope="module")
def reference(reference_and_ops):
  return reference_and_ops[0]


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_policies_change_memory_not_results(reference_and_ops, remat):
  (_, _, ref_state, ref_metrics), ref_ops = reference_and_ops
  (_, _, state, metrics), ops = _one_step_and_ops(remat=remat)
  np.testing.assert_allclose(float(metrics["loss"]), float(ref_metrics["loss"]), rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(state.trainable),
                  jax.tree_util.tree_leaves(ref_state.trainable)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  # What is not saved is recomputed in the backward pass: the program holds more
  # convolutions / dots ('dots' keeps matmul outputs but recomputes the convolutions).
  assert ops > ref_ops


def test_ema_after_the_first_step(reference):
  # build_train_step's warm-up decay min(ema_decay, (1 + step) / (10 + step)) is 0.1 at
  # step 0, so the EMA moves 90% of the way from the initial to the updated weights.
  stage, params, state, _ = reference
  init, _ = step_lib.split(params, stage.is_trainable)
  for e, p0, p1 in zip(jax.tree_util.tree_leaves(state.ema), jax.tree_util.tree_leaves(init),
                       jax.tree_util.tree_leaves(state.trainable)):
    np.testing.assert_allclose(np.asarray(e), 0.1 * np.asarray(p0) + 0.9 * np.asarray(p1),
                               rtol=1e-5, atol=1e-7)
  assert any(not np.array_equal(np.asarray(e), np.asarray(p0)) for e, p0 in zip(
      jax.tree_util.tree_leaves(state.ema), jax.tree_util.tree_leaves(init)))


@pytest.mark.parametrize("decay", [0.0, 0.5])
def test_ema_decay_caps_the_warm_up_ramp(decay):
  # Past the ramp (1 + n) / (10 + n), which passes 0.5 at update 8, the EMA follows
  # optim.ema_decay; 0 keeps the trained weights. SGD at lr 1 on loss sum(w) moves w by
  # -1 per update, so the reference recurrence is a scalar one.
  tx = optax.sgd(1.0)
  stage = step_lib.Stage("s", lambda p: True,
                         lambda p, b, k, s=None: (jnp.sum(p["w"] * b["x"]), {}))
  w = {"w": jnp.zeros((2,), jnp.float32)}
  ema = {"w": jnp.zeros((2,), jnp.float32)}  # its own buffer: the state is donated
  state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), trainable=w, frozen={},
                              opt_state=tx.init(w), ema=ema, skipped=jnp.zeros((), jnp.int32))
  fn = step_lib.build_train_step(stage, tx, seed=0, ema_decay=decay)
  ema = p = 0.0
  for n in range(20):
    state, _ = fn(state, {"x": jnp.ones((2,), jnp.float32)})
    p -= 1.0
    d = min(decay, (1 + n) / (10 + n))
    ema = d * ema + (1 - d) * p
  np.testing.assert_allclose(np.asarray(state.ema["w"]), [ema] * 2, rtol=1e-5)


def test_stage_losses_use_the_models_objective_and_average_over_videos(monkeypatch):
  # The key-frame and context stages hand denoising_loss the scheduler's prediction type
  # and min_snr_gamma, and average its per-video losses: an SD 2.x v-model trained on
  # eps targets, or a summed loss, passed every other test.
  from videoldm_jax.stages import context, predictor
  image = dataclasses.replace(IMAGE, scheduler={**IMAGE.scheduler,
                                                "prediction_type": "v_prediction"})
  options = keyframe.KeyframeOptions(min_snr_gamma=5.0)
  for module, temporal, make in (
      (keyframe, TemporalConfig(), lambda ldm: keyframe.make_stage(ldm, options, None)),
      (context, TemporalConfig(context_frames=True),
       lambda ldm: context.make_context_stage("predictor", ldm, options, None,
                                              predictor.mask_fn((1.0, 0.0, 0.0))))):
    seen, real = [], module.denoising_loss

    def spy(model_fn, x0, key, schedule, prediction_type, min_snr_gamma, _real=real):
      # A stand-in for the UNet: what is checked is what the stage passes to
      # denoising_loss and does with its result, for any model (the UNet's forward
      # took ~5 s of CPU per stage to compile; the steps above and test_context_stages
      # run it).
      model = lambda x_t, t: 0.5 * x_t
      seen.append((prediction_type, min_snr_gamma, x0.shape,
                   _real(model, x0, key, schedule, prediction_type, min_snr_gamma)))
      return seen[-1][-1]

    monkeypatch.setattr(module, "denoising_loss", spy)
    ldm = VideoLDM.from_pretrained(image, temporal)
    params = {**IMAGE.params, "unet": ldm.init_unet_params(1)}
    # Jitted (op by op the UNet dispatched hundreds of small programs): the spy records
    # the traced per-video losses, returned beside the loss to be read.
    loss, per_video = jax.jit(lambda p: (make(ldm).loss_fn(
        p, {"latents": jnp.asarray(LATENTS)}, jax.random.key(0))[0], seen[-1][-1]))(params)
    (kind, gamma, shape, _), = seen
    assert (kind, gamma, shape, per_video.shape) == ("v_prediction", 5.0, LATENTS.shape, (4,))
    np.testing.assert_allclose(float(loss), float(jnp.mean(per_video)), rtol=1e-6)


def test_gradient_accumulation_averages_microbatch_losses_and_gradients():
  # Microbatch i of step 3 holds rows i, i + 2 and uses key
  # fold_in(fold_in(key(seed), 3), i): the noise and times move with the step. With SGD
  # at lr 1 the update is minus the mean of the microbatches' gradients; the logged
  # (floating) metrics are means too.
  # Without attention: what is checked is the step's split, keys and averaging around
  # any loss (the attention layers compiled the step and the reference ~20% longer).
  cfg = MINI.copy_and_resolve_references()
  cfg.unet.attention_levels = (False,)
  stage, params, state, fn = _setup(grad_accum=2, image=pretrained.random_image_ldm(cfg))
  init, frozen = step_lib.split(params, stage.is_trainable)
  new_state, metrics = fn(state.replace(step=jnp.asarray(3, jnp.int32)),
                          {"latents": jnp.asarray(LATENTS)})
  key = jax.random.fold_in(jax.random.key(0), 3)
  micro = [({"latents": LATENTS[i::2]}, jax.random.fold_in(key, i)) for i in range(2)]
  # The reference, jitted once for both microbatches (op by op it took ~30 s).
  loss_and_grad = jax.jit(jax.value_and_grad(
      lambda t, b, k: stage.loss_fn(step_lib.merge(t, frozen), b, k)[0]))
  losses, grads = zip(*(loss_and_grad(init, b, k) for b, k in micro))
  expected = np.mean([float(x) for x in losses])
  np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["denoise_loss"]), expected, rtol=1e-5)
  want = jax.tree_util.tree_map(lambda p, g0, g1: p - (g0 + g1) / 2, init, *grads)
  for a, b in zip(jax.tree_util.tree_leaves(new_state.trainable),
                  jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_keeps_each_metrics_meaning_and_dtype():
  # Integer metrics (counts) are summed and boolean ones or-ed over the microbatches:
  # averaged, a count of 3 rows logged 1.5 (float32) and a flag set in one microbatch
  # 0.5. Floating ones stay means. A toy stage: compiles in milliseconds.
  def loss_fn(p, b, key, step=None):
    x = b["x"]
    return jnp.mean(x @ p["w"]), {"rows": jnp.int32(x.shape[0]),
                                  "large": jnp.sum(x[:, 0] > 6).astype(jnp.int32),
                                  "any_large": jnp.any(x > 10), "mean_x": jnp.mean(x)}
  stage = step_lib.Stage("s", lambda path: True, loss_fn)
  tx = optax.sgd(0.1)
  x = jnp.arange(12.0).reshape(4, 3)  # x[:, 0] = 0, 3, 6, 9; only row 3 holds x > 10
  got = []
  for n in (1, 2):
    w = {"w": jnp.ones((3,))}
    state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), trainable=w, frozen={},
                                opt_state=tx.init(w), ema={"w": jnp.ones((3,))},
                                skipped=jnp.zeros((), jnp.int32))
    _, metrics = step_lib.build_train_step(stage, tx, seed=0, grad_accum=n)(state, {"x": x})
    got.append({k: (metrics[k].dtype, metrics[k].item())
                for k in ("rows", "large", "any_large", "mean_x", "loss")})
  assert got[0] == {"rows": (jnp.int32, 4), "large": (jnp.int32, 1),
                    "any_large": (jnp.bool_, True), "mean_x": (jnp.float32, 5.5),
                    "loss": (jnp.float32, 16.5)}
  assert got[1] == got[0]


def test_each_step_draws_its_own_key():
  # Without accumulation too, step s uses fold_in(key(seed), s) (the same key every step
  # would draw the same noise and timesteps for each row, all run long).
  stage = step_lib.Stage("s", lambda path: True, lambda p, batch, key, step=None: (
      jnp.sum(p["w"]), {"draw": jax.random.uniform(key)}))
  tx = optax.sgd(0.0)
  w = {"w": jnp.zeros((2,), jnp.float32)}
  state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), trainable=w, frozen={},
                              opt_state=tx.init(w), ema={"w": jnp.zeros((2,))},
                              skipped=jnp.zeros((), jnp.int32))
  fn = step_lib.build_train_step(stage, tx, seed=5)
  draws = []
  for _ in range(2):
    state, metrics = fn(state, {"x": jnp.ones(2)})
    draws.append(float(metrics["draw"]))
  want = [float(jax.random.uniform(jax.random.fold_in(jax.random.key(5), s))) for s in (0, 1)]
  assert draws == want and draws[0] != draws[1]
  # The step, not the count of updates applied: after a skipped step the next one does
  # not redraw the skipped step's noise (and a resumed run draws what it would have).
  state = state.replace(step=jnp.asarray(3, jnp.int32), skipped=jnp.asarray(1, jnp.int32))
  _, metrics = fn(state, {"x": jnp.ones(2)})
  assert float(metrics["draw"]) == float(
      jax.random.uniform(jax.random.fold_in(jax.random.key(5), 3)))


def test_exports_take_the_ema_or_the_trained_weights(tmp_path):
  # export(weights="ema") writes EMA + frozen to step_N, "raw" the trained weights to
  # step_N_raw; only the stage's writer (here: one that keeps what it is given) is not
  # the trainer's own.
  import types

  from videoldm_jax.train import loop
  state = step_lib.TrainState(
      step=jnp.asarray(3, jnp.int32), trainable={"t": jnp.ones(2)}, frozen={"f": jnp.zeros(1)},
      opt_state=(), ema={"t": jnp.full(2, 0.5)}, skipped=jnp.zeros((), jnp.int32))
  written = []

  def write(folder, params):
    folder.mkdir(parents=True)
    written.append(params)
  setup = types.SimpleNamespace(export=write)
  assert loop.export(tmp_path, setup, state, 3).name == "step_3"
  assert loop.export(tmp_path, setup, state, 3, weights="raw").name == "step_3_raw"
  assert (tmp_path / "export" / "step_3").is_dir() and len(written) == 2
  # Again (a retrained run, or process 0 of several): the folder stays, nothing written.
  assert loop.export(tmp_path, setup, state, 3).name == "step_3" and len(written) == 2
  # Whether a step's export exists is asked of the weights named.
  import shutil
  shutil.rmtree(tmp_path / "export" / "step_3")
  assert loop._agreed(3, tmp_path) == (3, False)
  assert loop._agreed(3, tmp_path, "raw") == (3, True)
  ema, raw = written
  for params, t in ((ema, 0.5), (raw, 1.0)):
    np.testing.assert_array_equal(params["t"], [t, t])
    np.testing.assert_array_equal(params["f"], [0.0])


def test_gradient_accumulation_keeps_every_device_busy():
  """With the batch split over 4 devices, each microbatch has rows on all of them: the
  compiled step gathers nothing and each device's matmul takes B / (n * 4) rows."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  stage = step_lib.Stage("s", lambda path: True,
                         lambda p, b, key, step=None: (jnp.mean((b["x"] @ p["w"]) ** 2), {}))
  tx = optax.sgd(0.1)
  params = {"w": np.ones((16, 16), np.float32)}
  shardings = step_lib.state_shardings({"w": NamedSharding(mesh, PartitionSpec())}, stage,
                                       tx, jax.eval_shape(lambda: params), mesh)
  batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
  fn = step_lib.build_train_step(stage, tx, seed=0, grad_accum=2, shardings=shardings,
                                 batch_sharding=batch_sharding)
  state = step_lib.init_state(params, stage, tx, shardings)
  # The EMA starts at the weights, in buffers of its own (the state is donated).
  np.testing.assert_array_equal(np.asarray(state.ema["w"]), params["w"])
  assert state.ema["w"].addressable_data(0).unsafe_buffer_pointer() != \
      state.trainable["w"].addressable_data(0).unsafe_buffer_pointer()
  batch = {"x": jax.device_put(np.ones((8, 16), np.float32), batch_sharding)}
  hlo = fn.lower(state, batch).compile().as_text()
  assert "all-gather" not in hlo
  assert "f32[1,16]{1,0} dot(" in hlo, hlo  # 8 rows / 2 microbatches / 4 devices
  # The old state's buffers are donated to the new one (both at once would double the
  # memory of the weights, Adam's moments and the EMA), on the sharded path the trainer
  # takes and on the plain one the benchmarks take.
  plain = step_lib.build_train_step(stage, tx, seed=0, grad_accum=2)
  for step_fn, old in ((fn, state), (plain, step_lib.init_state(params, stage, tx, shardings))):
    new, _ = step_fn(old, batch)
    assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(
        (old.trainable, old.ema, old.opt_state, old.step)))
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(new))
  with pytest.raises(ValueError, match="batch size 5 is not divisible by grad_accum=2"):
    plain(new, {"x": np.ones((5, 16), np.float32)})


def test_bfloat16_compute_keeps_float32_params_and_close_loss(reference):
  _, _, _, ref_metrics = reference
  stage, params, state, metrics = _one_step(compute_dtype="bfloat16")
  # The UNet's matmuls run in bf16 (nothing in the float32 step does).
  jaxpr = lambda s: str(jax.make_jaxpr(lambda p: s.loss_fn(
      p, {"latents": LATENTS}, jax.random.key(0))[0])(params))
  bf16_jaxpr = jaxpr(stage)  # traced once, read twice
  assert "bf16[" in bf16_jaxpr and "bf16[" not in jaxpr(reference[0])
  bf16_dots = [line for line in bf16_jaxpr.splitlines()
               if ("dot_general" in line or "conv_general_dilated" in line) and "bf16[" in line]
  assert len(bf16_dots) > 10  # the UNet's matmuls and convolutions, not a stray cast
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state.trainable))
  assert bool(metrics["finite"])
  np.testing.assert_allclose(float(metrics["loss"]), float(ref_metrics["loss"]), rtol=0.05)


def test_logged_learning_rate_is_the_one_applied_after_skipped_steps():
  """A skipped (non-finite) step keeps the optimizer state, so its schedule does not
  advance: the logged lr is the schedule at the number of updates applied."""
  schedule = optax.linear_schedule(1.0, 0.0, 10)
  tx = optax.sgd(schedule)
  stage = step_lib.Stage("s", lambda path: True,
                         lambda p, b, key, step=None: (jnp.sum(p["w"] * b["x"]), {}))
  params = {"w": jnp.zeros((2,), jnp.float32)}
  state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), trainable=params, frozen={},
                              opt_state=tx.init(params),
                              ema={"w": jnp.zeros((2,), jnp.float32)},  # own buffer: donated
                              skipped=jnp.zeros((), jnp.int32))
  fn = step_lib.build_train_step(stage, tx, seed=0, lr_schedule=schedule)
  lrs, norms = [], []
  for x in (np.nan, 1.0, 1.0):  # step 1 skipped; steps 2 and 3 are updates 1 and 2
    state, metrics = fn(state, {"x": jnp.full((2,), x, jnp.float32)})
    lrs.append(float(metrics["lr"]))
    norms.append(float(metrics["grad_norm"]))
  assert int(state.skipped) == 1
  np.testing.assert_allclose(norms[1:], [np.sqrt(2)] * 2, rtol=1e-6)  # |(1, 1)|, global L2
  np.testing.assert_allclose(lrs, [1.0, 1.0, 0.9], rtol=1e-6)
  # The applied updates were -lr * grad (grad = x = 1): -1.0 then -0.9.
  np.testing.assert_allclose(np.asarray(state.trainable["w"]), [-1.9, -1.9], rtol=1e-6)
  # The EMA's warm-up decay min(decay, (1 + n) / (10 + n)) counts updates too: 0.1 at
  # the first (0.1 * 0 + 0.9 * -1 = -0.9), 2/11 at the second (2/11 * -0.9 + 9/11 * -1.9
  # = -18.9 / 11); counting the skipped step it was 2/11 then 1/4 (-1.6295).
  np.testing.assert_allclose(np.asarray(state.ema["w"]), [-18.9 / 11] * 2, rtol=1e-6)
  # Stages with two optimisers (the GAN stages) log each one's rate.
  # Each at the applied updates (2; the step is 3): 1 - 2/10 and 2 - 2/5.
  both = step_lib.build_train_step(stage, tx, seed=0, lr_schedule={
      "lr": schedule, "lr/discriminator": optax.linear_schedule(2.0, 0.0, 10)})
  _, metrics = both(state, {"x": jnp.ones((2,), jnp.float32)})
  np.testing.assert_allclose([float(metrics["lr"]), float(metrics["lr/discriminator"])],
                             [0.8, 1.6], rtol=1e-6)


def test_a_finite_loss_with_an_infinite_gradient_is_skipped():
  # sqrt(|w|) at w = 0: the loss is 0, its gradient infinite (as a bf16 gradient that
  # overflows): the update would make the weights -inf. Skipped and counted, nothing
  # changed.
  tx = optax.sgd(0.1)
  stage = step_lib.Stage("s", lambda path: True, lambda p, batch, key, step=None: (
      jnp.sum(jnp.sqrt(jnp.abs(p["w"]))), {}))
  w = {"w": jnp.zeros((2,), jnp.float32)}
  state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), trainable=w, frozen={},
                              opt_state=tx.init(w), ema={"w": jnp.ones((2,))},
                              skipped=jnp.zeros((), jnp.int32))
  state, metrics = step_lib.build_train_step(stage, tx, seed=0)(state, {"x": jnp.ones(2)})
  assert float(metrics["loss"]) == 0.0 and not np.isfinite(float(metrics["grad_norm"]))
  assert not bool(metrics["finite"]) and int(state.skipped) == 1 and int(state.step) == 1
  np.testing.assert_array_equal(state.trainable["w"], [0.0, 0.0])
  np.testing.assert_array_equal(state.ema["w"], [1.0, 1.0])


def test_learning_rate_schedule_warmup_and_none():
  from videoldm_jax.train import optim
  cfg = lambda warmup: ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=warmup, total_steps=10, final_lr_fraction=0.1))
  with_warmup = optim.learning_rate(cfg(2))
  # The cosine runs from the warmup's end to total_steps: halfway (step 6) it is at
  # lr (f + (1 - f) / 2) = 5.5e-4 (a decay over total_steps after the warmup, a common
  # slip with optax's decay_steps, ended 2 steps early: 3.3e-4 there).
  np.testing.assert_allclose([float(with_warmup(s)) for s in (0, 1, 2, 6, 10)],
                             [0.0, 5e-4, 1e-3, 5.5e-4, 1e-4], rtol=1e-6)
  # No warmup: the first update already uses lr (not 0), decaying to the same end.
  none = optim.learning_rate(cfg(0))
  np.testing.assert_allclose([float(none(s)) for s in (0, 5, 10)], [1e-3, 5.5e-4, 1e-4],
                             rtol=1e-6)
  # A warmup as long as the schedule never decays: a run of total_steps ended still
  # warming up (optax stretched the schedule to warmup + 1 steps).
  for warmup in (10, 20):
    with pytest.raises(ValueError, match=rf"warmup_steps={warmup} must be below "
                       r"total_steps=10"):
      optim.learning_rate(cfg(warmup))


def test_schedules_ending_elsewhere_than_the_run_are_reported_per_optimiser(capsys):
  """The decoder stage's discriminator schedule is checked like the generator's: a
  disc_optim.total_steps shorter than the run trained its tail at the final rate
  without a word."""
  from videoldm_jax.train import loop
  config = ml_collections.ConfigDict(dict(
      train=dict(num_steps=100), optim=dict(total_steps=100),
      disc_optim=dict(total_steps=40)))
  loop._check_schedule_length(config)  # noqa: SLF001
  err = capsys.readouterr().err
  assert "disc_optim.total_steps=40: steps 41-100 train at the schedule's final" in err
  assert "optim.total_steps=100" not in err.replace("disc_optim", "")
  config.optim.total_steps, config.disc_optim.total_steps = 400, 100
  loop._check_schedule_length(config)  # noqa: SLF001
  err = capsys.readouterr().err
  assert "decays until optim.total_steps=400; this run stops at train.num_steps=100" in err
  assert "disc_optim" not in err


def test_settings_that_train_the_wrong_way_are_refused_by_field(tmp_path):
  """A negative grad_clip made optax's clip scale every gradient by -1 / |g| (ascent),
  as a negative lr does; an ema_decay outside [0, 1) extrapolated past the weights or
  averaged the whole run; sample fields that cannot sample failed at the first sample,
  after the compile (sample.steps=0 at step `every`; no prompts: ZeroDivisionError);
  a misspelt compute_dtype was a bare KeyError in the decoder stages."""
  from videoldm_jax.config_files import load_sibling
  from videoldm_jax.stages import base
  from videoldm_jax.train import loop
  for change, message in ((dict(grad_clip=-1.0), r"config.optim.grad_clip=-1.0: expected >= 0"),
                          (dict(lr=-0.1), r"config.optim.lr=-0.1: expected >= 0"),
                          (dict(b2=1.0), r"config.optim.b2=1.0: expected in \[0, 1\)"),
                          (dict(weight_decay=-1e-2), r"weight_decay=-0.01: expected >= 0"),
                          # Adam's 0 / 0 on a zero gradient: NaN weights, a finite step.
                          (dict(eps=0.0), r"config.optim.eps=0.0: expected > 0"),
                          # The cosine decay ended below 0 (ascent) or rose.
                          (dict(final_lr_fraction=-0.5), r"final_lr_fraction=-0.5: "
                           r"expected in \[0, 1\]"),
                          (dict(final_lr_fraction=2.0), r"final_lr_fraction=2.0"),
                          (dict(warmup_steps=-5), r"warmup_steps=-5: expected a whole"),
                          (dict(total_steps=0), r"total_steps=0: expected a whole number "
                           ">= 1"),
                          # Adam with b1 = 1: NaN updates, which the step's finite-loss
                          # skip does not see; lr = inf: -inf updates.
                          (dict(b1=1.0), r"config.optim.b1=1.0: expected in \[0, 1\)"),
                          (dict(lr=float("inf")), r"config.optim.lr=inf"),
                          (dict(warmup_steps=2.5), r"warmup_steps=2.5: expected a whole")):
    with pytest.raises(ValueError, match=message):
      optim.make_optimizer(ml_collections.ConfigDict({**OPTIM.to_dict(), **change}))
  optim.make_optimizer(ml_collections.ConfigDict({**OPTIM.to_dict(), "grad_clip": None}))
  with pytest.raises(ValueError, match=r"config.disc_optim.lr=-1.0"):
    optim.make_grouped_optimizer(
        {"g": OPTIM, "d": ml_collections.ConfigDict({**OPTIM.to_dict(), "lr": -1.0})},
        lambda path: "g", fields={"g": "optim", "d": "disc_optim"})
  # The trainer checks both before the image model loads (minutes for SD 1.5's 4 GB).
  configs = Path(__file__).parents[1] / "configs"
  for name, field in (("keyframe_tiny", "optim"), ("decoder_tiny", "disc_optim")):
    config = load_sibling(str(configs / "x.py"), name).get_config()
    config.image_model = str(tmp_path / "absent")
    config[field].lr = -1.0
    with pytest.raises(ValueError, match=rf"config.{field}.lr=-1.0: expected >= 0"):
      loop.train_and_evaluate(config, tmp_path / name)
  for decay in (-0.1, 1.0, 1.5, True, "0.9"):
    with pytest.raises(ValueError, match=rf"config.optim.ema_decay={decay!r}: expected a "
                       r"number in \[0, 1\)"):
      step_lib.check_ema_decay(decay)
  step_lib.check_ema_decay(np.float32(0.99))
  stage = step_lib.Stage("s", lambda p: True, lambda p, b, k, s=None: (jnp.sum(p["w"]), {}))
  for bad in (0, True, 2.0):
    with pytest.raises(ValueError, match=rf"grad_accum={bad!r}: expected an integer >= 1"):
      step_lib.build_train_step(stage, optax.sgd(1.0), seed=0, grad_accum=bad)
  for change, message in ((dict(steps=0), r"config.sample.steps=0: expected an integer >= 1"),
                          (dict(prompts=()), r"config.sample.prompts is empty"),
                          (dict(num_frames=0), r"config.sample.num_frames=0"),
                          (dict(every=-5), r"config.sample.every=-5")):
    sample = ml_collections.ConfigDict(dict(every=2, prompts=("a",), steps=2, num_frames=4))
    sample.update(change)
    with pytest.raises(ValueError, match=message):
      base.check_sample_config(sample)
  base.check_sample_config(ml_collections.ConfigDict(dict(every=0, steps=0, prompts=())))
  # num_context=0 is valid (clips extended without context); below it is not.
  base.check_sample_config(ml_collections.ConfigDict(dict(every=5, steps=2, num_context=0)))
  with pytest.raises(ValueError, match=r"num_context=-1"):
    base.check_sample_config(ml_collections.ConfigDict(dict(every=5, steps=2,
                                                            num_context=-1)))
  # The key-frame stage trains phi of the UNet alone, never a like-named leaf elsewhere.
  assert not keyframe.is_trainable_fn("temporal")(("vae", "temporal_x", "kernel"))
  root = Path(__file__).parents[1]
  up = load_sibling(str(root / "configs" / "x.py"), "upsampler_tiny").get_config()
  up.sample.update(every=2, sampler="ddpmx")
  with pytest.raises(ValueError, match=r"config.sample.sampler='ddpmx': expected one of"):
    loop.stage_setup(up, tmp_path)  # before anything loads
  up.sample.sampler, up.space = "ddim", "latnt"  # (was an AttributeError on a None VAE)
  with pytest.raises(ValueError, match=r"config.space='latnt': expected one of "):
    loop.stage_setup(up, tmp_path)
  up.space, up.min_snr_gamma = "pixel", 0.0  # (refused only when the step was traced)
  with pytest.raises(ValueError, match=r"config.min_snr_gamma=0.0: expected > 0"):
    loop.stage_setup(up, tmp_path)
  dec = load_sibling(str(root / "configs" / "x.py"), "decoder_tiny").get_config()
  dec.train.compute_dtype = "bf16"
  with pytest.raises(ValueError, match=r"train.compute_dtype must be one of \['bfloat16', "
                     r"'float32'\], got 'bf16'"):
    loop.stage_setup(dec, tmp_path)
  image = load_sibling(str(root / "configs" / "x.py"), "image_ldm_tiny").get_config()
  image.mode = "temporal"  # (trained the whole UNet: there are no temporal layers)
  with pytest.raises(ValueError, match=r"config.mode must be 'full', got 'temporal'"):
    loop.stage_setup(image, tmp_path)
  # A tokenizer with ids past the text encoder's table gave all-NaN prompt embeddings.
  key = load_sibling(str(root / "configs" / "x.py"), "keyframe_tiny").get_config()
  key.random_image_model.text_encoder.vocab_size = 300
  with pytest.raises(ValueError, match=r"config.random_image_model.text_encoder: the "
                     r"tokenizer has token id 513 .* vocab_size is 300"):
    loop.stage_setup(key, tmp_path / "key")


def test_optimizer_clips_the_global_gradient_norm():
  # Adam's first update is -lr g / (|g| + eps) per element (bias-corrected m = g,
  # v = g^2); with eps = 1 it depends on the gradient's scale, so clipping shows.
  cfg = OPTIM.copy_and_resolve_references()
  cfg.eps, cfg.weight_decay, cfg.warmup_steps = 1.0, 0.0, 0  # lr(0) = lr, not 0
  tx = optim.make_optimizer(cfg)
  g = {"w": jnp.array([3.0, 4.0])}  # global norm 5 -> [0.6, 0.8] after clipping to 1
  update, _ = tx.update(g, tx.init(g), g)
  lr = float(optim.learning_rate(cfg)(0))
  assert lr == pytest.approx(cfg.lr)
  clipped = np.array([0.6, 0.8])
  # (float32: Adam's bias corrections round at ~3e-6; unclipped would be -lr [0.75, 0.8].)
  np.testing.assert_allclose(np.asarray(update["w"]), -lr * clipped / (clipped + 1.0),
                             rtol=2e-5)


def test_grad_clip_zero_means_no_clipping():
  # (Clipping to 0 would zero every update: a run that silently trains nothing.)
  cfg = OPTIM.copy_and_resolve_references()
  cfg.grad_clip, cfg.warmup_steps, cfg.eps = 0.0, 0, 1e-12
  tx = optim.make_optimizer(cfg)
  g = {"w": jnp.array([3.0, 4.0])}
  update, _ = tx.update(g, tx.init(g), g)
  np.testing.assert_allclose(np.asarray(update["w"]), [-cfg.lr] * 2, rtol=1e-4)


def test_an_empty_trainable_mask_is_refused():
  with pytest.raises(ValueError, match="selects no parameter"):
    step_lib.split({"a": {"w": np.zeros(1)}}, lambda path: False)


def test_merging_trees_that_share_a_path_is_refused():
  # The trainable / frozen and loaded / newly initialised unions took the second tree's
  # leaf for a path both held (a loaded weight silently replaced by a random one).
  a = {"unet": {"conv": {"kernel": np.zeros(1)}, "temporal_1": {"w": np.zeros(1)}}}
  b = {"unet": {"conv": {"kernel": np.ones(1), "bias": np.ones(1)}}}
  with pytest.raises(ValueError,
                     match=r"the trees merged share paths: \['unet/conv/kernel'\]"):
    step_lib.merge(a, b)
  # A leaf in one tree where the other has a sub-tree overlaps as well (in either order).
  leaf = {"unet": {"temporal_1": np.ones(1)}}
  for pair in ((a, leaf), (leaf, a)):
    with pytest.raises(ValueError, match=r"share paths: \['unet/temporal_1'\]"):
      step_lib.merge(*pair)
  merged = step_lib.merge(a, {"unet": {"conv": {"bias": np.ones(1)}}})
  assert traverse_util.flatten_dict(merged).keys() == {
      ("unet", "conv", "kernel"), ("unet", "conv", "bias"), ("unet", "temporal_1", "w")}


def test_weight_decay_is_decoupled_from_adam():
  # With a zero gradient AdamW's whole update is -lr * weight_decay * w.
  cfg = OPTIM.copy_and_resolve_references()
  cfg.weight_decay, cfg.warmup_steps, cfg.grad_clip = 0.5, 0, None
  tx = optim.make_optimizer(cfg)
  w = {"w": jnp.array([2.0, -4.0])}
  update, _ = tx.update({"w": jnp.zeros(2)}, tx.init(w), w)
  np.testing.assert_allclose(np.asarray(update["w"]), -cfg.lr * 0.5 * np.array([2.0, -4.0]),
                             rtol=1e-6)


def test_a_text_free_model_with_attention_at_levels_of_other_widths_trains():
  # A class-conditional model without a text encoder is called without a context:
  # attn2 attends to each level's own tokens, so its key width is that level's, and one
  # cross_attention_dim cannot fit widths 8 and 16 (a UCF-101-style model failed with a
  # parameter shape error).
  cfg = MINI.copy_and_resolve_references()
  cfg.unet.update(block_out_channels=(8, 16), attention_levels=(True, True),
                  num_class_embeds=3)
  image = pretrained.random_image_ldm(cfg)
  ldm = VideoLDM.from_pretrained(image, TemporalConfig())
  stage = keyframe.make_stage(ldm, keyframe.KeyframeOptions(), None)
  phi = ldm.init_unet_params(1, where=partition.is_temporal)
  unet = {**traverse_util.flatten_dict(image.params["unet"]), **traverse_util.flatten_dict(phi)}
  params = {**image.params, "unet": traverse_util.unflatten_dict(unet)}
  assert set(traverse_util.flatten_dict(params["unet"])) == set(
      traverse_util.flatten_dict(ldm.abstract_params()["unet"]))
  batch = {"latents": LATENTS, "labels": np.array([0, 1, 2, 0])}
  # A latent cache's text embeddings are not for it (they crashed the step).
  cached = {**batch, "context": np.ones((4, 1, 16), np.float32)}
  # Both losses in one jitted program (op by op the UNet dispatched hundreds of small
  # programs, each compiled apart).
  loss, cached_loss = jax.jit(lambda p: tuple(
      stage.loss_fn(p, b, jax.random.key(0))[0] for b in (batch, cached)))(params)
  assert np.isfinite(float(loss))
  assert float(cached_loss) == float(loss)


def test_bfloat16_gradients_of_mixing_factors_and_biases():
  """In bf16 the mixing factor's gradient is the small difference of two large sums
  (the temporal branch starts near the identity): rounding each to bf16 lost it (15.0
  for 4.1). A bias's gradient is dy summed over every other axis, which XLA:CPU summed
  in bf16 (8.6 for 25.2). Both are now summed in float32."""
  from videoldm_jax.models import layers
  from videoldm_jax.models.temporal import mix
  from videoldm_jax.models.vae import mix_temporal
  r = np.random.default_rng(0)
  xs = r.standard_normal((8, 16, 16, 64)).astype(np.float32) + 1.0
  xt = xs + 0.02 * r.standard_normal(xs.shape).astype(np.float32)
  dy = r.standard_normal(xs.shape).astype(np.float32) + 0.5
  xs16, xt16 = (jnp.asarray(a, jnp.bfloat16) for a in (xs, xt))
  m = jnp.array([0.5], jnp.float32)
  for fn in (mix, mix_temporal):
    g = lambda a, b: jax.grad(lambda m: jnp.sum(fn(a, b, m, None).astype(jnp.float32) * dy))(m)
    exact = float(g(xs16.astype(jnp.float32), xt16.astype(jnp.float32))[0])
    np.testing.assert_allclose(float(jax.jit(g)(xs16, xt16)[0]), exact, rtol=0.05)
  conv = layers.conv2d(32, 3, name="c", dtype=jnp.bfloat16)
  x = jnp.asarray(r.standard_normal((8, 32, 32, 32)), jnp.bfloat16)
  params = nn.meta.unbox(conv.init(jax.random.key(0), x))
  dy = jnp.asarray(r.standard_normal((8, 32, 32, 32)) * 0.1 + 0.003, jnp.float32)
  grad = lambda dtype, x: jax.grad(lambda p: jnp.sum(layers.conv2d(32, 3, name="c", dtype=dtype)
                                                     .apply(p, x).astype(jnp.float32) * dy))(
      params)["params"]["bias"]
  ref = grad(jnp.float32, x.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(grad(jnp.bfloat16, x)), np.asarray(ref), rtol=0.05,
                             atol=0.02 * float(jnp.abs(ref).max()))


def test_bfloat16_gradients_of_the_timestep_and_frame_embeddings():
  """An embedding added to every pixel, h + t[:, None, None, :], gets dh summed over the
  pixels: in bf16 that sum stalled (time_emb_proj's gradient 0.28 (spatial ResBlock)
  and 0.35 (temporal) off in relative norm; now 0.002, the rounding of the rest)."""
  from flax import traverse_util
  from videoldm_jax.models.temporal import (Frames, TemporalResBlock,
                                            TemporalTransformerBlock)
  from videoldm_jax.models.unet import ResBlock
  r = np.random.default_rng(1)

  def rel_errs(module, args, names):
    params = nn.meta.unbox(module(jnp.float32).init(jax.random.key(0), *args))
    # Perturbed: the temporal ResBlock's zero-initialised conv2 passes no gradient.
    params = jax.tree.map(lambda p: p + 0.05 * r.standard_normal(p.shape), params)
    probe = 1.0 + 0.1 * r.standard_normal(
        jax.eval_shape(module(jnp.float32).apply, params, *args).shape)

    def grads(dtype):
      cast = [a.astype(dtype) if isinstance(a, jax.Array) else a for a in args]
      # Jitted: op by op the backward pass dispatched hundreds of small programs.
      return traverse_util.flatten_dict(jax.jit(jax.grad(lambda p: jnp.sum(
          module(dtype).apply(p, *cast).astype(jnp.float32) * probe)))(params)["params"],
          sep="/")
    a, b = grads(jnp.float32), grads(jnp.bfloat16)
    return [float(jnp.linalg.norm(b[k] - a[k]) / jnp.linalg.norm(a[k])) for k in names]

  normal = lambda *shape: jnp.asarray(r.standard_normal(shape), jnp.float32)
  emb = ["time_emb_proj/bias", "time_emb_proj/kernel"]
  frames = Frames(num_frames=4)
  errs = rel_errs(lambda dtype: ResBlock(64, dtype=dtype), (normal(2, 64, 64, 64),
                                                           normal(2, 32)), emb)
  errs += rel_errs(lambda dtype: TemporalResBlock(TemporalConfig(), dtype=dtype),
                   (normal(8, 32, 32, 64), normal(8, 32), frames), emb)
  errs += rel_errs(lambda dtype: TemporalTransformerBlock(TemporalConfig(), 2, dtype=dtype),
                   (normal(8, 1024, 64), None, frames),
                   ["pos_linear_2/bias", "pos_linear_2/kernel"])
  assert max(errs) < 0.02, errs


def test_batches_of_a_class_conditional_model_check_their_labels():
  # A label past the table gave NaN (every step skipped, reported as divergence); -1
  # wrapped to the last class; a misspelt label_field failed inside the UNet.
  make = keyframe.batch_maker(None, 0, num_classes=3, label_field="action")
  assert make({"latents": LATENTS[:2], "labels": np.array([0, 2])})["labels"].tolist() == [0, 2]
  for bad in ([0, 3], [-1, 1]):
    with pytest.raises(ValueError, match=r"config.data.label_field='action': labels \[-?\d\] "
                       r"lie outside the UNet's classes 0..2"):
      make({"latents": LATENTS[:2], "labels": np.array(bad)})
  with pytest.raises(ValueError, match="hold no labels: config.data.label_field='action' "
                     "names no field"):
    make({"latents": LATENTS[:2]})
  assert "labels" not in keyframe.batch_maker(None, 0)({"latents": LATENTS[:2]})
  # Image examples' per-frame labels are checked too (they are what the UNet reads).
  with pytest.raises(ValueError, match=r"labels \[3\] lie outside the UNet's classes 0..2"):
    make({"latents": LATENTS[:2], "labels": np.array([0, 1]),
          "frame_labels": np.array([[0, 0, 0], [1, 3, 1]])})


def test_pixels_reach_the_vae_in_its_range():
  # uint8 0..255 -> [-1, 1], the range the image VAE was trained on (frame by frame).
  ldm = VideoLDM.from_pretrained(IMAGE, TemporalConfig())
  video = np.random.default_rng(2).integers(0, 256, (2, 3, 8, 8, 3), dtype=np.uint8)
  got = keyframe.encode_video(ldm.vae(), IMAGE.params["vae"], jnp.asarray(video), None)
  frames = jnp.asarray(video.reshape(6, 8, 8, 3), jnp.float32) * (2 / 255) - 1
  want = ldm.vae().apply({"params": IMAGE.params["vae"]}, frames,
                         method=type(ldm.vae()).encode_latents)
  assert got.shape == (2, 3) + want.shape[1:]
  np.testing.assert_allclose(np.asarray(got).reshape(want.shape), np.asarray(want),
                             rtol=1e-5, atol=1e-6)


def test_image_examples_condition_each_frame_on_its_own_clip():
  # Frames of an image example come from different clips: the image LDM stage trains
  # each on its own caption and label (it used frame 0's for all), and the video UNet
  # takes per-frame labels.
  from videoldm_jax.stages import image_ldm
  batch = {"latents": LATENTS[:2], "labels": np.array([0, 1]),
           "frame_labels": np.array([[0, 2, 1], [1, 1, 1]]),
           "tokens": np.array([[7, 7], [8, 8]]),
           "frame_tokens": np.arange(12).reshape(2, 3, 2)}
  out = image_ldm.frames_as_images(batch)
  assert out["latents"].shape == (6, 1, 4, 4, 4)
  # clip-major, as the labels and tokens: image i is frame i % 3 of clip i // 3
  np.testing.assert_array_equal(out["latents"][:, 0],
                                LATENTS[:2].reshape((6,) + LATENTS.shape[2:]))
  assert out["labels"].tolist() == [0, 2, 1, 1, 1, 1]
  np.testing.assert_array_equal(out["tokens"], np.arange(12).reshape(6, 2))
  assert keyframe.batch_labels(batch).tolist() == [0, 2, 1, 1, 1, 1]
  # Video examples (no per-frame fields): each frame takes its clip's caption and label,
  # clip-major (image i is frame i % 3 of clip i // 3).
  plain = image_ldm.frames_as_images({k: batch[k] for k in ("latents", "labels", "tokens")})
  assert plain["labels"].tolist() == [0, 0, 0, 1, 1, 1]
  assert plain["tokens"].tolist() == [[7, 7]] * 3 + [[8, 8]] * 3
  assert keyframe.batch_labels({"labels": np.array([0, 1])}).tolist() == [0, 1]
  # Per-video labels repeated equal the same labels given per frame, bit for bit.
  cfg = MINI.copy_and_resolve_references()
  cfg.unet.update(num_class_embeds=3)
  image = pretrained.random_image_ldm(cfg)
  ldm = VideoLDM.from_pretrained(image, TemporalConfig())
  unet = ldm.unet()
  params = traverse_util.unflatten_dict({**traverse_util.flatten_dict(image.params["unet"]),
                                         **traverse_util.flatten_dict(
                                             ldm.init_unet_params(1, where=partition.is_temporal))})
  x, t = jnp.asarray(LATENTS[:2]), jnp.array([10, 500])
  # Jitted (one program per labels shape): op by op the UNet dispatched hundreds of small
  # programs, each compiled apart.
  forward = jax.jit(lambda p, labels: unet.apply({"params": p}, x, t, None, labels))
  apply = lambda labels: forward(params, jnp.asarray(labels))
  np.testing.assert_array_equal(apply([0, 2]), apply([0, 0, 0, 2, 2, 2]))
  assert not np.allclose(apply([0, 2]), apply([0, 1, 0, 2, 2, 2]))
