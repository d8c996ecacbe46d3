"""Grain input pipeline for video diffusion training: clips in, uint8 batches out.

Works over any random-access source of video examples (`len()` and `[i]`): a TFDS
array_record data source (`builder.as_data_source('train')`) or a plain list of dicts.
Each example needs 'video' uint8 (L, h, w, 3) with any L, h, w; optional 'caption'
(str or bytes), 'path' (str or bytes, named in errors and warnings) and integer scalar
fields, among them the class label `label_field` (UCF-101's 'label').

Pipeline, in order (all per-example work is lazy, so a host reads only its share):
  range(N) -> shuffle (reshuffled every epoch) -> repeat(num_epochs)
  -> random_map: read the example, pick T frames at `frame_stride` from a random start,
     resize (keep aspect, cover the target), center/random crop, optional hflip; a clip
     too short for that is replaced by another drawn at random (with a warning);
     with probability `image_fraction` build an "image" example instead
  -> this process's blocks of the global batch (`process_share`) -> per-process batches
  -> worker processes, each building whole batches in turn.
The random_map sits BEFORE the process slice, so its per-example randomness is keyed on
the global stream position: the result does not depend on how many hosts read it, nor
on how many worker processes build the batches.

Batch (B = per-process batch size, T = num_frames):
  'video'          uint8 (B, T, H, W, 3); normalising to [-1, 1] happens on device
  'caption'        str (B,)   the example's caption ('' if the source has none)
  'frame_caption'  str (B, T) caption of each frame's clip (differs per frame only in
                   image examples, whose frames come from different clips)
  'labels'         int32 (B,)  the `label_field` of each example, when the source has
                   it: the class labels a class-conditional UNet reads
  'frame_labels'   int32 (B, T) the label of each frame's clip (with 'labels'; differs
                   per frame only in image examples)
  <other ints>     int64 (B,)  every integer scalar field under its own name, e.g.
                   'time_of_day', 'crowdedness', 'num_frames' (the label field too)
  'source_index'   int64 (B,)  position of the example in `source`
  'image_only'     bool (B, T) True for every frame of an image example

Image examples (Video LDM trains on joint image/video batches): frame 0 comes from the
stream's own example and frames 1..T-1 from other random clips at random times; caption,
labels and source_index are those of frame 0's clip, 'frame_caption' and 'frame_labels'
those of each frame's. The model treats their frames as
independent images (temporal mixing alpha = 1), so each frame gets its own crop and flip.
An image example reads T clips (a compressed clip decodes whole), so keep image_fraction
modest or use more workers when clips are long.

Exact resume: the iterator of the returned dataset has `get_state()` / `set_state()`.
  it = iter(ds); ...; state = it.get_state()   # a small JSON-serialisable dict
  # either store json.dumps(state) next to the model checkpoint, or let Orbax do it:
  #   mngr.save(step, args=ocp.args.Composite(..., data_iter=grain.checkpoint.CheckpointSave(it)))
  #   mngr.restore(step, args=ocp.args.Composite(..., data_iter=grain.checkpoint.CheckpointRestore(it)))
  it2 = iter(make_video_dataset(<same arguments>)); it2.set_state(state)  # continues exactly
The state is only valid for the same source, seed and arguments (including process
count and worker_count).
"""

import functools
import os
import signal
import threading
import time

from absl import logging
import numpy as np
from PIL import Image

import grain

from videoldm_jax.models.config_base import is_integer, is_seed

_CROPS = ("center", "random")


def to_text(value, where: str, field: str = "caption") -> str:
  """A text field as str: str, UTF-8 bytes (TFDS returns Text features as bytes) or a
  0-d array of either; anything else raises TypeError naming `where` and `field`."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return to_text(value.item(), where, field)
  if isinstance(value, str):
    return value
  raise TypeError(f"{where}: {field!r} must be str or bytes, got {type(value).__name__}")


def class_label(value, where: str, field: str) -> np.int32:
  """An example's class label (its `field`) as the int32 the UNet's class embedding
  takes; a value that is not one integer, or lies beyond int32, raises ValueError naming
  `where` (instead of truncating 1.7 to 1 or wrapping)."""
  if not _is_int_scalar(np.asarray(value)):
    raise ValueError(f"{where}: label field {field!r} must be one integer (a class "
                     f"index), got {type(value).__name__} {value!r}")
  label = int(np.asarray(value))
  if not np.iinfo(np.int32).min <= label <= np.iinfo(np.int32).max:
    raise ValueError(f"{where}: label field {field!r} = {label} does not fit int32")
  return np.int32(label)


def _is_int_scalar(value) -> bool:
  if isinstance(value, (bool, np.bool_)):
    return False
  if isinstance(value, (int, np.integer)):
    return True
  return isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iu"


def resize_and_crop(frames: np.ndarray, height: int, width: int, crop: str,
                    rng: np.random.Generator | None = None) -> np.ndarray:
  """Resizes (n, h, w, 3) uint8 frames, keeping the aspect ratio, so that they just cover
  (height, width), then crops to (n, height, width, 3) uint8.

  The shorter side (relative to the target's aspect) lands on the target, so nothing is
  padded and nothing is squashed. 'center' crops the middle, 'random' draws one offset
  from `rng` for all n frames (one clip = one camera).
  """
  n, h, w, _ = frames.shape
  scale = max(height / h, width / w)
  # max(): rounding must never leave the image a pixel short of the target.
  new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
  if (new_h, new_w) != (h, w):
    # PIL's bilinear filter widens its support when shrinking (antialiased), unlike a
    # plain bilinear lookup that would alias the fine lane markings.
    frames = np.stack([np.asarray(Image.fromarray(f).resize((new_w, new_h),
                                                            Image.Resampling.BILINEAR))
                       for f in frames])
  if crop == "center":
    y0, x0 = (new_h - height) // 2, (new_w - width) // 2
  else:
    y0, x0 = int(rng.integers(new_h - height + 1)), int(rng.integers(new_w - width + 1))
  return frames[:, y0:y0 + height, x0:x0 + width]


class _MakeExample:
  """Random map: source index -> one training example (see the module docstring).

  A class rather than a closure so worker processes can rebuild it; it holds the source,
  which for TFDS is a lightweight handle on the array_record files.
  """

  # Random draws of a replacement for a clip too short for the requested frames, before
  # the clips are tried in turn (a dataset whose clips are mostly too short).
  MAX_DRAWS = 16

  def __init__(self, source, num_frames, frame_stride, height, width, crop, hflip,
               image_fraction, label_field="label"):
    self.source, self.num_frames, self.frame_stride = source, num_frames, frame_stride
    self.height, self.width, self.crop, self.hflip = height, width, crop, hflip
    self.image_fraction, self.label_field = image_fraction, label_field
    self._warned = set()  # short clips already reported by this process
    self._fields = None  # example 0's integer fields, which every example must share

  def _integer_fields(self, ex: dict) -> frozenset:
    return frozenset(k for k, v in ex.items()
                     if k not in ("video", "caption") and _is_int_scalar(v))

  def _read(self, i: int):
    """Returns (video (L, h, w, 3) uint8, caption str, int fields dict, where str) of
    source[i]; `where` names the example (and its file, when it has a 'path')."""
    ex = self.source[i]
    where = f"grain_pipeline: source example {i}"
    if not isinstance(ex, dict) or "video" not in ex:
      raise KeyError(f"{where}: expected a dict with a 'video' field, got "
                     f"{list(ex) if isinstance(ex, dict) else type(ex).__name__}")
    if "path" in ex:
      where += f" ({to_text(ex['path'], where, 'path')})"
    video = np.asarray(ex["video"])
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
      raise ValueError(f"{where}: 'video' must be uint8 (T, H, W, 3), got {video.dtype} "
                       f"{video.shape}")
    if video.shape[0] == 0:
      raise ValueError(f"{where}: 'video' has no frames")
    caption = to_text(ex["caption"], where) if "caption" in ex else ""
    ints = {k: np.int64(ex[k]) for k in self._integer_fields(ex)}
    if self._fields is None:  # read once per process (and worker)
      self._fields = self._integer_fields(self.source[0]) if i else frozenset(ints)
    if set(ints) != self._fields:
      # Examples are batched together: without this, Grain's batching fails naming none.
      raise ValueError(
          f"{where}: integer fields {sorted(ints)} differ from example 0's "
          f"{sorted(self._fields)}; every example of a dataset needs the same fields "
          f"(missing here: {sorted(self._fields - set(ints))}, extra: "
          f"{sorted(set(ints) - self._fields)})")
    label = np.asarray(ex.get(self.label_field, ""))
    if label.ndim == 0 and label.dtype.kind in "fbc":
      # A number that is no class index (1.5): refused, not dropped. (Text or arrays
      # under that name are other data: not batched, as before.)
      class_label(ex[self.label_field], where, self.label_field)  # raises
    if self.label_field in ints:
      ints["labels"] = class_label(ints[self.label_field], where, self.label_field)
    return video, caption, ints, where

  def _flip(self, frames, rng):
    return frames[:, :, ::-1] if self.hflip and rng.random() < 0.5 else frames

  def _long_enough(self, index: int, rng: np.random.Generator, span: int):
    """(index, _read(index)) of a clip with >= span frames: `index` itself, or, when it
    is too short, other clips drawn with `rng` (so the stream stays deterministic), then
    the clips after the last one drawn, in turn; ValueError when no clip is long
    enough."""
    for _ in range(self.MAX_DRAWS):
      read = self._read(index)
      length, where = read[0].shape[0], read[3]
      if length >= span:
        return index, read
      if index not in self._warned:
        self._warned.add(index)
        logging.warning(
            "%s has %d frames, fewer than the %d that num_frames=%d at frame_stride=%d "
            "need: replaced by another clip (%d short clips seen by this process; "
            "rebuild the dataset with --min_frames=%d to drop them)", where, length,
            span, self.num_frames, self.frame_stride, len(self._warned), span)
      index = int(rng.integers(len(self.source)))
    # Then the clips in turn from there (deterministic too): with half the clips short,
    # MAX_DRAWS failed draws happen once in 2^16 examples, and a long run met one.
    n = len(self.source)
    for j in ((index + k) % n for k in range(n)):
      if j in self._warned:  # known to be short
        continue
      read = self._read(j)
      if read[0].shape[0] >= span:
        return j, read
      self._warned.add(j)
    raise ValueError(f"{where} has {length} frames, fewer than num_frames="
                     f"{self.num_frames} at frame_stride={self.frame_stride} need ({span}), "
                     f"and so has every other clip of the source ({n}): lower "
                     "num_frames / frame_stride, or rebuild the dataset with longer clips")

  def __call__(self, index, rng: np.random.Generator) -> dict:
    index = int(index)
    T, stride = self.num_frames, self.frame_stride
    # Drawn unconditionally, so video examples' crops do not depend on image_fraction.
    is_image = rng.random() < self.image_fraction
    if not is_image:
      span = (T - 1) * stride + 1
      index, (video, caption, ints, _) = self._long_enough(index, rng, span)
      start = int(rng.integers(video.shape[0] - span + 1))
      frames = video[start:start + span:stride]
      frames = self._flip(resize_and_crop(frames, self.height, self.width, self.crop, rng),
                          rng)
      frame_captions = [caption] * T
      frame_labels = [ints.get("labels")] * T
    else:
      video, caption, ints, _ = self._read(index)
      # Other clips for frames 1..T-1: distinct when the source is large enough.
      n = len(self.source)
      if n > 1:
        others = rng.choice(n - 1, size=T - 1, replace=n - 1 < T - 1)
        others = others + (others >= index)  # skips the example itself
      else:
        others = np.full(T - 1, index)
      frames, frame_captions, frame_labels = [], [], []
      for k, i in enumerate([index] + [int(o) for o in others]):
        v, c, clip_ints = (video, caption, ints) if k == 0 else self._read(i)[:3]
        f = v[int(rng.integers(v.shape[0]))][None]  # (1, h, w, 3)
        frames.append(self._flip(resize_and_crop(f, self.height, self.width, self.crop,
                                                 rng), rng))
        frame_captions.append(c)
        frame_labels.append(clip_ints.get("labels"))
      frames = np.concatenate(frames)
    per_frame = {}
    if "labels" in ints:  # (every clip has it: `_read` checks the fields are example 0's)
      per_frame["frame_labels"] = np.array(frame_labels, np.int32)
    return {
      "video": np.ascontiguousarray(frames),
      "caption": caption,
      "frame_caption": np.array(frame_captions, dtype=str),
      **ints, **per_frame,
      "source_index": np.int64(index),
      "image_only": np.full((T,), is_image, bool),
    }


class _TakeShare:
  """Element k of a process's share -> element g(k) of the global stream: consecutive
  blocks of `block` elements go to processes 0, 1, ..., P-1 in turn, so the global batch
  of a step (all processes' batches concatenated in process order, as
  `jax.make_array_from_process_local_data` lays them out) is exactly the batch one
  process would read alone. A final partial round (finite epochs) is dealt round-robin.
  """

  def __init__(self, ds: grain.MapDataset, block: int, index: int, count: int):
    self.ds, self.block, self.index, self.count = ds, block, index, count
    n = len(ds)
    self.full = n // (block * count) * (block * count)  # elements in whole rounds

  def __call__(self, k: int):
    b, p = self.block, self.count
    if k < self.full // p:
      g = (k // b) * b * p + self.index * b + k % b
    else:
      g = self.full + (k - self.full // p) * p + self.index
    return self.ds[g]


def _exit_with_parent(parent: int, worker_index: int, worker_count: int) -> None:
  """Grain worker start-up: the worker exits once `parent`, the process that built the
  pipeline, is gone. A SIGKILLed trainer (a preempted job, an OOM kill) left its workers
  running, ~220 MB each, and every relaunch added more. (The pid comes from the parent:
  a worker still starting up when it died would read pid 1 as its parent.)

  SIGTERM is ignored: SLURM (--signal, scancel), systemd at a VM's shutdown and a kill of
  the process group signal every process, the workers too. They died of it while the
  trainer, which saves and stops at the end of its step, still needed a batch: an
  input-bound run (no batch read ahead) crashed in `next()` with "Worker process was
  terminated unexpectedly" instead of saving. Grain stops its workers with an event and
  SIGKILL, never SIGTERM; a trainer that dies ends them through the watch below."""
  del worker_index, worker_count
  signal.signal(signal.SIGTERM, signal.SIG_IGN)

  def watch():
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(1)  # the parent is gone: nobody reads this worker's batches

  threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def process_share(ds: grain.MapDataset, block: int, process_index: int,
                  process_count: int) -> grain.MapDataset:
  """This process's share of `ds` (len(ds) // process_count elements) by blocks of
  `block` (the per-process batch), see `_TakeShare`."""
  if process_count == 1:
    return ds
  return grain.MapDataset.range(len(ds) // process_count).map(
      _TakeShare(ds, block, process_index, process_count))


def make_video_dataset(source, *, batch_size: int, num_frames: int, height: int,
                       width: int, seed: int, frame_stride: int = 1, crop: str = "center",
                       hflip: bool = False, shuffle: bool = True,
                       num_epochs: int | None = None, process_index: int | None = None,
                       process_count: int | None = None, worker_count: int = 0,
                       image_fraction: float = 0.0, label_field: str = "label",
                       drop_remainder: bool = True,
                       read_threads: int = 4,
                       worker_buffer_size: int = 2) -> grain.IterDataset:
  """Builds the training input pipeline; `iter()` it to get batches (module docstring).

  Args:
    source: random-access examples (`len`, `[i]` -> dict with 'video' uint8 (L, h, w, 3)).
    batch_size: examples per batch on THIS process.
    num_frames, frame_stride: T frames, `frame_stride` source frames apart.
    height, width: output frame size; crop: 'center' or 'random'; hflip: random
      horizontal flips (p = 0.5).
    seed: drives shuffling, clip starts, crops, flips and image examples.
    shuffle: reshuffle every epoch (else source order).
    num_epochs: None repeats forever. With a finite count, the stream is cut to a
      multiple of process_count so that all hosts yield the same number of batches;
      a count too small for one batch per process (with drop_remainder) raises.
    process_index, process_count: this host's share; default jax.process_index() /
      jax.process_count(). Shares are disjoint and their union is the stream.
    worker_count: > 0 builds batches in that many worker processes (Grain
      mp_prefetch), each a whole batch in turn: the same batches as worker_count=0.
    image_fraction: probability that an example is an image example (image_only=True).
    label_field: the integer field emitted as 'labels' (int32), the class label (a
      non-integer number raises). Every example must have the same integer fields.
    drop_remainder: drop a final partial batch (finite epochs only).
    read_threads: threads that read and decode examples (without worker processes;
      each worker process builds two batches at a time).
    worker_buffer_size: batches each worker process keeps ready.
  """
  if crop not in _CROPS:
    raise ValueError(f"make_video_dataset: crop must be one of {_CROPS}, got {crop!r}")
  for name, value in (("batch_size", batch_size), ("num_frames", num_frames),
                      ("height", height), ("width", width), ("frame_stride", frame_stride),
                      ("read_threads", read_threads)):
    # (2.9 frames were truncated to 2)
    if not is_integer(value, 1):
      raise ValueError(f"make_video_dataset: {name} must be an integer >= 1, got {value!r}")
  if not is_seed(seed):  # (-1 failed inside Grain, naming no argument)
    raise ValueError(f"make_video_dataset: seed must be an integer in [0, 2^32), got "
                     f"{seed!r}")
  if not 0.0 <= image_fraction <= 1.0:
    raise ValueError(f"make_video_dataset: image_fraction must be in [0, 1], got "
                     f"{image_fraction}")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"make_video_dataset: num_epochs must be None or >= 1, got {num_epochs}")
  if process_index is None or process_count is None:
    import jax  # only when asked to find out; the pipeline itself never touches JAX
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"make_video_dataset: need 0 <= process_index < process_count, got "
                     f"{process_index} of {process_count}")
  n = len(source)
  if n == 0:
    raise ValueError("make_video_dataset: the source is empty")
  if num_epochs is not None and drop_remainder and \
      n * num_epochs // process_count < batch_size:
    # Else an iterator that ends at once: a run that trains on nothing, without a word.
    raise ValueError(
        f"make_video_dataset: the source has {n} clips; {num_epochs} epoch(s) of them "
        f"give each of the {process_count} processes {n * num_epochs // process_count}, "
        f"fewer than one batch of {batch_size}: with drop_remainder=True no batch is "
        "made. Use more clips or epochs, a smaller batch, or drop_remainder=False")

  ds = grain.MapDataset.range(n).seed(int(seed))
  if shuffle:
    ds = ds.shuffle()  # Grain reseeds per epoch: index // n picks the epoch's permutation
  ds = ds.repeat(num_epochs)
  # (With finite epochs `process_share` cuts the stream to a multiple of process_count.)
  ds = ds.random_map(_MakeExample(source, int(num_frames), int(frame_stride), int(height),
                                  int(width), crop, bool(hflip), float(image_fraction),
                                  str(label_field)))
  ds = process_share(ds, int(batch_size), process_index, process_count)
  if worker_count > 0:
    # Batched before the iterator: Grain deals the elements of this dataset to the
    # worker processes in turn, so each builds whole batches and the stream of batches
    # is the one without workers (batched after it, worker w batched every W-th
    # example: other batches than a run with another count of workers or processes).
    # Two batches read ahead per worker, as many as the 2 B examples below.
    ds = ds.batch(int(batch_size), drop_remainder=drop_remainder)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
  else:
    # A bounded read-ahead: the default (hundreds of examples) would hold GBs of clips.
    # At least one slot per thread (Grain warns otherwise).
    ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=int(read_threads),
        prefetch_buffer_size=max(2 * int(batch_size), int(read_threads))))
    ds = ds.batch(int(batch_size), drop_remainder=drop_remainder)
  if worker_count > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():
      # Grain reads its absl flags when it starts workers; outside an absl app (pytest, a
      # notebook, a plain script) nobody parsed them and it raises UnparsedFlagAccessError.
      # Marking them parsed keeps every flag at its default.
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(worker_count), per_worker_buffer_size=int(worker_buffer_size)),
        worker_init_fn=functools.partial(_exit_with_parent, os.getpid()))
  return ds
