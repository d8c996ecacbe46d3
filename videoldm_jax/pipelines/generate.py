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
call it). Loading the stages is `chain_models.load_chain`; the options and what they
make (frame counts, sizes, checks before sampling) are `chain_plan`.

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
import sys
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from videoldm_jax import video_io
from videoldm_jax.pipelines import context_sampling, sampling, streaming, upsampling
# The options, the plan and the loaded chain live in their own modules; they are part of
# this module's API (videoldm-generate, the demo and bench.sample use them from here).
from videoldm_jax.pipelines.chain_models import ChainModels, load_chain
from videoldm_jax.pipelines.chain_plan import GenerateOptions, Plan, check_options, plan
from videoldm_jax.pipelines.context_sampling import ContextSampleOptions

__all__ = ["ChainModels", "GenerateOptions", "GenerationResult", "Plan", "generate_video",
           "check_options", "load_chain", "log_to_stderr", "plan"]

Log = Callable[[str], None]


def log_to_stderr(message: str) -> None:
  """The default `log` of `generate_video`."""
  print(message, file=sys.stderr)


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
  """text / uncond_text (1, L, D) and labels / uncond_labels (1,) for one stage's model."""
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
    null = sampling.null_class_label(model)
    if null is not None:  # trained with label dropout: guidance against the null class
      cond["uncond_labels"] = jnp.asarray([null], jnp.int32)
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
  if models.predictor is None or (models.keyframe is not None and p.rounds == 0):
    # (no prediction round: a class-conditional predictor needs no label then)
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
  if Path(output).is_dir():  # (found at the rename, after the whole video was made)
    raise ValueError(f"{output}: is a folder; give a file path ending in .mp4 or .npy")
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
  # The frames past the video's end (of the last window) are not decoded or upsampled.
  stages.append(streaming.Cut(p.num_frames))
  vae_params = decoder.params["vae"]
  decode = sampling.decode_fn(decoder.vae_config, decoder.vae_temporal_config)
  stages.append(streaming.OverlapChunker(
      lambda z, call, first: decode(vae_params, z), o.decode_chunk,
      o.decode_overlap if temporal_decoder else 0, bar("decode", p.num_frames)))
  if models.upsampler is not None:
    # An image upsampler (no temporal layers) sees no neighbours: no overlap needed.
    overlap = o.upsample_overlap if models.upsampler.config.temporal is not None else 0
    stages.append(streaming.OverlapChunker(_upsample_fn(models, o), o.upsample_chunk,
                                           overlap, bar("upsample", p.num_frames)))
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
