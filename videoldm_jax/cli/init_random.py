r"""videoldm-init-random: a randomly initialised image LDM in the converted-model format.

  videoldm-init-random --config=configs/image_tiny.py --output=work/tiny_ldm

The folder is exactly what `videoldm-convert` writes (Orbax params + model_index.json +
tokenizer/), so every consumer of converted checkpoints can be run without weights.
"""

import sys
import tempfile

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from ml_collections import config_flags

from videoldm_jax import pretrained
from videoldm_jax.models import params as params_lib
from videoldm_jax.models import unet as unet_lib
from videoldm_jax.models import vae as vae_lib
from videoldm_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from videoldm_jax.models.tokenizer import write_byte_level_tokenizer

_CONFIG = config_flags.DEFINE_config_file("config", None, "model config file")
_OUTPUT = flags.DEFINE_string("output", None, "output folder (must not exist or be empty)")


def random_image_ldm(config) -> pretrained.ImageLDM:
  """Builds an `ImageLDM` with random params from a config like configs/image_tiny.py."""
  unet_cfg = unet_lib.UNetConfig.from_dict(dict(config.unet), "config.unet").validate()
  vae_cfg = vae_lib.VAEConfig.from_dict(dict(config.vae), "config.vae")
  params = {
      "unet": params_lib.init_params(unet_lib.UNet(unet_cfg), config.seed,
                                     *unet_lib.example_inputs(unet_cfg)),
      "vae": params_lib.init_params(vae_lib.AutoencoderKL(vae_cfg), config.seed,
                                    *vae_lib.example_inputs(vae_cfg)),
  }
  text_cfg = None
  if config.get("text_encoder") is not None:
    text_cfg = CLIPTextConfig.from_dict(dict(config.text_encoder), "config.text_encoder")
    ids = jnp.zeros((1, text_cfg.max_position_embeddings), jnp.int32)
    params["text_encoder"] = params_lib.init_params(CLIPTextModel(text_cfg), config.seed,
                                                    ids)
  return pretrained.ImageLDM(unet_cfg, vae_cfg, text_cfg, dict(config.scheduler), params,
                             source="random init")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax reports every file at INFO
  if _CONFIG.value is None or _OUTPUT.value is None:
    raise app.UsageError("--config and --output are required")
  model = random_image_ldm(_CONFIG.value)
  with tempfile.TemporaryDirectory() as tok:
    tokenizer = None
    if model.text_config is not None:
      write_byte_level_tokenizer(tok)
      tokenizer = tok
    out = pretrained.save(_OUTPUT.value, model, tokenizer)
  print(f"wrote {out}", file=sys.stderr)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
