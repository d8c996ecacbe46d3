"""Reading user-supplied weight files: safetensors only, never pickle."""

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")

_HOW_TO_CONVERT = (
    "videoldm-jax does not load pickle files, which can run arbitrary code when opened. "
    "Convert it once to safetensors in an environment you trust, e.g.\n"
    "  python -c \"import torch, safetensors.torch as st; "
    "sd = torch.load('{path}', map_location='cpu', weights_only=True); "
    "sd = sd.get('state_dict', sd); "
    "st.save_file({{k: v.contiguous() for k, v in sd.items() if hasattr(v, 'contiguous')}}, "
    "'{stem}.safetensors')\"\n"
    "or, for a diffusers folder, load it with diffusers and call "
    "`save_pretrained(folder, safe_serialization=True)`.")


class PickleRefused(ValueError):
  """A pickle-based checkpoint was given; the message says how to convert it."""


def refuse_pickle(path: str | os.PathLike) -> None:
  """Raises `PickleRefused` with conversion instructions if `path` is a pickle file."""
  p = Path(path)
  if p.suffix.lower() in PICKLE_SUFFIXES:
    raise PickleRefused(f"{p}: refusing a pickle checkpoint ({p.suffix}). " +
                        _HOW_TO_CONVERT.format(path=p, stem=p.with_suffix("")))


_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
           "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Maps every tensor of a .safetensors file as a read-only numpy array.

  The format is an 8-byte little-endian header size, a JSON header of
  {name: {dtype, shape, data_offsets}} and the raw bytes; reading it ourselves gives
  bfloat16 (via ml_dtypes) and memory-mapping of multi-GB checkpoints for free.
  """
  path = Path(path)
  refuse_pickle(path)
  if path.suffix.lower() != ".safetensors":
    raise ValueError(f"{path}: expected a .safetensors file")
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file")
  size = path.stat().st_size
  with open(path, "rb") as f:
    raw = f.read(8)
    n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
    if n < 2 or 8 + n > size:
      raise ValueError(f"{path}: not a safetensors file (bad header length)")
    try:
      header = json.loads(f.read(n))
    except ValueError as e:
      raise ValueError(f"{path}: not a safetensors file (header is not JSON: {e})") from e
  if not isinstance(header, dict):
    raise ValueError(f"{path}: not a safetensors file (the header is a JSON "
                     f"{type(header).__name__}, expected an object)")
  # (np.memmap refuses an empty region: a file of zero-element tensors has no data.)
  data = (np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n
          else np.zeros((0,), np.uint8))
  out = {}
  for key, info in header.items():
    if key == "__metadata__":
      continue
    if not (isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= info.keys()
            and _whole_numbers(info["shape"], None) and _whole_numbers(info["data_offsets"], 2)):
      raise ValueError(f"{path}: not a safetensors file (tensor {key}: expected an object "
                       "with dtype, shape (whole numbers >= 0) and data_offsets (two), got "
                       f"{info!r:.200})")
    if info["dtype"] not in _DTYPES:
      raise ValueError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    dtype = np.dtype(_DTYPES[info["dtype"]])
    if not 0 <= start <= end <= data.shape[0] or \
       end - start != dtype.itemsize * int(np.prod(info["shape"])):
      raise ValueError(f"{path}: tensor {key} lies outside the file or has the wrong "
                       "byte size (truncated download?)")
    out[key] = data[start:end].view(dtype).reshape(info["shape"])
  return out


def _whole_numbers(value, length) -> bool:
  """Whether `value` is a list of `length` (None: any number of) integers >= 0."""
  return (isinstance(value, list) and (length is None or len(value) == length)
          and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))


def find_weights(folder: str | os.PathLike, stem: str) -> Path:
  """The safetensors weights file `<stem>.safetensors` in a diffusers model folder, or
  the half-precision variant `<stem>.fp16.safetensors` (what `variant="fp16"` saves;
  loaded as float32) where that is the only one.

  Sharded weights (`<stem>.safetensors.index.json`) are not supported yet; a folder
  holding only `<stem>.bin` is refused with conversion instructions.
  """
  folder = Path(folder)
  candidates = [folder / f"{stem}.safetensors", folder / "model.safetensors",
                folder / f"{stem}.fp16.safetensors", folder / "model.fp16.safetensors"]
  for c in candidates:
    if c.is_file():
      return c
  if (folder / f"{stem}.safetensors.index.json").is_file() or \
     (folder / "model.safetensors.index.json").is_file():
    raise ValueError(f"{folder}: sharded safetensors are not supported; merge the shards "
                     "into one file first")
  pickles = sorted(p for p in folder.glob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
  if pickles:
    refuse_pickle(pickles[0])
  raise FileNotFoundError(f"{folder}: no weights found (looked for "
                          f"{', '.join(c.name for c in candidates)})")
