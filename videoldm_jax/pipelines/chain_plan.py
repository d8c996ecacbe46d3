"""What a generation run makes, decided before anything is sampled: the options
(`GenerateOptions`), and the frame counts, sizes and notes they give for a loaded chain
(`plan`, which raises ValueError for impossible options). Pure: no model is called.
"""

import dataclasses
import math
from typing import Optional

from videoldm_jax import video_io
from videoldm_jax.diffusion import samplers as samplers_lib
from videoldm_jax.diffusion.schedules import schedule_from_diffusers_config
from videoldm_jax.models.config_base import is_integer, is_seed
from videoldm_jax.pipelines import sampling
from videoldm_jax.pipelines.chain_models import ChainModels


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
  """What `generate_video` makes. Lengths count frames of the OUTPUT unless named keys.

  Conditioning: `prompt` / `negative_prompt` (text models), `class_label` (class-
  conditional UNets). Length: `num_frames`, or `duration` seconds at `fps` (duration x
  fps rounded, halves to even: 2.5 frames are 2); neither: one key-frame clip through
  the chain. `seed` in [0, 2^32). `height` / `width`: frames before the
  upsampler, any multiple of the latent models' total downsampling (larger than
  training = convolutional in space).
  Key frames: `keyframes_per_clip` frames from the key-frame model (without a predictor
  it samples all key frames in one clip: convolutional in time); the predictor makes
  clips of `predictor_frames` (default keyframes_per_clip) from the last `num_context`.
  Guidance: `guidance_scale` (classifier-free guidance of key frames and predictor:
  against the negative prompt, or a class-conditional model's null class),
  `context_scale` (s of context guidance, predictor; the paper finds s > 1 helps), and
  for the interpolators `interp_guidance_scale` / `interp_context_scale` (1.0: no
  extra branch; the key frames already carry the prompt).
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


def check_options(o: GenerateOptions) -> None:
  """ValueError for options impossible whatever the models (`plan` checks the rest):
  callable before the models load, which takes minutes for SD-sized exports."""
  for field in dataclasses.fields(o):
    value = getattr(o, field.name)
    if field.type in (int, Optional[int]) and value is not None and not is_integer(value):
      # (num_frames=10.5 made 10 frames; a frame count of True made 1)
      raise ValueError(f"{field.name} must be an integer, got {value!r}")
  if not (o.fps > 0 and math.isfinite(o.fps)):
    raise ValueError(f"fps must be positive, got {o.fps}")
  for name in ("guidance_scale", "context_scale", "interp_guidance_scale",
               "interp_context_scale", "eta"):
    if not math.isfinite(getattr(o, name)):  # (NaN: every frame black, said by no one)
      raise ValueError(f"{name} must be a finite number, got {getattr(o, name)}")
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
  if not is_seed(o.seed):  # (NumPy's SeedSequence derives the stages' seeds from it)
    raise ValueError(f"seed must be an integer in [0, 2^32), got {o.seed!r}")
  if o.gif and (o.gif_max_size < 1 or o.gif_max_frames < 1):
    raise ValueError(f"gif_max_size and gif_max_frames must be >= 1 (or gif=False), got "
                     f"{o.gif_max_size}, {o.gif_max_frames}")
  if o.gif and o.fps < video_io.GIF_MIN_FPS:  # (the preview is written last)
    raise ValueError(f"fps {o.fps} is slower than the GIF preview can show (>= "
                     f"{video_io.GIF_MIN_FPS:.6f}; or gif=False)")
  if not 0 <= o.interp_passes <= 2:
    raise ValueError(f"interp_passes must be 0, 1 or 2, got {o.interp_passes}")
  if o.interp_stride is not None and o.interp_stride < 2:
    raise ValueError(f"interp_stride must be >= 2, got {o.interp_stride}")
  if o.keyframes_per_clip < 1:
    raise ValueError(f"keyframes_per_clip must be >= 1, got {o.keyframes_per_clip}")
  if o.num_frames is not None and o.duration is not None:
    raise ValueError("give num_frames or duration, not both")
  if o.duration is not None and not (o.duration > 0 and math.isfinite(o.duration)):
    raise ValueError(f"duration must be a positive number of seconds, got {o.duration}")
  if ((o.num_frames is not None and o.num_frames < 1)
      or (o.duration is not None and round(o.duration * o.fps) < 1)):
    raise ValueError(f"the video must have at least one frame (num_frames={o.num_frames}, "
                     f"duration={o.duration}, fps={o.fps})")
  if o.height < 1 or o.width < 1:
    raise ValueError(f"height and width must be positive, got {o.height}x{o.width}")
  for name, chunk, overlap in (("decode", o.decode_chunk, o.decode_overlap),
                               ("upsample", o.upsample_chunk, o.upsample_overlap)):
    if chunk < 1 or overlap < 0:
      raise ValueError(f"{name}_chunk must be >= 1 and {name}_overlap >= 0, got "
                       f"{chunk}, {overlap}")


def plan(models: ChainModels, o: GenerateOptions) -> Plan:
  """Frame counts and sizes of a run; raises ValueError for impossible options (before
  anything is sampled)."""
  check_options(o)
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
  passes = o.interp_passes if models.interpolator is not None else 0
  trained = _trained_on(models)
  for name, stage in (("predictor", "predictor"), ("interpolator", "interpolator"),
                      ("interpolator2", "interpolator")):
    # Both are context models: a predictor and an interpolator swapped between the
    # flags loaded, and the record checks below read fields the other lacks.
    got = trained[name].get("stage")
    if got is not None and got != stage:
      raise ValueError(f"{models.paths.get(name, name)}: an export of the {got} stage, "
                       f"given as the {name} (--{name}_model)")
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
  if o.num_frames is not None:
    n = int(o.num_frames)
  elif o.duration is not None:
    n = int(round(o.duration * o.fps))
  else:
    n = f * (t - 1) + 1
  k = -(-(n - 1) // f) + 1
  p = t if o.predictor_frames is None else o.predictor_frames
  s = o.num_context
  if models.predictor is not None:
    if not 0 <= s < p:
      # (A predictor_frames the user never gave, taken from keyframes_per_clip, was named
      # as if given: --keyframes_per_clip=2 refused num_context=2, its default.)
      given = ("" if o.predictor_frames is not None
               else f" (predictor_frames defaults to keyframes_per_clip={t}; give it)")
      raise ValueError(f"num_context={s} must be in [0, predictor_frames={p}){given}")
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
  interp_clip = trained["interpolator"].get("num_frames", 0)
  window = o.interp_window if o.interp_window is not None else interp_clip // stride or t
  if passes and window < 2:
    # (Only a default gets here (check_options refuses a given one), and was named as if
    # given: --keyframes_per_clip=1, or a training clip of 1 stride.)
    source = (f"the interpolator's training clip of {interp_clip} frames // interp_stride="
              f"{stride}" if interp_clip // stride else f"keyframes_per_clip={t}")
    raise ValueError(f"interp_window must be >= 2 key frames, got {window} (its default: "
                     f"{source}); give interp_window")
  if o.class_label is None:
    # (found when the stage's turn came: a class-conditional predictor after a text
    # key-frame model failed once the key frames had been sampled)
    sampled = {"keyframe": True, "predictor": rounds > 0 or models.keyframe is None,
               "interpolator": passes >= 1, "interpolator2": passes >= 2}
    for stage, used in sampled.items():
      entry = getattr(models, stage)
      if used and entry is not None and entry[0].unet_config.num_class_embeds:
        raise ValueError(f"{models.paths.get(stage, stage)}: a class-conditional model; "
                         "give class_label")
  notes = []
  text_stage = next((e for e in (models.keyframe, models.predictor) if e is not None), None)
  if text_stage is not None:
    notes += sampling.truncation_notes(*text_stage, {"prompt": o.prompt,
                                                     "negative_prompt": o.negative_prompt})
  if o.eta != 0.0 and o.sampler != "ddim":
    notes.append(f"eta={o.eta} ignored: only the ddim sampler takes it (sampler="
                 f"{o.sampler})")
  for name, needs in (("interpolator", 1), ("interpolator2", 2)):
    if getattr(models, name) is not None and o.interp_passes < needs:
      notes.append(f"{name} model {models.paths.get(name, '')} unused: interp_passes="
                   f"{o.interp_passes}")
  for stage, runs, names in (
      ("interpolation", passes > 0, ("interp_stride", "interp_window", "interp_steps")),
      ("upsampler", models.upsampler is not None, ("upsampler_steps",
                                                   "upsampler_noise_level"))):
    given = [f"{name}={getattr(o, name)}" for name in names if getattr(o, name) is not None]
    if given and not runs:  # (passed silently: a flag for a stage the chain lacks)
      notes.append(f"{', '.join(given)} ignored: the chain runs no {stage}")
  if o.class_label is not None and not conditional:
    notes.append(f"class_label={o.class_label} ignored: no model of the chain is "
                 "class-conditional")
  nulls = [stage for stage in ("keyframe", "predictor", "interpolator", "interpolator2")
           if getattr(models, stage) is not None
           and sampling.null_class_label(getattr(models, stage)[0]) == o.class_label]
  if o.class_label is not None:
    for stage in nulls:
      notes.append(f"class_label={o.class_label} is the null class (no class) of the {stage} "
                   f"model: {sampling.null_class_effect(getattr(models, stage)[0])}")
  # Context guidance subtracts the no-context prediction (S = 0): a model that never
  # trained without context gives an untrained branch there.
  # The predictor samples without context (S = 0) for the first clip when there is no
  # key-frame model, and in every round with num_context=0.
  without = [what for what, on in (("the first clip (no key-frame model)",
                                    models.predictor is not None and models.keyframe is None),
                                   ("every round (num_context=0)", rounds > 0 and s == 0))
             if on]
  if without and trained["predictor"].get("no_context_prob") == 0.0:
    notes.append(f"predictor stage: samples {' and '.join(without)} without context frames, "
                 "which it never trained (no clip without context): expect artefacts")
  for name, used, option, scale in (
      # (S = 0 rounds have no context to guide with: one branch runs.)
      ("predictor", rounds > 0 and s > 0, "context_scale", o.context_scale),
      ("interpolator", passes > 0, "interp_context_scale", o.interp_context_scale),
      ("interpolator2", passes == 2 and models.interpolator2 is not None,
       "interp_context_scale", o.interp_context_scale)):
    if used and scale != 1.0 and trained[name].get("no_context_prob") == 0.0:
      notes.append(f"{name} stage: {option}={scale} guides against its no-context "
                   "prediction, which it never trained (no clip without context): "
                   f"expect artefacts; {option}=1 does not use it")
  if models.base.text_config is not None and o.negative_prompt and o.guidance_scale == 1.0:
    # (The unconditional branch it conditions is not run: the video was the same.)
    notes.append(f"negative_prompt={o.negative_prompt!r} ignored: guidance_scale=1 runs no "
                 "unconditional branch")
  if models.base.text_config is None:
    # No text encoder: guidance_scale needs a class-conditional model's null class
    # (the label of the unconditional branch; config.null_class_label in training).
    # (The predictor samples only in prediction rounds, or the first clip without a
    # key-frame model.)
    samples = {"keyframe": models.keyframe is not None,
               "predictor": models.predictor is not None and (
                   rounds > 0 or models.keyframe is None)}
    guided = {stage: sampling.guided(getattr(models, stage)[0])
              for stage, on in samples.items() if on}
    ignored = [f"{k}={v!r}" for k, v in (("prompt", o.prompt),
                                          ("negative_prompt", o.negative_prompt)) if v]
    if o.guidance_scale != 1.0 and not any(guided.values()):
      ignored.append(f"guidance_scale={o.guidance_scale}")
    if ignored:
      notes.append(f"{', '.join(ignored)} ignored: the models have no text encoder"
                   + ("" if any(guided.values()) else " (no classifier-free guidance "
                      "without one, or a class-conditional model's null class)"))
    unguided = [stage for stage, g in guided.items() if not g]
    if o.guidance_scale != 1.0 and any(guided.values()) and unguided:
      notes.append(f"guidance_scale={o.guidance_scale}: the {' and '.join(unguided)} "
                   "model samples unguided (no text encoder, and no null class: not "
                   "class-conditional or trained without label dropout)")
  # (stage, used, frames per call, the option that sets it, its value); a short video
  # makes shorter calls than the options say: the key-frame model is called once, on
  # the first clip, and a window or chunk holds at most the frames there are (the
  # decoder and upsampler get the video's n, cut from the generated f (k - 1) + 1).
  calls = [("keyframe", models.keyframe is not None, first, "keyframes_per_clip", t),
           ("predictor", rounds > 0, p, "predictor_frames", p),
           ("interpolator", passes > 0, stride * min(window, k), "interp_window", window),
           ("interpolator2", passes == 2 and models.interpolator2 is not None,
            stride * min(window, stride * (k - 1) + 1), "interp_window", window),
           ("decoder", models.decoder is not None
            and models.decoder.vae_temporal_config is not None,
            min(o.decode_chunk + 2 * o.decode_overlap, n), "decode_chunk",
            o.decode_chunk),
           ("upsampler", models.upsampler is not None
            and models.upsampler.config.temporal is not None,
            min(o.upsample_chunk + 2 * o.upsample_overlap, n), "upsample_chunk",
            o.upsample_chunk)]
  for name, used, length, option, value in calls:
    clip = trained[name].get("num_frames")
    if used and clip is not None and length != clip:
      notes.append(f"{name} stage: calls of {length} frames, trained on clips of {clip} "
                   f"({option}={value}; temporal statistics follow the call length)")
  # Frame spacing: each stage's training clips were sampled data.frame_stride source
  # frames apart. Followed along the chain from the key frames: an interpolator fills
  # in key frames stride x its own spacing apart and makes frames at its own spacing.
  # A reused second pass fills in key frames 1 / stride of the first's apart, which
  # the one spacing it trained on cannot also match (the paper trains its interpolator
  # on both regimes, T -> 4T and 4T -> 16T; this stage on one): noted like a second
  # model's. Another spacing is motion of another speed than the stage learned, if the
  # stages' datasets share a frame rate (the records hold strides, not rates). Only the
  # first mismatch along the chain is noted: the stages after it follow from it.
  key_stage = "keyframe" if models.keyframe is not None else "predictor"
  key_spacing = trained[key_stage].get("frame_stride")
  used = {name: on for name, on, *_ in calls}
  caveat = ": on data of one frame rate, its motion runs at another speed than it learned"
  if key_spacing is not None:
    own = trained["predictor"].get("frame_stride")
    if key_stage == "keyframe" and used["predictor"] and own not in (None, key_spacing):
      notes.append(f"predictor stage: trained on frames {own} source frames apart, "
                   f"continues key frames {key_spacing} apart (the keyframe model's "
                   f"frame_stride){caveat}")
    spacing, source = key_spacing, f"the {key_stage} model's frame_stride={key_spacing}"
    stages = [("interpolator2" if i == 1 and models.interpolator2 is not None
               else "interpolator", i) for i in range(passes)]
    stages += [(name, None) for name in ("decoder", "upsampler") if used[name]]
    for name, i in stages:
      own = trained[name].get("frame_stride")
      if i is not None and own is not None and own * stride != spacing:
        reused = i == 1 and name == "interpolator"
        what = "interpolator stage, reused for pass 2," if reused else f"{name} stage:"
        notes.append(f"{what} trained to fill in key frames {own * stride} source "
                     f"frames apart (frame_stride={own} x interp_stride={stride}), given "
                     f"key frames {spacing:g} apart ({source}){caveat}")
        break
      if i is None and own is not None and own != spacing:
        notes.append(f"{name} stage: trained on frames {own} source frames apart, used on "
                     f"frames {spacing:g} apart ({source}){caveat}")
        break
      if i is not None:
        spacing, source = ((own, f"the {name} model's frame_stride={own}") if own is not None
                           else (spacing / stride, f"{source}, / {stride} per pass"))
  # Each stage's step count on its own schedule's grid: a grid past the schedule (1000
  # 'leading' steps with steps_offset 1) or a repeating dpmpp_2m grid failed in the
  # sampler, after the stages before it had sampled.
  interp_steps = o.steps if o.interp_steps is None else o.interp_steps
  grids = [("keyframe", "steps", o.steps), ("predictor", "steps", o.steps)]
  grids += [(name, "interp_steps", interp_steps)
            for name in ("interpolator", "interpolator2")[:passes]]
  for name, option, steps in grids:
    entry = getattr(models, name)
    # (The predictor samples the first clip too when there is no key-frame model.)
    if entry is not None and (name != "predictor" or rounds > 0 or models.keyframe is None):
      sampling.check_step_grid(
          schedule_from_diffusers_config(entry[0].scheduler), o.sampler, steps,
          f"{name} model ({models.paths.get(name, entry[0].source)}), {option}")
  if models.upsampler is not None:
    up_steps = o.steps if o.upsampler_steps is None else o.upsampler_steps
    sampling.check_step_grid(models.upsampler.config.schedules()[:2], o.sampler, up_steps,
                             f"upsampler ({models.paths.get('upsampler')}), upsampler_steps")
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
  out["decoder"] = models.decoder.decoder_training if models.decoder is not None else {}
  out["upsampler"] = models.upsampler.training if models.upsampler is not None else {}
  return out
