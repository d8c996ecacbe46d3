"""Finding, captioning and decoding the videos of a source folder (no TFDS in here).

Everything that can go wrong with ONE item (an unreadable file, a too-short clip, a
caption row for a file that isn't there) becomes a `Skip` record instead of an
exception, so that one bad file never stops a build. Problems with the whole input (the
source folder missing, a caption file without the required columns) still raise,
because no partial result would be correct.

Decoding mirrors `videoldm_jax.video_io.read_video` (the main video stream, PyAV,
`to_ndarray(format="rgb24")`, display rotation applied), so without resizing the stored
frames are bit-identical to what `read_video` returns for the same file.
"""

import csv
import dataclasses
import json
import math
import os
import unicodedata

import numpy as np

from videoldm_jax.video_io import display_size, gif_has_trailer, riff_bytes_missing, upright

__all__ = [
    "VIDEO_EXTENSIONS", "Skip", "SkipError", "Clip", "find_videos", "read_captions",
    "match_captions", "decode_clip", "EMPTY_FILE", "UNREADABLE", "NO_VIDEO_STREAM",
    "DECODE_ERROR", "TRUNCATED", "NO_FRAMES", "TOO_SHORT", "MISSING_FILE", "NOT_A_VIDEO",
    "DUPLICATE_CAPTION", "DUPLICATE_FILE", "UNDECODABLE_NAME", "readable_text",
]

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".gif", ".avi", ".mkv")

# Skip reasons: short stable codes (tests and `skipped.json` consumers match on them);
# the human-readable cause goes in `Skip.detail`.
EMPTY_FILE = "empty_file"            # zero bytes
UNREADABLE = "unreadable"            # FFmpeg cannot open it (not a video, truncated, ...)
NO_VIDEO_STREAM = "no_video_stream"  # a container with only audio / subtitles
DECODE_ERROR = "decode_error"        # opened, but decoding failed part-way
TRUNCATED = "truncated"              # opened, but fewer frames present than declared
NO_FRAMES = "no_frames"              # opened, but not one frame decoded
TOO_SHORT = "too_short"              # fewer stored frames than `min_frames`
MISSING_FILE = "missing_file"        # caption row naming a file that does not exist
NOT_A_VIDEO = "not_a_video_file"     # caption row naming a file without a video extension
DUPLICATE_CAPTION = "duplicate_caption"  # a second caption row for the same path
DUPLICATE_FILE = "duplicate_file"    # a second path (a file link) to a listed video
UNDECODABLE_NAME = "undecodable_name"    # a file name that is not valid UTF-8


@dataclasses.dataclass(frozen=True)
class Skip:
  """One item left out of the dataset: `path` relative to the source folder (posix)."""
  path: str
  reason: str
  detail: str


class SkipError(Exception):
  """Raised by `decode_clip` for a file that must be skipped; carries the reason code."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f"{reason}: {detail}")
    self.reason, self.detail = reason, detail


@dataclasses.dataclass
class Clip:
  """A decoded clip: frames (T, H, W, 3) uint8 RGB; fps of the STORED frames (the
  source rate divided by the stride), 0.0 when the container states no rate."""
  frames: np.ndarray
  fps: float


def _rel(path: str, root: str) -> str:
  """`path` relative to `root` with '/' separators, so keys match across platforms."""
  return os.path.relpath(path, root).replace(os.sep, "/")


def readable_text(text: str) -> bool:
  """False for text holding bytes that were not valid UTF-8 (read with
  errors="surrogateescape", as the file system hands over such file names)."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


def find_videos(source_dir: str) -> tuple[list[str], list[Skip]]:
  """Relative posix paths of all files with a video extension under `source_dir`,
  sorted (so builds are deterministic), and `Skip`s for video files whose names are not
  valid UTF-8 (TFDS and skipped.json store names as UTF-8 text). Extensions match
  case-insensitively; files with other extensions are not candidates and are not
  reported. Symlinked folders outside the tree are followed, each once; a link into
  the tree (or a loop) adds nothing, its videos keep their real paths. A second path
  to one file (a file link) is a DUPLICATE_FILE skip: each video is stored once."""
  if not os.path.isdir(source_dir):
    raise FileNotFoundError(f"{source_dir}: video source folder does not exist")
  top = os.path.realpath(source_dir)
  found, skips, seen = [], [], set()
  for root, dirs, files in os.walk(source_dir, followlinks=True):
    kept = []
    for d in sorted(dirs):
      full = os.path.join(root, d)
      real = os.path.realpath(full)
      if os.path.islink(full):
        # A link into the tree itself: the real folder is walked under its own name
        # (captions name it so); a second link to one outside folder adds nothing.
        if real == top or real.startswith(top + os.sep) or real in seen:
          continue
        seen.add(real)
      kept.append(d)
    dirs[:] = kept
    for name in files:
      if name.lower().endswith(VIDEO_EXTENSIONS):
        rel = _rel(os.path.join(root, name), source_dir)
        if readable_text(rel):
          found.append(rel)
        else:
          shown = rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
          skips.append(Skip(shown, UNDECODABLE_NAME, "the file name is not valid UTF-8; "
                            "rename it to store it"))
  # One file under two paths (a file link beside its target): stored once, under the
  # path that is not a link (else the first in order); it was trained on twice as often.
  kept, by_real = [], {}
  for rel in sorted(found, key=lambda r: (os.path.islink(os.path.join(source_dir, r)), r)):
    real = os.path.realpath(os.path.join(source_dir, rel))
    if real in by_real:
      skips.append(Skip(rel, DUPLICATE_FILE, f"the same file as {by_real[real]}; stored "
                        "once"))
    else:
      by_real[real] = rel
      kept.append(rel)
  return sorted(kept), skips


def _normalize_row_path(raw: str, source_dir: str) -> str:
  """A caption row's path as a key comparable with `find_videos` output: relative to
  the source folder (absolute paths inside it are accepted), normalised, posix."""
  raw = raw.strip()
  if os.path.isabs(raw):
    return _rel(os.path.normpath(raw), source_dir)
  return os.path.normpath(raw).replace(os.sep, "/")


def _not_utf8(path: str, line_num: int) -> str:
  return (f"{path}:{line_num}: not valid UTF-8 text; save the caption file as UTF-8 "
          "(spreadsheets: 'CSV UTF-8')")


def read_captions(captions_file: str,
                  source_dir: str) -> tuple[list[tuple[str, str]], list[Skip]]:
  """Reads (path, caption) rows from a CSV (header with `path` and `caption` columns;
  others are ignored) or JSONL ({"path": ..., "caption": ...} per line) file.

  Returns the rows in file order plus `Skip`s for duplicate rows (the FIRST row for a
  path wins). A malformed file raises ValueError naming the file and line, because
  silently dropping captions would train on wrong text.
  """
  if not os.path.isfile(captions_file):
    raise FileNotFoundError(f"{captions_file}: caption file does not exist")
  ext = os.path.splitext(captions_file)[1].lower()
  rows = []  # (line number, raw path, caption)
  if ext == ".csv":
    # utf-8-sig: spreadsheet exports often start with a byte-order mark, which would
    # otherwise become part of the first column name.
    with open(captions_file, newline="", encoding="utf-8-sig",
              errors="surrogateescape") as f:
      reader = csv.DictReader(f)
      missing = {"path", "caption"} - set(reader.fieldnames or ())
      if missing:
        raise ValueError(f"{captions_file}: CSV header must have columns 'path' and "
                         f"'caption'; missing {sorted(missing)} (header: {reader.fieldnames})")
      for row in reader:
        if not (row.get("path") or "").strip():
          raise ValueError(f"{captions_file}:{reader.line_num}: row has an empty 'path'")
        if row.get("caption") is None:
          # A short row (a missing comma): its caption read as "", counted as captioned.
          raise ValueError(f"{captions_file}:{reader.line_num}: row has no 'caption' "
                           "field (an empty caption is written as a trailing comma)")
        if None in row:
          # A long row: an unquoted comma in a caption cut it there, the rest dropped.
          raise ValueError(f"{captions_file}:{reader.line_num}: row has "
                           f"{len(reader.fieldnames) + len(row[None])} fields, the header "
                           f"{len(reader.fieldnames)}; put a caption holding commas in "
                           'double quotes ("a car, then a bus")')
        if not all(readable_text(v) for v in (row["path"], row["caption"])):
          raise ValueError(_not_utf8(captions_file, reader.line_num))
        rows.append((reader.line_num, row["path"], row["caption"]))
  elif ext in (".jsonl", ".json"):
    # utf-8-sig: a byte-order mark (as Windows editors write) is not part of line 1.
    with open(captions_file, encoding="utf-8-sig", errors="surrogateescape") as f:
      for line_num, line in enumerate(f, 1):
        if not line.strip():
          continue
        if not readable_text(line):
          raise ValueError(_not_utf8(captions_file, line_num))
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{captions_file}:{line_num}: not valid JSON ({e})") from e
        # "caption" required: a file keyed otherwise ("text") trained on empty captions,
        # none of them counted as uncaptioned.
        if not isinstance(obj, dict) or not isinstance(obj.get("path"), str) \
            or not obj["path"].strip() or not isinstance(obj.get("caption"), str):
          raise ValueError(f"{captions_file}:{line_num}: expected an object with a "
                           'non-empty string "path" and a string "caption", got '
                           f"{line.strip()[:200]}")
        rows.append((line_num, obj["path"], obj["caption"]))
  else:
    raise ValueError(f"{captions_file}: caption file must end in .csv or .jsonl (or .json: "
                     f"JSON lines), got '{ext}'")

  out, skips, seen = [], [], {}
  for line_num, raw, caption in rows:
    key = _normalize_row_path(raw, source_dir)
    if key in seen:
      skips.append(Skip(key, DUPLICATE_CAPTION, f"{os.path.basename(captions_file)} line "
                        f"{line_num} repeats the path of line {seen[key]}; first row kept"))
      continue
    seen[key] = line_num
    out.append((key, caption))
  return out, skips


def match_captions(videos: list[str], rows: list[tuple[str, str]], source_dir: str,
                   captions_file: str) -> tuple[dict[str, str], list[Skip]]:
  """Maps each video to its caption; rows naming no candidate video become `Skip`s. A
  row that names no video exactly names the one video equal to it in Unicode NFC, if
  there is exactly one: "café" typed or exported composed (NFC) names the file a macOS
  copy stored decomposed (NFD), which Linux file systems keep as other bytes. Two files
  equal in NFC are two videos: a row naming one exactly captions that one only, and a
  row equal to both but naming neither is a MISSING_FILE skip that lists them."""
  candidates, captions, skips = set(videos), {}, []
  exact = {key for key, _ in rows if key in candidates}
  nfc = lambda text: unicodedata.normalize("NFC", text)
  by_nfc = {}
  for v in videos:
    by_nfc.setdefault(nfc(v), []).append(v)
  by_real = None  # real path -> video, for rows naming another path to a video
  for key, caption in rows:
    if key in candidates:
      captions[key] = caption
      continue
    spelled = by_nfc.get(nfc(key), [])
    if len(spelled) == 1:
      if spelled[0] in exact or spelled[0] in captions:
        kept = ("; the row naming it exactly is kept" if spelled[0] in exact
                else ", which has a caption already; first kept")
        skips.append(Skip(key, DUPLICATE_CAPTION, f"names {spelled[0]} in another Unicode "
                          f"form{kept}"))
      else:
        captions[spelled[0]] = caption
      continue
    full = os.path.join(source_dir, key)
    if by_real is None:
      by_real = {os.path.realpath(os.path.join(source_dir, v)): v for v in videos}
    video = by_real.get(os.path.realpath(full)) if os.path.exists(full) else None
    if video is not None:  # (a link to a video stored under its other path)
      if video in captions:
        skips.append(Skip(key, DUPLICATE_CAPTION, f"names the file of {video}, which has "
                          "a caption already; first kept"))
      else:
        captions[video] = caption
      continue
    where = f"listed in {os.path.basename(captions_file)}"
    if key.startswith("../") or key == "..":
      skips.append(Skip(key, MISSING_FILE, f"{where} but outside the source folder"))
    elif not os.path.exists(full):
      # (Two files equal to the row in NFC: it names neither, "no such file" alone
      # misled, both files being there.) Escaped: the spellings print alike.
      twins = (f"; it equals {len(spelled)} files in Unicode NFC "
               f"({', '.join(ascii(v) for v in spelled)}): ambiguous, spell the row as "
               "one of them exactly" if spelled else "")
      skips.append(Skip(key, MISSING_FILE, f"{where} but no such file{twins}"))
    else:
      skips.append(Skip(key, NOT_A_VIDEO, f"{where} but not a file with a video extension "
                        f"{VIDEO_EXTENSIONS}"))
  return captions, skips


def _stream_fps(stream) -> float:
  """The stream's frame rate as a float, 0.0 if the container states none."""
  for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
    if rate and float(rate) > 0 and math.isfinite(float(rate)):
      return float(rate)
  return 0.0


def _nominal_fps(stream) -> float:
  """The frame rate the stream's timestamps are laid out on, for picking frames by time.

  FFmpeg's average rate is frames over duration: a last frame held for a second (a
  screen recording) or a slower stretch of a variable-rate phone video lowers it below
  the rate the frames actually follow, which slots of that average would then sample
  unevenly; a GIF's whole-centisecond delays (3, 3, 4 cs for 30 fps) raise it to one over
  the shortest delay. Its guessed rate (r_frame_rate, the rate that represents all
  timestamps) is used instead when it lies within 2x of the average; a timebase-like
  guess (1000 fps for millisecond timestamps) is not.
  """
  average = _stream_fps(stream)
  guessed = float(stream.guessed_rate) if stream.guessed_rate else 0.0
  if average and math.isfinite(guessed) and average / 2 <= guessed <= 2 * average:
    return guessed
  return average


def _target_size(h: int, w: int, resize_short_side: int | None) -> tuple[int, int]:
  """(h, w) after scaling the shorter side DOWN to `resize_short_side`; never upscales
  (upscaling adds storage, not information). Odd results are kept as they are."""
  if not resize_short_side or min(h, w) <= resize_short_side:
    return h, w
  scale = resize_short_side / min(h, w)
  # The shorter side lands exactly on the target; the other rounds to the nearest pixel.
  if h <= w:
    return resize_short_side, max(1, round(w * scale))
  return max(1, round(h * scale)), resize_short_side


def _is_truncated(declared: int, packets: int) -> bool:
  """Fewer packets than the container's index declares (0 = no declared count)."""
  return declared > 0 and declared - packets > max(2, declared // 20)


def _truncated_detail(declared: int, packets: int) -> str:
  return (f"container declares {declared} frames but only {packets} could be read: "
          "file is cut short")


def _declared_span(container, stream) -> tuple[float, float] | None:
  """(start, end) seconds of the video stream as the container states them, None when
  it states no duration. Times are absolute (as `frame.time`): a stream may start late.

  Matroska / WebM keep no per-stream duration field; their muxers write a DURATION tag
  ("HH:MM:SS.nnnnnnnnn", mkvmerge's language-suffixed, e.g. DURATION-eng) per track,
  whose value is FFmpeg's end time. Without it the file's duration is used only for a
  file with one stream: an audio track may well outlast the video.
  """
  # The track's own tag first: for a Matroska video of a few frames FFmpeg fills
  # stream.duration with the file's, which a longer audio track sets (2 frames stated
  # to end at 5 s: skipped as cut short).
  for key, value in (stream.metadata or {}).items():
    if key.upper().startswith("DURATION"):
      try:
        h, m, sec = value.split(":")
        return 0.0, int(h) * 3600 + int(m) * 60 + float(sec)
      except ValueError:
        pass
  tb = stream.time_base
  if stream.duration is not None and tb is not None:
    start = float((stream.start_time or 0) * tb)
    return start, start + float(stream.duration * tb)
  if container.duration is not None and len(container.streams) == 1:
    start = (container.start_time or 0) / 1_000_000  # AV_TIME_BASE units
    return start, start + container.duration / 1_000_000
  return None


def _frame_end(frame, stream, fps: float) -> float | None:
  """When `frame` stops showing: its time plus its duration (a last frame held for a
  second is no cut), else one frame period."""
  if frame.time is None:
    return None
  tb = frame.time_base or stream.time_base
  if frame.duration and tb is not None:
    return frame.time + float(frame.duration * tb)
  return frame.time + (1 / fps if fps else 0.0)


def _ends_early(span: tuple[float, float] | None, last_end: float | None,
                fps: float) -> bool | None:
  """Whether decoding stopped well before the stated end (None: unknown). The margin
  matches `_is_truncated`'s: 2 frame periods or 5%, whichever is larger."""
  if span is None or last_end is None or not fps or span[1] <= span[0]:
    return None
  return span[1] - last_end > max(2 / fps, (span[1] - span[0]) / 20)


def _tail_missing(container, stream, packets: int, last_end: float | None,
                  fps: float, path: str) -> str | None:
  """Why the decoded video looks cut short, or None.

  Two signals: fewer packets than the stream's declared frame count (mp4, avi), and the
  last frame's end falling short of the stated duration (the only signal for Matroska
  and WebM, which declare no frame count). When both are known both must agree: an AVI's
  count includes the empty chunks FFmpeg writes for dropped frames, which are never
  returned as packets, while its last frame still reaches the stated duration. An AVI
  cut off loses its index, and FFmpeg then states the duration of what it found, so
  there the count decides when the file is shorter than its RIFF header says.
  """
  by_count = _is_truncated(stream.frames, packets) if stream.frames > 0 else None
  missing = riff_bytes_missing(path) if by_count and container.format.name == "avi" else 0
  if missing:  # (a cut AVI was kept: 6 of 40 frames, the last one partly garbage)
    return (f"{_truncated_detail(stream.frames, packets)} ({missing} bytes short of its "
            "RIFF header's size)")
  span = _declared_span(container, stream)
  by_time = _ends_early(span, last_end, fps)
  signals = [x for x in (by_count, by_time) if x is not None]
  if not signals or not all(signals):
    return None
  if by_count:
    return _truncated_detail(stream.frames, packets)
  return (f"container states the video ends at {span[1]:.2f} s but the last frame ends "
          f"at {last_end:.2f} s: file is cut short")


def decode_clip(path: str, *, max_frames: int | None, frame_stride: int = 1,
                target_fps: float | None = None, resize_short_side: int | None = None,
                min_frames: int = 1) -> Clip:
  """Decodes frames 0, s, 2s, ... (s = stride) of the main video stream of `path`.

  With `target_fps` the stride is round(source fps / target fps), at least 1, and
  frames are picked by timestamp: one per stride / source fps seconds, the one nearest
  each slot (frames 0, s, 2s, ... at a constant rate; even in time at a variable one;
  whole frames are dropped, never interpolated or repeated); without a known source
  rate the stride stays 1. At most `max_frames` frames are kept, decoding stops there. Every
  problem raises `SkipError` with a reason code and a detail message (the caller
  knows the file's name and puts it in front).
  """
  import av  # local: importing PyAV loads FFmpeg, only needed while building

  if os.path.getsize(path) == 0:
    raise SkipError(EMPTY_FILE, "file is empty (0 bytes)")
  try:
    container = av.open(path, mode="r")
  except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
    raise SkipError(UNREADABLE, "FFmpeg cannot open it as a video "
                    f"({type(e).__name__}: {e})") from e
  frames = []
  with container:
    if not container.streams.video:
      raise SkipError(NO_VIDEO_STREAM, "container has no video stream")
    # FFmpeg's main video stream (not a cover picture, not a short extra track):
    # the first by index was a 2-frame thumbnail track in some files.
    stream = container.streams.best("video") or container.streams.video[0]
    stream.thread_type = "AUTO"  # same as read_video; frame order is unaffected
    src_fps = _stream_fps(stream)
    stride = frame_stride
    # With target_fps frames are picked by their timestamps, one per `period` seconds
    # of the stream's nominal rate (the one nearest each slot: within half its own
    # duration): a variable-frame-rate stream (phone recordings) kept every stride-th
    # frame, so its speed changed where its rate did. On a constant-rate stream these
    # are frames 0, s, 2s, ...
    period = 0.0
    if target_fps and src_fps:
      src_fps = _nominal_fps(stream)
      stride = max(1, round(src_fps / target_fps))
      period = stride / src_fps
    first_time, next_time, last_time = None, None, None
    size = None  # (h, w) of the stored frames, fixed by the first frame
    packets, frame_index, reached_end, last_end = 0, 0, True, None
    try:
      # demux + decode is what container.decode(stream) does; spelled out to count
      # the packets actually read, for the truncation check below.
      demuxed = container.demux(stream)
      for packet in demuxed:
        packets += packet.size > 0  # the final empty packet only flushes the decoder
        for frame in packet.decode():
          last_end = _frame_end(frame, stream, src_fps) or last_end
          if period and (frame.time is not None or last_time is not None):
            # (an untimed frame among timed ones: one source period after the last)
            t = frame.time if frame.time is not None else last_time + 1 / src_fps
            if first_time is None:
              first_time, keep = t, True
            else:  # within half this frame's own duration (a VFR stream's local rate)
              shown = _frame_end(frame, stream, src_fps)
              half = (shown - frame.time if shown is not None and frame.time is not None
                      and shown > frame.time else 1 / src_fps) / 2
              keep = t >= next_time - half
            last_time = t
            if keep:  # the next slot after this frame's: a gap skips slots, no burst
              next_time = first_time + (round((t - first_time) / period) + 1) * period
          else:
            keep = frame_index % stride == 0
          frame_index += 1
          if not keep:
            continue
          if size is None:  # before the rotation: _target_size is symmetric in h, w
            size = _target_size(*display_size(stream, frame.height, frame.width),
                                resize_short_side)
          if (frame.height, frame.width) == size:
            rgb = frame.to_ndarray(format="rgb24")  # exactly what read_video does
          else:
            # Resizing, or a stream that changes resolution mid-way (legal in some
            # containers): scale to the first frame's size so frames stack. AREA
            # averages source pixels, which avoids aliasing when shrinking.
            rgb = frame.reformat(width=size[1], height=size[0], format="rgb24",
                                 interpolation="AREA").to_ndarray()
          frames.append(upright(rgb, frame))
          if max_frames is not None and len(frames) >= max_frames:
            break
        if max_frames is not None and len(frames) >= max_frames:
          reached_end = False
          break
    except av.error.FFmpegError as e:
      # Whether a cut-off file errors here or just ends early (check below) depends on
      # decoder threading; count the remaining packets so both read as "truncated".
      try:
        packets += sum(p.size > 0 for p in demuxed)
      except av.error.FFmpegError:
        pass
      if _is_truncated(stream.frames, packets):
        raise SkipError(TRUNCATED, _truncated_detail(stream.frames, packets)) from e
      raise SkipError(DECODE_ERROR, f"decoding failed after {len(frames)} kept "
                      f"frame(s) ({type(e).__name__}: {e})") from e
    # A cut-off file whose index sits at the front (mp4 "faststart", as served on the
    # web) or that states its duration up front (Matroska) opens fine and, with
    # threaded decoding, just ends early without an error, its last decoded frames
    # possibly garbage. A small margin: edit lists can legitimately hide a few declared
    # samples. Stopping at max_frames before the damage keeps the clip: those frames
    # are intact.
    cut = reached_end and _tail_missing(container, stream, packets, last_end, src_fps,
                                        path)
    if reached_end and not cut and container.format.name == "gif" \
        and not gif_has_trailer(path):
      # A GIF states no frame count or duration (FFmpeg scans for it): a cut-off one
      # decodes without an error, its last frame partly garbage.
      cut = "the GIF ends without its trailer byte (0x3B): cut off"
    if cut:
      raise SkipError(TRUNCATED, cut)
  if not frames:
    raise SkipError(NO_FRAMES, "video stream has no decodable frames")
  if len(frames) < min_frames:
    raise SkipError(TOO_SHORT, f"{len(frames)} frame(s) after stride {stride}, "
                    f"fewer than min_frames={min_frames}")
  return Clip(np.stack(frames), src_fps / stride if src_fps else 0.0)
