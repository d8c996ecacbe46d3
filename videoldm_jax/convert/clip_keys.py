"""CLIP text-encoder checkpoints (transformers folders, LDM single files) -> Flax params.

The Flax `CLIPTextModel` is named after transformers' modules, so the generic
`torch_layout.load_state_dict` does the mapping once the keys are brought to
transformers' naming without the `text_model.` prefix.
"""

from typing import Any, Mapping

import numpy as np

from videoldm_jax.convert.torch_layout import load_state_dict

TEXT_MODEL_PREFIX = "text_model."
_LDM_PREFIX = "cond_stage_model.transformer."
_LDM_OPENCLIP_PREFIX = "cond_stage_model.model."
# Top-level children of transformers' CLIPTextTransformer: the old LDM checkpoints
# (transformers < 4.13 wrapped CLIPTextTransformer directly) store them without
# `text_model.`.
_TEXT_MODEL_CHILDREN = ("embeddings.", "encoder.", "final_layer_norm.")
# Not parameters of the encoder: the position_ids buffer (persistent in older
# transformers) and the projection head of CLIPTextModelWithProjection, which
# last_hidden_state does not use.
_IGNORED = (r"^embeddings\.position_ids$", r"^text_projection\.")


def clip_params_from_torch(abstract_params: Mapping[str, Any],
                           state_dict: Mapping[str, np.ndarray], source: str) -> dict:
  """Flax params of `CLIPTextModel` from a transformers CLIPTextModel state dict.

  Args:
    abstract_params: the model's param tree (shapes only suffice, e.g. the unboxed
      `jax.eval_shape(model.init, ...)["params"]`).
    state_dict: flat {key: array} in transformers' layout. Keys may carry the
      `text_model.` prefix (checkpoints from transformers < 5, e.g. SD's
      text_encoder/model.safetensors) or not (transformers >= 5 `save_pretrained`).
    source: file or folder name, for error messages.

  Returns:
    nested dict of float32 numpy arrays with the paths and shapes of `abstract_params`.

  Raises:
    ConversionError: listing every missing, mis-shaped and unused key.
  """
  stripped = {(k[len(TEXT_MODEL_PREFIX):] if k.startswith(TEXT_MODEL_PREFIX) else k): v
              for k, v in state_dict.items()}
  return load_state_dict(abstract_params, stripped, what="CLIP text encoder", source=source,
                         ignore=_IGNORED)


def clip_state_dict_from_ldm(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Text-encoder part of an original LDM / SD 1.x single-file state dict.

  Accepts both `cond_stage_model.transformer.text_model.*` and the older
  `cond_stage_model.transformer.{embeddings,encoder,final_layer_norm}.*` layouts.

  Returns:
    {`text_model.` + transformers key: array}, ready for `clip_params_from_torch`.

  Raises:
    ValueError: for an OpenCLIP text encoder (`cond_stage_model.model.*`, SD 2.x), or
      when the file has no text-encoder keys at all.
  """
  if any(k.startswith(_LDM_OPENCLIP_PREFIX) for k in sd):
    raise ValueError(
        "this checkpoint's text encoder is OpenCLIP (keys under "
        f"'{_LDM_OPENCLIP_PREFIX}', as in SD 2.x single files); OpenCLIP single-file text "
        "encoders are not supported: convert from the diffusers folder instead (the "
        "stabilityai/stable-diffusion-2-1 layout, with text_encoder/ and tokenizer/)")
  out = {}
  for key, value in sd.items():
    if not key.startswith(_LDM_PREFIX):
      continue
    rest = key[len(_LDM_PREFIX):]
    if rest.startswith(TEXT_MODEL_PREFIX):
      out[rest] = value
    elif rest.startswith(_TEXT_MODEL_CHILDREN):
      out[TEXT_MODEL_PREFIX + rest] = value
    else:
      # Anything else under the prefix is unknown; keep it so the loader reports it.
      out[rest] = value
  if not out:
    roots = sorted({k.split(".", 1)[0] for k in sd})
    raise ValueError(f"no CLIP text-encoder keys under '{_LDM_PREFIX}' in this checkpoint "
                     f"(top-level key prefixes: {roots[:20]})")
  return out
