"""Load the UNet and VAE of a Stable Diffusion checkpoint into Flax param trees.

Two sources: a diffusers folder (`unet/`, `vae/` with config.json + safetensors) and
an original LDM single file (see `ldm_keys`). Both end in `torch_layout.load_state_dict`,
which checks every key and shape.
"""

import re
from pathlib import Path

import numpy as np

from videoldm_jax.config_files import read_json_object
from videoldm_jax.convert import ldm_keys
from videoldm_jax.convert.diffusers_config import (unet_config_from_diffusers,
                                                   vae_config_from_diffusers)
from videoldm_jax.convert.safetensors_io import find_weights, load_safetensors
from videoldm_jax.convert.torch_layout import load_state_dict
from videoldm_jax.models import params as params_lib
from videoldm_jax.models import unet as unet_lib
from videoldm_jax.models import vae as vae_lib


def read_json(path: Path) -> dict:
  if not path.is_file():
    raise FileNotFoundError(f"{path}: missing (expected a diffusers config.json)")
  return read_json_object(path)


def unet_params_from_torch(config: unet_lib.UNetConfig, sd: dict[str, np.ndarray],
                           source: str, names=None) -> dict:
  """diffusers-named UNet state dict -> Flax params of `UNet(config)` (`names`: see
  `torch_layout.load_state_dict`)."""
  abstract = params_lib.abstract_params(unet_lib.UNet(config), *unet_lib.example_inputs(config))
  return load_state_dict(abstract, sd, what="UNet", source=source, names=names)


def vae_params_from_torch(config: vae_lib.VAEConfig, sd: dict[str, np.ndarray],
                          source: str, names=None) -> dict:
  """diffusers-named AutoencoderKL state dict -> Flax params of `AutoencoderKL(config)`."""
  abstract = params_lib.abstract_params(vae_lib.AutoencoderKL(config),
                                        *vae_lib.example_inputs(config))
  return load_state_dict(abstract, sd, what="VAE", source=source, names=names)


def load_diffusers_unet(folder: str | Path) -> tuple[unet_lib.UNetConfig, dict]:
  """`unet/` folder of a diffusers pipeline -> (config, Flax params)."""
  folder = Path(folder)
  config = unet_config_from_diffusers(read_json(folder / "config.json"),
                                      str(folder / "config.json"))
  weights = find_weights(folder, "diffusion_pytorch_model")
  return config, unet_params_from_torch(config, load_safetensors(weights), str(weights))


# VAE folders saved before diffusers 0.15 (SD 1.5's on the Hub among them) name the
# mid-block attention's projections as the old AttentionBlock did; diffusers renames
# them on load, and so do we.
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v",
                        "proj_attn": "to_out.0"}
_OLD_ATTENTION_KEY = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)"
                                r"\.(weight|bias)$")


def rename_old_attention(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A VAE state dict with pre-0.15 attention names (`query`, `key`, `value`,
  `proj_attn`) renamed to the current ones; other keys unchanged."""
  out = {}
  for key, value in sd.items():
    m = _OLD_ATTENTION_KEY.match(key)
    out[f"{m[1]}.{_OLD_ATTENTION_NAMES[m[2]]}.{m[3]}" if m else key] = value
  return out


def load_diffusers_vae(folder: str | Path) -> tuple[vae_lib.VAEConfig, dict]:
  """`vae/` folder of a diffusers pipeline -> (config, Flax params)."""
  folder = Path(folder)
  config = vae_config_from_diffusers(read_json(folder / "config.json"),
                                     str(folder / "config.json"))
  weights = find_weights(folder, "diffusion_pytorch_model")
  sd = rename_old_attention(load_safetensors(weights))
  return config, vae_params_from_torch(config, sd, str(weights))


def unet_from_ldm(config: unet_lib.UNetConfig, unet_sd: dict[str, np.ndarray],
                  source: str) -> dict:
  """UNet part of a split LDM checkpoint (prefix removed) -> Flax params."""
  table = ldm_keys.unet_key_table(config)
  return unet_params_from_torch(config, ldm_keys.unet_ldm_to_diffusers(unet_sd, config),
                                f"{source} ({ldm_keys.UNET_PREFIX}*)",
                                lambda k: ldm_keys.UNET_PREFIX + ldm_keys.ldm_key(k, table))


def vae_from_ldm(config: vae_lib.VAEConfig, vae_sd: dict[str, np.ndarray],
                 source: str) -> dict:
  """VAE part of a split LDM checkpoint (prefix removed) -> Flax params."""
  table = ldm_keys.vae_key_table(config)
  return vae_params_from_torch(config, ldm_keys.vae_ldm_to_diffusers(vae_sd, config),
                               f"{source} ({ldm_keys.VAE_PREFIX}*)",
                               lambda k: ldm_keys.VAE_PREFIX + ldm_keys.ldm_key(k, table))
