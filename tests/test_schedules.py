"""Noise schedules, parametrisations and the training loss against diffusers / hand maths."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import max_rel_err
from videoldm_jax.diffusion import losses, parametrization as param, schedules

diffusers = pytest.importorskip("diffusers")

KINDS = [("scaled_linear", "scaled_linear"), ("linear", "linear"), ("cosine", "squaredcos_cap_v2")]


@pytest.mark.parametrize("ours,theirs", KINDS)
@pytest.mark.parametrize("cls_name", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("n,b0,b1", [(1000, 0.00085, 0.012), (500, 0.0001, 0.02)])
def test_betas_and_alphas_cumprod_match_diffusers(torch_cpu, ours, theirs, cls_name, n, b0, b1):
  ref = getattr(diffusers, cls_name)(num_train_timesteps=n, beta_schedule=theirs,
                                     beta_start=b0, beta_end=b1)
  s = schedules.make_schedule(ours, n, b0, b1)
  assert s.betas.dtype == jnp.float32 and s.alphas_cumprod.dtype == jnp.float32
  assert s.num_train_timesteps == n
  # ABSOLUTE tolerances. Our betas are formed in float64 and rounded to float32 once, and
  # abar is the float64 product of those float32 betas, rounded once. diffusers takes the
  # 1000-term product in float32, which drifts from the exact one by up to 4.7e-7
  # absolute / 1.1e-6 relative (measured in float64 for scaled_linear); ours stays within
  # 6e-8 relative. Hence a 1e-6 absolute bound, and a relative one of 2e-6 that covers
  # diffusers' own drift.
  np.testing.assert_allclose(np.asarray(s.betas), ref.betas.numpy(), rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(s.alphas_cumprod), ref.alphas_cumprod.numpy(),
                             rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(s.alphas_cumprod), ref.alphas_cumprod.numpy(),
                             rtol=2e-6, atol=0)


def test_rescale_zero_terminal_snr_matches_diffusers(torch_cpu):
  ref = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                beta_end=0.012, rescale_betas_zero_snr=True)
  s = schedules.make_schedule("scaled_linear", rescale_zero_snr=True)
  np.testing.assert_allclose(np.asarray(s.alphas_cumprod), ref.alphas_cumprod.numpy(),
                             rtol=0, atol=1e-6)
  assert float(s.alphas_cumprod[-1]) == 0.0
  assert float(schedules.snr(s, jnp.array(999))) == 0.0
  # Also on a config's trained_betas (the SD 2.x-style zero-SNR fine-tunes).
  cfg = {"trained_betas": diffusers.DDIMScheduler(
      beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).betas.tolist()}
  plain, _ = schedules.schedule_from_diffusers_config(cfg)
  assert float(plain.alphas_cumprod[-1]) > 0
  zero, _ = schedules.schedule_from_diffusers_config({**cfg, "rescale_betas_zero_snr": True})
  np.testing.assert_allclose(np.asarray(zero.alphas_cumprod), ref.alphas_cumprod.numpy(),
                             rtol=0, atol=1e-6)


def test_alpha_sigma_snr_q_sample_broadcast(torch_cpu):
  torch = torch_cpu
  s = schedules.make_schedule("scaled_linear")
  t = jnp.array([0, 17, 500, 999])
  alpha, sigma = schedules.alpha_sigma(s, t)
  abar = np.asarray(s.alphas_cumprod)[np.asarray(t)]
  np.testing.assert_allclose(np.asarray(alpha), np.sqrt(abar), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(alpha ** 2 + sigma ** 2), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(schedules.snr(s, t)), abar / (1 - abar), rtol=1e-5)
  # Channels-last video latents (B, F, H, W, C): coefficients broadcast over all trailing dims.
  rng = np.random.default_rng(0)
  x0, noise = (rng.standard_normal((4, 3, 5, 6, 4)).astype(np.float32) for _ in range(2))
  ours = schedules.q_sample(s, jnp.asarray(x0), t, jnp.asarray(noise))
  ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                beta_end=0.012).add_noise(
      torch.from_numpy(x0), torch.from_numpy(noise), torch.tensor(np.asarray(t)))
  assert max_rel_err(ours, ref.numpy()) < 1e-6


def test_schedule_from_diffusers_config(torch_cpu):
  sd = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None, "prediction_type": "v_prediction"}
  s, cfg = schedules.schedule_from_diffusers_config(sd)
  np.testing.assert_array_equal(np.asarray(s.betas),
                                np.asarray(schedules.make_schedule("scaled_linear").betas))
  # No timestep_spacing in the file: None, so each sampler takes its diffusers default.
  assert cfg == schedules.SamplingConfig(
      prediction_type="v_prediction", timestep_spacing=None, steps_offset=1,
      final_alpha_cumprod=float(s.alphas_cumprod[0]), clip_sample=None)
  # A config as diffusers itself writes it (every key, DDIM defaults: clip on, linear).
  ddim = dict(diffusers.DDIMScheduler(timestep_spacing="trailing").config)
  s2, cfg2 = schedules.schedule_from_diffusers_config(ddim)
  np.testing.assert_allclose(np.asarray(s2.betas), np.linspace(1e-4, 0.02, 1000), atol=1e-8)
  assert cfg2.clip_sample == 1.0 and cfg2.final_alpha_cumprod == 1.0
  assert cfg2.timestep_spacing == "trailing"
  # Keys a file leaves out take DDIMScheduler's defaults (steps_offset 0, epsilon).
  defaults = diffusers.DDIMScheduler().config
  empty_schedule, empty = schedules.schedule_from_diffusers_config({})
  assert (empty.steps_offset, empty.prediction_type) == (defaults.steps_offset,
                                                         defaults.prediction_type)
  # ... the schedule too (linear, 1e-4 to 0.02) and set_alpha_to_one (True).
  np.testing.assert_allclose(np.asarray(empty_schedule.betas),
                             diffusers.DDIMScheduler().betas.numpy(), rtol=0, atol=1e-8)
  assert empty.final_alpha_cumprod == 1.0 and defaults.set_alpha_to_one
  # clip_sample left out is off; on without a clip_sample_range, diffusers' 1.0.
  assert empty.clip_sample is None
  assert schedules.schedule_from_diffusers_config({"clip_sample": True})[1].clip_sample == 1.0
  # Any real number (a NumPy float32 or integer was refused as "not a finite number").
  for value in (np.float32(1.5), np.int64(2), 2):
    clip = schedules.schedule_from_diffusers_config(
        {"clip_sample": True, "clip_sample_range": value})[1].clip_sample
    assert clip == float(value) and type(clip) is float


@pytest.mark.parametrize("field,value", [
    ("beta_schedule", "sigmoid"), ("prediction_type", "flow_prediction"),
    ("timestep_spacing", "karras"), ("thresholding", True), ("use_karras_sigmas", True),
    ("variance_type", "learned_range"), ("solver_order", 3), ("lambda_min_clipped", -5.1),
    ("final_sigmas_type", "sigma_min"), ("euler_at_final", True),
    ("variance_type", "fixed_large"), ("clip_sample_range", 0.0),
    ("clip_sample_range", -1.0), ("clip_sample_range", float("nan")),
    ("steps_offset", 1.5), ("steps_offset", -1), ("steps_offset", True),
    ("steps_offset", "1")])
def test_schedule_from_diffusers_config_rejects(field, value):
  # (clip_sample_range <= 0 or NaN collapsed every DDIM / DDPM sample to 0, -1 or NaN)
  with pytest.raises(ValueError, match=field):
    schedules.schedule_from_diffusers_config({"beta_schedule": "linear", field: value,
                                              "clip_sample": True})


@pytest.mark.parametrize("cls,field", [
    ("EDMEulerScheduler", "sigma_data"), ("EDMDPMSolverMultistepScheduler", "sigma_data"),
    ("FlowMatchEulerDiscreteScheduler", "shift"), ("EulerDiscreteScheduler", "timestep_type")])
def test_other_noise_processes_are_refused_on_load_and_save(tmp_path, cls, field):
  # Their configs have no beta_schedule: they read as linear betas (a model converted
  # with one sampled noise), and a save dropped the telling keys before its check.
  from videoldm_jax import pretrained
  kw = {"timestep_type": "continuous"} if field == "timestep_type" else {}
  config = dict(getattr(diffusers, cls)(**kw).config)
  with pytest.raises(ValueError, match=f"unsupported scheduler config: {field}="):
    schedules.schedule_from_diffusers_config(config)
  model = pretrained.PretrainedLDM(None, None, None, config, {})
  with pytest.raises(ValueError, match=f"{field}="):
    pretrained.save(tmp_path / "out", model)
  assert not (tmp_path / "out").exists()
  # The same keys at their discrete-schedule values (DPM-Solver's flow switch off,
  # Euler's default timesteps) are no reason to refuse.
  for ok in ("DPMSolverMultistepScheduler", "EulerDiscreteScheduler"):
    schedules.schedule_from_diffusers_config(dict(getattr(diffusers, ok)().config))


def test_diffusers_config_sizes_and_dtypes():
  # num_train_timesteps is read for named schedules too; trained_betas must have that
  # many; the float64 product gives abar (no accumulated float32 error); the loss is
  # float32 and the noise of the asked dtype.
  diffusers = pytest.importorskip("diffusers")
  config = dict(diffusers.DDIMScheduler(num_train_timesteps=500,
                                        beta_schedule="scaled_linear").config)
  assert schedules.schedule_from_diffusers_config(config)[0].num_train_timesteps == 500
  with pytest.raises(ValueError, match=r"trained_betas has shape \(3,\), "
                     "num_train_timesteps=4"):
    schedules.schedule_from_diffusers_config({"num_train_timesteps": 4,
                                              "trained_betas": [0.1] * 3})
  betas = np.asarray(schedules.make_schedule("scaled_linear").betas)
  np.testing.assert_array_equal(
      np.asarray(schedules.schedule_from_betas(betas).alphas_cumprod),
      np.cumprod(1 - betas.astype(np.float64)).astype(np.float32))
  s = schedules.make_schedule("linear")
  pred = jnp.full((2, 8), 1.001, jnp.bfloat16)
  loss = losses.diffusion_loss(pred, jnp.ones((2, 8), jnp.bfloat16), jnp.array([0, 1]), s,
                               "epsilon")
  assert loss.dtype == jnp.float32
  assert schedules.gaussian_noise(jax.random.key(0), (2, 3), jnp.bfloat16).dtype == jnp.bfloat16


def test_impossible_betas_are_refused():
  # Betas past [0, 1) or NaN gave a negative or NaN abar: every training step was then
  # skipped as non-finite, which looked like divergence.
  for betas, shown in (([0.5, 1.5], "[1.5] at steps [1]"), ([-0.1, 0.2], "[-0.1"),
                       ([0.1, float("nan")], "[nan] at steps [1]"),
                       ([1.0, 0.5], "[1.0] at steps [0]")):
    with pytest.raises(ValueError, match=r"scheduler config trained_betas: every beta must "
                       r"lie in \[0, 1\) \(1 only at the last step\), got " + re.escape(shown)):
      schedules.schedule_from_diffusers_config({"num_train_timesteps": 2,
                                                "trained_betas": betas})
  # With the zero-SNR rescale the betas are checked as written (the rescale turned them
  # into NaN or other values before).
  with pytest.raises(ValueError, match=re.escape("got [1.5] at steps [1]")):
    schedules.schedule_from_diffusers_config({"num_train_timesteps": 3,
                                              "trained_betas": [0.1, 1.5, 0.2],
                                              "rescale_betas_zero_snr": True})
  with pytest.raises(ValueError, match=r"beta_end=1.5: every beta .* got \[1.5\] at steps "
                     r"\[2\]"):
    schedules.make_schedule("linear", 3, 0.1, 1.5, rescale_zero_snr=True)
  with pytest.raises(ValueError, match="rescale_betas_zero_snr needs at least 2 timesteps"):
    schedules.make_schedule("linear", 1, rescale_zero_snr=True)
  with pytest.raises(ValueError, match=r"num_train_timesteps=1000.5, expected a whole"):
    schedules.schedule_from_diffusers_config({"num_train_timesteps": 1000.5})
  schedules.schedule_from_betas([0.5, 1.0])  # zero terminal SNR: 1 last is fine
  with pytest.raises(ValueError, match=r"a linear schedule from beta_start=0.5, "
                     r"beta_end=1.5: every beta"):
    schedules.make_schedule("linear", 10, 0.5, 1.5)
  with pytest.raises(ValueError, match=r"num_train_timesteps=0: expected an integer >= 1"):
    schedules.make_schedule("linear", 0)


def test_schedule_is_a_pytree():
  s = schedules.make_schedule("cosine")
  leaves, treedef = jax.tree_util.tree_flatten(s)
  assert len(leaves) == 2
  assert jax.jit(lambda sch: sch.alphas_cumprod[3])(s) == s.alphas_cumprod[3]
  assert jax.tree_util.tree_unflatten(treedef, leaves).num_train_timesteps == 1000


@pytest.mark.parametrize("kind", param.PREDICTION_TYPES)
def test_parametrisations_are_consistent(kind):
  rng = np.random.default_rng(1)
  x0, eps = (jnp.asarray(rng.standard_normal((2, 3, 4, 4)), jnp.float32) for _ in range(2))
  alpha, sigma = jnp.float32(0.6), jnp.float32(0.8)
  x_t = alpha * x0 + sigma * eps
  pred = param.target(kind, x0, eps, alpha, sigma)
  np.testing.assert_allclose(param.to_x0(pred, x_t, alpha, sigma, kind), x0, atol=1e-5)
  np.testing.assert_allclose(param.to_eps(pred, x_t, alpha, sigma, kind), eps, atol=1e-5)
  np.testing.assert_allclose(param.to_v(pred, x_t, alpha, sigma, kind),
                             alpha * eps - sigma * x0, atol=1e-5)
  for dst in param.PREDICTION_TYPES:
    np.testing.assert_allclose(param.convert(pred, x_t, alpha, sigma, kind, dst),
                               param.target(dst, x0, eps, alpha, sigma), atol=1e-5)
  with pytest.raises(ValueError, match="prediction_type"):
    param.to_x0(pred, x_t, alpha, sigma, "flow")


# Hand derivation for the two-step schedule betas = (0.2, 0.5):
#   abar_0 = 0.8, abar_1 = 0.8 * 0.5 = 0.4;  snr = abar / (1 - abar) = (4, 2/3).
# gamma = 1: eps  min(snr,1)/snr      = (1/4, (2/3)/(2/3))        = (0.25, 1)
#            v    min(snr,1)/(snr+1)  = (1/5, (2/3)/(5/3))        = (0.2, 0.4)
#            x0   min(snr,1)          = (1, 2/3)
# gamma = 5: eps  = (4/4, 1) = (1, 1);  v = (4/5, 0.4);  x0 = (4, 2/3).
MIN_SNR_CASES = [
    (1.0, "epsilon", [0.25, 1.0]), (1.0, "v_prediction", [0.2, 0.4]),
    (1.0, "sample", [1.0, 2 / 3]), (5.0, "epsilon", [1.0, 1.0]),
    (5.0, "v_prediction", [0.8, 0.4]), (5.0, "sample", [4.0, 2 / 3])]


@pytest.mark.parametrize("gamma,kind,expected", MIN_SNR_CASES)
def test_min_snr_weights_by_hand(gamma, kind, expected):
  s = schedules.schedule_from_betas([0.2, 0.5])
  np.testing.assert_allclose(np.asarray(s.alphas_cumprod), [0.8, 0.4], rtol=1e-6)
  t = jnp.array([0, 1])
  w = losses.min_snr_weight(schedules.snr(s, t), kind, gamma)
  np.testing.assert_allclose(np.asarray(w), expected, rtol=1e-6)
  # The weight multiplies the per-example MSE: an error of exactly 2 everywhere gives
  # 4 w (squared: an absolute error would give 2 w).
  target = jnp.zeros((2, 3, 2, 2, 4))
  loss = losses.diffusion_loss(target + 2.0, target, t, s, kind, gamma)
  np.testing.assert_allclose(np.asarray(loss), 4 * np.asarray(expected), rtol=1e-6)


def test_min_snr_eps_weight_finite_at_zero_snr():
  w = losses.min_snr_weight(jnp.array([0.0, 1e-3]), "epsilon", 5.0)
  np.testing.assert_array_equal(np.asarray(w), [1.0, 1.0])



def test_out_of_range_loss_options_are_refused():
  # Accepted before: gamma 0 zeroed every weight (a run that changed nothing), a negative
  # gamma climbed the loss, cond_drop_prob 1.5 dropped every caption.
  from videoldm_jax.stages import keyframe
  for gamma in (0.0, -5.0):
    with pytest.raises(ValueError, match=f"min_snr_gamma={gamma}: expected > 0"):
      losses.min_snr_weight(jnp.array([1.0]), "epsilon", gamma)
    with pytest.raises(ValueError, match=f"config.min_snr_gamma={gamma}: expected > 0"):
      keyframe.KeyframeOptions(min_snr_gamma=gamma)
  for p in (1.5, -0.1):
    with pytest.raises(ValueError, match=rf"config.cond_drop_prob={p}: expected a "
                       r"probability in \[0, 1\]"):
      keyframe.KeyframeOptions(cond_drop_prob=p)
  keyframe.KeyframeOptions(cond_drop_prob=1.0, min_snr_gamma=5.0)  # the edges are valid


def test_denoising_loss_draws_tau_and_eps_from_their_own_keys_and_weights_them():
  # tau from split(key)[0], eps from split(key)[1] (one key correlated them); an x0
  # model predicting 0 for x0 = 1 has mse 1 per example, times its min-SNR weight.
  s = schedules.schedule_from_betas([0.2, 0.5])  # snr 4 at t = 0, 2/3 at t = 1
  x0, key, seen = jnp.ones((6, 2, 2, 1)), jax.random.key(4), {}

  def model_fn(x_t, t):
    seen.update(x_t=x_t, t=t)
    return jnp.zeros_like(x_t)

  loss = losses.denoising_loss(model_fn, x0, key, s, "sample", 1.0)
  t_key, n_key = jax.random.split(key)
  t = losses.sample_timesteps(t_key, 6, s)
  np.testing.assert_array_equal(np.asarray(seen["t"]), np.asarray(t))
  assert len(set(np.asarray(t).tolist())) == 2  # both timesteps drawn
  noise = schedules.gaussian_noise(n_key, x0.shape)
  np.testing.assert_allclose(np.asarray(seen["x_t"]),
                             np.asarray(schedules.q_sample(s, x0, t, noise)), rtol=1e-6)
  weight = np.asarray(losses.min_snr_weight(schedules.snr(s, t), "sample", 1.0))
  assert not np.allclose(weight, 1.0)
  np.testing.assert_allclose(np.asarray(loss), weight, rtol=1e-6)


@pytest.mark.parametrize("kind", param.PREDICTION_TYPES)
def test_loss_is_zero_for_perfect_prediction(kind):
  s = schedules.make_schedule("scaled_linear")
  x0 = jnp.asarray(np.random.default_rng(0).standard_normal((3, 2, 4, 4, 4)), jnp.float32)
  t = jnp.array([0, 400, 999])
  pred = jnp.asarray(np.random.default_rng(1).standard_normal(x0.shape), jnp.float32)
  assert np.all(np.asarray(losses.diffusion_loss(pred, pred, t, s, kind, 5.0)) == 0.0)

  # An oracle that knows x0 returns the exact target from (x_t, t) alone.
  def oracle(x_t, t_b):
    alpha, sigma = (schedules.per_example(v, x_t) for v in schedules.alpha_sigma(s, t_b))
    eps = (x_t - alpha * x0) / sigma
    return param.target(kind, x0, eps, alpha, sigma)

  loss_fn = losses.make_loss_fn(s, kind, 5.0)
  loss = jax.jit(lambda x, k: loss_fn(oracle, x, k))(x0, jax.random.PRNGKey(2))
  assert float(loss) < 1e-8


def test_loss_gradient_flows():
  s = schedules.make_schedule("scaled_linear")
  x0 = jnp.asarray(np.random.default_rng(0).standard_normal((2, 2, 4, 4, 4)), jnp.float32)
  loss_fn = losses.make_loss_fn(s, "v_prediction", 5.0)
  loss, grad = jax.jit(jax.value_and_grad(
      lambda a: loss_fn(lambda x, t: a * x, x0, jax.random.PRNGKey(3))))(0.5)
  assert float(loss) > 0 and np.isfinite(float(grad)) and float(grad) != 0.0


def test_sample_timesteps_range():
  s = schedules.make_schedule("linear", num_train_timesteps=50)
  t = losses.sample_timesteps(jax.random.PRNGKey(0), 4096, s)
  assert t.shape == (4096,) and t.dtype == jnp.int32
  assert int(t.min()) == 0 and int(t.max()) == 49
