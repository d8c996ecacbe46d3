"""TFDS builder `webvid_local`: WebVid-10M (or a subset) from a local download.

Input: a results CSV as published with WebVid (`results_2M_train.csv`, ...; columns
videoid, contentUrl, duration, page_dir, name) and the videos, already downloaded, at
`<videos_root>/<page_dir>/<videoid>.mp4`. Each usable row becomes one example with the
features of `video_folder` (video uint8 (T, H, W, 3) zlib Tensor, caption = the row's
`name`, path = `<page_dir>/<videoid>.mp4`, num_frames, fps) plus `videoid` (int64) and
`page_dir` (Text).

Named `webvid_local`, not `webvid`: TFDS ships its own `webvid` (JPEG frames, other
features), and `tfds.data_source("webvid", ...)` would pick that class.

Decoding, skipping and reporting are `data_pipelines.video_folder`'s: a row whose file
is missing, unreadable or too short is skipped and listed in `skipped.json` with its
reason; a malformed row (non-integer videoid, page_dir leaving the videos root) too,
as `bad_row`, naming the CSV line and column. Only a CSV without the required columns,
or one from which nothing at all is usable, fails the build.

A videoid is an integer: when `<videoid>.mp4` as the CSV spells it is missing, the one
file of its page_dir that spells the same integer with other leading zeros is the
row's (`00123.mp4` for a CSV's `123`: a spreadsheet or pandas that read the column as
numbers wrote it back without them); its name is then the example's `path`. Two or
more such files are ambiguous: a `missing_file` skip naming them.
"""

import csv
import dataclasses
import os
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.video_folder import builder as vfb
from data_pipelines.video_folder import sources

__all__ = ["WebVidConfig", "WebVid", "REQUIRED_COLUMNS", "BAD_ROW", "read_header",
           "iter_rows", "build"]

REQUIRED_COLUMNS = ("videoid", "page_dir", "name")  # contentUrl, duration: not needed
BAD_ROW = "bad_row"  # skip reason: a CSV row that names no valid file
_INT64_MAX = np.iinfo(np.int64).max


@dataclasses.dataclass(frozen=True)
class WebVidConfig(vfb.DecodeOptions):
  """What to build and how (recorded in metadata.json, like `VideoFolderConfig`).

  Attributes:
    csv: the WebVid results CSV. Not needed to READ a built dataset.
    videos_root: folder holding `<page_dir>/<videoid>.mp4`.
    max_rows: read only the first this many data rows of the CSV (subsets for
      experiments; counted before skipping); None reads all.
    max_frames, frame_stride, target_fps, resize_short_side, min_frames: as in
      `VideoFolderConfig`.
  """
  csv: str | None = None
  videos_root: str | None = None
  max_rows: int | None = None

  def __post_init__(self):
    super().__post_init__()
    if self.max_rows is not None and self.max_rows < 1:
      raise ValueError(f"WebVidConfig: max_rows must be >= 1 or None, got {self.max_rows}")


def read_header(csv_path: str) -> list[str]:
  """The CSV's column names; raises naming the file when it can't be a WebVid CSV."""
  if not os.path.isfile(csv_path):
    raise FileNotFoundError(f"{csv_path}: WebVid results CSV does not exist")
  # utf-8-sig: a byte-order mark would otherwise become part of the first column name.
  with open(csv_path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
    header = next(csv.reader(f), None)
  if not header:
    raise ValueError(f"{csv_path}: empty file; expected a WebVid results CSV with "
                     f"columns {', '.join(REQUIRED_COLUMNS)}")
  missing = [c for c in REQUIRED_COLUMNS if c not in header]
  if missing:
    raise ValueError(f"{csv_path}: CSV header must have columns "
                     f"{', '.join(REQUIRED_COLUMNS)}; missing {missing} (header: {header})")
  return header


def _parse_row(row: dict, where: str):
  """(videoid text, videoid, page_dir, caption) of one row, or a `Skip` detail."""
  if not all(sources.readable_text(row.get(c) or "") for c in REQUIRED_COLUMNS):
    return f"{where}: not valid UTF-8 text"
  raw_id = (row.get("videoid") or "").strip()
  try:
    videoid = int(raw_id)
  except ValueError:
    return f"{where}: column 'videoid' must be an integer, got {raw_id!r}"
  if not 0 <= videoid <= _INT64_MAX:
    return f"{where}: column 'videoid' out of range for int64: {raw_id!r}"
  page_dir = (row.get("page_dir") or "").strip().replace(os.sep, "/")
  norm = os.path.normpath(page_dir).replace(os.sep, "/") if page_dir else ""
  # A page_dir that is empty, absolute or climbs out (..) would make the row read a
  # file outside videos_root: that is a broken row, not a missing video.
  if not norm or norm.startswith(("/", "../")) or norm in (".", ".."):
    return (f"{where}: column 'page_dir' must be a folder under the videos root, "
            f"got {row.get('page_dir')!r}")
  caption = row.get("name")
  if caption is None:  # DictReader fills columns missing from a short row with None
    return f"{where}: column 'name' (the caption) is missing from the row"
  if None in row:  # (DictReader's key for fields past the header's)
    # An unquoted comma in the caption: it was cut there, the rest dropped.
    return (f"{where}: {len(row[None])} field(s) more than the header; a caption "
            "holding commas must be in double quotes")
  return raw_id, videoid, norm, caption


_LISTINGS = 64


def _files_by_id(folder: str) -> dict[int, list[str]]:
  """{videoid: names} of the files `<digits>.mp4` in `folder` ({} if there is none)."""
  out = {}
  try:
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
  except OSError:
    return out
  for e in entries:
    stem = e.name[:-len(".mp4")]
    # (A folder or a broken link named 00123.mp4 stays "no such file", as before.)
    if e.name.endswith(".mp4") and stem.isascii() and stem.isdigit() and e.is_file():
      out.setdefault(int(stem), []).append(e.name)
  return out


def iter_rows(csv_path: str, videos_root: str, skips: list,
              max_rows: int | None = None) -> Iterator[tuple[str, str, dict]]:
  """Streams `(key, file, fields)` for `vfb.decode_examples` from the CSV (streamed:
  the full WebVid CSV has 10M rows). Rows that can't name a file become `Skip`s in
  `skips`: `bad_row`, `missing_file`, or `duplicate_caption` for a repeated videoid
  (the first row wins, so `videoid` is unique in the dataset)."""
  name = os.path.basename(csv_path)
  seen = {}  # videoid -> CSV line of its first row
  # page_dir -> _files_by_id of it, for the last _LISTINGS page_dirs with a missing file
  # (a partial download misses many rows; they need not come grouped by page_dir).
  listed = {}
  # surrogateescape: a row with bytes that are not UTF-8 becomes one bad_row skip
  # instead of a UnicodeDecodeError hours into a build.
  with open(csv_path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
    reader = csv.DictReader(f)
    for n, row in enumerate(reader):
      if max_rows is not None and n >= max_rows:
        break
      where = f"{name} line {reader.line_num}"
      parsed = _parse_row(row, where)
      if isinstance(parsed, str):
        skips.append(sources.Skip(f"{name}:{reader.line_num}", BAD_ROW, parsed))
        continue
      raw_id, videoid, page_dir, caption = parsed
      key = f"{page_dir}/{raw_id}.mp4"
      if videoid in seen:
        skips.append(sources.Skip(key, sources.DUPLICATE_CAPTION, f"{where} repeats "
                                  f"videoid {videoid} of line {seen[videoid]}; first "
                                  "row kept"))
        continue
      seen[videoid] = reader.line_num
      path = os.path.join(videos_root, *key.split("/"))
      if not os.path.isfile(path):
        if page_dir not in listed:
          if len(listed) >= _LISTINGS:
            del listed[next(iter(listed))]  # (the oldest listing)
          listed[page_dir] = _files_by_id(os.path.join(videos_root, *page_dir.split("/")))
        spelled = listed[page_dir].get(videoid, [])
        if len(spelled) != 1:
          other = (f"; {', '.join(spelled)} spell videoid {videoid} with other leading "
                   "zeros: ambiguous" if spelled else "")
          skips.append(sources.Skip(key, sources.MISSING_FILE,
                                    f"listed in {where} but no such file{other}"))
          continue
        key = f"{page_dir}/{spelled[0]}"  # (see the module docstring)
        path = os.path.join(videos_root, *key.split("/"))
      yield key, path, {"caption": caption, "videoid": np.int64(videoid),
                        "page_dir": page_dir}


class WebVid(vfb.SkipReportingBuilder):
  """Builds `webvid_local`; see the module docstring.

  Build:  `build(csv, videos_root, data_dir, ...)`
  Read:   WebVid(data_dir=D).as_data_source("train"), or
          tfds.data_source("webvid_local", split="train", data_dir=D)
  """

  name = "webvid_local"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "video_folder features plus videoid (int64), page_dir."}

  def __init__(self, *, data_dir=None, config=None, version=None,
               file_format="array_record", webvid_config: WebVidConfig | None = None,
               **options):
    """`options` are `WebVidConfig` fields (or pass a whole `webvid_config`).
    `config` / `version` are TFDS's own arguments, accepted so `tfds.builder` works."""
    if webvid_config is not None and options:
      raise TypeError(f"WebVid: pass webvid_config or options {sorted(options)}, "
                      "not both")
    cfg = webvid_config or WebVidConfig(**options)
    # Absolute, so metadata and messages say where the inputs were.
    self.webvid_config = dataclasses.replace(
        cfg, csv=cfg.csv and os.path.abspath(cfg.csv),
        videos_root=cfg.videos_root and os.path.abspath(cfg.videos_root))
    super().__init__(data_dir=data_dir, config=config, version=version,
                     file_format=file_format or "array_record")

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="WebVid videos (decoded uint8 frames) with their captions, built "
                    "from a local copy of the videos and a results CSV.",
        features=vfb.video_features(
            videoid=tfds.features.Scalar(dtype=np.int64),
            page_dir=tfds.features.Text()),
        homepage="https://m-bain.github.io/webvid-dataset/",
        # Overwritten from metadata.json when reading a built dataset.
        metadata=tfds.core.MetadataDict(build_options=self.build_options()),
    )

  def build_options(self) -> dict:
    return dataclasses.asdict(self.webvid_config)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the videos are local
    cfg = self.webvid_config
    if not cfg.csv or not cfg.videos_root:
      raise ValueError("WebVid: csv and videos_root are both needed to build (reading a "
                       "built dataset needs only data_dir)")
    if not os.path.isdir(cfg.videos_root):
      raise FileNotFoundError(f"{cfg.videos_root}: WebVid videos root does not exist")
    read_header(cfg.csv)  # a wrong file fails here, before any decoding
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    """Yields (path, example); every CSV row read is either kept or in `skips`."""
    cfg, skips = self.webvid_config, []
    items = iter_rows(cfg.csv, cfg.videos_root, skips, cfg.max_rows)
    kept = yield from vfb.decode_examples(items, skips, cfg)
    if not kept:
      # Raised before TFDS finalises anything, so no half-written dataset remains.
      what = (f"none of the {len(skips)} row(s) read from {cfg.csv} could be used"
              if skips else f"{cfg.csv} has no data rows")
      raise vfb.no_usable_video_error(cfg.videos_root, skips, what, dataset=self.name)
    self.report = vfb.skip_report(skips, kept, source_dir=cfg.videos_root, csv=cfg.csv,
                                  max_rows=cfg.max_rows, num_rows=kept + len(skips))


def build(csv_path: str, videos_root: str, data_dir: str, *, overwrite: bool = False,
          **options) -> WebVid:
  """Builds `webvid_local` into `data_dir` and returns the builder
  (`.as_data_source("train")` reads it; `.report` is what skipped.json holds).

  `options` are the other `WebVidConfig` fields (max_rows, max_frames, frame_stride,
  target_fps, resize_short_side, min_frames). An existing build in `data_dir` raises
  FileExistsError unless `overwrite=True`.
  """
  builder = WebVid(data_dir=data_dir, csv=csv_path, videos_root=videos_root, **options)
  vfb.prepare(builder, overwrite=overwrite)
  return builder
