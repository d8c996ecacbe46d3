r"""videoldm-sample: prompt -> video clips (mp4 + gif) with an exported video LDM.

  videoldm-sample --model=work/keyframe_tiny/export/step_200 \
      --prompt="a dash-cam view of a road at night" --num_frames=8 --height=32 \
      --width=32 --num_videos=2 --output=work/samples/night.mp4

Writes OUTPUT (mp4, several clips tiled side by side) and the same clip as .gif.
"""

import sys
from pathlib import Path

from absl import app, flags, logging

from videoldm_jax.cli import (autoencoder_export, check_at_least, check_seed, class_labels,
                              load_to_sample, output_path, run_app)
from videoldm_jax import video_io

_MODEL = flags.DEFINE_string("model", None, "exported video model folder "
                             "(WORKDIR/export/step_N)")
_PROMPT = flags.DEFINE_string("prompt", "", "text prompt")
_NEGATIVE = flags.DEFINE_string("negative_prompt", "", "negative prompt")
_NUM = flags.DEFINE_integer("num_videos", 1, "clips to sample (one batch)")
_FRAMES = flags.DEFINE_integer("num_frames", 8, "frames per clip (may exceed training)")
_HEIGHT = flags.DEFINE_integer("height", 64, "frame height in pixels")
_WIDTH = flags.DEFINE_integer("width", 64, "frame width in pixels")
_SAMPLER = flags.DEFINE_enum("sampler", "ddim", ["ddim", "ddpm", "dpmpp_2m"], "sampler")
_STEPS = flags.DEFINE_integer("steps", 25, "denoising steps")
_CFG = flags.DEFINE_float("guidance_scale", 5.0, "classifier-free guidance scale")
_LABEL = flags.DEFINE_integer("class_label", None, "class label, for class-conditional "
                              "models (e.g. UCF-101's 0..100)")
_SEED = flags.DEFINE_integer("seed", 0, "random seed")
_FPS = flags.DEFINE_float("fps", 8, "frames per second of the written files")
_OUTPUT = flags.DEFINE_string("output", "sample.mp4", "mp4 path (a .gif is written beside)")


def main(argv):
  del argv  # (run_app refuses positional arguments)
  logging.set_verbosity(logging.WARNING)  # Orbax reports every file at INFO
  if _MODEL.value is None:
    raise app.UsageError("--model is required")
  # Before the model is loaded and sampled (they failed after the sampling, some with
  # a ZeroDivisionError or FFmpeg's "Could not determine output format").
  check_at_least(("num_videos", _NUM.value, 1), ("num_frames", _FRAMES.value, 1),
                 ("height", _HEIGHT.value, 1), ("width", _WIDTH.value, 1),
                 ("steps", _STEPS.value, 1))
  check_seed("seed", _SEED.value)
  if Path(_OUTPUT.value).suffix.lower() != ".mp4":
    raise app.UsageError(f"--output={_OUTPUT.value}: expected an .mp4 path (the .gif is "
                         "written beside it)")
  try:  # the rates both writers can store (0.0001 and inf failed after the sampling)
    video_io.rate_and_crf(_OUTPUT.value, _FPS.value, 18)
    video_io.check_gif_fps(str(Path(_OUTPUT.value).with_suffix(".gif")), _FPS.value)
  except ValueError as e:
    raise app.UsageError(f"--fps: {e}") from None
  out = output_path(_OUTPUT.value, "output")
  # Imported here, not above: a usage error or --help then exits before JAX loads
  # (~1 s).
  from videoldm_jax import pretrained
  from videoldm_jax.pipelines import sampling
  configs = pretrained.load(_MODEL.value, weights=False)  # (refusals before the weights)
  if configs.temporal_config is None:
    if configs.vae_temporal_config is not None:
      what = ("a decoder-stage export on an image model (its video decoder is for "
              "videoldm-generate --decoder_model)")
    elif autoencoder_export(configs):
      what = ("an autoencoder-stage export (an image model whose UNet has not been "
              "trained on its latents: train the image_ldm stage on it)")
    else:
      what = "an image model (no temporal layers; videoldm-sample-image samples it)"
    raise app.UsageError(f"--model={_MODEL.value}: {what}; pass a key-frame, prediction "
                         "or interpolation export")
  labels = class_labels(configs.unet_config.num_class_embeds, _LABEL.value, _NUM.value,
                        _MODEL.value)
  options = sampling.SampleOptions(
      height=_HEIGHT.value, width=_WIDTH.value, num_steps=_STEPS.value,
      sampler=_SAMPLER.value, guidance_scale=_CFG.value, seed=_SEED.value,
      num_frames=_FRAMES.value)
  model, tokenizer = load_to_sample(_MODEL.value, configs, options, _NEGATIVE.value,
                                    _LABEL.value, _PROMPT.value)
  videos = sampling.generate(model, tokenizer, [_PROMPT.value] * _NUM.value,
                             _NEGATIVE.value, options, class_labels=labels)
  clip = video_io.video_grid(videos, cols=min(len(videos), 4), pad=2)
  video_io.write_mp4(str(out), clip, fps=_FPS.value)
  video_io.write_gif(str(out.with_suffix(".gif")), clip, fps=_FPS.value)
  # (what was sampled, as the sampler was given it: the options, not the flags)
  print(f"wrote {out} and {out.with_suffix('.gif')} ({len(videos)} clips of "
        f"{videos.shape[1]} frames, {videos.shape[2]}x{videos.shape[3]}; {options.sampler}, "
        f"{options.num_steps} steps, seed {options.seed})", file=sys.stderr)


def run():
  run_app(main, __name__)


if __name__ == "__main__":
  run()
