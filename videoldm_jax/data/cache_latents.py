"""Encode clips with a model's frozen VAE (and text encoder) into a latent cache."""

from typing import Iterable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from videoldm_jax import pretrained, sharding
from videoldm_jax.data import latent_cache
from videoldm_jax.data.grain_pipeline import to_text
from videoldm_jax.models.clip_text import CLIPTextModel
from videoldm_jax.models.tokenizer import CLIPTokenizer
from videoldm_jax.models.vae import AutoencoderKL


def _batches(examples: Iterable[dict], size: int) -> Iterator[list[dict]]:
  batch = []
  for ex in examples:
    batch.append(ex)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def _name(example: dict, index: int) -> str:
  """The example's number in the stream, and its file when it has a 'path'."""
  where = f"example {index}"
  return f"{index} ({to_text(example['path'], where, 'path')})" if "path" in example \
      else str(index)


def encode_examples(model: pretrained.PretrainedLDM, examples: Iterable[dict], *,
                    batch_size: int = 8, tokenizer: Optional[CLIPTokenizer] = None,
                    mesh=None) -> Iterator[dict]:
  """Yields one record per example: 'latents' float32 (T, h, w, C) = the scaled VAE
  posterior mean of its uint8 'video' (T, H, W, 3); with a tokenizer also 'context'
  (L, D) text embeddings of its 'caption' (str or UTF-8 bytes, as TFDS gives Text);
  other scalar / string fields pass through. Every video must have the same shape (the
  cache stores whole clips, uncropped): a dataset of fixed-size clips.

  The mean (not a sample) is cached so that a cache is deterministic (a step on pixels
  draws a posterior sample; see `data/latent_cache.py`); frames of a batch are encoded
  together, sharded over the mesh's batch axes.
  """
  if batch_size < 1:  # (else every clip would be stacked into one batch)
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  mesh = mesh or sharding.make_mesh({"data": -1})
  frames_sh = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  vae = AutoencoderKL(model.vae_config)
  encode = jax.jit(lambda p, x: vae.apply(
      {"params": p}, x.astype(jnp.float32) / 127.5 - 1.0, None,
      method=AutoencoderKL.encode_latents))
  text = None
  if tokenizer is not None and model.text_config is not None:
    text = jax.jit(CLIPTextModel(model.text_config).apply)
  n_dev = mesh.shape["data"] * mesh.shape["fsdp"]
  shape, seen, uncaptioned = None, 0, 0
  for batch in _batches(examples, batch_size):
    videos = [np.asarray(ex["video"]) for ex in batch]
    if shape is None:
      shape = videos[0].shape
    for ex, v in zip(batch, videos):
      if v.shape != shape:
        raise ValueError(f"example {_name(ex, seen)}: video of shape {v.shape}, the first "
                         f"was {shape}; a latent cache holds clips of one size (cache a "
                         "dataset of fixed-size clips)")
      seen += 1
    videos = np.stack(videos)
    b, t = videos.shape[:2]
    frames = videos.reshape((b * t,) + videos.shape[2:])
    pad = (-len(frames)) % n_dev  # the sharded batch axis must divide evenly
    frames = np.concatenate([frames, np.zeros((pad,) + frames.shape[1:], frames.dtype)])
    z = np.asarray(encode(model.params["vae"], jax.device_put(frames, frames_sh)))
    z = z[:b * t].reshape((b, t) + z.shape[1:])
    contexts = None
    if text is not None:
      uncaptioned += sum("caption" not in ex for ex in batch)
      ids = tokenizer([to_text(ex.get("caption", ""), f"example {seen - len(batch) + i}")
                       for i, ex in enumerate(batch)],
                      max_length=model.text_config.max_position_embeddings)
      contexts = np.asarray(text({"params": model.params["text_encoder"]}, ids))
    for i, ex in enumerate(batch):
      rec = {k: v for k, v in ex.items() if k != "video" and np.ndim(v) == 0}
      rec["latents"] = z[i].astype(np.float32)
      if contexts is not None:
        rec["context"] = contexts[i]
      yield rec
  if uncaptioned:
    # (A text-conditioned cache of empty prompts trains an unconditional model.)
    logging.warning("cache_latents: %d of %d clips have no 'caption' field; their text "
                    "embeddings are of the empty prompt", uncaptioned, seen)


def cache_examples(model: pretrained.PretrainedLDM, examples: Iterable[dict], out_dir: str,
                   *, num_examples: Optional[int] = None, batch_size: int = 8,
                   tokenizer: Optional[CLIPTokenizer] = None, num_shards: int = 1,
                   source: str = "") -> dict:
  """Encodes `examples` and writes the cache (with a progress bar); returns its info."""
  bar = tqdm(total=num_examples, desc="caching latents", unit="clip")
  try:
    return latent_cache.write_cache(
        out_dir, encode_examples(model, examples, batch_size=batch_size,
                                 tokenizer=tokenizer),
        vae_config=model.vae_config.to_dict(), vae_params=model.params["vae"],
        text_params=model.params.get("text_encoder") if tokenizer is not None else None,
        text_config=(model.text_config.to_dict()
                     if tokenizer is not None and model.text_config is not None else None),
        num_shards=num_shards, source=source, progress=bar)
  finally:
    bar.close()
