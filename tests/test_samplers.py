"""Samplers against diffusers' schedulers, oracle denoisers and guidance identities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import max_rel_err
from videoldm_jax.diffusion import parametrization as param, samplers, schedules

diffusers = pytest.importorskip("diffusers")
# diffusers' DPM scheduler trips a NumPy 2 deprecation inside its own set_timesteps.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SHAPE = (2, 3, 4, 4, 4)  # channels-last video latents (B, F, H, W, C)
KINDS = param.PREDICTION_TYPES


def _randn(seed, shape=SHAPE):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _ref(cls, **kw):
  return getattr(diffusers, cls)(**{**SD, **kw})


@pytest.mark.parametrize("cls,grid", [("DDIMScheduler", samplers.inference_timesteps),
                                      ("DDPMScheduler", samplers.inference_timesteps),
                                      ("DPMSolverMultistepScheduler",
                                       samplers.dpm_solver_timesteps)])
def test_timesteps_match_diffusers(cls, grid):
  for steps in (1, 7, 10, 25, 30, 50, 333, 1000):
    for spacing in ("leading", "trailing", "linspace"):
      for offset in (0, 1):
        ref = _ref(cls, timestep_spacing=spacing, steps_offset=offset)
        ref.set_timesteps(steps)
        ours = grid(1000, steps, spacing, offset)
        np.testing.assert_array_equal(ours, ref.timesteps.numpy(),
                                      err_msg=f"{steps} {spacing} {offset}")


def test_trailing_grid_has_num_steps_points_for_every_count():
  # diffusers' np.arange(1000, 0, -1000 / n) gives n + 1 values for 62 counts (61, 103,
  # ...; the last one -1); its first n are the grid.
  for n in range(1, 1001):
    ours = samplers.inference_timesteps(1000, n, "trailing")
    ref = (np.round(np.arange(1000, 0, -1000 / n)) - 1).astype(np.int64)[:n]
    np.testing.assert_array_equal(ours, ref, err_msg=str(n))
  assert len(np.round(np.arange(1000, 0, -1000 / 61))) == 62
  x = jnp.ones((1, 4))
  out = samplers.sample(lambda x, t: 0.3 * x, x, schedules.make_schedule("linear"), 61,
                        "ddim", timestep_spacing="trailing", progress=False)
  assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("t,alpha_to_one,eta", [(501, True, 0.0), (1, False, 0.0),
                                                (1, True, 0.0), (741, True, 1.0),
                                                (741, True, 0.5)])
def test_ddim_step_matches_diffusers(torch_cpu, kind, t, alpha_to_one, eta):
  torch = torch_cpu
  ref = _ref("DDIMScheduler", prediction_type=kind, clip_sample=False, steps_offset=1,
             set_alpha_to_one=alpha_to_one)
  ref.set_timesteps(20)
  out, x, noise = _randn(0), _randn(1), _randn(2)
  expected = ref.step(torch.from_numpy(out), t, torch.from_numpy(x), eta=eta,
                      variance_noise=torch.from_numpy(noise) if eta else None).prev_sample
  s = schedules.make_schedule("scaled_linear")
  final = 1.0 if alpha_to_one else float(s.alphas_cumprod[0])
  ours = samplers.ddim_step(s, jnp.asarray(out), t, t - 50, jnp.asarray(x), kind, eta=eta,
                            final_alpha_cumprod=final, noise=jnp.asarray(noise))
  assert max_rel_err(ours, expected.numpy()) < 1e-6


def test_ddim_step_clip_and_per_example_t(torch_cpu):
  torch = torch_cpu
  out, x = _randn(3), _randn(4)
  s = schedules.make_schedule("scaled_linear")
  # eps is worked out before x0 is clipped, for every parametrisation (as diffusers).
  for kind in KINDS:
    ref = _ref("DDIMScheduler", clip_sample=True, clip_sample_range=0.5, prediction_type=kind)
    ref.set_timesteps(10)
    expected = ref.step(torch.from_numpy(out), 900, torch.from_numpy(x)).prev_sample
    got = samplers.ddim_step(s, jnp.asarray(out), 900, 800, jnp.asarray(x), kind,
                             clip_sample=0.5)
    assert max_rel_err(got, expected.numpy()) < 1e-6, kind
  ours = samplers.ddim_step(s, jnp.asarray(out), 900, 800, jnp.asarray(x), clip_sample=0.5)
  # Per-example times: each example steps from its own t to its own t_prev, as a
  # call with that example alone does.
  t, t_prev = jnp.array([900, 500]), jnp.array([800, 400])  # SHAPE: a batch of 2
  per_ex = samplers.ddim_step(s, jnp.asarray(out), t, t_prev, jnp.asarray(x), clip_sample=0.5)
  for i in range(2):
    alone = samplers.ddim_step(s, jnp.asarray(out[i:i + 1]), int(t[i]), int(t_prev[i]),
                               jnp.asarray(x[i:i + 1]), clip_sample=0.5)
    np.testing.assert_allclose(np.asarray(per_ex[i:i + 1]), np.asarray(alone), rtol=1e-6,
                               atol=1e-7)
  np.testing.assert_allclose(np.asarray(per_ex[:1]), np.asarray(ours[:1]), rtol=1e-6,
                             atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("t", [601, 1, 0, 100])
def test_ddpm_step_matches_diffusers_with_same_noise(torch_cpu, kind, t):
  torch = torch_cpu
  spacing = "linspace" if t == 0 else "leading"  # the linspace grid ends at t = 0
  # (offset 0 for t = 100: its step goes into t = 0, which still adds noise)
  ref = _ref("DDPMScheduler", prediction_type=kind, clip_sample=False,
             steps_offset=0 if t == 100 else 1, timestep_spacing=spacing)
  ref.set_timesteps(10)
  grid = list(ref.timesteps.numpy()) + [-1]
  t_prev = int(grid[grid.index(t) + 1])
  out, x = _randn(5), _randn(6)
  expected = ref.step(torch.from_numpy(out), t, torch.from_numpy(x),
                      generator=torch.Generator().manual_seed(7)).prev_sample
  # diffusers draws its CPU noise as torch.randn(shape, generator=...); replay it.
  noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7)).numpy()
  s = schedules.make_schedule("scaled_linear")
  ours = samplers.ddpm_step(s, jnp.asarray(out), t, t_prev, jnp.asarray(x), kind,
                            noise=jnp.asarray(noise))
  assert max_rel_err(ours, expected.numpy()) < 1e-6


def test_ddpm_step_clips_x0_as_diffusers(torch_cpu):
  # clip_sample_range 0.5 (a DDPM config's clip_sample, as DDIM's): x0_hat is clipped
  # before the posterior mean.
  torch = torch_cpu
  ref = _ref("DDPMScheduler", clip_sample=True, clip_sample_range=0.5, steps_offset=1)
  ref.set_timesteps(10)
  out, x = _randn(5), _randn(6) * 3
  expected = ref.step(torch.from_numpy(out), 601, torch.from_numpy(x),
                      generator=torch.Generator().manual_seed(7)).prev_sample
  noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7)).numpy()
  s = schedules.make_schedule("scaled_linear")
  ours = samplers.ddpm_step(s, jnp.asarray(out), 601, 501, jnp.asarray(x), "epsilon",
                            clip_sample=0.5, noise=jnp.asarray(noise))
  assert max_rel_err(ours, expected.numpy()) < 1e-6
  unclipped = samplers.ddpm_step(s, jnp.asarray(out), 601, 501, jnp.asarray(x), "epsilon",
                                 noise=jnp.asarray(noise))
  assert max_rel_err(unclipped, expected.numpy()) > 1e-3


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_stochastic_runs_draw_fresh_noise_at_every_step(sampler, eta):
  # Step i's noise comes from fold_in(key, i) (one key for every step correlates the
  # noise of the whole run); eta and clip_sample reach each step.
  s = schedules.make_schedule("scaled_linear")
  x_T, key = jnp.asarray(_randn(12)), jax.random.key(3)
  fn = lambda x, t: 0.3 * x
  # (clip_sample 1: x0_hat = (x - 0.3 sigma x) / alpha is clipped in the early steps)
  out = samplers.sample(fn, x_T, s, 5, sampler, key=key, eta=eta, progress=False,
                        steps_offset=1, clip_sample=1.0)
  grid = samplers.timestep_grid(s.num_train_timesteps, 5, sampler, None, 1)
  x = x_T
  for i, (t, t_next) in enumerate(zip(grid, grid[1:] + [-1])):
    noise = schedules.gaussian_noise(jax.random.fold_in(key, i), x.shape)
    kw = dict(final_alpha_cumprod=1.0, noise=noise, clip_sample=1.0)
    x = (samplers.ddpm_step(s, fn(x, None), t, t_next, x, **kw) if sampler == "ddpm" else
         samplers.ddim_step(s, fn(x, None), t, t_next, x, eta=eta, **kw))
  assert max_rel_err(out, x) < 1e-5


def _toy_jax(x, t_b):
  return 0.1 * x + jnp.sin(schedules.per_example(t_b.astype(jnp.float32), x))


def _toy_torch(torch, x, t):
  return 0.1 * x + torch.sin(torch.tensor(float(t)))


@pytest.mark.parametrize("kind,steps", [("epsilon", 10), ("epsilon", 20),
                                        ("v_prediction", 10), ("sample", 10)])
def test_dpmpp_2m_run_matches_diffusers(torch_cpu, kind, steps):
  torch = torch_cpu
  ref = _ref("DPMSolverMultistepScheduler", prediction_type=kind)
  ref.set_timesteps(steps)
  x_T = _randn(8)
  x = torch.from_numpy(x_T)
  for t in ref.timesteps:
    x = ref.step(_toy_torch(torch, x, int(t)), t, x).prev_sample
  s = schedules.make_schedule("scaled_linear")
  ours = samplers.sample(_toy_jax, jnp.asarray(x_T), s, steps, "dpmpp_2m", kind,
                         progress=False)
  assert max_rel_err(ours, x.numpy()) < 1e-5


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_dpmpp_2m_on_a_zero_terminal_snr_schedule_matches_diffusers(torch_cpu, kind):
  # abar = 0 at T - 1: diffusers takes 2^-24 there (an infinite log-SNR dropped the
  # second step's 2nd-order correction: 2.8e-3 relative error through a whole pipeline).
  torch = torch_cpu
  ref = _ref("DPMSolverMultistepScheduler", prediction_type=kind,
             rescale_betas_zero_snr=True, timestep_spacing="trailing")
  ref.set_timesteps(6)
  x_T = _randn(9)
  x = torch.from_numpy(x_T)
  for t in ref.timesteps:
    x = ref.step(_toy_torch(torch, x, int(t)), t, x).prev_sample
  s = schedules.make_schedule("scaled_linear", rescale_zero_snr=True)
  assert float(s.alphas_cumprod[-1]) == 0.0
  ours = samplers.sample(_toy_jax, jnp.asarray(x_T), s, 6, "dpmpp_2m", kind,
                         timestep_spacing="trailing", progress=False)
  assert max_rel_err(ours, x.numpy()) < 1e-5


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_dpmpp_2m_on_the_cosine_schedule_keeps_its_last_alpha(torch_cpu, kind):
  # Its abar at T - 1 is 2.4e-9, below the 2^-24 put in for zero-SNR schedules only
  # (raising it gave 2.1e-3 absolute error at 5 v-prediction steps).
  torch = torch_cpu
  ref = diffusers.DPMSolverMultistepScheduler(
      beta_schedule="squaredcos_cap_v2", prediction_type=kind, timestep_spacing="trailing")
  ref.set_timesteps(5)
  x_T = _randn(10)
  x = torch.from_numpy(x_T)
  for t in ref.timesteps:
    x = ref.step(_toy_torch(torch, x, int(t)), t, x).prev_sample
  s = schedules.make_schedule("cosine")
  assert 0 < float(s.alphas_cumprod[-1]) < 2.0 ** -24
  ours = samplers.sample(_toy_jax, jnp.asarray(x_T), s, 5, "dpmpp_2m", kind,
                         timestep_spacing="trailing", progress=False)
  assert max_rel_err(ours, x.numpy()) < 1e-5


def test_dpmpp_2m_ignores_clip_sample_and_refuses_repeated_timesteps():
  s = schedules.make_schedule("scaled_linear")
  x = jnp.asarray(_randn(11, (1, 4)))
  run = lambda **kw: np.asarray(samplers.sample(lambda x, t: 0.3 * x, x, s, 10, "dpmpp_2m",
                                                progress=False, **kw))
  plain = run()
  assert np.abs(plain).max() > 1  # clipping x0 to [-1, 1] would change the result
  np.testing.assert_array_equal(run(clip_sample=1.0), plain)
  # Epsilon prediction from abar = 0 (zero terminal SNR) divides by alpha = 0.
  zero_snr = schedules.make_schedule("scaled_linear", rescale_zero_snr=True)
  with pytest.raises(ValueError, match="epsilon-prediction model cannot start at t = 999"):
    samplers.sample(lambda x, t: 0.3 * x, x, zero_snr, 10, "ddim",
                    timestep_spacing="trailing", progress=False)
  # linspace over [0, 999] in 1001 points rounds to repeated timesteps: h = 0, NaN.
  with pytest.raises(ValueError, match="repeats timesteps"):
    samplers.sample(lambda x, t: 0.3 * x, x, s, 1000, "dpmpp_2m", progress=False)


@pytest.mark.parametrize("spacing,offset,alpha_to_one", [("trailing", 0, True),
                                                         ("leading", 1, False)])
def test_ddim_run_matches_diffusers(torch_cpu, spacing, offset, alpha_to_one):
  torch = torch_cpu
  ref = _ref("DDIMScheduler", prediction_type="v_prediction", clip_sample=False,
             timestep_spacing=spacing, steps_offset=offset, set_alpha_to_one=alpha_to_one)
  ref.set_timesteps(10)
  x_T = _randn(9)
  x = torch.from_numpy(x_T)
  for t in ref.timesteps:
    x = ref.step(_toy_torch(torch, x, int(t)), t, x).prev_sample
  s, cfg = schedules.schedule_from_diffusers_config(dict(ref.config))
  ours = samplers.sample(_toy_jax, jnp.asarray(x_T), s, 10, "ddim", progress=False,
                         **vars(cfg))
  assert max_rel_err(ours, x.numpy()) < 1e-5


def _oracle(s, x0, kind):
  """Denoiser that knows x0: returns the exact eps / v / x0 implied by (x_t, t)."""
  def denoise(x_t, t_b):
    alpha, sigma = (schedules.per_example(v, x_t) for v in schedules.alpha_sigma(s, t_b))
    return param.target(kind, x0, (x_t - alpha * x0) / sigma, alpha, sigma)
  return denoise


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sampler,tol", [("ddim", 1e-5), ("dpmpp_2m", 1e-5), ("ddpm", 1e-4)])
def test_oracle_denoiser_recovers_x0(kind, sampler, tol):
  s = schedules.make_schedule("scaled_linear")
  x0, x_T = jnp.asarray(_randn(10)), jnp.asarray(_randn(11))
  out = samplers.sample(_oracle(s, x0, kind), x_T, s, 12, sampler, kind,
                        key=jax.random.PRNGKey(0), progress=False, steps_offset=1)
  assert max_rel_err(out, x0) < tol


@pytest.mark.parametrize("sampler,tol", [("dpmpp_2m", 1e-5), ("ddpm", 1e-4)])
def test_ddpm_and_dpm_end_on_x0_even_without_set_alpha_to_one(sampler, tol):
  """set_alpha_to_one=False (SD's scheduler configs) is DDIM's: its last step ends at
  abar_0. DDPM and DPM-Solver end at abar = 1 regardless, as in diffusers; DDPM's last
  step at t = 0 with steps_offset 0 would otherwise go from abar_0 to abar_0, a no-op."""
  s = schedules.make_schedule("scaled_linear")
  x0, x_T = jnp.asarray(_randn(10)), jnp.asarray(_randn(11))
  abar0 = float(s.alphas_cumprod[0])
  kw = dict(key=jax.random.PRNGKey(0), progress=False, steps_offset=0,
            final_alpha_cumprod=abar0)
  out = samplers.sample(_oracle(s, x0, "epsilon"), x_T, s, 20, sampler, "epsilon", **kw)
  assert max_rel_err(out, x0) < tol
  # DDIM honours it: its result is x_0 re-noised to abar_0 with the predicted noise.
  ddim = samplers.sample(_oracle(s, x0, "epsilon"), x_T, s, 20, "ddim", "epsilon", **kw)
  assert max_rel_err(ddim, x0) > 1e-3


def test_cfg_identities():
  cond, uncond = jnp.asarray(_randn(12)), jnp.asarray(_randn(13))
  np.testing.assert_array_equal(samplers.classifier_free_guidance(uncond, cond, 1.0), cond)
  np.testing.assert_array_equal(samplers.classifier_free_guidance(uncond, cond, 0.0), uncond)
  np.testing.assert_allclose(samplers.classifier_free_guidance(uncond, cond, 7.5),
                             uncond + 7.5 * (cond - uncond), rtol=1e-5, atol=1e-5)


def test_guided_denoise_fn_batches_both_branches():
  calls = []

  def model(x, t, c):
    calls.append(x.shape[0])
    return x * c["scale"][:, None, None, None, None] + t[:, None, None, None, None]

  cond, uncond = {"scale": jnp.array([2.0, 3.0])}, {"scale": jnp.array([0.5, 0.5])}
  x, t = jnp.asarray(_randn(14)), jnp.array([5, 7])  # per-example times
  guided = samplers.guided_denoise_fn(model, cond, uncond, 4.0)(x, t)
  assert calls == [4]  # one forward pass of batch 2B
  expected = samplers.classifier_free_guidance(model(x, t, uncond), model(x, t, cond), 4.0)
  np.testing.assert_allclose(guided, expected, rtol=1e-6)
  calls.clear()
  np.testing.assert_array_equal(samplers.guided_denoise_fn(model, cond, uncond, 1.0)(x, t),
                                model(x, t, cond))
  assert calls == [2, 2]  # scale 1 skips the unconditional branch
  for scale in (0.0, 0.5):  # below 1 too the combination (0: the unconditional output)
    np.testing.assert_allclose(
        samplers.guided_denoise_fn(model, cond, uncond, scale)(x, t),
        samplers.classifier_free_guidance(model(x, t, uncond), model(x, t, cond), scale),
        rtol=1e-6)


def test_sample_argument_errors():
  s = schedules.make_schedule("linear")
  x = jnp.zeros((1, 4))
  with pytest.raises(ValueError, match="key"):
    samplers.sample(lambda x, t: x, x, s, 5, "ddpm", progress=False)
  with pytest.raises(ValueError, match="sampler"):
    samplers.sample(lambda x, t: x, x, s, 5, "euler", progress=False)
  with pytest.raises(ValueError, match="num_steps"):
    samplers.inference_timesteps(1000, 1001)
  # 'leading' with 1000 steps and steps_offset 1 puts the first step at t = 1000.
  with pytest.raises(ValueError, match=r"timesteps \[1000\] lie outside the schedule's "
                     r"\[0, 1000\)"):
    samplers.sample(lambda x, t: x, x, s, 1000, "ddim", progress=False, steps_offset=1)
  with pytest.raises(ValueError, match=r"timesteps \[-3\] lie outside"):
    samplers.sample(lambda x, t: x, x, s, 2, "ddim", progress=False, timesteps=[500, -3])
  # Given timesteps that rise ran the process forwards: DDPM all NaN, the others garbage.
  for sampler in ("ddpm", "ddim", "dpmpp_2m"):
    with pytest.raises(ValueError, match="timesteps must descend .* 1 is followed by 500"):
      samplers.sample(lambda x, t: x, x, s, 3, sampler, progress=False,
                      timesteps=[999, 1, 500], key=jax.random.key(0))
  # (DDIM / DDPM may repeat one: a step that changes nothing.)
  assert samplers.timestep_grid(1000, 3, "ddim", timesteps=[500, 500, 1]) == [500, 500, 1]


def test_sample_options_refuse_non_finite_scales():
  # A NaN guidance scale wrote an all-black image, with only NumPy's cast warning.
  from videoldm_jax.pipelines.sampling import SampleOptions
  for bad, message in ((dict(guidance_scale=float("nan")), "guidance_scale must be a "
                        "finite number, got nan"),
                       (dict(eta=-0.5), "eta must be a finite number >= 0, got -0.5"),
                       (dict(eta=float("inf")), "eta must be a finite number >= 0, got inf")):
    with pytest.raises(ValueError, match=message):
      SampleOptions(**bad)
  assert SampleOptions(guidance_scale=1.0, eta=1.0).eta == 1.0
  # Sizes and counts (the CLIs check their flags; a library caller's height=0 passed the
  # size-multiple check, num_frames=-2 made a negative latent shape).
  for field, value, least in (("height", 0, 1), ("width", -8, 1), ("num_steps", 0, 1),
                              ("num_frames", -2, 0), ("height", 64.0, 1),
                              ("num_frames", True, 0)):
    with pytest.raises(ValueError, match=rf"SampleOptions\.{field}={value!r}: expected a "
                       rf"whole number >= {least}"):
      SampleOptions(**{field: value})
  assert SampleOptions(height=np.int64(64), num_frames=0).height == 64
  for seed in (-1, 2 ** 32):
    with pytest.raises(ValueError, match=r"SampleOptions\.seed=.*: expected a whole number "
                       r"in \[0, 2\^32\)"):
      SampleOptions(seed=seed)
  with pytest.raises(ValueError, match=r"SampleOptions\.sampler='dpmpp2m': expected one of "
                     r"\('ddim', 'ddpm', 'dpmpp_2m'\)"):
    SampleOptions(sampler="dpmpp2m")


def test_ddim_with_eta_on_the_cosine_schedule_stays_finite():
  # float32 makes 1 - abar_prev - std^2 slightly negative (-6e-8) for long jumps of the
  # cosine schedule (999 -> 0 here): the square root of the direction term is clamped,
  # not NaN.
  s = schedules.make_schedule("cosine")
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 8)), jnp.float32)
  out = samplers.sample(lambda x, t: 0.3 * x, x, s, 2, "ddim", eta=1.0, key=jax.random.key(0),
                        timestep_spacing="linspace", progress=False)
  assert np.isfinite(np.asarray(out)).all()
  # sample()'s own eta check (SampleOptions checks it for the pipelines).
  with pytest.raises(ValueError, match="eta must be >= 0"):
    samplers.sample(lambda x, t: x, x, s, 3, "ddim", eta=-0.5, key=jax.random.key(0),
                    progress=False)
