r"""videoldm-convert: Stable Diffusion weights -> a videoldm-jax model folder (Orbax + JSON).

  # a diffusers pipeline folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)
  videoldm-convert --diffusers=/data/stable-diffusion-2-1 --output=/ckpt/sd21
  # an original single-file checkpoint; the tokenizer comes from a local folder
  videoldm-convert --single_file=/data/v1-5-pruned-emaonly.safetensors --preset=sd15 \
      --tokenizer=/data/clip-vit-large-patch14 --output=/ckpt/sd15
"""

import sys

import jax
from absl import app, flags, logging

from videoldm_jax.cli import run_app
from videoldm_jax import pretrained
from videoldm_jax.convert import pipeline_import, presets
from videoldm_jax.pipelines import sampling

_DIFFUSERS = flags.DEFINE_string("diffusers", None, "diffusers pipeline folder")
_SINGLE = flags.DEFINE_string("single_file", None, "original LDM checkpoint (.safetensors)")
_PRESET = flags.DEFINE_string("preset", "sd15", "model configs for --single_file: one of "
                              f"{sorted(presets.PRESETS)} or a JSON file with unet, vae, "
                              "text_encoder and scheduler configs")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer folder for --single_file "
                                 "(vocab.json + merges.txt, or tokenizer.json)")
_NO_TEXT = flags.DEFINE_bool("skip_text_encoder", False, "--single_file: do not convert "
                             "the text encoder")
_EMA = flags.DEFINE_bool("extract_ema", False, "--single_file: take the UNet from the "
                         "model_ema copy")
_OUTPUT = flags.DEFINE_string("output", None, "output folder (must not exist or be empty)")


def main(argv):
  del argv  # (run_app refuses positional arguments)
  logging.set_verbosity(logging.WARNING)  # Orbax reports every file at INFO
  if (_DIFFUSERS.value is None) == (_SINGLE.value is None):
    raise app.UsageError("give exactly one of --diffusers and --single_file")
  if _OUTPUT.value is None:
    raise app.UsageError("--output is required")
  try:  # before the source model loads
    pretrained.check_new_folder(_OUTPUT.value)
  except FileExistsError as e:
    raise app.UsageError(str(e)) from e
  if _DIFFUSERS.value is not None:
    # A diffusers folder brings its own configs, tokenizer, text encoder and weights.
    # (Against their defaults: --noextract_ema or --preset=sd15 ask for nothing else.)
    ignored = [f"--{f}" for f in ("preset", "tokenizer", "skip_text_encoder", "extract_ema")
               if flags.FLAGS[f].value != flags.FLAGS[f].default]
    if ignored:
      raise app.UsageError(f"{', '.join(ignored)}: --single_file options; a --diffusers "
                           "folder brings its own configs, tokenizer and text encoder")
    model, tokenizer = pipeline_import.from_diffusers(_DIFFUSERS.value)
  else:
    with_text = not _NO_TEXT.value
    if not with_text and _TOKENIZER.value is not None:
      raise app.UsageError("--tokenizer with --skip_text_encoder: a folder without a text "
                           "encoder keeps no tokenizer")
    if with_text and _TOKENIZER.value is None:
      raise app.UsageError("--single_file needs --tokenizer=FOLDER (single files carry no "
                           "tokenizer), or --skip_text_encoder")
    model = pipeline_import.from_single_file(_SINGLE.value, _PRESET.value,
                                             extract_ema=_EMA.value,
                                             with_text_encoder=with_text)
    tokenizer = _TOKENIZER.value if with_text else None
  try:  # (a diffusers folder without text_encoder/ too: it converted without a word)
    sampling.check_context_source(model, _SINGLE.value or _DIFFUSERS.value)
  except ValueError as e:  # still a valid folder: training can feed it cached embeddings
    print(f"note: {e}", file=sys.stderr)
  out = pretrained.save(_OUTPUT.value, model, tokenizer)
  counts = {k: sum(x.size for x in jax.tree_util.tree_leaves(v))
            for k, v in model.params.items()}
  print(f"wrote {out}: " + ", ".join(f"{k} {n / 1e6:.2f}M params" for k, n in counts.items()),
        file=sys.stderr)


def run():
  run_app(main, __name__)


if __name__ == "__main__":
  run()
