"""The trainer's input: config.data -> an iterator of host batches with get/set_state.

config.data.kind:
  procedural_driving  the built-in TFDS dataset (built on first use under data_dir,
                      config `tfds_config`), read through the Grain pipeline
  video_folder        a `video_folder` TFDS dataset built beforehand under data_dir
  tfds                any TFDS ArrayRecord dataset `tfds_name` under data_dir
  latent_cache        a folder written by videoldm-cache-latents (cache_dir); its VAE
                      (and text encoder, when it holds text embeddings) must be the
                      model's, its clips data.num_frames x height x width
  procedural          clips drawn on the fly (no files; a smoke-test source)
Every process reads only its share; iterator states are JSON and go into checkpoints.
data.label_field (default 'label') names the integer field batched as 'labels', the
class labels of a class-conditional UNet.
"""

from pathlib import Path
from typing import Optional

import grain
import jax
import numpy as np
from absl import logging

from videoldm_jax import distributed
from videoldm_jax.data import latent_cache
from videoldm_jax.data.grain_pipeline import class_label, make_video_dataset, process_share
from videoldm_jax.data.procedural import ClipIterator

KINDS = ("procedural_driving", "video_folder", "tfds", "latent_cache", "procedural")


def _tfds_source(data, workdir: Path, alone: bool = False):
  """The TFDS data source of config.data. kind='procedural_driving' is built first when
  missing, by process 0 only; with `alone=False` every process calls this and the others
  wait at a barrier. `alone=True` has no barrier: there a process other than 0 reads a
  dataset already built (TFDS moves a finished build into place whole), else
  FileNotFoundError; a build of its own would race process 0's on the same folder.
  (The one caller, the autoencoder export's statistics, runs on process 0.)"""
  import tensorflow_datasets as tfds  # imported here: only TFDS kinds need it
  data_dir = data.get("data_dir") or str(workdir / "tfds")
  if data.kind == "procedural_driving":
    from data_pipelines.procedural_driving import ProceduralDriving, build
    config_name = data.get("tfds_config", "tiny")
    name = f"procedural_driving/{config_name}"
    if jax.process_index() == 0:
      build(config_name, data_dir)  # (a built one is kept)
    elif alone and not (Path(data_dir, name, str(ProceduralDriving.VERSION))
                        / "dataset_info.json").exists():  # (not incomplete.*: building)
      raise FileNotFoundError(
          f"data.data_dir={data_dir}: no built {name} dataset, and process "
          f"{jax.process_index()} of {jax.process_count()} reads it alone (no barrier): "
          "only process 0 builds it; read it alone after a run built it, or on process 0")
    if not alone:
      distributed.wait_for_all("procedural_driving built")
  elif data.kind == "video_folder":
    import data_pipelines.video_folder  # noqa: F401  (registers the builder)
    name = "video_folder"
    # Registered, TFDS would make an empty builder here and fail on its split list.
    if not list(Path(data_dir).glob("video_folder/*/dataset_info.json")):
      raise FileNotFoundError(
          f"data.data_dir={data_dir}: no built video_folder dataset in it (expected "
          f"{data_dir}/video_folder/<version>/); build one with `python -m "
          f"data_pipelines.video_folder --source=VIDEOS --data_dir={data_dir}` and pass "
          "that --data_dir (the folder above video_folder/)")
  else:
    name = data.get("tfds_name", "")
    if not name:
      raise ValueError("data.kind='tfds' reads the TFDS dataset data.tfds_name (e.g. "
                       "--config.data.tfds_name=webvid_local or ucf101_local/split_1); "
                       "it is empty")
  source = tfds.data_source(name, data_dir=data_dir, split=data.get("split", "train"),
                            download=False)
  _check_clip_lengths(source, data, f"{data_dir}/{name}")
  return source


def _cache_dataset(data, seed: int, pi: int, pc: int, cache_check: dict,
                   label_field: str, source=None):
  # (`source`: the caller's LatentCacheSource of data.cache_dir, opened once.)
  if source is None:  # (not `or`: an empty source has len 0)
    source = latent_cache.LatentCacheSource(data.cache_dir)
  latent_cache.check_cache(source.info, str(data.cache_dir), data=data, **cache_check)
  b = data.batch_size // pc

  def fields(r: dict) -> dict:
    out = {k: np.asarray(r[k]) for k in ("latents", "context") if k in r}
    if label_field in r:
      out["labels"] = class_label(r[label_field], f"{data.cache_dir}: a record",
                                  label_field)
    return out

  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
  ds = process_share(ds, b, pi, pc).map(fields)
  # Batched after to_iter_dataset, so the Grain state counts elements (as ShareIterator
  # assumes); a bounded read-ahead (the default keeps hundreds of elements).
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=4,
                                            prefetch_buffer_size=max(2 * b, 4)))
  return ds.batch(b, drop_remainder=True)


def _check_clip_lengths(source, data, name: str) -> None:
  """Warns, before training, when the dataset may hold clips too short for
  data.num_frames at data.frame_stride (its builders record `min_frames`); the pipeline
  replaces each such clip by another, with a warning naming it. Also when it was built
  smaller (`resize_short_side`) than data.height x data.width: every frame is upscaled."""
  info = getattr(source, "dataset_info", None)
  built = (info.metadata or {}).get("build_options", {}) if info is not None else {}
  span = (data.num_frames - 1) * data.get("frame_stride", 1) + 1
  if not isinstance(built, dict):
    return
  most = built.get("max_frames")
  if most and most < span:  # (None: clips stored whole)
    # Every clip is cut to max_frames when built: none is long enough.
    raise ValueError(
        f"{name} was built with max_frames={most} (clips cut to that length), but "
        f"num_frames={data.num_frames} at frame_stride={data.get('frame_stride', 1)} "
        f"need {span}: lower data.num_frames / frame_stride, or rebuild with "
        f"--max_frames={span} or more")
  short = built.get("resize_short_side")
  if short and short < min(data.height, data.width):
    # Frames are resized to cover height x width: all of them grow, blurred, and the
    # run looks like any other.
    logging.warning(
        "%s was built with resize_short_side=%d (frames at most %d pixels on their "
        "shorter side), smaller than data.height=%d x data.width=%d: every frame will be "
        "upscaled; rebuild with --resize_short_side=%d or more, or train smaller",
        name, short, short, data.height, data.width, max(data.height, data.width))
  if "min_frames" in built and built["min_frames"] < span:
    logging.warning(
        "%s was built with min_frames=%d, but num_frames=%d at frame_stride=%d need %d "
        "frames: shorter clips will be replaced by others (rebuild with --min_frames=%d "
        "to drop them)", name, built["min_frames"], data.num_frames,
        data.get("frame_stride", 1), span, span)


_OLD_WORKERS = (
    "data state: the checkpoint's Grain worker processes built batches example by example "
    "(videoldm-jax before commit 235770b, 2026-12-05 20:35 UTC), whose order this version "
    "does not reproduce; it cannot be continued exactly. Start the data afresh from the "
    "checkpoint's weights (videoldm-export, then config.image_model / init_from), or "
    "resume with that version")


class ShareIterator:
  """A Grain iterator over this process's blocks of the global batch (see
  `grain_pipeline.process_share`) whose state also resumes in a run with another number
  of processes: it records the global batches consumed, and after n of them every
  process has read exactly n * (its batch) elements of its share. (With Grain worker
  processes the state is per worker: it resumes with the same worker_count only.)
  `seed`: the pipeline's shuffle seed (config.seed), recorded and checked on resume;
  `num_examples`: the size of its source, recorded and compared on resume (None:
  neither).
  """

  def __init__(self, it, per_process_batch: int, process_count: int, worker_count: int = 0,
               seed: Optional[int] = None, num_examples: Optional[int] = None):
    self._it, self._b, self._pc, self._batches = it, per_process_batch, process_count, 0
    self._workers, self._seed, self._size = worker_count, seed, num_examples

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._it)
    self._batches += 1
    return batch

  def get_state(self) -> dict:
    state = {"grain": self._it.get_state(), "batches": self._batches,
             "global_batch": self._b * self._pc, "process_count": self._pc,
             "worker_count": self._workers}
    recorded = (("seed", self._seed), ("num_examples", self._size))
    return {**state, **{k: v for k, v in recorded if v is not None}}

  def set_state(self, state: dict) -> None:
    if "grain" not in state:  # a bare Grain state (older checkpoints)
      if set(state) != {"next_index"}:
        if {"workers_state", "iterators_in_use_states"} & set(state):
          raise ValueError(_OLD_WORKERS)
        raise ValueError(f"data state {sorted(state)} is not a Grain pipeline's: the "
                         "checkpoint was written with another config.data.kind")
      self._check_layout(saved_plain=True)
      self._it.set_state(state)
      self._batches = int(state["next_index"]) // self._b  # so a later resume elsewhere
      return
    if state["global_batch"] != self._b * self._pc:
      raise ValueError(f"data state: the checkpoint read global batches of "
                       f"{state['global_batch']}, this run reads {self._b * self._pc}; "
                       "resuming would skip or repeat examples")
    saved_seed = state.get("seed")  # (absent in older checkpoints)
    if None not in (saved_seed, self._seed) and saved_seed != self._seed:
      # The position counts elements of the seed's shuffled epoch: under another seed's
      # permutation the rest of the epoch repeats examples already read and skips others
      # (the procedural source refuses it too).
      raise ValueError(f"data state: the checkpoint's pipeline was shuffled with "
                       f"config.seed={saved_seed}, this run's is {self._seed}; resuming "
                       "would repeat and skip examples: resume with the checkpoint's "
                       f"config.seed={saved_seed}")
    saved_size = state.get("num_examples")  # (absent in older checkpoints)
    if None not in (saved_size, self._size) and saved_size != self._size:
      # A rebuilt or other dataset: the saved position is in another permutation.
      logging.warning(
          "data state: the checkpoint's dataset had %d examples, this run's has %d (rebuilt "
          "or another one?): the rest of this epoch follows another shuffled order, so "
          "some examples repeat and others are skipped until it ends", saved_size,
          self._size)
    saved_plain = set(state["grain"]) == {"next_index"}
    saved_workers = state.get("worker_count")  # (absent in older checkpoints)
    if not saved_plain and saved_workers is None:
      raise ValueError(_OLD_WORKERS)
    self._check_layout(saved_plain)
    if not saved_plain and saved_workers != self._workers:
      # Grain takes per-worker states of another count without a word: examples were
      # repeated and skipped (or an IndexError for fewer workers).
      raise ValueError(f"data state: the checkpoint was written with {saved_workers} Grain "
                       f"worker processes, this run has {self._workers}: resume with the "
                       f"checkpoint's config.data.worker_count={saved_workers}")
    self._batches = int(state["batches"])
    if saved_plain:
      # Every global batch took exactly b elements of each process's share. Set from the
      # batch count, not the stored index: latent-cache checkpoints written before its
      # dataset was batched after `to_iter_dataset` stored an index of batches.
      self._it.set_state({"next_index": self._batches * self._b})
    else:
      # Workers build whole batches in turn (grain_pipeline.py), so after n global
      # batches every process's per-worker state is the same at any process count.
      self._it.set_state(state["grain"])

  def _check_layout(self, saved_plain: bool) -> None:
    """Without worker processes Grain's state is {"next_index"}; with them, per-worker
    states: one layout cannot be read as the other (a bare KeyError)."""
    if saved_plain != (set(self._it.get_state()) == {"next_index"}):
      raise ValueError(
          "data state: the checkpoint was written "
          f"{'without' if saved_plain else 'with'} Grain worker processes, this run has "
          f"{'some' if saved_plain else 'none'}: resume with the checkpoint's "
          "config.data.worker_count")


def make_iterator(config, workdir: Path, cache_check: dict, alone: bool = False):
  """Host-batch iterator for this process (see the module docstring).

  cache_check: keyword arguments of `latent_cache.check_cache` besides the cache's info
  (the model's vae_config, vae_params, text_params, needs_context) for
  data.kind='latent_cache'.
  alone: the whole global batches, read by this process without the others (no
  collective, no Grain worker processes), e.g. for statistics one process computes:
  the same batches at any process count.
  """
  data, seed = config.data, config.seed
  pc, pi = (1, 0) if alone else (jax.process_count(), jax.process_index())
  if data.kind not in KINDS:
    raise ValueError(f"config.data.kind={data.kind!r}; expected one of {KINDS}")
  for field, kind in (("tfds_name", "tfds"), ("cache_dir", "latent_cache")):
    if data.get(field) and data.kind != kind:
      # A likely slip: the run would train on data.kind's data, not the one named.
      raise ValueError(f"config.data.{field}={data.get(field)!r} is read only with "
                       f"data.kind='{kind}', but data.kind={data.kind!r}; set "
                       f"--config.data.kind={kind}, or clear {field}")
  if data.batch_size % pc:
    raise ValueError(f"data.batch_size={data.batch_size} is not divisible by the {pc} "
                     "processes")
  if data.kind in ("procedural", "latent_cache"):
    # Options of the video pipeline these sources do not have: a run would silently
    # train without them (no still images mixed in, no flips, another frame rate).
    unused = {k: v for k, v in (("image_fraction", data.get("image_fraction", 0.0)),
                                ("frame_stride", data.get("frame_stride", 1)),
                                ("hflip", data.get("hflip", False)))
              if v != {"image_fraction": 0.0, "frame_stride": 1, "hflip": False}[k]}
    if unused:
      raise ValueError(f"config.data: {unused} are options of the video pipelines "
                       f"(tfds / video_folder / webvid); data.kind={data.kind!r} has none "
                       "of them: reset them, or use a video source")
    # These two change no example (a procedural clip is drawn at its size, a cached one
    # was cropped when cached; neither source has Grain workers): a warning, not an error.
    ignored = {k: v for k, v in (("crop", data.get("crop", "random")),
                                 ("worker_count", data.get("worker_count", 0)))
               if v != {"crop": "random", "worker_count": 0}[k]}
    if ignored and pi == 0 and not alone:
      logging.warning("config.data: %s ignored: data.kind=%r has no such option", ignored,
                      data.kind)
  if data.kind == "procedural":
    # ('label', the default of the video sources, names no field here: no labels.)
    label_field = data.get("label_field", "label")
    return ClipIterator(data.batch_size // pc, data.num_frames, data.height, data.width,
                        seed=seed, process_index=pi, process_count=pc,
                        label_field=None if label_field == "label" else label_field)
  if data.kind == "latent_cache":
    source = latent_cache.LatentCacheSource(data.cache_dir)
    return ShareIterator(iter(_cache_dataset(data, seed, pi, pc, cache_check,
                                             data.get("label_field", "label"), source)),
                         data.batch_size // pc, pc, seed=seed, num_examples=len(source))
  workers = 0 if alone else data.get("worker_count", 0)
  source = _tfds_source(data, workdir, alone)
  ds = make_video_dataset(
      source, batch_size=data.batch_size // pc,
      num_frames=data.num_frames, frame_stride=data.get("frame_stride", 1),
      height=data.height, width=data.width, crop=data.get("crop", "random"),
      hflip=data.get("hflip", False), seed=seed, process_index=pi, process_count=pc,
      worker_count=workers, image_fraction=data.get("image_fraction", 0.0),
      label_field=data.get("label_field", "label"))
  return ShareIterator(iter(ds), data.batch_size // pc, pc, workers, seed=seed,
                       num_examples=len(source))
