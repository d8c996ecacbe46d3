"""A cache of VAE latents (and optional text embeddings) in ArrayRecord files.

Encoding clips with the frozen VAE every step wastes most of a key-frame step; the
cache does it once. Layout of a cache folder:

  DIR/latents-00000-of-00004.array_record   records: msgpack maps of NumPy arrays and
                                            strings (no pickle), one per clip
  DIR/cache_info.json                       which VAE made it (config, scaling factor
                                            and a fingerprint of its encoder's weights),
                                            whether it holds text embeddings and the
                                            text encoder's config and fingerprint,
                                            latent shape, record count, source

The latents are the scaled posterior MEAN of each frame (deterministic: a cache equals
a fresh encode); a step on pixels draws a posterior sample instead. For SD's VAE the
posterior's standard deviation is small against the latents' spread, so the two
differ little.

`LatentCacheSource` is a random-access source (`len`, `[i]`) for Grain; `check_cache`
refuses a cache made by another VAE, scale factor or text encoder, one without the text
embeddings a text-conditioned model needs, and clips of another size, naming what
differs.
"""

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np
from array_record.python import array_record_module as ar
from flax import serialization, traverse_util

from videoldm_jax.config_files import read_json_object
from videoldm_jax.models import partition
from videoldm_jax.models import vae as vae_lib

INFO_FILE = "cache_info.json"
FORMAT = "videoldm-jax/latent-cache"


def params_fingerprint(params: dict) -> str:
  """SHA-256 over every weight of a parameter tree (path, shape, dtype and bytes), in
  path order."""
  h = hashlib.sha256()
  for path, value in sorted(traverse_util.flatten_dict(params).items()):
    value = np.ascontiguousarray(np.asarray(value))
    h.update("/".join(path).encode())
    h.update(str((value.shape, value.dtype.str)).encode())
    h.update(value.tobytes())
  return h.hexdigest()


def model_fingerprints(vae_params: dict, text_params: Optional[dict] = None,
                       whole_vae: bool = False) -> dict:
  """What `check_cache` compares, as strings (a run keeps no parameter tree alive for
  it): 'encoder', the fingerprint of the encoder and quant_conv, which alone decide the
  latents (a decoder-stage export's video decoder leaves them as they are); with
  `whole_vae`, 'vae', the frame-wise VAE's (what caches written before 'encoder'
  existed hold); 'text', the text encoder's (None without one)."""
  out = {"encoder": params_fingerprint(vae_lib.latent_params(vae_params)),
         "text": None if text_params is None else params_fingerprint(text_params)}
  if whole_vae:
    out["vae"] = params_fingerprint(partition.split(vae_params)[0])
  return out


def _field(name: str, value):
  """A record field as msgpack stores it: text as str (bytes, as TFDS returns Text
  features, are decoded: msgpack cannot restore NumPy byte-string arrays), the rest as
  arrays."""
  if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "SU":
    value = value.item()
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(f"record field {name!r}: bytes that are not UTF-8 text") from e
  if isinstance(value, str):
    # str itself: a NumPy string scalar (np.str_, what indexing a string array gives)
    # is a str too, but msgpack stored it as an array of a dtype it cannot read back.
    return str(value)
  value = np.asarray(value)
  if value.dtype.kind in "SUO":
    raise TypeError(f"record field {name!r}: {value.dtype} arrays cannot be cached; "
                    "give text as str")
  return value


def encode_record(example: dict[str, Any]) -> bytes:
  """{name: array | str | bytes (UTF-8 text) | number} -> msgpack bytes."""
  return serialization.msgpack_serialize({k: _field(k, v) for k, v in example.items()})


def decode_record(data: bytes) -> dict[str, Any]:
  return dict(serialization.msgpack_restore(data))


def write_cache(out_dir: str | Path, records: Iterable[dict], *, vae_config: dict,
                vae_params: dict, text_params: Optional[dict] = None,
                text_config: Optional[dict] = None, num_shards: int = 1,
                source: str = "", progress: Optional[Any] = None) -> dict:
  """Writes `records` (dicts with 'latents' float (T, h, w, C) and anything else, e.g.
  'caption', labels, 'context' (L, D) from the text encoder `text_params`) round-robin
  into `num_shards` ArrayRecord files. Every record must have the same latent shape, and
  all or none a 'context'.

  Returns the info written to cache_info.json.
  """
  if num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}")
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  if (out_dir / INFO_FILE).exists():
    raise FileExistsError(f"{out_dir}: already holds a latent cache ({INFO_FILE})")
  paths = [out_dir / f"latents-{i:05d}-of-{num_shards:05d}.array_record"
           for i in range(num_shards)]
  writers = [ar.ArrayRecordWriter(str(p), "group_size:1") for p in paths]
  count, shape, has_context = 0, None, None
  try:
    for rec in records:
      latents = np.asarray(rec["latents"])
      if shape is None:
        shape, has_context = list(latents.shape), "context" in rec
      elif list(latents.shape) != shape or ("context" in rec) != has_context:
        raise ValueError(f"{out_dir}: record {count} has latents {list(latents.shape)}"
                         f"{' and' if 'context' in rec else ' but no'} context, the first "
                         f"had {shape}{' and' if has_context else ' but no'} context")
      writers[count % num_shards].write(encode_record(rec))
      count += 1
      if progress is not None:
        progress.update(1)
  finally:
    for w in writers:
      w.close()
  if count == 0:
    raise ValueError(f"{out_dir}: no records to cache")
  prints = model_fingerprints(vae_params, text_params if has_context else None)
  info = {"format": FORMAT, "num_records": count, "latent_shape": shape,
          "files": [p.name for p in paths], "vae_config": vae_config,
          "scaling_factor": vae_config.get("scaling_factor"),
          "encoder_fingerprint": prints["encoder"], "source": source,
          "has_context": has_context, "text_fingerprint": prints["text"],
          "text_config": text_config if has_context else None}
  # Written last: a cache without its info file is incomplete and is never opened.
  (out_dir / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
  return info


def read_info(cache_dir: str | Path) -> dict:
  if not str(cache_dir).strip():
    # (Path("") is the working directory: a cache there would be read unasked.)
    raise ValueError("config.data.cache_dir is empty: data.kind='latent_cache' reads a "
                     "folder written by videoldm-cache-latents; set "
                     "--config.data.cache_dir=FOLDER")
  path = Path(cache_dir) / INFO_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{cache_dir}: no {INFO_FILE}; not a (complete) latent cache "
                            "made by videoldm-cache-latents")
  info = read_json_object(path)  # (a cut or non-object file: named, not a bare error)
  if info.get("format") != FORMAT:
    raise ValueError(f"{path}: format {info.get('format')!r}, expected {FORMAT!r}")
  return info


def check_cache(info: dict, where: str, *, vae_config: dict, fingerprints: dict,
                text_config: Optional[dict] = None, needs_context: bool = False,
                data: Optional[Any] = None) -> None:
  """Raises ValueError unless the cache (its `info`) can feed the model: made by this
  VAE (config, scale factor, encoder weights); with text embeddings from this text
  encoder (config `text_config`, weights) when the model is text-conditioned
  (`needs_context`); clips of data.num_frames x data.height x data.width pixels when
  `data` (config.data) is given. fingerprints: `model_fingerprints` of the model."""
  if info.get("scaling_factor") != vae_config.get("scaling_factor"):
    raise ValueError(f"{where}: latents were scaled by {info.get('scaling_factor')}, the "
                     f"model's VAE uses {vae_config.get('scaling_factor')}; rebuild the cache")
  if info.get("vae_config") != vae_config:
    raise ValueError(f"{where}: made by a VAE with config {info.get('vae_config')}, the "
                     f"model's is {vae_config}; rebuild the cache")
  # Older caches fingerprinted the whole (frame-wise) VAE.
  key, which = (("encoder_fingerprint", "encoder") if "encoder_fingerprint" in info
                else ("vae_fingerprint", "vae"))
  fingerprint = fingerprints[which]
  if info.get(key) != fingerprint:
    raise ValueError(f"{where}: made by other VAE weights (fingerprint "
                     f"{str(info.get(key, '?'))[:12]}…, the model's is "
                     f"{fingerprint[:12]}…); rebuild the cache")
  if needs_context:
    if not info.get("has_context"):
      raise ValueError(f"{where}: holds no text embeddings (made with --notext), but the "
                       "model is text-conditioned; rebuild the cache with --text")
    if (text_config is not None and info.get("text_config") is not None
        and info["text_config"] != text_config):
      raise ValueError(f"{where}: text embeddings from a text encoder with config "
                       f"{info['text_config']}, the model's is {text_config}; rebuild "
                       "the cache")
    if fingerprints.get("text") is not None and info.get("text_fingerprint") is not None:
      fingerprint = fingerprints["text"]
      if info["text_fingerprint"] != fingerprint:
        raise ValueError(f"{where}: text embeddings from other text-encoder weights "
                         f"(fingerprint {info['text_fingerprint'][:12]}…, the model's is "
                         f"{fingerprint[:12]}…); rebuild the cache")
  if data is not None and info.get("latent_shape"):
    t, h, w = info["latent_shape"][:3]
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    if (t, h * factor, w * factor) != (data.num_frames, data.height, data.width):
      raise ValueError(f"{where}: holds clips of {t} frames of {h * factor}x{w * factor} "
                       f"pixels (latents {info['latent_shape']}), the config asks for "
                       f"data.num_frames={data.num_frames}, data.height={data.height}, "
                       f"data.width={data.width}; set those, or cache clips of that size")


class LatentCacheSource:
  """Random access to a cache's records (a Grain `RandomAccessDataSource`)."""

  def __init__(self, cache_dir: str | Path):
    self.cache_dir = Path(cache_dir)
    self.info = read_info(cache_dir)
    self._readers = [ar.ArrayRecordReader(str(self.cache_dir / f)) for f in self.info["files"]]
    self._counts = [r.num_records() for r in self._readers]
    if sum(self._counts) != self.info["num_records"]:
      raise ValueError(f"{cache_dir}: files hold {sum(self._counts)} records, "
                       f"{INFO_FILE} says {self.info['num_records']} (truncated copy?)")
    if "has_context" not in self.info:  # caches written before the field existed
      self.info["has_context"] = "context" in self[0]

  def __len__(self) -> int:
    return self.info["num_records"]

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} of {len(self)}")
    # Records were dealt round-robin over the shards.
    shard, pos = index % len(self._readers), index // len(self._readers)
    return decode_record(self._readers[shard].read([pos])[0])

  def __iter__(self) -> Iterator[dict]:
    return (self[i] for i in range(len(self)))
