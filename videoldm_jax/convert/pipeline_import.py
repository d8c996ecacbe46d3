"""Whole-pipeline import: a diffusers folder or an LDM single file -> `PretrainedLDM`."""

import sys
from pathlib import Path

from videoldm_jax import pretrained
from videoldm_jax.convert import clip_keys, image_models, ldm_keys, presets
from videoldm_jax.convert.safetensors_io import find_weights, load_safetensors, refuse_pickle
from videoldm_jax.models import params as params_lib
from videoldm_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from videoldm_jax.models.unet import called_with_context, context_attention


def _abstract_text_params(config: CLIPTextConfig):
  import jax.numpy as jnp
  ids = jnp.zeros((1, config.max_position_embeddings), jnp.int32)
  return params_lib.abstract_params(CLIPTextModel(config), ids)


def text_params_from_torch(config: CLIPTextConfig, sd, source: str) -> dict:
  """transformers CLIPTextModel state dict -> Flax params of `CLIPTextModel(config)`."""
  return clip_keys.clip_params_from_torch(_abstract_text_params(config), sd, source)


def check_context_free(model: pretrained.PretrainedLDM, where: str) -> None:
  """A class-conditional UNet without a text encoder is run without a context
  (`unet.called_with_context`): its attn2 must attend to its own tokens. One trained
  with an external context of another width cannot run here: refused by name."""
  cfg = model.unet_config
  if called_with_context(cfg, model.text_config is not None):
    return
  found = context_attention(model.params["unet"])
  if found:
    path, keys, queries = found
    raise ValueError(
        f"{where}: a class-conditional UNet without a text encoder whose cross-attention "
        f"takes a context of cross_attention_dim={cfg.cross_attention_dim} "
        f"({path}: {keys}, self-attention needs {queries}); videoldm-jax calls such "
        "models without a context, so this one cannot be converted")


def sd_scheduler_fixes(scheduler: dict, where: str | Path) -> dict:
  """The scheduler config a Stable Diffusion pipeline samples with: diffusers'
  StableDiffusionPipeline corrects outdated configs when it loads them (steps_offset
  other than 1, from before the field existed, becomes 1; clip_sample true, DDIM's
  class default, becomes false: clipping x0 to [-1, 1] is for pixels, not latents), so
  the same folder sampled other timesteps, or clipped latents, here. Said on stderr."""
  fixed = dict(scheduler)
  if fixed.get("steps_offset", 0) != 1:
    fixed["steps_offset"] = 1
  if fixed.get("clip_sample", False):
    fixed["clip_sample"] = False
  changed = [f"{k}: {scheduler.get(k, '(absent)')} -> {v}" for k, v in fixed.items()
             if scheduler.get(k, "(absent)") != v]
  if changed:
    print(f"note: {where}: {', '.join(changed)} (as diffusers' StableDiffusionPipeline "
          "corrects outdated scheduler configs)", file=sys.stderr)
  return fixed


def from_diffusers(folder: str | Path) -> tuple[pretrained.PretrainedLDM, Path | None]:
  """Reads `unet/`, `vae/`, optional `text_encoder/`, `tokenizer/`, `scheduler/`.

  Returns the model and the tokenizer folder to copy (None if the pipeline has none).
  """
  folder = Path(folder)
  if not folder.is_dir():
    refuse_pickle(folder)
    raise FileNotFoundError(f"{folder}: not a folder (a diffusers pipeline folder with "
                            "unet/ and vae/ is expected; use --single_file for one file)")
  for sub in ("unet", "vae"):
    if not (folder / sub).is_dir():
      raise FileNotFoundError(f"{folder}: missing {sub}/ (expected a diffusers pipeline "
                              "folder with unet/, vae/, text_encoder/, tokenizer/)")
  print(f"reading {folder}/unet", file=sys.stderr)
  unet_config, unet_params = image_models.load_diffusers_unet(folder / "unet")
  print(f"reading {folder}/vae", file=sys.stderr)
  vae_config, vae_params = image_models.load_diffusers_vae(folder / "vae")
  params = {"unet": unet_params, "vae": vae_params}
  text_config, tokenizer = None, None
  if (folder / "text_encoder").is_dir():
    print(f"reading {folder}/text_encoder", file=sys.stderr)
    text_config = CLIPTextConfig.from_transformers_config(
        image_models.read_json(folder / "text_encoder" / "config.json"))
    weights = find_weights(folder / "text_encoder", "model")
    params["text_encoder"] = text_params_from_torch(text_config, load_safetensors(weights),
                                                    str(weights))
    tokenizer = folder / "tokenizer"
    if not tokenizer.is_dir():
      raise FileNotFoundError(f"{folder}: has text_encoder/ but no tokenizer/")
  scheduler_json = folder / "scheduler" / "scheduler_config.json"
  if scheduler_json.is_file():
    scheduler = sd_scheduler_fixes(image_models.read_json(scheduler_json), scheduler_json)
  else:
    scheduler = dict(presets.PRESETS["sd15"].scheduler)
    # The UNet's weights do not say what they predict: a v-prediction model (SD 2.x
    # 768) sampled as epsilon gives noise, so say what was assumed.
    print(f"WARNING {folder} has no scheduler/scheduler_config.json: assuming SD 1.5's "
          "schedule (epsilon prediction, scaled_linear betas); copy the right scheduler "
          "folder in for a v-prediction model", file=sys.stderr)
  model = pretrained.PretrainedLDM(unet_config, vae_config, text_config, scheduler, params,
                              source=str(folder.absolute()))
  check_context_free(model, str(folder))
  return model, tokenizer


def from_single_file(path: str | Path, preset: str, extract_ema: bool = False,
                     with_text_encoder: bool = True) -> pretrained.PretrainedLDM:
  """Reads an original LDM single-file checkpoint (.safetensors).

  `preset` names a release in `presets.PRESETS` or is a JSON file with the configs.
  """
  path = Path(path)
  refuse_pickle(path)
  base = presets.resolve(preset)
  print(f"reading {path}", file=sys.stderr)
  sd = load_safetensors(path)
  parts = ldm_keys.split_single_file(sd, str(path), extract_ema=extract_ema)
  unet_config = presets.unet_config_from_weights(base.unet, parts["unet"])
  differs = {f: (getattr(base.unet, f), getattr(unet_config, f))
             for f in ("cross_attention_dim", "use_linear_projection")
             if getattr(base.unet, f) != getattr(unet_config, f)}
  if differs:
    # The head layout and the text encoder come from the preset; no weight shape shows
    # the heads, so a mixed model (SD 2.x weights with SD 1.5's 8 heads) converted.
    raise ValueError(
        f"{path}: the UNet weights have " + ", ".join(f"{f}={w}" for f, (_, w) in
                                                     differs.items())
        + f", preset {preset!r} " + ", ".join(f"{f}={p}" for f, (p, _) in differs.items())
        + ": SD 2.x files (context 1024, linear projections) need --preset=sd21 (768 px, "
        "v-prediction) or --preset=sd21-base, SD 1.x files --preset=sd15, other models a "
        "JSON preset with their configs")
  params = {"unet": image_models.unet_from_ldm(unet_config, parts["unet"], str(path)),
            "vae": image_models.vae_from_ldm(base.vae, parts["vae"], str(path))}
  text_config = None
  if with_text_encoder:
    if base.text is None:
      raise ValueError(f"preset {preset!r} has no text encoder; pass "
                       "--skip_text_encoder")
    text_config = base.text
    # num_layers: an OpenCLIP (SD 2.x) file holds all 24 layers, the model uses 23.
    text_sd = clip_keys.clip_state_dict_from_ldm(
        parts["text_encoder"], num_layers=text_config.num_hidden_layers)
    params["text_encoder"] = text_params_from_torch(text_config, text_sd,
                                                    f"{path} ({ldm_keys.TEXT_PREFIX}*)")
  model = pretrained.PretrainedLDM(unet_config, base.vae, text_config, dict(base.scheduler),
                                   params, source=str(path.absolute()))
  check_context_free(model, str(path))
  return model
