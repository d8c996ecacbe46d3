"""Sampling with context frames: prediction (eq. 3), long videos, interpolation.

A prediction or interpolation model (a video LDM whose `temporal_config.context_frames`
is set, exported by stages/predictor.py or stages/interpolator.py) denoises a clip
given known latents at the frames where a mask m is 1 (`context_encoder.masked_cond`).

- Context guidance (paper Sec. 3.3): f(z) + s (f(z, c_S) - f(z)), the unconditional
  branch being S = 0 (an all-zero cond), combined with text guidance as a bilinear
  lerp over the (context, text) branches; every branch runs in one batched UNet call.
- After sampling the known frames are put back, so they are exactly the given latents.
- `extend`: autoregressive prediction to any length, each round conditioned on the last
  S frames generated so far.
- `interpolate`: T key frames -> 4T frames (known at 0, 4, 8, ...);
  `interpolate_twice`: 4T -> 16T with a second model or the same one again.

All latents are scaled and channels-last: (B, T, h, w, C).
"""

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from videoldm_jax.diffusion import samplers
from videoldm_jax.diffusion.schedules import (NoiseSchedule, SamplingConfig,
                                              schedule_from_diffusers_config)
from videoldm_jax.models.context_encoder import first_frames_mask, masked_cond, strided_mask
from videoldm_jax.pipelines.sampling import check_context_source, on_device, unet_fn
from videoldm_jax.pretrained import PretrainedLDM


@dataclasses.dataclass(frozen=True)
class ContextModel:
  """A context-conditioned video UNet ready to sample: its jitted apply, UNet params,
  noise schedule and sampling settings."""
  apply_fn: Callable
  params: dict
  schedule: NoiseSchedule
  sampling: SamplingConfig

  @classmethod
  def from_pretrained(cls, model: PretrainedLDM) -> "ContextModel":
    tc = model.temporal_config
    if tc is None or not tc.context_frames:
      raise ValueError(f"{model.source}: not a context model (its temporal_config has no "
                       "context_frames); train one with the predictor or interpolator stage")
    check_context_source(model)
    schedule, sampling = schedule_from_diffusers_config(model.scheduler)
    # The cached jitted apply: training-time samples of the context stages made a new
    # one per sample step, recompiling the UNet each time.
    return cls(unet_fn(model.unet_config, tc), on_device(model.params["unet"]), schedule,
               sampling)


@dataclasses.dataclass(frozen=True)
class ContextSampleOptions:
  """Sampler settings of every function here.

  context_scale: s of context guidance; 1.0 runs only the conditional branch.
  guidance_scale: classifier-free guidance over the text (needs `text` and
  `uncond_text`) and / or class label (needs `uncond_labels`, the null class).
  """
  num_steps: int = 50
  sampler: str = "ddim"           # ddim | ddpm | dpmpp_2m
  eta: float = 0.0
  context_scale: float = 1.0
  guidance_scale: float = 1.0
  seed: int = 0
  progress: bool = False


def guided_context_fn(model: ContextModel, cond: jax.Array, options: ContextSampleOptions,
                      text: Optional[jax.Array] = None,
                      uncond_text: Optional[jax.Array] = None,
                      labels: Optional[jax.Array] = None,
                      uncond_labels: Optional[jax.Array] = None) -> samplers.DenoiseFn:
  """denoise_fn(x (B, T, h, w, C), t (B,)) with context and classifier-free guidance.

  cond: (B, T, h, w, C+1) = (m * z, m); text / uncond_text: (B, L, D) or None; labels
  (B,) for class-conditional UNets, uncond_labels (B,) the null class of one trained
  with label dropout (else the unconditional branch takes `labels`). With
  s_c = context_scale, s_t = guidance_scale and f(context, y) the model output for
  condition y (text and / or label; "empty" the unconditional ones), the result is the
  bilinear lerp
    g(c) = f(c, empty) + s_t (f(c, y) - f(c, empty)),  out = g(0) + s_c (g(c_S) - g(0)),
  i.e. context guidance over classifier-free-guided predictions (the order does not
  matter). A scale of exactly 1 drops its unconditional branches, so with both at 1
  the output is the plain conditional prediction, bit for bit; so does s_t for a model
  with neither text nor a null class. All branches go through one UNet call of batch
  (number of branches) * B.
  """
  s_c, s_t = options.context_scale, options.guidance_scale
  contexts = [cond] if s_c == 1.0 else [jnp.zeros_like(cond), cond]
  guide = s_t != 1.0 and (text is not None or uncond_labels is not None)
  if guide and text is not None and uncond_text is None:
    raise ValueError("text guidance (guidance_scale != 1) needs uncond_text")
  # (text, labels) of each guidance branch: unconditional first.
  ys = ([(uncond_text, labels if uncond_labels is None else uncond_labels),
         (text, labels)] if guide else [(text, labels)])
  n = len(contexts) * len(ys)
  cat = lambda xs: None if xs[0] is None else jnp.concatenate(
      [jnp.asarray(x) for x in xs], axis=0)
  all_cond = cat([c for c in contexts for _ in ys])
  all_text = cat([y[0] for _ in contexts for y in ys])
  all_labels = cat([y[1] for _ in contexts for y in ys])
  params = {"params": model.params}

  def denoise_fn(x: jax.Array, t: jax.Array) -> jax.Array:
    out = model.apply_fn(params, jnp.concatenate([x] * n, axis=0),
                         jnp.concatenate([t] * n, axis=0), all_text, all_labels, None,
                         cond=all_cond)
    outs = jnp.split(out, n, axis=0)
    per_context = [outs[i * len(ys):(i + 1) * len(ys)] for i in range(len(contexts))]
    g = [o[0] if len(o) == 1 else samplers.classifier_free_guidance(o[0], o[1], s_t)
         for o in per_context]
    return g[0] if len(g) == 1 else samplers.classifier_free_guidance(g[0], g[1], s_c)

  return denoise_fn


def sample_clip(model: ContextModel, known: jax.Array, mask: jax.Array,
                options: ContextSampleOptions = ContextSampleOptions(),
                text: Optional[jax.Array] = None, uncond_text: Optional[jax.Array] = None,
                labels: Optional[jax.Array] = None, key: Optional[jax.Array] = None,
                x_T: Optional[jax.Array] = None,
                uncond_labels: Optional[jax.Array] = None) -> jax.Array:
  """One clip given known frames: known (B, T, h, w, C) (any values where mask = 0),
  mask (B, T) in {0, 1} -> latents (B, T, h, w, C), exactly `known` where mask = 1.

  x_T (B, T, h, w, C) is the initial noise (drawn from `key`, else from options.seed).
  """
  known = jnp.asarray(known, jnp.float32)
  mask = jnp.asarray(mask, jnp.float32)
  key = jax.random.key(options.seed) if key is None else key
  if x_T is None:
    x_T = jax.random.normal(jax.random.fold_in(key, 0), known.shape, jnp.float32)
  if options.context_scale != 1.0 and not bool(mask.any()):
    # No known frame: the guided branch is the unguided one (u + s (u - u) = u), so
    # only one runs (twice the UNet batch for the same result otherwise).
    options = dataclasses.replace(options, context_scale=1.0)
  denoise = guided_context_fn(model, masked_cond(known, mask), options, text, uncond_text,
                              labels, uncond_labels)
  sampling = model.sampling
  x0 = samplers.sample(denoise, x_T, model.schedule, options.num_steps,
                       sampler=options.sampler, key=jax.random.fold_in(key, 1),
                       progress=options.progress, eta=options.eta,
                       **dataclasses.asdict(sampling))
  # Replacement: the known frames are the given latents, not the model's rendition.
  return jnp.where(mask[:, :, None, None, None] > 0, known, x0)


def predict(model: ContextModel, context: jax.Array, num_frames: int,
            options: ContextSampleOptions = ContextSampleOptions(), *,
            key: Optional[jax.Array] = None, **conditioning) -> jax.Array:
  """Prediction model: context (B, S, h, w, C) -> clip (B, num_frames, h, w, C) whose
  first S frames are the context. S = 0 samples an unconditional clip.
  `conditioning`: text / uncond_text / labels / uncond_labels / x_T as in
  `sample_clip`."""
  b, s = context.shape[:2]
  if s >= num_frames:
    raise ValueError(f"{s} context frames leave nothing to predict in {num_frames} frames")
  known = jnp.zeros((b, num_frames) + context.shape[2:], jnp.float32).at[:, :s].set(context)
  mask = first_frames_mask(jnp.full((b,), s), num_frames)
  return sample_clip(model, known, mask, options, key=key, **conditioning)


def extend(model: ContextModel, context: jax.Array, num_frames: int, clip_frames: int,
           num_context: int = 2, options: ContextSampleOptions = ContextSampleOptions(),
           **conditioning) -> jax.Array:
  """Autoregressive extension: context (B, S0, h, w, C) -> video (B, num_frames, h, w, C)
  whose first S0 frames are the context (S0 may be 0: the first clip is unconditional).

  Each round predicts a clip of `clip_frames` from the last min(num_context, frames so
  far) frames and appends its new frames; round r draws its noise from
  fold_in(key, r), key = `key` (else key(options.seed)). `conditioning`: text /
  uncond_text / labels / uncond_labels; no x_T (each round draws its own noise).
  """
  if not 0 <= num_context < clip_frames:
    raise ValueError(f"num_context={num_context} must be in [0, clip_frames={clip_frames})")
  if "x_T" in conditioning:  # (every round would start from the same noise)
    raise ValueError("extend draws each round's noise itself: no x_T; give a key")
  video = jnp.asarray(context, jnp.float32)
  key = conditioning.pop("key", None)
  base = jax.random.key(options.seed) if key is None else key
  r = 0
  while video.shape[1] < num_frames:
    s = min(num_context, video.shape[1])
    clip = predict(model, video[:, video.shape[1] - s:], clip_frames, options,
                   key=jax.random.fold_in(base, r), **conditioning)
    video = jnp.concatenate([video, clip[:, s:]], axis=1)
    r += 1
  return video[:, :num_frames]


def interpolate(model: ContextModel, keys: jax.Array, stride: int = 4,
                options: ContextSampleOptions = ContextSampleOptions(),
                **conditioning) -> jax.Array:
  """Interpolation model: key frames (B, N, h, w, C) -> (B, stride * N, h, w, C) with key
  frame k at position stride * k (the training layout: known at 0, stride, 2 stride, ...;
  the last stride - 1 frames follow the last key frame). One UNet call covers the clip:
  the temporal layers take any number of frames. `conditioning` as in `sample_clip`."""
  if not (isinstance(stride, (int, np.integer)) and stride >= 2):
    # (1 marked every frame known: the keys came back unchanged; 0 and below as well.)
    raise ValueError(f"interpolate: stride must be an integer >= 2, got {stride!r}")
  b, n = keys.shape[:2]
  known = jnp.zeros((b, stride * n) + keys.shape[2:], jnp.float32).at[:, ::stride].set(keys)
  return sample_clip(model, known, strided_mask(b, stride * n, stride), options,
                     **conditioning)


def interpolate_twice(model: ContextModel, keys: jax.Array, stride: int = 4,
                      options: ContextSampleOptions = ContextSampleOptions(),
                      second_model: Optional[ContextModel] = None,
                      **conditioning) -> jax.Array:
  """T -> stride^2 T frames (4T -> 16T in the paper's terms): `interpolate` with `model`,
  then again on its output with `second_model` (default: the same model), drawing other
  noise. keys (B, N, h, w, C) -> (B, stride^2 N, h, w, C); `conditioning`: text /
  uncond_text / labels / uncond_labels, and `key` (else key(options.seed); the second
  pass draws from fold_in(key, 2)), no x_T (the two passes have different lengths)."""
  # (A given key was passed to both passes: the second drew the first's noise again;
  # without one the second pass drew from seed + 1: the next seed's first pass.)
  if "x_T" in conditioning:
    raise ValueError("interpolate_twice draws each pass's noise itself: no x_T (the passes "
                     "have different lengths); give a key, or call interpolate twice")
  key = conditioning.pop("key", None)
  key = jax.random.key(options.seed) if key is None else key
  once = interpolate(model, keys, stride, options, key=key, **conditioning)
  return interpolate(second_model or model, once, stride, options,
                     key=jax.random.fold_in(key, 2), **conditioning)
