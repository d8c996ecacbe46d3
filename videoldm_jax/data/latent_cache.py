"""A cache of VAE latents (and optional text embeddings) in ArrayRecord files.

Encoding clips with the frozen VAE every step wastes most of a key-frame step; the
cache does it once. Layout of a cache folder:

  DIR/latents-00000-of-00004.array_record   records: msgpack maps of NumPy arrays and
                                            strings (no pickle), one per clip
  DIR/cache_info.json                       which VAE made it (config, scaling factor
                                            and a fingerprint of its weights), latent
                                            shape, record count, source

`LatentCacheSource` is a random-access source (`len`, `[i]`) for Grain; `check_vae`
refuses a cache made by another VAE or scale factor, naming what differs.
"""

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np
from array_record.python import array_record_module as ar
from flax import serialization, traverse_util

INFO_FILE = "cache_info.json"
FORMAT = "videoldm-jax/latent-cache"


def vae_fingerprint(vae_params: dict) -> str:
  """SHA-256 over every VAE weight (path, shape, dtype and bytes), in path order."""
  h = hashlib.sha256()
  for path, value in sorted(traverse_util.flatten_dict(vae_params).items()):
    value = np.ascontiguousarray(np.asarray(value))
    h.update("/".join(path).encode())
    h.update(str((value.shape, value.dtype.str)).encode())
    h.update(value.tobytes())
  return h.hexdigest()


def encode_record(example: dict[str, Any]) -> bytes:
  """{name: array | str | number} -> msgpack bytes."""
  return serialization.msgpack_serialize(
      {k: (np.asarray(v) if not isinstance(v, str) else v) for k, v in example.items()})


def decode_record(data: bytes) -> dict[str, Any]:
  return dict(serialization.msgpack_restore(data))


def write_cache(out_dir: str | Path, records: Iterable[dict], *, vae_config: dict,
                vae_params: dict, num_shards: int = 1, source: str = "",
                progress: Optional[Any] = None) -> dict:
  """Writes `records` (dicts with 'latents' float (T, h, w, C) and anything else, e.g.
  'caption', labels, 'context') round-robin into `num_shards` ArrayRecord files.

  Returns the info written to cache_info.json.
  """
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  if (out_dir / INFO_FILE).exists():
    raise FileExistsError(f"{out_dir}: already holds a latent cache ({INFO_FILE})")
  paths = [out_dir / f"latents-{i:05d}-of-{num_shards:05d}.array_record"
           for i in range(num_shards)]
  writers = [ar.ArrayRecordWriter(str(p), "group_size:1") for p in paths]
  count, shape = 0, None
  try:
    for rec in records:
      latents = np.asarray(rec["latents"])
      if shape is None:
        shape = list(latents.shape)
      writers[count % num_shards].write(encode_record(rec))
      count += 1
      if progress is not None:
        progress.update(1)
  finally:
    for w in writers:
      w.close()
  if count == 0:
    raise ValueError(f"{out_dir}: no records to cache")
  info = {"format": FORMAT, "num_records": count, "latent_shape": shape,
          "files": [p.name for p in paths], "vae_config": vae_config,
          "scaling_factor": vae_config.get("scaling_factor"),
          "vae_fingerprint": vae_fingerprint(vae_params), "source": source}
  # Written last: a cache without its info file is incomplete and is never opened.
  (out_dir / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
  return info


def read_info(cache_dir: str | Path) -> dict:
  path = Path(cache_dir) / INFO_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{cache_dir}: no {INFO_FILE}; not a (complete) latent cache "
                            "made by videoldm-cache-latents")
  info = json.loads(path.read_text())
  if info.get("format") != FORMAT:
    raise ValueError(f"{path}: format {info.get('format')!r}, expected {FORMAT!r}")
  return info


def check_vae(info: dict, vae_config: dict, vae_params: dict, where: str) -> None:
  """Raises ValueError unless the cache was made by this VAE and scale factor."""
  if info.get("scaling_factor") != vae_config.get("scaling_factor"):
    raise ValueError(f"{where}: latents were scaled by {info.get('scaling_factor')}, the "
                     f"model's VAE uses {vae_config.get('scaling_factor')}; rebuild the cache")
  if info.get("vae_config") != vae_config:
    raise ValueError(f"{where}: made by a VAE with config {info.get('vae_config')}, the "
                     f"model's is {vae_config}; rebuild the cache")
  fingerprint = vae_fingerprint(vae_params)
  if info.get("vae_fingerprint") != fingerprint:
    raise ValueError(f"{where}: made by other VAE weights (fingerprint "
                     f"{info.get('vae_fingerprint', '?')[:12]}…, the model's is "
                     f"{fingerprint[:12]}…); rebuild the cache")


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
