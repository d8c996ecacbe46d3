"""The stages of the generation chain, loaded (`load_chain`): which are there, that they
share one latent space, and the notes on the ones skipped (`pipelines/generate.py`)."""

import dataclasses
import functools
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from flax import traverse_util

from videoldm_jax import pretrained
from videoldm_jax import upsampler_model as um
from videoldm_jax.diffusion.schedules import schedule_from_diffusers_config
from videoldm_jax.models import vae as vae_lib
from videoldm_jax.pipelines import personalize, sampling
from videoldm_jax.pipelines.context_sampling import ContextModel


@dataclasses.dataclass
class ChainModels:
  """The loaded stages (None = skipped) and the notes about skipped stages.

  keyframe / predictor / interpolator / interpolator2: (PretrainedLDM, tokenizer or None).
  decoder: a PretrainedLDM whose params['vae'] decode (its `vae_temporal_config` set for
  a temporal decoder). upsampler: a PretrainedUpsampler.
  """
  keyframe: Optional[tuple] = None
  predictor: Optional[tuple] = None
  interpolator: Optional[tuple] = None
  interpolator2: Optional[tuple] = None
  decoder: Optional[pretrained.PretrainedLDM] = None
  upsampler: Optional[um.PretrainedUpsampler] = None
  notes: list = dataclasses.field(default_factory=list)
  paths: dict = dataclasses.field(default_factory=dict)  # stage -> folder (for messages)

  @property
  def base(self) -> pretrained.PretrainedLDM:
    """The model whose latent space everything shares (key-frame, else predictor)."""
    return (self.keyframe or self.predictor)[0]

  @functools.cached_property
  def samplers(self) -> dict:
    """A ContextModel per UNet stage (the key-frame model's ignores the context cond)."""
    out = {name: _context_model(getattr(self, name)[0], context=name != "keyframe")
           for name in ("keyframe", "predictor", "interpolator", "interpolator2")
           if getattr(self, name) is not None}
    return out


def _context_model(model: pretrained.PretrainedLDM, context: bool) -> ContextModel:
  """`ContextModel` on the shared jitted UNet. context=False (the key-frame model):
  the cond argument of `context_sampling` is dropped, so `sample_clip` with an
  all-zero mask samples the key-frame model with classifier-free guidance."""
  schedule, sampling_cfg = schedule_from_diffusers_config(model.scheduler)
  fn = sampling.unet_fn(model.unet_config, model.temporal_config)
  if not context:
    jitted = fn
    fn = lambda params, x, t, text, labels, image_only, cond=None: jitted(
        params, x, t, text, labels, image_only)
  return ContextModel(fn, model.params["unet"], schedule, sampling_cfg)


def _load_ldm(path, image: Optional[pretrained.PretrainedLDM], parts, image_source: str):
  model, tokenizer = pretrained.load_with_tokenizer(path)
  if image is not None:
    model = personalize.personalize(model, image, parts, source=image_source)
  return model, tokenizer


def load_chain(keyframe_model=None, predictor_model=None, interpolator_model=None,
               interpolator2_model=None, decoder_model=None, upsampler_model=None,
               image_checkpoint=None, personalize_parts: Sequence[str] = ("unet",),
               weights: bool = True) -> ChainModels:
  """Loads each given stage folder (None / "" skips the stage, with a note).

  image_checkpoint: an image LDM folder whose spatial UNet (theta) replaces that of the
  key-frame, prediction and interpolation models, keeping their phi (personalisation,
  `pipelines/personalize.py`; `personalize_parts` may add 'vae', which then also applies
  to the decoder, and 'text_encoder').
  weights=False reads the folders' configs and training records alone (params {}, no
  tokenizers; personalisation and `check_chain`'s comparison of the encoders' weights
  are left out): all `chain_plan.plan` reads, so that its refusals, and those of
  `check_chain`, come before gigabytes of weights.
  """
  image, image_source = None, ""
  if image_checkpoint and weights:
    image_source = str(Path(image_checkpoint).absolute())
    image = pretrained.load(image_checkpoint)
  if weights:
    ldm = lambda p: _load_ldm(p, image, personalize_parts, image_source) if p else None
  else:
    ldm = lambda p: (pretrained.load(p, weights=False), None) if p else None
  m = ChainModels(keyframe=ldm(keyframe_model), predictor=ldm(predictor_model),
                  interpolator=ldm(interpolator_model),
                  interpolator2=ldm(interpolator2_model))
  given = dict(keyframe=keyframe_model, predictor=predictor_model,
               interpolator=interpolator_model, interpolator2=interpolator2_model,
               decoder=decoder_model, upsampler=upsampler_model)
  m.paths = {k: str(v) for k, v in given.items() if v}
  if m.keyframe is None and m.predictor is None:
    raise ValueError("need a key-frame model (--keyframe_model) or a prediction model "
                     "(--predictor_model) to make key frames")
  if decoder_model:
    m.decoder = pretrained.load(decoder_model, weights=weights)
    if image is not None and "vae" in personalize_parts:
      m.decoder = personalize.personalize(m.decoder, image, ("vae",), source=image_source)
  if upsampler_model:
    m.upsampler = um.load(upsampler_model, read_params=weights)
  if m.interpolator is None and m.interpolator2 is not None:
    m.interpolator, m.interpolator2 = m.interpolator2, None
    m.paths["interpolator"] = m.paths.pop("interpolator2")
    m.notes.append("interpolator stage: only --interpolator2_model given; it is used for "
                   "both passes")
  check_chain(m, compare_weights=weights)
  if weights:
    _place_on_device(m)
  if m.keyframe is None:
    m.notes.append("key-frame stage skipped (no --keyframe_model): the first clip comes "
                   "from the prediction model's unconditional branch (S = 0)")
  if m.predictor is None:
    m.notes.append("prediction stage skipped (no --predictor_model): the key frames are "
                   "ONE clip of the key-frame model (convolutional in time when longer "
                   "than keyframes_per_clip; its memory then grows with the length)")
  if m.interpolator is None:
    m.notes.append("interpolation stage skipped (no --interpolator_model): the video runs "
                   "at the key-frame rate")
  if m.decoder is None:
    kind = "temporal" if m.base.vae_temporal_config is not None else "frame-wise image"
    m.notes.append(f"decoder stage skipped (no --decoder_model): decoding with the {kind} "
                   "decoder of the key-frame model")
  elif m.decoder.vae_temporal_config is None:
    m.notes.append(f"decoder model {decoder_model}: has no temporal decoder (vae_temporal_config); "
                   "decoding frame by frame with its image decoder")
  if m.upsampler is None:
    m.notes.append("upsampler stage skipped (no --upsampler_model): the output stays at "
                   "the generated (low) resolution")
  return m


def _place_on_device(m: ChainModels) -> None:
  """Every parameter of `m` on the device (in place)."""
  # Every parameter on the device once (the host copies are dropped): the chain calls
  # each model for many windows and chunks, and a jitted call given host arrays copies
  # them every time.
  for name in ("keyframe", "predictor", "interpolator", "interpolator2"):
    entry = getattr(m, name)
    if entry is not None:
      setattr(m, name, (dataclasses.replace(entry[0], params=sampling.on_device(
          entry[0].params)), entry[1]))
  if m.decoder is not None:
    m.decoder = dataclasses.replace(m.decoder, params=sampling.on_device(m.decoder.params))
  if m.upsampler is not None:
    m.upsampler = dataclasses.replace(m.upsampler,
                                      params=sampling.on_device(m.upsampler.params))


def check_chain(m: ChainModels, compare_weights: bool = True) -> None:
  """Every stage must live in the base model's latent space (its encoder's weights
  compared too, with `compare_weights`) and be a model of its kind."""
  base = m.base
  key = lambda c: (c.latent_channels, c.downsample_factor, c.scaling_factor, c.shift_factor)
  stages = {"predictor": m.predictor and m.predictor[0],
            "interpolator": m.interpolator and m.interpolator[0],
            "interpolator2": m.interpolator2 and m.interpolator2[0], "decoder": m.decoder}
  for name, model in stages.items():
    if model is None:
      continue
    where = m.paths.get(name, model.source)
    if key(model.vae_config) != key(base.vae_config):
      raise ValueError(
          f"{name} model ({where}): its autoencoder's latent space (channels, "
          f"factor, scaling, shift) = {key(model.vae_config)} differs from the key-frame "
          f"model's {key(base.vae_config)}; all stages must share one latent space")
    differs = compare_weights and _encoder_difference(model.params["vae"],
                                                      base.params["vae"])
    if differs:
      # Same shapes, other weights: latents of another autoencoder, decoded (or
      # denoised) without an error into a wrong video.
      raise ValueError(
          f"{name} model ({where}): its autoencoder's encoder differs from the key-frame "
          f"model's ({differs}): it was trained on another autoencoder's latents; train "
          "every stage from the same image model (--config.image_model)")
    if name != "decoder":
      tc = model.temporal_config
      if tc is None or not tc.context_frames:
        raise ValueError(f"{name} model ({where}): not a context model (no "
                         "temporal_config.context_frames); export one with the "
                         f"{name.rstrip('2')} stage")
  if m.keyframe is not None and m.keyframe[0].temporal_config is None:
    where = m.paths.get("keyframe", m.keyframe[0].source)
    raise ValueError(f"key-frame model ({where}): an image model (no temporal layers); "
                     "pass a key-frame export")
  for name in ("keyframe", "predictor", "interpolator", "interpolator2"):
    entry = getattr(m, name)
    if entry is not None:
      where = m.paths.get(name, entry[0].source)
      sampling.check_context_source(entry[0], f"{name} model ({where})")


def _encoder_difference(vae: dict, base_vae: dict) -> str:
  """'' if the encoders (encoder + quant_conv: what defines the latent space; the
  decoder stage trains only the decoder) are equal, else the first differing path."""
  flat = lambda v: traverse_util.flatten_dict(vae_lib.latent_params(v))
  a, b = flat(vae), flat(base_vae)
  if a.keys() != b.keys():
    return f"parameters {sorted('/'.join(k) for k in a.keys() ^ b.keys())[:3]}"
  for path in sorted(a):
    x, y = np.asarray(a[path]), np.asarray(b[path])
    if x.shape != y.shape or not np.array_equal(x, y):
      return "vae/" + "/".join(path)
  return ""
