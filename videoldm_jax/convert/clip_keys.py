"""CLIP text-encoder checkpoints (transformers folders, LDM single files) -> Flax params.

The Flax `CLIPTextModel` is named after transformers' modules, so the generic
`torch_layout.load_state_dict` does the mapping once the keys are brought to
transformers' naming without the `text_model.` prefix. SD 2.x single files store an
OpenCLIP text encoder, which `openclip_to_transformers` renames and re-splits first.
"""

import re
from typing import Any, Mapping

import numpy as np

from videoldm_jax.convert.torch_layout import ConversionError, load_state_dict

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


# OpenCLIP (open_clip.model.CLIP / SD 2.x FrozenOpenCLIPEmbedder) -> transformers names.
_OPENCLIP_TOP = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
# Within one resblock; `attn.in_proj_*` is handled apart (split into q/k/v).
_OPENCLIP_BLOCK = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_OPENCLIP_IN_PROJ = ("attn.in_proj_weight", "attn.in_proj_bias")
# Not used by last_hidden_state: the contrastive head (text_projection, logit_scale),
# the causal-mask buffer (rebuilt by the model) and an image tower, if kept.
_OPENCLIP_IGNORED = re.compile(r"^(text_projection|logit_scale|attn_mask)$|^visual\.")
_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")


def openclip_to_transformers(sd: Mapping[str, np.ndarray], num_layers: int,
                             prefix: str = _LDM_OPENCLIP_PREFIX) -> dict[str, np.ndarray]:
  """OpenCLIP text tower (SD 2.x single file) -> transformers CLIPTextModel state dict.

  SD 2.x conditions on the PENULTIMATE layer of OpenCLIP ViT-H/14 (24 resblocks); the
  equivalent transformers model (diffusers' stable-diffusion-2 text_encoder/) has the
  first 23 layers with `final_layer_norm` applied on top, so resblocks with index
  >= `num_layers` are dropped.

  Args:
    sd: flat {key: array}; only keys under `prefix` are read. In OpenCLIP layout,
      with D = hidden size, V = vocab, P = context length:
      token_embedding.weight (V, D), positional_embedding (P, D), ln_final.* (D,),
      transformer.resblocks.{i}.attn.in_proj_weight (3D, D) / in_proj_bias (3D,)
      (rows q, k, v), attn.out_proj.* (D, D) / (D,), ln_1.*, ln_2.* (D,),
      mlp.c_fc.* (F, D) / (F,), mlp.c_proj.* (D, F) / (D,).
    num_layers: the text config's num_hidden_layers (23 for SD 2.x).
    prefix: where the text tower sits in `sd`.

  Returns:
    {`text_model.` + transformers key: array}, arrays unchanged in shape except the
    (3D, D) / (3D,) in_proj split into three (D, D) / (D,) q_proj, k_proj, v_proj.
    Unknown keys are kept, with `prefix` removed, so that the strict loader reports
    them as unmapped.

  Raises:
    ConversionError: naming every missing OpenCLIP key of the first `num_layers`
      resblocks, embeddings and ln_final, and every in_proj not of shape (3D, ...).
  """
  out, problems, blocks_seen = {}, [], set()
  for key, value in sd.items():
    if not key.startswith(prefix):
      continue
    rest = key[len(prefix):]
    if _OPENCLIP_IGNORED.search(rest):
      continue
    if rest in _OPENCLIP_TOP:
      out[TEXT_MODEL_PREFIX + _OPENCLIP_TOP[rest]] = value
      continue
    m = _RESBLOCK.match(rest)
    if m is None:
      out[rest] = value  # unknown: left for the loader to report
      continue
    index, leaf = int(m.group(1)), m.group(2)
    blocks_seen.add(index)
    if index >= num_layers:
      continue  # past the layer SD 2.x reads its context from
    layer = f"{TEXT_MODEL_PREFIX}encoder.layers.{index}."
    if leaf in _OPENCLIP_BLOCK:
      out[layer + _OPENCLIP_BLOCK[leaf]] = value
    elif leaf in _OPENCLIP_IN_PROJ:
      value = np.asarray(value)
      if value.ndim == 0 or value.shape[0] % 3:
        problems.append(f"shape mismatch: {key} has {value.shape}; expected (3*D, ...) with "
                        "q, k, v stacked along the first axis")
        continue
      kind = leaf.rsplit("_", 1)[1]  # "weight" or "bias"
      # nn.MultiheadAttention stacks the projections as [q; k; v] along the output axis.
      for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
        out[f"{layer}self_attn.{name}.{kind}"] = part
    else:
      out[rest] = value
  # Named here in the file's own keys, as the loader could only name the
  # transformers keys (three of them for one missing in_proj).
  expected = list(_OPENCLIP_TOP) + [f"transformer.resblocks.{i}.{leaf}"
                                    for i in range(num_layers)
                                    for leaf in (*_OPENCLIP_BLOCK, *_OPENCLIP_IN_PROJ)]
  problems += [f"missing: {prefix}{k}" for k in expected if prefix + k not in sd]
  if problems:
    found = f"{len(blocks_seen)} resblocks"
    raise ConversionError(
        f"OpenCLIP text encoder ({prefix}*, {found} in the file, the config uses "
        f"{num_layers}) does not fit:\n  " + "\n  ".join(problems))
  return out


def clip_state_dict_from_ldm(sd: Mapping[str, np.ndarray],
                             num_layers: int | None = None) -> dict[str, np.ndarray]:
  """Text-encoder part of an original LDM / SD 1.x / SD 2.x single-file state dict.

  Accepts the `cond_stage_model.transformer.text_model.*` and the older
  `cond_stage_model.transformer.{embeddings,encoder,final_layer_norm}.*` layouts
  (transformers CLIP, SD 1.x), and OpenCLIP's `cond_stage_model.model.*` (SD 2.x,
  see `openclip_to_transformers`).

  Args:
    sd: flat {key: array}: the whole file (keys starting `cond_stage_model.`).
    num_layers: the text config's num_hidden_layers. Needed for OpenCLIP only, where
      the file holds more layers than SD 2.x uses (24 vs. 23) and so cannot tell.

  Returns:
    {`text_model.` + transformers key: array}, ready for `clip_params_from_torch`.

  Raises:
    ValueError: for OpenCLIP without `num_layers`, or when the file has no
      text-encoder keys at all.
    ConversionError: for OpenCLIP keys that are missing or mis-shaped.
  """
  if any(k.startswith(_LDM_OPENCLIP_PREFIX) for k in sd):
    if num_layers is None:
      raise ValueError(
          "this checkpoint's text encoder is OpenCLIP (keys under "
          f"'{_LDM_OPENCLIP_PREFIX}', as in SD 2.x single files); its conversion needs "
          "num_layers, the text config's num_hidden_layers (23 for SD 2.x, which reads "
          "the penultimate of OpenCLIP ViT-H's 24 layers), or convert from the diffusers "
          "folder instead")
    return openclip_to_transformers(sd, num_layers)
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
