r"""videoldm-sample-image: prompt -> PNG with a converted image LDM.

  videoldm-sample-image --model=/ckpt/sd15 --prompt="a dash-cam view of a rainy road" \
      --sampler=dpmpp_2m --steps=25 --guidance_scale=7.5 --seed=0 --output=out.png
"""

import sys
from pathlib import Path

from absl import app, flags, logging
from PIL import Image

from videoldm_jax.cli import (autoencoder_export, check_at_least, check_seed, class_labels,
                              load_to_sample, output_path, run_app)

_MODEL = flags.DEFINE_string("model", None, "folder written by videoldm-convert or "
                             "videoldm-init-random")
_PROMPT = flags.DEFINE_string("prompt", "", "text prompt")
_NEGATIVE = flags.DEFINE_string("negative_prompt", "", "negative prompt (the CFG "
                                "unconditional branch)")
_LABEL = flags.DEFINE_integer("class_label", None, "class label, for class-conditional "
                              "UNets")
_NUM = flags.DEFINE_integer("num_images", 1, "images to generate, as one batch drawn "
                            "from --seed")
_SAMPLER = flags.DEFINE_enum("sampler", "ddim", ["ddim", "ddpm", "dpmpp_2m"], "sampler")
_STEPS = flags.DEFINE_integer("steps", 50, "denoising steps")
_CFG = flags.DEFINE_float("guidance_scale", 7.5, "classifier-free guidance scale (1 = off)")
_ETA = flags.DEFINE_float("eta", 0.0, "DDIM eta")
_SEED = flags.DEFINE_integer("seed", 0, "random seed")
_HEIGHT = flags.DEFINE_integer("height", None, "image height (default: the VAE factor x "
                               "64, i.e. 512 for SD)")
_WIDTH = flags.DEFINE_integer("width", None, "image width (default as height)")
_OUTPUT = flags.DEFINE_string("output", "sample.png", "PNG path; with --num_images > 1 "
                              "an index is appended")


def main(argv):
  del argv  # (run_app refuses positional arguments)
  logging.set_verbosity(logging.WARNING)  # Orbax reports every file at INFO
  if _MODEL.value is None:
    raise app.UsageError("--model is required")
  # Before the model is loaded and sampled (they failed after the sampling).
  # (A 0 size was taken as "the default".)
  check_at_least(("num_images", _NUM.value, 1), ("steps", _STEPS.value, 1),
                 ("height", _HEIGHT.value, 1), ("width", _WIDTH.value, 1))
  check_seed("seed", _SEED.value)
  Image.init()
  suffix = Path(_OUTPUT.value).suffix.lower()
  if Image.registered_extensions().get(suffix) not in Image.SAVE:  # (some only read)
    raise app.UsageError(f"--output={_OUTPUT.value}: not an image file name Pillow can "
                         "write (e.g. .png)")
  out = output_path(_OUTPUT.value, "output")
  # Imported here, not above: a usage error or --help then exits before JAX loads
  # (~1 s).
  from videoldm_jax import pretrained
  from videoldm_jax.pipelines import sampling
  configs = pretrained.load(_MODEL.value, weights=False)  # (refusals before the weights)
  labels = class_labels(configs.unet_config.num_class_embeds, _LABEL.value, _NUM.value,
                        _MODEL.value)
  default = 64 * configs.vae_config.downsample_factor
  height = default if _HEIGHT.value is None else _HEIGHT.value
  options = sampling.SampleOptions(
      height=height, width=height if _WIDTH.value is None else _WIDTH.value,
      num_steps=_STEPS.value, sampler=_SAMPLER.value, guidance_scale=_CFG.value,
      eta=_ETA.value, seed=_SEED.value)
  model, tokenizer = load_to_sample(_MODEL.value, configs, options, _NEGATIVE.value,
                                    _LABEL.value, _PROMPT.value)
  if _ETA.value != 0.0 and _SAMPLER.value != "ddim":
    print(f"note: --eta={_ETA.value} ignored: only --sampler=ddim takes it",
          file=sys.stderr)
  if autoencoder_export(model):
    print(f"note: --model={_MODEL.value} is an autoencoder-stage export: its UNet was not "
          "trained on this autoencoder's latents (the image_ldm stage does that); expect "
          "noise", file=sys.stderr)
  images = sampling.generate(model, tokenizer, [_PROMPT.value] * _NUM.value,
                                  _NEGATIVE.value, options, class_labels=labels)
  paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}")
                                          for i in range(len(images))]
  for img, path in zip(images, paths):
    Image.fromarray(img).save(path)
    print(f"wrote {path}", file=sys.stderr)
  # (what was sampled, as the sampler was given it: the options, not the flags)
  print(f"{len(images)} image(s) of {options.height}x{options.width}; {options.sampler}, "
        f"{options.num_steps} steps, seed {options.seed}", file=sys.stderr)


def run():
  run_app(main, __name__)


if __name__ == "__main__":
  run()
