r"""videoldm-generate: prompt -> a long video through the whole Video LDM chain.

  videoldm-generate \
      --keyframe_model=work/keyframe_tiny/export/step_200 \
      --predictor_model=work/predictor_tiny/export/step_200 \
      --interpolator_model=work/interpolator_tiny/export/step_200 \
      --decoder_model=work/decoder_tiny/export/step_400 \
      --upsampler_model=work/upsampler_tiny/export/step_900 \
      --prompt="a dash-cam view of a road at night" --duration=10 --fps=24 \
      --height=32 --width=32 --output=work/videos/night.mp4

Key frames (key-frame model) -> autoregressive prediction to the requested length
(predictor) -> x4 and x4 again (interpolator; --interpolator2_model for a second one)
-> temporal decoder -> 4x upsampler -> OUTPUT (.mp4, or .npy: the uint8 frames exactly,
for FVD against lossless clips) and OUTPUT.gif (a short, downscaled preview). Each
stage's folder is optional except a key-frame or prediction model; a missing stage is
skipped with a note. Memory does not grow with --duration: the video is
generated, decoded and written in chunks (pipelines/generate.py).

Personalisation: --image_checkpoint=DIR (an image LDM folder, e.g. a DreamBooth
fine-tune converted with videoldm-convert) replaces the spatial UNet parameters of the
key-frame, prediction and interpolation models, keeping their temporal layers
(--personalize_parts adds vae / text_encoder).

Several --seeds make one video each (OUTPUT_seedN.mp4), reusing the compiled models.
"""

import sys
from pathlib import Path

from absl import app, flags, logging

from videoldm_jax import video_io
from videoldm_jax.cli import check_at_least, check_seed, output_path, run_app, seed_outputs

_STAGES = ("keyframe", "predictor", "interpolator", "interpolator2", "decoder", "upsampler")
_MODEL_HELP = {
    "keyframe": "key-frame model folder (key-frame stage export)",
    "predictor": "prediction model folder (predictor stage export); extends the video "
                 "autoregressively",
    "interpolator": "interpolation model folder (interpolator stage export); applied "
                    "--interp_passes times",
    "interpolator2": "a second interpolation model for the second pass",
    "decoder": "temporal decoder folder (decoder stage export); default: the key-frame "
               "model's frame-wise image decoder",
    "upsampler": "4x upsampler folder (upsampler stage export)",
}
_FOLDERS = {s: flags.DEFINE_string(f"{s}_model", None, _MODEL_HELP[s]) for s in _STAGES}
_IMAGE = flags.DEFINE_string("image_checkpoint", None, "image LDM folder whose spatial UNet "
                             "replaces theta of the UNet stages (personalisation)")
_PARTS = flags.DEFINE_list("personalize_parts", ["unet"], "what --image_checkpoint "
                           "replaces: unet, vae, text_encoder")
_PROMPT = flags.DEFINE_string("prompt", "", "text prompt")
_NEGATIVE = flags.DEFINE_string("negative_prompt", "", "negative prompt")
_LABEL = flags.DEFINE_integer("class_label", None, "class label (class-conditional models)")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "one video per seed")
_FRAMES = flags.DEFINE_integer("num_frames", None, "frames of the output video")
_DURATION = flags.DEFINE_float("duration", None, "seconds of video (instead of num_frames)")
_FPS = flags.DEFINE_float("fps", 24.0, "frame rate of the output (key frames run at "
                          "fps / stride^passes; the stride is the interpolator's, 4 "
                          "by default)")
_HEIGHT = flags.DEFINE_integer("height", 64, "frame height before the upsampler")
_WIDTH = flags.DEFINE_integer("width", 64, "frame width before the upsampler")
_SAMPLER = flags.DEFINE_enum("sampler", "ddim", ["ddim", "ddpm", "dpmpp_2m"], "sampler")
_STEPS = flags.DEFINE_integer("steps", 25, "denoising steps (key frames and predictor)")
_ETA = flags.DEFINE_float("eta", 0.0, "DDIM stochasticity")
_CFG = flags.DEFINE_float("guidance_scale", 5.0, "classifier-free guidance scale (text, or "
                          "a class-conditional model's null class)")
_CTX = flags.DEFINE_float("context_scale", 1.0, "context guidance scale of the predictor "
                          "(> 1 helps in the paper)")
_KPC = flags.DEFINE_integer("keyframes_per_clip", 8, "key frames per key-frame clip "
                            "(the key-frame model's training length)")
_PRED_FRAMES = flags.DEFINE_integer("predictor_frames", None, "frames per predictor clip "
                                    "(default keyframes_per_clip)")
_NUM_CONTEXT = flags.DEFINE_integer("num_context", 2, "context key frames per prediction")
_PASSES = flags.DEFINE_integer("interp_passes", 2, "interpolation passes (0, 1, 2), each "
                               "x --interp_stride frames")
_STRIDE = flags.DEFINE_integer("interp_stride", None, "frames per key frame and pass "
                               "(default: the interpolator's training record, else 4; "
                               "another than it trained on is refused)")
_WINDOW = flags.DEFINE_integer("interp_window", None, "key frames per interpolator call "
                               "(default: the interpolator's training num_frames // its "
                               "stride, else keyframes_per_clip)")
_INTERP_STEPS = flags.DEFINE_integer("interp_steps", None, "interpolator steps "
                                     "(default --steps)")
_INTERP_CFG = flags.DEFINE_float("interp_guidance_scale", 1.0, "classifier-free guidance "
                                 "of the interpolators")
_INTERP_CTX = flags.DEFINE_float("interp_context_scale", 1.0, "context guidance of the "
                                 "interpolators")
_DEC_CHUNK = flags.DEFINE_integer("decode_chunk", 16, "frames per decoder call")
_DEC_OVERLAP = flags.DEFINE_integer("decode_overlap", 2, "context frames on each side of a "
                                    "temporal-decoder chunk")
_UP_STEPS = flags.DEFINE_integer("upsampler_steps", None, "upsampler steps (default --steps)")
_NOISE = flags.DEFINE_integer("noise_level", None, "upsampler noise-augmentation level "
                              "(default: the model's)")
_UP_CHUNK = flags.DEFINE_integer("upsample_chunk", 8, "frames per upsampler call")
_UP_OVERLAP = flags.DEFINE_integer("upsample_overlap", 2, "context frames on each side of "
                                   "an upsampler chunk")
_CRF = flags.DEFINE_integer("crf", 18, "x264 quality (0 lossless .. 51 worst); 0 also "
                            "makes the files byte-identical run to run (see "
                            "video_io.write_mp4)")
_GIF = flags.DEFINE_bool("gif", True, "also write OUTPUT.gif, a short downscaled preview")
_GIF_FRAMES = flags.DEFINE_integer("gif_max_frames", 48, "frames of the gif preview")
_GIF_SIZE = flags.DEFINE_integer("gif_max_size", 128, "longer side of the gif preview")
_PROGRESS = flags.DEFINE_bool("progress", True, "progress bars")
_OUTPUT = flags.DEFINE_string("output", "video.mp4", ".mp4 path (H.264), or .npy for the "
                              "uint8 frames (T, H, W, 3) without codec loss (evaluation)")


def options(seed: int):
  """The flags' GenerateOptions (pipelines/chain_plan.py) for `seed`."""
  from videoldm_jax.pipelines.chain_plan import GenerateOptions
  return GenerateOptions(
      prompt=_PROMPT.value, negative_prompt=_NEGATIVE.value, class_label=_LABEL.value,
      seed=seed, num_frames=_FRAMES.value, duration=_DURATION.value, fps=_FPS.value,
      height=_HEIGHT.value, width=_WIDTH.value, sampler=_SAMPLER.value, steps=_STEPS.value,
      eta=_ETA.value, guidance_scale=_CFG.value, context_scale=_CTX.value,
      keyframes_per_clip=_KPC.value, predictor_frames=_PRED_FRAMES.value,
      num_context=_NUM_CONTEXT.value, interp_passes=_PASSES.value,
      interp_stride=_STRIDE.value, interp_window=_WINDOW.value, interp_steps=_INTERP_STEPS.value,
      interp_guidance_scale=_INTERP_CFG.value, interp_context_scale=_INTERP_CTX.value,
      decode_chunk=_DEC_CHUNK.value, decode_overlap=_DEC_OVERLAP.value,
      upsampler_steps=_UP_STEPS.value, upsampler_noise_level=_NOISE.value,
      upsample_chunk=_UP_CHUNK.value, upsample_overlap=_UP_OVERLAP.value, crf=_CRF.value,
      gif=_GIF.value, gif_max_frames=_GIF_FRAMES.value, gif_max_size=_GIF_SIZE.value,
      progress=_PROGRESS.value)


def main(argv):
  del argv  # (run_app refuses positional arguments)
  logging.set_verbosity(logging.WARNING)  # Orbax reports every file at INFO
  if not (_FOLDERS["keyframe"].value or _FOLDERS["predictor"].value):
    raise app.UsageError("give --keyframe_model and/or --predictor_model")
  try:
    seeds = [int(s) for s in _SEEDS.value]
  except ValueError as e:
    raise app.UsageError(f"--seeds must be integers, got {_SEEDS.value}") from e
  check_seed("seeds", *seeds)  # (check_options checks the first one, after the flags)
  if not seeds or len(set(seeds)) != len(seeds):  # nothing written / a file overwritten
    raise app.UsageError(f"--seeds must be distinct and at least one, got {_SEEDS.value}")
  if flags.FLAGS["personalize_parts"].present and not _IMAGE.value:
    raise app.UsageError("--personalize_parts says what --image_checkpoint replaces; give "
                         "--image_checkpoint too")
  if _IMAGE.value and not _PARTS.value:
    raise app.UsageError("--personalize_parts is empty: nothing of --image_checkpoint would "
                         "be used (unet, vae, text_encoder)")
  check_at_least(("interp_stride", _STRIDE.value, 2))  # before the models load
  out = Path(_OUTPUT.value)
  if out.suffix.lower() not in (".mp4", ".npy"):  # before minutes of model loading
    raise app.UsageError(f"--output={out}: expected a .mp4 or .npy path")
  output_path(_OUTPUT.value, "output")
  # Imported here, not above: the usage errors above and --help exit before JAX loads
  # (~1 s).
  from videoldm_jax.pipelines import generate
  try:  # what no model decides, before minutes of loading them
    generate.check_options(options(seeds[0]))
    if out.suffix.lower() == ".mp4":
      video_io.rate_and_crf(str(out), _FPS.value, _CRF.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  folders = {f"{s}_model": f.value for s, f in _FOLDERS.items()}
  try:  # what the models' configs decide (sizes, strides, steps), before their weights
    # load: found by generate_video's plan after minutes of loading, with a traceback
    generate.plan(generate.load_chain(**folders, weights=False), options(seeds[0]))
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  models = generate.load_chain(**folders, image_checkpoint=_IMAGE.value,
                               personalize_parts=_PARTS.value)
  for i, (seed, path) in enumerate(zip(seeds, seed_outputs(out, seeds))):
    # The notes on skipped stages are printed once, not once per seed.
    result = generate.generate_video(path, options(seed), models=models,
                                     log=generate.log_to_stderr if i == 0 else None)
    gif = f" and {result.gif_path}" if result.gif_path else ""
    print(f"wrote {result.path}{gif}: {result.num_frames} frames, {result.height}x"
          f"{result.width}, {result.fps:g} fps ({result.plan.num_keys} key frames)",
          file=sys.stderr)


def run():
  run_app(main, __name__)


if __name__ == "__main__":
  run()
