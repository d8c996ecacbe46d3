r"""videoldm-init-random: a randomly initialised image LDM in the converted-model format.

  videoldm-init-random --config=configs/image_tiny.py --output=work/tiny_ldm

The folder is exactly what `videoldm-convert` writes (Orbax params + model_index.json +
tokenizer/), so every consumer of converted checkpoints can be run without weights.
"""

import sys
import tempfile

from absl import app, flags, logging
from ml_collections import config_flags

from videoldm_jax.cli import run_app

_CONFIG = config_flags.DEFINE_config_file("config", None, "model config file")
_OUTPUT = flags.DEFINE_string("output", None, "output folder (must not exist or be empty)")


def main(argv):
  del argv  # (run_app refuses positional arguments)
  logging.set_verbosity(logging.WARNING)  # Orbax reports every file at INFO
  if _CONFIG.value is None or _OUTPUT.value is None:
    raise app.UsageError("--config and --output are required")
  # Imported here, not above: the usage errors above and --help exit before JAX loads
  # (~1 s).
  from videoldm_jax import pretrained
  from videoldm_jax.models.tokenizer import write_byte_level_tokenizer
  try:  # before the model is built (minutes for an SD-sized one)
    pretrained.check_new_folder(_OUTPUT.value)
  except FileExistsError as e:
    raise app.UsageError(str(e)) from e
  model = pretrained.random_image_ldm(_CONFIG.value)
  with tempfile.TemporaryDirectory() as tok:
    tokenizer = None
    if model.text_config is not None:
      write_byte_level_tokenizer(tok)
      tokenizer = tok
    out = pretrained.save(_OUTPUT.value, model, tokenizer)
  print(f"wrote {out}", file=sys.stderr)


def run():
  run_app(main, __name__)


if __name__ == "__main__":
  run()
