"""Personalised video generation without training (Video LDM Sec. 4.1.2, Fig. 7): the
temporal layers phi learnt on top of one image LDM are inserted into a differently
fine-tuned image LDM (e.g. a DreamBooth fine-tune of the same base model, converted
with videoldm-convert).

What is swapped: by default only theta, the spatial UNet parameters (every UNet leaf
whose path has no `temporal_` component, `models/partition.py`); phi (temporal
layers, mixing factors and, in prediction / interpolation models, the context encoder)
is kept bitwise. That is the paper's recipe: DreamBooth fine-tunes the UNet, and phi
was trained against that UNet's frozen spatial features. `parts` can add:

  'vae'           the spatial autoencoder (the video decoder's `temporal_*` layers,
                  if the video model has them, are kept);
  'text_encoder'  the whole CLIP text encoder (fine-tunes that train it, e.g.
                  DreamBooth with --train_text_encoder). The video model's tokenizer
                  is kept: the image model must use the same vocabulary.

The image model must have exactly theta's paths and shapes (same base architecture);
otherwise `ValueError` lists every missing / unexpected path and, for each shape
mismatch, the path with both shapes. If the image folder is itself a video model, its
own temporal leaves are ignored (only its theta is used).
"""

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from videoldm_jax import pretrained
from videoldm_jax.diffusion import schedules
from videoldm_jax.models import partition
from videoldm_jax.models.unet import called_with_context
from videoldm_jax.pretrained import PretrainedLDM

PARTS = ("unet", "vae", "text_encoder")


def _spatial(tree: dict) -> dict:
  return partition.split(tree)[0]


def personalize(video: PretrainedLDM, image: PretrainedLDM, parts: Sequence[str] = ("unet",),
                source: str = "the image checkpoint") -> PretrainedLDM:
  """A copy of `video` whose spatial parameters of `parts` are `image`'s.

  video: any video LDM (key-frame, prediction or interpolation export, or a decoder
    export for 'vae'); image: an image LDM of the same base architecture.
  source: names the image checkpoint in error messages (e.g. its folder).
  The parameter arrays are shared with the inputs, not copied. `video.source` gets a
  note of the swap.
  """
  # One name is one part ("unet" was read as the parts 'u', 'n', 'e', 't').
  parts = (parts,) if isinstance(parts, str) else tuple(parts)
  unknown = set(parts) - set(PARTS)
  if unknown:
    raise ValueError(f"parts must be among {PARTS}, got {sorted(unknown)}")
  params = dict(video.params)
  for part in parts:
    if part not in video.params:
      raise ValueError(f"{video.source or 'the video model'} has no {part!r} parameters "
                       "to personalise")
    if part not in image.params:
      raise ValueError(f"{source}: has no {part!r} parameters (needed for parts={parts})")
    what = f"{part} parameters (theta)" if part != "text_encoder" else "text encoder parameters"
    if part == "text_encoder":
      # No temporal layers here: the whole tree is replaced, with the same checks.
      partition.check_same_structure(video.params[part], image.params[part], what=what,
                                     source=source)
      params[part] = image.params[part]
    else:
      spatial, temporal = partition.split(video.params[part])
      given = _spatial(image.params[part])
      partition.check_same_structure(spatial, given, what=what, source=source)
      params[part] = partition.merge(given, temporal) if temporal else given
  _check_configs(video, image, parts, source)
  ours, theirs = (m.training.get("null_class_label") for m in (video, image))
  if "unet" in parts and video.unet_config.num_class_embeds and theirs not in (None, ours):
    # The class table is the image model's: guidance would subtract another class's
    # prediction than its "no class" one. (Without a record, e.g. a converted
    # fine-tune of the same base model, the video model's null row is kept.)
    raise ValueError(f"{source}: its class embedding's null class is {theirs}, the video "
                     f"model's " + ("none" if ours is None else str(ours))
                     + " (null_class_label): the two were trained apart")
  return PretrainedLDM(
      unet_config=video.unet_config, vae_config=video.vae_config,
      text_config=video.text_config, scheduler=video.scheduler, params=params,
      source=f"{video.source} personalised with {source} ({', '.join(parts)})",
      temporal_config=video.temporal_config, vae_temporal_config=video.vae_temporal_config,
      training=video.training, decoder_training=video.decoder_training)


def _computed(part: str, config) -> dict:
  """What of `config` decides what the parameters compute, in one spelling: a UNet's
  heads per level (the diffusers route states SD 2.x heads as counts per level, the
  single-file presets as a head dim), depths per level; the text encoder without its
  EOS id, which only picks the pooled output (the LDM conditions on the hidden states;
  diffusers' SD 2.x config says 2, the presets 49407)."""
  d = json.loads(json.dumps(config.to_dict()))  # tuples and lists compare equal
  if part == "unet":
    d.pop("num_heads", None)
    d.pop("head_dim", None)
    d["heads_per_level"] = list(config.heads_per_level())
    d["transformer_depth"] = list(config.depth_per_level())
  elif part == "text_encoder":
    d.pop("eos_token_id", None)
  return d


def _check_configs(video: PretrainedLDM, image: PretrainedLDM, parts: Sequence[str],
                   source: str) -> None:
  """Equal shapes are not enough: e.g. the number of attention heads or the latent
  scaling factor change what the same parameters compute."""
  configs = {"unet": ("unet_config", "UNet"), "vae": ("vae_config", "autoencoder"),
             "text_encoder": ("text_config", "text encoder")}
  for part in parts:
    attr, name = configs[part]
    a = _computed(part, getattr(video, attr))
    b = _computed(part, getattr(image, attr))
    diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if diff:
      shown = ", ".join(f"{k}: {b.get(k)!r} vs {a.get(k)!r}" for k in diff)
      raise ValueError(f"{source}: its {name} config differs from the video model's "
                       f"({shown}; image vs video); personalisation needs the same base "
                       "architecture")
  if "unet" in parts:
    # The swapped UNet samples under the video model's scheduler: SD 2.1 (v-prediction)
    # and SD 2.1-base (epsilon) have one architecture but predict different things.
    (s_video, c_video), (s_image, c_image) = (
        schedules.schedule_from_diffusers_config(m.scheduler) for m in (video, image))
    if c_image.prediction_type != c_video.prediction_type:
      raise ValueError(f"{source}: its UNet predicts {c_image.prediction_type!r}, the video "
                       f"model's {c_video.prediction_type!r} (scheduler prediction_type); "
                       "personalisation needs the same base model")
    a_image, a_video = s_image.alphas_cumprod, s_video.alphas_cumprod
    if a_image.shape != a_video.shape:
      raise ValueError(f"{source}: its noise schedule has {a_image.shape[0]} steps, the "
                       f"video model's {a_video.shape[0]} (scheduler num_train_timesteps); "
                       "personalisation needs the same base model")
    if not np.allclose(a_image, a_video, rtol=1e-6, atol=0):
      raise ValueError(f"{source}: its noise schedule (scheduler betas) differs from the "
                       "video model's; personalisation needs the same base model")
    # Without a text encoder a class-conditional UNet's attn2 attends to its own tokens
    # (`unet.called_with_context`): weights trained on text would run as self-attention.
    calls = [called_with_context(m.unet_config, m.text_config is not None)
             for m in (image, video)]
    if calls[0] != calls[1]:
      said = lambda c: "a text context" if c else "no context (attn2 attends to x itself)"
      raise ValueError(f"{source}: its UNet is called with {said(calls[0])}, the video "
                       f"model's with {said(calls[1])}; personalisation needs the same "
                       "conditioning")


def load_personalized(video_dir: str | Path, image_dir: str | Path,
                      parts: Sequence[str] = ("unet",)) -> PretrainedLDM:
  """`personalize(pretrained.load(video_dir), pretrained.load(image_dir), parts)`."""
  return personalize(pretrained.load(video_dir), pretrained.load(image_dir), parts,
                     source=str(Path(image_dir).absolute()))


def save_personalized(video_dir: str | Path, image_dir: str | Path, out_dir: str | Path,
                      parts: Sequence[str] = ("unet",)) -> Path:
  """Writes the personalised model as a new folder (tokenizer of the video model), usable
  wherever `video_dir` was (videoldm-sample, videoldm-generate)."""
  model = load_personalized(video_dir, image_dir, parts)
  tok = Path(video_dir) / "tokenizer"
  return pretrained.save(out_dir, model, tok if model.text_config is not None else None)
