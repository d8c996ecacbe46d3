"""The whole Video LDM chain (paper Fig. 2 / Sec. 3), streamed to an mp4:

  prompt or class label
   -> key frames            key-frame model, text CFG (first clip)
   -> more key frames       prediction model, autoregressive: each round is conditioned on
                            the last S generated key frames (context guidance s_c)
   -> x4, and x4 again      interpolation model(s): one model applied twice, or two
   -> pixels                temporal decoder (a decoder-stage export), else the key-frame
                            model's frame-wise image decoder
   -> x4 resolution         temporally aligned upsampler (optional)
   -> mp4 (+ gif preview)

Every stage is optional except a key-frame or prediction model; a missing one is skipped
with a note (no predictor: one clip; no interpolator: key-frame rate; no upsampler: low
resolution). `generate_video` is the Python API (the CLI videoldm-generate and the demo
call it).

Memory stays flat in the video's length: nothing holds the whole video. Key frames are
produced window by window (only the last S key latents survive a prediction round) and
pushed through a chain of streaming stages with bounded buffers (interpolation, decoding,
upsampling, the mp4 sink; `pipelines/streaming.py` describes how each one windows its
frames). Every call of a stage has the same number of frames (one compiled program per
stage, however long the video), and stages that share a config share their compiled
UNet / text encoder / decoder, also across videos.

Chunk borders of the temporal decoder: it decodes `decode_chunk` frames per call with
`decode_overlap` real neighbouring latents on each side, so the temporal convolutions
next to a chunk border see true neighbours instead of the zero padding of a clip end;
only the video's true first and last frames see zero padding, as in training. No
finite overlap makes the chunked decode exactly the whole-video decode: the temporal
ResBlocks' Conv3ds compound to a radius of (2 + levels (layers + 1)) * 2 + 1 frames (29
for SD's VAE) and their GroupNorms pool statistics over all frames of the call. The
influence of far frames is weak, so a small overlap (default 2) removes the visible
seams, and the call length (chunk + 2 overlap, default 20) should be near the decoder's
training clip length so the GroupNorm statistics are the ones it was trained with.
(sgm, the same authors' code, decodes in chunks with no overlap at all.) The frame-wise
image decoder needs no overlap (set to 0). The upsampler is chunked the same way: its
context frames give its temporal layers real neighbours at chunk borders, and each
frame's initial and augmentation noise follow the frame (`upsample(first_frame=)`), so
a chunk's context frames start where its neighbour's emitted frames did.

Lengths: with F = 4^passes (1, 4 or 16), K key frames give F (K - 1) + 1 frames; K is
the smallest count that reaches the requested `num_frames` (or `duration * fps`) and the
file is cut to exactly that. `fps` is the frame rate of the output (the key frames run
at fps / F).
"""

import dataclasses
import functools
import math
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from videoldm_jax import pretrained, video_io
from videoldm_jax import upsampler_model as um
from videoldm_jax.diffusion import samplers as samplers_lib
from videoldm_jax.diffusion.schedules import schedule_from_diffusers_config
from videoldm_jax.pipelines import (context_sampling, personalize, sampling, streaming,
                                    upsampling)
from videoldm_jax.pipelines.context_sampling import ContextModel, ContextSampleOptions

Log = Callable[[str], None]


def log_to_stderr(message: str) -> None:
  """The default `log` of `generate_video`."""
  print(message, file=sys.stderr)


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
  """What `generate_video` makes. Lengths count frames of the OUTPUT unless named keys.

  Conditioning: `prompt` / `negative_prompt` (text models), `class_label` (class-
  conditional UNets). Length: `num_frames`, or `duration` seconds at `fps`; neither:
  one key-frame clip through the chain. `height` / `width`: frames before the
  upsampler, any multiple of the latent models' total downsampling (larger than
  training = convolutional in space).
  Key frames: `keyframes_per_clip` frames from the key-frame model (without a predictor
  it samples all key frames in one clip: convolutional in time); the predictor makes
  clips of `predictor_frames` (default keyframes_per_clip) from the last `num_context`.
  Guidance: `guidance_scale` (text CFG of key frames and predictor), `context_scale` (s
  of context guidance, predictor; the paper finds s > 1 helps), and for the
  interpolators `interp_guidance_scale` / `interp_context_scale` (1.0: no extra
  branch; the key frames already carry the prompt).
  Interpolation: `interp_passes` passes (at most 2) of x `interp_stride` (default: the
  stride the interpolator was trained with, else 4), `interp_window` key frames per
  interpolator call (default: the interpolator's training clip, num_frames // stride
  key frames, else keyframes_per_clip).
  Chunking: see the module docstring. Exports record what they were trained on
  (`pretrained.training_record`): a stride or context count the model never saw is an
  error, and calls of another length than the training clips get a note.
  """
  prompt: str = ""
  negative_prompt: str = ""
  class_label: Optional[int] = None
  seed: int = 0
  num_frames: Optional[int] = None
  duration: Optional[float] = None
  fps: float = 24.0
  height: int = 64
  width: int = 64
  sampler: str = "ddim"
  steps: int = 25
  eta: float = 0.0
  guidance_scale: float = 5.0
  context_scale: float = 1.0
  keyframes_per_clip: int = 8
  predictor_frames: Optional[int] = None
  num_context: int = 2
  interp_passes: int = 2
  interp_stride: Optional[int] = None
  interp_window: Optional[int] = None
  interp_steps: Optional[int] = None
  interp_guidance_scale: float = 1.0
  interp_context_scale: float = 1.0
  decode_chunk: int = 16
  decode_overlap: int = 2
  upsampler_steps: Optional[int] = None
  upsampler_noise_level: Optional[int] = None
  upsample_chunk: int = 8
  upsample_overlap: int = 2
  crf: int = 18
  gif: bool = True
  gif_max_frames: int = 48
  gif_max_size: int = 128
  progress: bool = True


# --- models ----------------------------------------------------------------------------

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
  all-zero mask samples the key-frame model with text guidance."""
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
               ) -> ChainModels:
  """Loads each given stage folder (None / "" skips the stage, with a note).

  image_checkpoint: an image LDM folder whose spatial UNet (theta) replaces that of the
  key-frame, prediction and interpolation models, keeping their phi (personalisation,
  `pipelines/personalize.py`; `personalize_parts` may add 'vae', which then also applies
  to the decoder, and 'text_encoder').
  """
  image, image_source = None, ""
  if image_checkpoint:
    image_source = str(Path(image_checkpoint).absolute())
    image = pretrained.load(image_checkpoint)
  ldm = lambda p: _load_ldm(p, image, personalize_parts, image_source) if p else None
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
    m.decoder = pretrained.load(decoder_model)
    if image is not None and "vae" in personalize_parts:
      m.decoder = personalize.personalize(m.decoder, image, ("vae",), source=image_source)
  if upsampler_model:
    m.upsampler = um.load(upsampler_model)
  if m.interpolator is None and m.interpolator2 is not None:
    m.interpolator, m.interpolator2 = m.interpolator2, None
    m.paths["interpolator"] = m.paths.pop("interpolator2")
    m.notes.append("interpolator stage: only --interpolator2_model given; it is used for "
                   "both passes")
  _check_chain(m)
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


def _check_chain(m: ChainModels) -> None:
  """Every stage must live in the base model's latent space."""
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


# --- lengths and sizes -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Plan:
  """What a run makes, computed before any sampling (`plan`)."""
  num_frames: int         # frames written
  num_keys: int           # K key frames
  first_clip: int         # key frames of the first clip
  new_per_round: int      # new key frames per prediction round (after the first round,
                          # which makes more when the first clip is shorter than the
                          # context)
  rounds: int             # prediction rounds
  passes: int             # x stride interpolation passes
  generated_frames: int   # F (K - 1) + 1 >= num_frames
  latent_hw: tuple        # (h, w) of the latents
  lowres_hw: tuple        # (H, W) decoded
  out_hw: tuple           # (H, W) written (x upsampler scale)
  fps: float
  frame_factor: int       # F = stride ** passes output frames per key frame
  interp_stride: int = 4  # frames per key frame and pass
  interp_window: int = 2  # key frames per interpolator call
  notes: tuple = ()       # call lengths that differ from the models' training clips


def plan(models: ChainModels, o: GenerateOptions) -> Plan:
  """Frame counts and sizes of a run; raises ValueError for impossible options (before
  anything is sampled)."""
  if not (o.fps > 0 and math.isfinite(o.fps)):
    raise ValueError(f"fps must be positive, got {o.fps}")
  # Options that would otherwise fail (or be replaced by their default) only after
  # earlier stages have sampled.
  for name in ("predictor_frames", "interp_steps", "upsampler_steps"):
    value = getattr(o, name)
    if value is not None and value < 1:
      raise ValueError(f"{name} must be >= 1 (or unset for its default), got {value}")
  if o.interp_window is not None and o.interp_window < 2:
    raise ValueError(f"interp_window must be >= 2 key frames, got {o.interp_window}")
  if o.steps < 1 or o.eta < 0 or o.sampler not in samplers_lib.SAMPLERS:
    raise ValueError(f"steps must be >= 1, eta >= 0 and sampler one of "
                     f"{samplers_lib.SAMPLERS}; "
                     f"got steps={o.steps}, eta={o.eta}, sampler={o.sampler!r}")
  if o.gif and (o.gif_max_size < 1 or o.gif_max_frames < 1):
    raise ValueError(f"gif_max_size and gif_max_frames must be >= 1 (or gif=False), got "
                     f"{o.gif_max_size}, {o.gif_max_frames}")
  conditional = False
  for stage in ("keyframe", "predictor", "interpolator", "interpolator2"):
    entry = getattr(models, stage)
    classes = None if entry is None else entry[0].unet_config.num_class_embeds
    conditional = conditional or bool(classes)
    if classes and o.class_label is not None and not 0 <= o.class_label < classes:
      # The embedding lookup of a label past the table gives NaN: a black video.
      raise ValueError(f"class_label={o.class_label}: {models.paths.get(stage, stage)} "
                       f"has classes 0..{classes - 1}")
  if models.upsampler is not None and o.upsampler_noise_level is not None:
    top = models.upsampler.config.max_noise_level
    if not 0 <= o.upsampler_noise_level < top:
      raise ValueError(f"upsampler_noise_level must be in [0, {top}) (the levels the "
                       f"upsampler was trained on), got {o.upsampler_noise_level}")
  if not 0 <= o.interp_passes <= 2:
    raise ValueError(f"interp_passes must be 0, 1 or 2, got {o.interp_passes}")
  passes = o.interp_passes if models.interpolator is not None else 0
  trained = _trained_on(models)
  stride = (o.interp_stride if o.interp_stride is not None
            else trained["interpolator"].get("interp_stride", 4))
  if stride < 2:
    raise ValueError(f"interp_stride must be >= 2, got {stride}")
  for name in ("interpolator", "interpolator2")[:passes]:
    own = trained[name].get("interp_stride", stride)
    if own != stride:
      raise ValueError(f"{models.paths.get(name, name)}: trained to fill in x{own} "
                       f"(key frames every {own} frames), asked for interp_stride={stride}")
  f = stride ** passes
  t = o.keyframes_per_clip
  if t < 1:
    raise ValueError(f"keyframes_per_clip must be >= 1, got {t}")
  if o.num_frames is not None and o.duration is not None:
    raise ValueError("give num_frames or duration, not both")
  if o.num_frames is not None:
    n = int(o.num_frames)
  elif o.duration is not None:
    n = int(round(o.duration * o.fps))
  else:
    n = f * (t - 1) + 1
  if n < 1:
    raise ValueError(f"the video must have at least one frame (num_frames={o.num_frames}, "
                     f"duration={o.duration}, fps={o.fps})")
  k = -(-(n - 1) // f) + 1
  p = t if o.predictor_frames is None else o.predictor_frames
  s = o.num_context
  if models.predictor is not None:
    if not 0 <= s < p:
      raise ValueError(f"num_context={s} must be in [0, predictor_frames={p})")
    most = trained["predictor"].get("max_context")
    if most is not None and s > most:
      raise ValueError(f"num_context={s}: {models.paths.get('predictor', 'the predictor')} "
                       f"was trained with at most {most} context frames")
    first = min(k, t if models.keyframe is not None else p)
    # Round 1 sees min(s, first) context frames (a first clip shorter than num_context
    # gives fewer), the later rounds s: each makes p minus its context new frames.
    rounds, have = 0, first
    while have < k:
      have += p - min(s, have)
      rounds += 1
  else:
    first, rounds = k, 0
  window = (o.interp_window if o.interp_window is not None
            else trained["interpolator"].get("num_frames", 0) // stride or t)
  if passes and window < 2:
    raise ValueError(f"interp_window must be >= 2 key frames, got {window}")
  notes = []
  if o.class_label is not None and not conditional:
    notes.append(f"class_label={o.class_label} ignored: no model of the chain is "
                 "class-conditional")
  # (stage, used, frames per call, the option that sets it, its value); a short video
  # makes shorter calls than the options say: the key-frame model is called once, on
  # the first clip, and a window or chunk holds at most the frames there are.
  generated = f * (k - 1) + 1
  calls = [("keyframe", models.keyframe is not None, first, "keyframes_per_clip", t),
           ("predictor", models.predictor is not None, p, "predictor_frames", p),
           ("interpolator", passes > 0, stride * min(window, k), "interp_window", window),
           ("interpolator2", passes == 2 and models.interpolator2 is not None,
            stride * min(window, stride * (k - 1) + 1), "interp_window", window),
           ("decoder", models.decoder is not None
            and models.decoder.vae_temporal_config is not None,
            min(o.decode_chunk + 2 * o.decode_overlap, generated), "decode_chunk",
            o.decode_chunk),
           ("upsampler", models.upsampler is not None,
            min(o.upsample_chunk + 2 * o.upsample_overlap, generated), "upsample_chunk",
            o.upsample_chunk)]
  for name, used, length, option, value in calls:
    clip = trained[name].get("num_frames")
    if used and clip is not None and length != clip:
      notes.append(f"{name} stage: calls of {length} frames, trained on clips of {clip} "
                   f"({option}={value}; temporal statistics follow the call length)")
  base = models.base
  mult = base.vae_config.downsample_factor
  for m in (models.keyframe, models.predictor, models.interpolator, models.interpolator2):
    if m is not None:
      mult = max(mult, sampling.size_multiple(m[0].unet_config, base.vae_config))
  if o.height % mult or o.width % mult or o.height < 1 or o.width < 1:
    raise ValueError(f"height and width must be positive multiples of {mult} for these "
                     f"models (got {o.height}x{o.width})")
  fac = base.vae_config.downsample_factor
  out_hw = (o.height, o.width)
  if models.upsampler is not None:
    c = models.upsampler.config
    out_hw = (o.height * c.scale, o.width * c.scale)
    if out_hw[0] % c.size_multiple or out_hw[1] % c.size_multiple:
      raise ValueError(f"the upsampler's output {out_hw[0]}x{out_hw[1]} must be a multiple "
                       f"of {c.size_multiple}: choose height and width multiples of "
                       f"{c.size_multiple // math.gcd(c.size_multiple, c.scale)}")
  for name, chunk, overlap in (("decode", o.decode_chunk, o.decode_overlap),
                               ("upsample", o.upsample_chunk, o.upsample_overlap)):
    if chunk < 1 or overlap < 0:
      raise ValueError(f"{name}_chunk must be >= 1 and {name}_overlap >= 0, got "
                       f"{chunk}, {overlap}")
  return Plan(num_frames=n, num_keys=k, first_clip=first, new_per_round=p - s,
              rounds=rounds, passes=passes, generated_frames=f * (k - 1) + 1,
              latent_hw=(o.height // fac, o.width // fac), lowres_hw=(o.height, o.width),
              out_hw=out_hw, fps=o.fps, frame_factor=f, interp_stride=stride,
              interp_window=window, notes=tuple(notes))


def _trained_on(models: ChainModels) -> dict:
  """Stage -> the training record of its export ({} for older folders or none)."""
  entries = {"keyframe": models.keyframe, "predictor": models.predictor,
             "interpolator": models.interpolator, "interpolator2": models.interpolator2}
  out = {k: (v[0].training if v is not None else {}) for k, v in entries.items()}
  out["decoder"] = models.decoder.training if models.decoder is not None else {}
  out["upsampler"] = models.upsampler.training if models.upsampler is not None else {}
  return out


# --- the run ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GenerationResult:
  """What `generate_video` wrote."""
  path: str                 # the mp4
  gif_path: Optional[str]   # the preview, if written
  num_frames: int
  height: int
  width: int
  fps: float
  plan: Plan
  notes: tuple              # what was skipped or adapted


def _seed(*ids: int) -> int:
  """An independent 31-bit seed per (run seed, stage, window): windows never share noise."""
  return int(np.random.SeedSequence([int(i) for i in ids]).generate_state(1)[0] >> 1)


def _conditioning(entry: tuple, o: GenerateOptions) -> dict:
  """text / uncond_text (1, L, D) and labels (1,) for one stage's model."""
  model, tokenizer = entry
  cond = {}
  if model.text_config is not None:
    n = model.text_config.max_position_embeddings
    encode = lambda prompt: sampling.text_fn(model.text_config)(
        {"params": model.params["text_encoder"]},
        jnp.asarray(tokenizer([prompt], max_length=n)))
    cond["text"], cond["uncond_text"] = encode(o.prompt), encode(o.negative_prompt)
  if model.unet_config.num_class_embeds is not None:
    if o.class_label is None:
      raise ValueError(f"{model.source}: a class-conditional model; give class_label")
    cond["labels"] = jnp.asarray([o.class_label], jnp.int32)
  return cond


def _key_frames(models: ChainModels, o: GenerateOptions, p: Plan, bar):
  """Yields the K key-frame latents (1, n, h, w, C) window by window: the key-frame
  model's clip, then one prediction round at a time; between rounds only the last
  num_context latents are kept."""
  opts = ContextSampleOptions(num_steps=o.steps, sampler=o.sampler, eta=o.eta,
                              context_scale=o.context_scale,
                              guidance_scale=o.guidance_scale)
  shape = (1, p.first_clip, *p.latent_hw, models.base.vae_config.latent_channels)
  if models.keyframe is not None:
    # An all-zero mask: nothing known, plain text-guided sampling of the clip.
    first = context_sampling.sample_clip(
        models.samplers["keyframe"], jnp.zeros(shape), jnp.zeros(shape[:2]),
        dataclasses.replace(opts, context_scale=1.0),
        key=jax.random.key(_seed(o.seed, 0)), **_conditioning(models.keyframe, o))
  if models.predictor is None:
    bar.update(first.shape[1])
    yield first
    return
  cm = models.samplers["predictor"]
  cond = _conditioning(models.predictor, o)
  frames = o.keyframes_per_clip if o.predictor_frames is None else o.predictor_frames
  if models.keyframe is None:  # the S = 0 branch makes the first clip
    first = context_sampling.predict(cm, jnp.zeros((1, 0) + shape[2:]), frames, opts,
                                     key=jax.random.key(_seed(o.seed, 1, 0)), **cond)
    first = first[:, :p.first_clip]
  bar.update(first.shape[1])
  yield first
  produced, s = first.shape[1], o.num_context
  context = first[:, first.shape[1] - min(s, first.shape[1]):]
  del first
  for r in range(1, p.rounds + 1):
    clip = context_sampling.predict(cm, context, frames, opts,
                                    key=jax.random.key(_seed(o.seed, 1, r)), **cond)
    new = clip[:, context.shape[1]:][:, :p.num_keys - produced]
    produced += new.shape[1]
    context = streaming.cat_frames(context, new)[:, -s:] if s else context[:, :0]
    bar.update(new.shape[1])
    yield new


def _interpolate_fn(models: ChainModels, name: str, o: GenerateOptions, stride: int,
                    stage_id: int):
  cm = models.samplers[name]
  cond = _conditioning(getattr(models, name), o)
  steps = o.steps if o.interp_steps is None else o.interp_steps
  opts = ContextSampleOptions(num_steps=steps, sampler=o.sampler, eta=o.eta,
                              context_scale=o.interp_context_scale,
                              guidance_scale=o.interp_guidance_scale)

  def fn(keys: jax.Array, index: int, first: int) -> jax.Array:
    del first  # windows share only a known key frame: nothing to keep consistent
    n = keys.shape[1]
    # The training layout (known at 0, stride, ...; the last stride - 1 frames after
    # the last key frame) for n keys, cut after the last key frame.
    out = context_sampling.interpolate(cm, keys, stride, opts,
                                       key=jax.random.key(_seed(o.seed, stage_id, index)),
                                       **cond)
    return out[:, :stride * (n - 1) + 1]
  return fn


def _upsample_fn(models: ChainModels, o: GenerateOptions):
  up = models.upsampler

  def fn(frames: jax.Array, index: int, first: int) -> jax.Array:
    del index
    # Noise by frame, not by call: the frames two chunks share start from the same
    # noise in both, so the context a chunk sees agrees with what its neighbour emitted.
    return upsampling.upsample(up.config, up.params, frames, o.upsampler_noise_level,
                               steps=o.steps if o.upsampler_steps is None
                               else o.upsampler_steps, sampler=o.sampler,
                               seed=_seed(o.seed, 4), eta=o.eta, first_frame=first)
  return fn


def generate_video(output: str | Path, options: GenerateOptions = GenerateOptions(), *,
                   models: Optional[ChainModels] = None, log: Optional[Log] = log_to_stderr,
                   **folders) -> GenerationResult:
  """Runs the chain and writes `output` and, with options.gif, `output`.gif.

  output: `.mp4` (H.264 at options.crf) or `.npy` (the uint8 frames (T, H, W, 3)
  exactly, e.g. for FVD against lossless reference clips); see `video_io.open_writer`.

  models: stages loaded with `load_chain` (reuse them across videos); otherwise
  `folders` (the keyword arguments of `load_chain`: keyframe_model=..., ...) are loaded.
  log: receives the notes on skipped stages (None: silent; they are also returned).
  Returns the written file's frame count, size and fps, the plan, and the notes.
  """
  if models is None:
    models = load_chain(**folders)
  elif folders:
    raise ValueError("pass either models or stage folders, not both")
  o = options
  p = plan(models, o)
  notes = list(models.notes)
  if models.predictor is None and p.num_keys > o.keyframes_per_clip:
    notes.append(f"{p.num_keys} key frames from one clip of the key-frame model "
                 f"(keyframes_per_clip={o.keyframes_per_clip}): convolutional in time")
  notes += p.notes
  if log is not None:
    for note in notes:
      log(note)
  output = Path(output)
  output.parent.mkdir(parents=True, exist_ok=True)
  decoder = models.decoder or models.base
  temporal_decoder = decoder.vae_temporal_config is not None
  bars = []

  def bar(desc: str, total: int):
    b = tqdm(total=total, desc=desc, unit="frame", disable=not o.progress,
             position=len(bars), leave=True)
    bars.append(b)
    return b

  key_bar = bar("key frames", p.num_keys)
  stages = []
  frames = p.num_keys
  for i in range(p.passes):
    name = "interpolator2" if i == 1 and models.interpolator2 is not None else "interpolator"
    frames = p.interp_stride * (frames - 1) + 1
    stages.append(streaming.Interpolation(
        _interpolate_fn(models, name, o, p.interp_stride, 2 + i), p.interp_stride,
        p.interp_window, bar(f"interpolate x{p.interp_stride} ({i + 1})", frames)))
  vae_params = decoder.params["vae"]
  decode = sampling.decode_fn(decoder.vae_config, decoder.vae_temporal_config)
  stages.append(streaming.OverlapChunker(
      lambda z, call, first: decode(vae_params, z), o.decode_chunk,
      o.decode_overlap if temporal_decoder else 0, bar("decode", frames)))
  if models.upsampler is not None:
    stages.append(streaming.OverlapChunker(_upsample_fn(models, o), o.upsample_chunk,
                                           o.upsample_overlap, bar("upsample", frames)))
  try:
    with video_io.open_writer(str(output), p.num_frames, fps=o.fps, crf=o.crf) as writer:
      sink = streaming.Sink(writer, p.num_frames, o.gif_max_frames if o.gif else 0,
                            o.gif_max_size, bar("write", p.num_frames))
      pipeline = streaming.Pipeline(stages + [sink])
      for keys in _key_frames(models, o, p, key_bar):
        pipeline.push(keys)
      pipeline.flush()
      if writer.num_frames != p.num_frames:  # an internal error, not a user one
        raise RuntimeError(f"wrote {writer.num_frames} frames, planned {p.num_frames}")
      size = writer.size
  finally:
    for b in bars:
      b.close()
  gif_path = None
  if o.gif and sink.preview:
    gif_path = str(output.with_suffix(".gif"))
    video_io.write_gif(gif_path, np.stack(sink.preview), fps=o.fps)
  return GenerationResult(path=str(output), gif_path=gif_path, num_frames=p.num_frames,
                          height=size[0], width=size[1], fps=o.fps, plan=p,
                          notes=tuple(notes))
