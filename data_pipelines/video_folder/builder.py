"""TFDS builder `video_folder`: a folder tree of video files -> one array_record dataset.

Each example is
  video      uint8 (T, H, W, 3) RGB, channels-last, zlib-compressed Tensor; T, H, W vary
  caption    Text, from the caption file, "" for videos without a row
  path       Text, the file's path relative to the source folder ('/' separators)
  num_frames int32 scalar, T
  fps        float32 scalar, frame rate of the STORED frames (0.0 if unknown)

Odd heights / widths are KEPT as decoded (no crop, no pad): the stored tensor has no
codec constraint, and cropping is the training pipeline's job anyway.

Bad items never stop a build: each one is skipped, and listed with its reason in
`skipped.json` next to `dataset_info.json` (plus one summary log line). Only a source
with no usable video at all fails, with ONE `NoUsableVideoError` listing every reason.
Works without TensorFlow (see /work/shared/notes/jax_stack.md): read back with
`builder.as_data_source("train")` or `tfds.data_source("video_folder", split="train",
data_dir=...)`; read back that way, Text features arrive as `bytes` (numpy decoding).

The decoding / skipping / reporting machinery (`decode_examples`, `skip_report`,
`SkipReportingBuilder`, `prepare`, ...) is shared with the other builders that read
local video files (data_pipelines.webvid, data_pipelines.ucf101).
"""

import collections
import dataclasses
import inspect
import json
import logging
import os
import tempfile

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.video_folder import sources

__all__ = ["VideoFolderConfig", "VideoFolder", "NoUsableVideoError", "build",
           "SKIPPED_REPORT", "DECODE_OPTIONS", "validate_decode_options",
           "decode_options", "decode_examples", "reason_counts", "skip_report",
           "no_usable_video_error", "summary_line", "SkipReportingBuilder", "prepare"]

SKIPPED_REPORT = "skipped.json"
_MAX_LISTED = 50  # skip reasons spelled out in one error message; the rest are counted


class NoUsableVideoError(ValueError):
  """The source yielded no example; the message lists every skipped file and why."""


# The VideoFolderConfig fields that steer `sources.decode_clip`; other builders that
# decode local files (data_pipelines.webvid, .ucf101) reuse them with the same meaning.
DECODE_OPTIONS = ("max_frames", "frame_stride", "target_fps", "resize_short_side",
                  "min_frames")


def validate_decode_options(owner: str, cfg) -> None:
  """Checks the DECODE_OPTIONS fields of `cfg`; errors start with `owner` (the config's
  class name), so the message says which config is wrong."""
  def bad(msg):
    raise ValueError(f"{owner}: {msg}")
  if cfg.max_frames is not None and cfg.max_frames < 1:
    bad(f"max_frames must be >= 1 or None, got {cfg.max_frames}")
  if cfg.frame_stride < 1:
    bad(f"frame_stride must be >= 1, got {cfg.frame_stride}")
  if cfg.target_fps is not None and not cfg.target_fps > 0:
    bad(f"target_fps must be > 0 or None, got {cfg.target_fps}")
  if cfg.target_fps is not None and cfg.frame_stride != 1:
    bad("give frame_stride or target_fps, not both")
  if cfg.resize_short_side is not None and cfg.resize_short_side < 1:
    bad(f"resize_short_side must be >= 1 or None, got {cfg.resize_short_side}")
  if cfg.min_frames < 1:
    bad(f"min_frames must be >= 1, got {cfg.min_frames}")
  if cfg.max_frames is not None and cfg.min_frames > cfg.max_frames:
    bad(f"min_frames={cfg.min_frames} > max_frames={cfg.max_frames}: every video "
        "would be skipped")


def decode_options(cfg) -> dict:
  """The DECODE_OPTIONS fields of `cfg`, as keyword arguments for `decode_clip`."""
  return {name: getattr(cfg, name) for name in DECODE_OPTIONS}


def video_features(**extra) -> tfds.features.FeaturesDict:
  """The features of every decoded-video builder (video_folder, webvid, ucf101), plus
  `extra` ones."""
  return tfds.features.FeaturesDict({
      # zlib: neighbouring frames are similar and small clips compress well; decoding
      # needs no TensorFlow (plain numpy + zlib).
      "video": tfds.features.Tensor(shape=(None, None, None, 3), dtype=np.uint8,
                                    encoding="zlib"),
      "caption": tfds.features.Text(),
      "path": tfds.features.Text(),
      "num_frames": tfds.features.Scalar(dtype=np.int32),
      "fps": tfds.features.Scalar(dtype=np.float32),
      **extra,
  })


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """How every source video is decoded (shared by the video_folder, webvid and ucf101
  builders' configs); see `VideoFolderConfig` for the meaning of each field."""
  max_frames: int | None = 64
  frame_stride: int = 1
  target_fps: float | None = None
  resize_short_side: int | None = None
  min_frames: int = 4

  def __post_init__(self):
    validate_decode_options(type(self).__name__, self)


@dataclasses.dataclass(frozen=True)
class VideoFolderConfig(DecodeOptions):
  """What to build and how. A plain dataclass rather than a `tfds.core.BuilderConfig`:
  a custom BuilderConfig puts its name into the on-disk path and can't be recreated by
  name when reading; these options are recorded in the dataset's metadata.json instead.

  Attributes:
    source_dir: folder walked recursively for .mp4/.webm/.mov/.gif/.avi/.mkv files.
      Not needed to READ an already built dataset.
    captions: optional CSV (columns path,caption) or JSONL ({"path","caption"}) file;
      paths relative to `source_dir` (absolute paths inside it are accepted).
    max_frames: most frames stored per video (decoding stops there: bounds memory and
      disk for long videos); None keeps all.
    frame_stride: keep every n-th frame. Exclusive with `target_fps`.
    target_fps: choose the stride per video as round(source fps / target_fps), >= 1.
    resize_short_side: scale frames DOWN so the shorter side is this many pixels
      (aspect kept, never upscaled); None stores the decoded size.
    min_frames: videos with fewer stored frames are skipped as too short.
  """
  source_dir: str | None = None
  captions: str | None = None


def _format_skip(skip: sources.Skip) -> str:
  return f"{skip.path}: {skip.reason} ({skip.detail})"


def reason_counts(skips) -> dict[str, int]:
  """{reason: number of skips}, sorted by reason."""
  return dict(sorted(collections.Counter(s.reason for s in skips).items()))


def skip_report(skips, num_examples: int, **where) -> dict:
  """What `skipped.json` holds: `where` (source_dir first: `summary_line` names it),
  then the counts and every skip, sorted by path so reports diff well."""
  skips = sorted(skips, key=lambda s: (s.path, s.reason))
  return {**where, "num_examples": num_examples, "num_skipped": len(skips),
          "skipped_by_reason": reason_counts(skips),
          "skipped": [dataclasses.asdict(s) for s in skips]}


def no_usable_video_error(source_dir: str, skips, what: str,
                          dataset: str = "video_folder") -> NoUsableVideoError:
  """The single error for a source that produced nothing, listing every reason."""
  lines = [_format_skip(s) for s in skips[:_MAX_LISTED]]
  if len(skips) > _MAX_LISTED:
    lines.append(f"... and {len(skips) - _MAX_LISTED} more "
                 f"(by reason: {reason_counts(skips)})")
  listing = "".join(f"\n  {line}" for line in lines)
  return NoUsableVideoError(f"{dataset}: no usable video in {source_dir}: {what}"
                            + (f"; skipped {len(skips)} item(s):{listing}" if skips else ""))


def decode_examples(items, skips: list, cfg):
  """Decodes each `(key, file, fields)` of `items` with the DECODE_OPTIONS of `cfg`.

  Yields `(key, example)`: video, path (= key, unique, so TFDS's shuffle stays
  reproducible), num_frames and fps, plus `fields` (caption and any dataset-specific
  features). A file that can't be used is appended to `skips` instead. Returns the
  number of examples yielded (`kept = yield from decode_examples(...)`).
  """
  kept = 0
  for key, path, fields in items:
    try:
      clip = sources.decode_clip(path, **decode_options(cfg))
    except sources.SkipError as e:
      skips.append(sources.Skip(key, e.reason, e.detail))
      continue
    except Exception as e:  # pylint: disable=broad-except
      # Anything else a hostile file provokes (PyAV / FFmpeg edge cases, memory)
      # must not sink the other files either; the type is kept for diagnosis.
      skips.append(sources.Skip(key, sources.DECODE_ERROR, f"{type(e).__name__}: {e}"))
      continue
    if cfg.target_fps and not clip.fps >= cfg.target_fps / 1.5:
      # The stride cannot go below 1 (frames are never repeated): a slower source, or
      # one stating no rate, keeps its own, and plays faster than the other clips.
      logging.getLogger(__name__).warning(
          "%s: kept at %s, not near target_fps=%g (every frame stored)", key,
          f"its own {clip.fps:.3g} fps" if clip.fps else "an unknown rate (none stated)",
          cfg.target_fps)
    kept += 1
    yield key, {"video": clip.frames, "path": key,
                "num_frames": np.int32(len(clip.frames)), "fps": np.float32(clip.fps),
                **fields}
  return kept


class SkipReportingBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the builders that decode local video files (video_folder, webvid_local,
  ucf101_local): after a build, `self.report` (a `skip_report` dict, set by the last
  generator) goes to `skipped.json` and metadata.json, plus one summary log line.
  Subclasses define `build_options()`: the options recorded in metadata.json."""

  report = None  # filled by a build: what skipped.json holds

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10 resolves a packaged builder's code path through `importlib_resources`,
    # a dependency it only declares for Python < 3.9, so on 3.11 download_and_prepare
    # dies with ModuleNotFoundError. The file defining the subclass is the same answer.
    return epath.Path(inspect.getfile(cls))

  def build_options(self) -> dict:
    raise NotImplementedError

  def _download_and_prepare(self, dl_manager, download_config):
    super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
    if self.report is None:  # e.g. max_examples_per_split=0: nothing was generated
      return
    # self.data_dir is still TFDS's temporary folder here; it is renamed into place
    # with the data files, so the report exists exactly when the dataset does.
    (epath.Path(self.data_dir) / SKIPPED_REPORT).write_text(
        json.dumps(self.report, indent=1, ensure_ascii=False))
    # build_options again: constructing over an old build loaded ITS metadata.
    self.info.metadata.update(build_options=self.build_options(),
                              num_skipped=self.report["num_skipped"],
                              skipped_by_reason=self.report["skipped_by_reason"])

  def _post_download_and_prepare_hook(self):
    if self.report is not None:
      r = self.report
      level = logging.WARNING if r["num_skipped"] else logging.INFO
      # The subclass's own module logger, so each CLI / test listens to its dataset.
      logging.getLogger(type(self).__module__).log(
          level, "%s", summary_line(r, os.path.join(self.data_dir, SKIPPED_REPORT),
                                    dataset=self.name))


class VideoFolder(SkipReportingBuilder):
  """Builds `video_folder` from a folder of videos; see the module docstring.

  Build:  VideoFolder(data_dir=D, source_dir=S, captions=C, ...).download_and_prepare()
          (or `build(S, D, C)`, which also refuses to silently reuse an old build).
  Read:   VideoFolder(data_dir=D).as_data_source("train")
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "video (zlib uint8 T,H,W,3), caption, path, num_frames, fps."}

  def __init__(self, *, data_dir=None, config=None, version=None,
               file_format="array_record", folder_config: VideoFolderConfig | None = None,
               **options):
    """`options` are `VideoFolderConfig` fields (or pass a whole `folder_config`).
    `config` / `version` are TFDS's own arguments, accepted so `tfds.builder` works."""
    if folder_config is not None and options:
      raise TypeError(f"VideoFolder: pass folder_config or options {sorted(options)}, "
                      "not both")
    folder_config = folder_config or VideoFolderConfig(**options)
    if folder_config.source_dir:  # absolute, so metadata and messages say where it was
      folder_config = dataclasses.replace(
          folder_config, source_dir=os.path.abspath(folder_config.source_dir),
          captions=folder_config.captions and os.path.abspath(folder_config.captions))
    self.folder_config = folder_config
    super().__init__(data_dir=data_dir, config=config, version=version,
                     file_format=file_format or "array_record")

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.folder_config
    return self.dataset_info_from_configs(
        description="Videos decoded from a folder tree, with optional captions.",
        features=video_features(),
        # Overwritten from metadata.json when reading a built dataset.
        metadata=tfds.core.MetadataDict(build_options=dataclasses.asdict(cfg)),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the source is a local folder
    cfg = self.folder_config
    if not cfg.source_dir:
      raise ValueError("VideoFolder: no source_dir given, so there is nothing to build; "
                       "pass source_dir=... (reading a built dataset needs only data_dir)")
    videos, skips = sources.find_videos(cfg.source_dir)
    captions = {}
    if cfg.captions:
      rows, duplicates = sources.read_captions(cfg.captions, cfg.source_dir)
      captions, missing = sources.match_captions(videos, rows, cfg.source_dir, cfg.captions)
      skips += duplicates + missing
    if not videos:
      raise no_usable_video_error(cfg.source_dir, skips, "no file ending in "
                                  f"{'/'.join(sources.VIDEO_EXTENSIONS)} found")
    return {"train": self._generate_examples(videos, captions, skips)}

  def _generate_examples(self, videos, captions, skips):
    """Yields (relative path, example); bad files are appended to `skips`."""
    cfg = self.folder_config
    items = ((rel, os.path.join(cfg.source_dir, rel), {"caption": captions.get(rel, "")})
             for rel in videos)
    kept = yield from decode_examples(items, skips, cfg)
    if not kept:
      # Raised before TFDS finalises anything, so no half-written dataset remains.
      raise no_usable_video_error(cfg.source_dir, skips,
                                  f"none of {len(videos)} candidate file(s) could be used")
    self.report = skip_report(skips, kept, source_dir=cfg.source_dir,
                              captions=cfg.captions)
    if cfg.captions:
      # Stored, but trained on with the empty caption: listed so that it is not silent.
      skipped = {s.path for s in skips}
      missing = sorted(rel for rel in videos if rel not in captions and rel not in skipped)
      self.report.update(num_uncaptioned=len(missing), uncaptioned=missing)

  def build_options(self) -> dict:
    return dataclasses.asdict(self.folder_config)


def summary_line(report: dict, report_path: str, dataset: str = "video_folder") -> str:
  """One line: how many clips were stored and how many items skipped, by reason."""
  by_reason = ", ".join(f"{k}={v}" for k, v in report["skipped_by_reason"].items())
  uncaptioned = report.get("num_uncaptioned", 0)
  return (f"{dataset}: stored {report['num_examples']} video(s) from "
          f"{report['source_dir']}"
          + (f", {uncaptioned} of them without a caption row (empty caption)"
             if uncaptioned else "")
          + f"; skipped {report['num_skipped']}"
          + (f" ({by_reason})" if by_reason else "")
          + (f"; details in {report_path}" if by_reason or uncaptioned else ""))


def prepare(builder: tfds.core.DatasetBuilder, *, overwrite: bool = False):
  """`builder.download_and_prepare()` for a builder whose source is local files.

  An existing build raises FileExistsError unless `overwrite=True`: TFDS would
  otherwise silently reuse it even though the source may have changed.
  """
  if (builder.data_path / "dataset_info.json").exists() and not overwrite:
    raise FileExistsError(f"{builder.data_path}: a {builder.name} dataset is already "
                          "built there; pass overwrite=True (CLI: --overwrite) to "
                          "rebuild it")
  mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  # Nothing is downloaded, but TFDS's download manager still creates
  # `<download_dir>/extracted`; keep that clutter out of data_dir.
  with tempfile.TemporaryDirectory(prefix=f"{builder.name}_dl_") as download_dir:
    builder.download_and_prepare(download_dir=download_dir,
                                 download_config=tfds.download.DownloadConfig(
                                     download_mode=mode))


def build(source_dir: str, data_dir: str, captions: str | None = None, *,
          overwrite: bool = False, **options) -> VideoFolder:
  """Builds `video_folder` from `source_dir` into `data_dir` and returns the builder
  (`.as_data_source("train")` reads it; `.report` is what skipped.json holds).

  `options` are the other `VideoFolderConfig` fields (max_frames, frame_stride,
  target_fps, resize_short_side, min_frames). An existing build in `data_dir` raises
  FileExistsError unless `overwrite=True` (see `prepare`).
  """
  builder = VideoFolder(data_dir=data_dir, source_dir=source_dir, captions=captions,
                        **options)
  prepare(builder, overwrite=overwrite)
  return builder
