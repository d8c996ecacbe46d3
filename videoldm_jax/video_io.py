"""Video files in and out: MP4 (PyAV / libx264), GIF (Pillow), and a grid for logging.

All videos are channels-last uint8 RGB: one clip is (T, H, W, 3), a batch (B, T, H, W, 3).
Model outputs in [-1, 1] go through `to_uint8` first. `Mp4Writer` streams a video of any
length to disk chunk by chunk (memory independent of the length); `NpyWriter` does the
same into a lossless .npy array, for evaluations (`open_writer` picks by suffix).
"""

import math
import os
from fractions import Fraction

import numpy as np
from absl import logging

__all__ = ["to_uint8", "write_mp4", "Mp4Writer", "NpyWriter", "open_writer", "write_gif",
           "check_gif_fps", "read_video", "upright", "video_grid"]


def to_uint8(video) -> np.ndarray:
  """Maps values in [-1, 1] (any shape, e.g. (T, H, W, 3)) to uint8 [0, 255], same shape.

  Out-of-range values are clipped (samplers overshoot slightly); rounding, not
  truncation, so that -1 -> 0, 0 -> 128 and 1 -> 255 exactly. NaN becomes 0 and
  +-inf 255 / 0, with a warning (a diverged sampler must not pass as a black video).
  """
  x = np.asarray(video, np.float32)
  finite = np.isfinite(x)
  if not finite.all():
    logging.warning("to_uint8: %d of %d values are NaN or infinite (a diverged model?); "
                    "written as black (NaN, -inf) and white (+inf)",
                    finite.size - np.count_nonzero(finite), finite.size)
    x = np.nan_to_num(x, nan=-1.0, posinf=1.0, neginf=-1.0)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _check_frames(frames, path: str) -> np.ndarray:
  """Validates a (T, H, W, 3) uint8 clip, naming `path` in the error."""
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"{path}: expected frames of shape (T, H, W, 3), got {frames.shape}")
  if frames.dtype != np.uint8:
    raise TypeError(f"{path}: expected uint8 frames, got {frames.dtype}; convert videos in "
                    "[-1, 1] with video_io.to_uint8 first")
  if frames.shape[0] == 0 or frames.shape[1] == 0 or frames.shape[2] == 0:
    raise ValueError(f"{path}: cannot write an empty video of shape {frames.shape}")
  return frames


def _atomic_target(path: str) -> str:
  """A temporary sibling of `path`, hidden and without a video extension (the writers
  name their format): written files are renamed into place, so a crash mid-write never
  leaves a truncated video under the final name, nor a file that globs and
  videoldm-eval take for a clip (a killed .npy run left a full-shape array, black past
  the kill)."""
  folder, name = os.path.split(path)
  return os.path.join(folder, f".{name}.partial-{os.getpid()}")


def _tag_bt601(stream) -> None:
  """Marks the stream as what the rgb24 -> yuv420p conversion makes: BT.601 matrix,
  primaries and transfer (SMPTE 170M), limited range. Untagged, players guess, and
  most assume BT.709 for HD sizes: shifted colours."""
  cc = stream.codec_context
  # FFmpeg's AVColorSpace / AVColorPrimaries / AVColorTransferCharacteristic SMPTE170M
  # (PyAV's Colorspace enum holds swscale's numbers, where 5 is every BT.601 variant).
  cc.colorspace = cc.color_primaries = cc.color_trc = 6
  cc.color_range = 1  # AVCOL_RANGE_MPEG: limited


def _as_float(value) -> float:
  """float(value), NaN where it is no number (None, a string): the checks then name it."""
  try:
    return float(value)
  except (TypeError, ValueError):
    return math.nan


def rate_and_crf(path: str, fps, crf) -> tuple[Fraction, int]:
  """(the stream rate, the crf) for an mp4 writer, or ValueError naming the file.

  PyAV wants an int or Fraction rate: 29.97-style floats become 2997/100 (NumPy
  scalars too); a rate below 1/1001 fps would round to 0, which PyAV silently wrote as
  24 fps. crf is x264's integer quality, 0 (lossless) to 51: -0.5 was read as 0.
  """
  fps_f = _as_float(fps)
  rate = (Fraction(fps_f).limit_denominator(1001) if fps_f > 0 and math.isfinite(fps_f)
          else Fraction(0))
  if rate <= 0:
    raise ValueError(f"{path}: fps must be a positive number of at least 1/1001, got {fps!r}")
  crf_f = _as_float(crf)
  if not (math.isfinite(crf_f) and crf_f.is_integer() and 0 <= crf_f <= 51):
    raise ValueError(f"{path}: crf must be an integer in [0, 51], got {crf!r}")
  return rate, int(crf_f)


def write_mp4(path: str, frames, fps: float = 8, crf: int = 18,
              pad_odd: bool = True) -> tuple[int, int]:
  """Writes a (T, H, W, 3) uint8 RGB clip as H.264 (libx264, yuv420p) MP4.

  yuv420p stores chroma at half resolution, so libx264 needs even H and W. With
  `pad_odd=True` (default) an odd height / width is padded by one row / column that
  repeats the edge (edge pixels bleed less into the subsampled chroma than black would);
  the file, and what `read_video` returns, then has the padded size. With
  `pad_odd=False` odd sizes raise ValueError.

  `crf` is x264's constant rate factor: 0 lossless in YUV 4:2:0, 18 near-transparent
  (default; logging clips are small), 23 x264's default, 51 worst.

  Lossy encodes (crf > 0) of the same frames can differ slightly from run to run. Seen
  on 2026-12-05 with PyAV 18.1's x264, after other FFmpeg work in the process, at
  widths that are not a multiple of 128 px (32, 48, 96, 112, 144-240 varied; 128 and
  256 did not). With x264's MB-tree off (mbtree=0), or with glibc's MALLOC_PERTURB_
  set, every encode was the same, which points at MB-tree reading uninitialised heap
  memory. Decoded pixels then differ by a few levels, though the frames given were the
  same bit for bit. crf=0 makes the files byte-identical too, which is what evaluations
  that re-read the files (FVD) need.

  Returns the (height, width) actually written.
  """
  import av  # local: importing PyAV loads FFmpeg, which the rest of the package doesn't need

  frames = _check_frames(frames, path)
  _, h, w, _ = frames.shape
  if h % 2 or w % 2:
    if not pad_odd:
      raise ValueError(f"{path}: libx264 with yuv420p needs even height and width, got "
                       f"{h}x{w}; pass pad_odd=True or crop the frames")
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    h, w = frames.shape[1:3]
  rate, crf = rate_and_crf(path, fps, crf)

  tmp = _atomic_target(path)
  try:
    with av.open(tmp, mode="w", format="mp4") as container:
      stream = container.add_stream("libx264", rate=rate)
      stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
      stream.options = {"crf": str(crf)}
      _tag_bt601(stream)
      for frame in frames:
        # The encoder converts rgb24 -> yuv420p (BT.601, limited range) itself.
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        container.mux(stream.encode(vf))
      container.mux(stream.encode(None))  # flush the frames x264 still holds for lookahead
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return h, w


class _AtomicWriter:
  """A streaming writer's file handling: everything goes to a temporary sibling of
  `path`, renamed into place by `close()` (which `with` calls on success), so `path`
  never holds a truncated file; `abort()`, or an exception inside the `with` block,
  deletes it and leaves `path` as it was. Subclasses define `_check_complete` (raise
  ValueError for a file that must not be written), `_finish` (flush into the temporary
  file) and `_release` (drop open handles without finishing)."""

  def __init__(self, path: str):
    self.path = str(path)
    self._tmp = _atomic_target(self.path)
    self.closed = False

  def _check_complete(self) -> None:
    raise NotImplementedError

  def _finish(self) -> None:
    raise NotImplementedError

  def _release(self) -> None:
    raise NotImplementedError

  def close(self) -> str:
    """Finishes the file and moves it to `path`; returns `path`."""
    if self.closed:
      return self.path
    try:
      self._check_complete()
    except ValueError:
      self.abort()
      raise
    try:
      self._finish()
      os.replace(self._tmp, self.path)
    except BaseException:
      try:  # a failed finish (disk full, encoder error) still closes its handles
        self._release()
      except Exception:  # the first error is the one to report
        pass
      raise
    finally:
      self.closed = True
      if os.path.exists(self._tmp):
        os.remove(self._tmp)
    return self.path

  def abort(self) -> None:
    """Discards everything written so far (the temporary file); `path` is untouched."""
    if self.closed:
      return
    self.closed = True
    try:
      self._release()
    finally:
      if os.path.exists(self._tmp):
        os.remove(self._tmp)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()


class Mp4Writer(_AtomicWriter):
  """Streams an H.264 MP4 chunk by chunk: memory does not grow with the video's length.

    with video_io.Mp4Writer("out.mp4", fps=24) as writer:
      for chunk in chunks:          # each (T_i, H, W, 3) uint8, the same H and W
        writer.append(chunk)
    # out.mp4 now exists, complete

  Frames go to a temporary sibling file that `close()` renames to `path`, so `path`
  never holds a truncated video (`_AtomicWriter`); closing a writer that received no
  frame raises ValueError and writes nothing. The frame size is fixed by the first
  chunk; odd sizes are padded as in `write_mp4` (`pad_odd`). `crf` as in `write_mp4`.
  Only x264's look-ahead (a few dozen frames) is buffered inside the encoder.
  """

  def __init__(self, path: str, fps: float = 8, crf: int = 18, pad_odd: bool = True):
    self._rate, crf = rate_and_crf(path, fps, crf)
    super().__init__(path)
    self.fps, self.crf, self.pad_odd = fps, crf, pad_odd
    self._container = None
    self._stream = None
    self._size = None            # (H, W) of the input frames, set by the first chunk
    self.num_frames = 0          # frames appended so far

  @property
  def size(self) -> tuple[int, int] | None:
    """(height, width) written to the file (after odd-size padding); None before the
    first chunk."""
    if self._stream is None:
      return None
    return self._stream.height, self._stream.width

  def _open(self, h: int, w: int) -> None:
    import av  # local, as in write_mp4

    if h % 2 or w % 2:
      if not self.pad_odd:
        raise ValueError(f"{self.path}: libx264 with yuv420p needs even height and width, "
                         f"got {h}x{w}; pass pad_odd=True or crop the frames")
    self._container = av.open(self._tmp, mode="w", format="mp4")
    stream = self._container.add_stream("libx264", rate=self._rate)
    stream.width, stream.height, stream.pix_fmt = w + w % 2, h + h % 2, "yuv420p"
    stream.options = {"crf": str(self.crf)}
    _tag_bt601(stream)
    self._stream, self._size = stream, (h, w)

  def append(self, frames) -> None:
    """Encodes a (T, H, W, 3) uint8 chunk (T >= 1) after the frames appended before."""
    if self.closed:
      raise ValueError(f"{self.path}: append() after close() or abort()")
    import av

    frames = _check_frames(frames, self.path)
    h, w = frames.shape[1:3]
    if self._stream is None:
      self._open(h, w)
    elif (h, w) != self._size:
      raise ValueError(f"{self.path}: chunk frames are {h}x{w}, but the video's first chunk "
                       f"was {self._size[0]}x{self._size[1]}")
    if h % 2 or w % 2:
      frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    for frame in frames:
      vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
      self._container.mux(self._stream.encode(vf))
    self.num_frames += frames.shape[0]

  def _check_complete(self) -> None:
    if self._stream is None:
      raise ValueError(f"{self.path}: no frames were appended; nothing written")

  def _finish(self) -> None:
    self._container.mux(self._stream.encode(None))  # x264's look-ahead frames
    self._container.close()

  def _release(self) -> None:
    if self._container is not None:
      self._container.close()


class NpyWriter(_AtomicWriter):
  """Streams a clip into a .npy file of uint8 (T, H, W, 3) RGB frames: no codec, so the
  file holds exactly the frames given (what an evaluation such as FVD against lossless
  reference clips needs; H.264's 4:2:0 chroma halves colour resolution even at crf 0).

  The interface is `Mp4Writer`'s (append / close / abort / size / num_frames, `with`).
  The frame count is fixed up front, since a .npy header states the shape: the file is
  a memory map of (num_frames, H, W, 3) created on the first chunk, so memory does not
  grow with the clip. It is written to a temporary sibling and renamed into place by
  `close()` (`_AtomicWriter`), which raises ValueError and writes nothing unless
  exactly num_frames frames were appended.
  """

  def __init__(self, path: str, num_frames: int):
    if (isinstance(num_frames, (bool, np.bool_))
        or not isinstance(num_frames, (int, np.integer)) or num_frames < 1):
      # (2.5 was truncated to 2; a string failed comparing, naming no file)
      raise ValueError(f"{path}: num_frames must be an integer >= 1, got {num_frames!r}")
    super().__init__(path)
    self.total = int(num_frames)
    self._array = None
    self.size = None             # (height, width), set by the first chunk
    self.num_frames = 0

  def append(self, frames) -> None:
    """Writes a (T, H, W, 3) uint8 chunk (T >= 1) after the frames appended before."""
    if self.closed:
      raise ValueError(f"{self.path}: append() after close() or abort()")
    frames = _check_frames(frames, self.path)
    t, h, w, _ = frames.shape
    if self.size is None:
      self._array = np.lib.format.open_memmap(self._tmp, mode="w+", dtype=np.uint8,
                                              shape=(self.total, h, w, 3))
      self.size = (h, w)
    elif (h, w) != self.size:
      raise ValueError(f"{self.path}: chunk frames are {h}x{w}, but the clip's first chunk "
                       f"was {self.size[0]}x{self.size[1]}")
    if self.num_frames + t > self.total:
      raise ValueError(f"{self.path}: {self.num_frames + t} frames appended, but the file "
                       f"was opened for {self.total}")
    self._array[self.num_frames:self.num_frames + t] = frames
    self.num_frames += t

  def _check_complete(self) -> None:
    if self.num_frames != self.total:
      raise ValueError(f"{self.path}: {self.num_frames} of {self.total} frames were "
                       "appended; nothing written")

  def _finish(self) -> None:
    self._array.flush()
    self._array = None  # unmaps the file before the rename

  def _release(self) -> None:
    self._array = None


def open_writer(path: str, num_frames: int, fps: float = 8, crf: int = 18):
  """A streaming writer chosen by `path`'s suffix: `.mp4` -> `Mp4Writer(path, fps, crf)`,
  `.npy` -> `NpyWriter(path, num_frames)` (uint8 frames, no codec; fps and crf unused).
  Any other suffix raises ValueError naming the path."""
  suffix = os.path.splitext(str(path))[1].lower()
  if suffix == ".mp4":
    return Mp4Writer(path, fps=fps, crf=crf)
  if suffix == ".npy":
    return NpyWriter(path, num_frames)
  raise ValueError(f"{path}: unsupported output suffix {suffix!r}; expected .mp4 (H.264) "
                   "or .npy (uint8 frames (T, H, W, 3), lossless)")


def _palette_frames(frames: np.ndarray):
  """Converts a (T, H, W, 3) uint8 clip to Pillow "P" images sharing ONE palette.

  A shared palette keeps colours stable across frames (per-frame quantisation flickers).
  A clip with <= 256 distinct colours is mapped exactly; otherwise the palette is
  Pillow's median cut over all frames and pixels map to the nearest entry (no dithering,
  which would shimmer frame to frame).
  """
  from PIL import Image

  t, h, w, _ = frames.shape
  packed = (frames[..., 0].astype(np.int32) << 16) | (frames[..., 1].astype(np.int32) << 8) \
      | frames[..., 2].astype(np.int32)
  colours, inverse = np.unique(packed.reshape(-1), return_inverse=True)
  if colours.size <= 256:
    palette = np.stack([(colours >> 16) & 255, (colours >> 8) & 255, colours & 255], -1)
    idx = inverse.reshape(t, h, w).astype(np.uint8)
    flat_palette = palette.astype(np.uint8).reshape(-1).tolist()
    images = []
    for i in range(t):
      im = Image.fromarray(idx[i], mode="P")
      im.putpalette(flat_palette)
      images.append(im)
    return images
  # Build the palette from at most ~2^18 pixels (a strided subsample of all frames) so a
  # large logging grid stays fast; a few k-means refinements cut the error of plain median
  # cut by ~10% on smooth colour fields.
  pixels = frames.reshape(-1, 3)
  pixels = pixels[::max(1, pixels.shape[0] >> 18)]
  sample = Image.fromarray(pixels[None], mode="RGB")
  pal_img = sample.quantize(256, method=Image.Quantize.MEDIANCUT, kmeans=2,
                            dither=Image.Dither.NONE)
  return [Image.fromarray(f, mode="RGB").quantize(palette=pal_img, dither=Image.Dither.NONE)
          for f in frames]


# A GIF frame delay is a 16-bit count of 1/100 s: at most 655.35 s per frame.
GIF_MIN_FPS = 100 / 65535


def check_gif_fps(path: str, fps) -> float:
  """fps as a float, or ValueError naming `path` when a GIF cannot hold it (not a
  positive finite number, or slower than GIF_MIN_FPS: the frame delay would overflow)."""
  fps_f = _as_float(fps)
  if not (fps_f > 0 and math.isfinite(fps_f)):
    raise ValueError(f"{path}: fps must be a positive number, got {fps!r}")
  if fps_f < GIF_MIN_FPS:
    raise ValueError(f"{path}: fps {fps!r} is slower than a GIF can show (its frame delay "
                     f"is at most 655.35 s, i.e. fps >= {GIF_MIN_FPS:.6f})")
  return fps_f


def write_gif(path: str, frames, fps: float = 8) -> None:
  """Writes a (T, H, W, 3) uint8 RGB clip as an endlessly looping GIF.

  GIF holds at most 256 colours (see `_palette_frames`) and frame delays in 1/100 s, so
  fps is rounded to the nearest representable delay. Browsers show delays under 20 ms
  as 100 ms, so above 50 fps every k-th frame is kept (k = ceil(fps / 50)) at fps / k:
  the clip plays at its own speed. Pillow merges consecutive
  IDENTICAL frames into one longer frame (the playback is the same), so a reader may
  see fewer frames than were written for a clip with repeated frames.
  """
  frames = _check_frames(frames, path)
  fps = check_gif_fps(path, fps)
  if fps > 50:
    step = math.ceil(fps / 50)
    frames, fps = frames[::step], fps / step
  images = _palette_frames(frames)
  duration_ms = max(20, int(round(100.0 / fps)) * 10)
  tmp = _atomic_target(path)
  try:
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                   duration=duration_ms, loop=0, optimize=False, disposal=1)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def display_size(stream, height: int, width: int) -> tuple[int, int]:
  """(height, width) of `height` x `width` coded frames of the PyAV video `stream` as a
  player shows them: with non-square pixels (a sample aspect ratio other than 1:1,
  anamorphic video) the width is stretched by it, so frames do not train squashed."""
  sar = stream.sample_aspect_ratio
  if not sar or sar == 1:
    return height, width
  return height, max(1, round(width * float(sar)))


def upright(rgb: np.ndarray, frame) -> np.ndarray:
  """`rgb` (H, W, C), the pixels of the decoded PyAV `frame`, turned the way a player
  shows it: phones store portrait video as landscape frames plus a display rotation.
  (H, W, C) or, for a quarter turn, (W, H, C).

  `frame.rotation` is counter-clockwise degrees, the way `np.rot90` turns: this matched
  the ffmpeg command line's autorotation pixel for pixel for 90, -90 and 180 (checked
  once by hand; tests/test_video_folder.py pins the result).
  Flips in the display matrix (rare) are not applied.
  """
  turns = round((frame.rotation or 0) / 90) % 4
  return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


def gif_has_trailer(path: str) -> bool:
  """Whether a GIF file ends with its trailer byte 0x3B (NUL or whitespace padding after
  it allowed, as some tools and transfers add): one cut off mid-file lacks it, and
  FFmpeg decodes it without an error."""
  with open(path, "rb") as f:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - 64))
    return f.read().rstrip(b"\0 \t\r\n").endswith(b";")


def riff_bytes_missing(path: str) -> int:
  """How many bytes shorter than its RIFF header states (file size - 8) an AVI file is;
  0 for a complete file or one that is not RIFF AVI. A cut-off AVI loses its index, and
  FFmpeg then states the duration of what is left and decodes it without an error, the
  last frame partly garbage."""
  with open(path, "rb") as f:
    head = f.read(12)
  if len(head) < 12 or head[:4] != b"RIFF" or head[8:] != b"AVI ":
    return 0
  return max(0, int.from_bytes(head[4:8], "little") + 8 - os.path.getsize(path))


def read_video(path: str, max_frames: int | None = None) -> np.ndarray:
  """Decodes the main video stream (FFmpeg's best) of any FFmpeg-readable file (mp4, gif, ...).

  Returns (T, H, W, 3) uint8 RGB with T <= max_frames when given, upright (a display
  rotation stored in the file is applied, as players do; non-square pixels are stretched
  to square ones, `display_size`); a stream whose resolution changes mid-way is scaled
  to its first frame's size. Raises FileNotFoundError for a missing path and ValueError
  naming the file when it cannot be decoded, has no video stream, yields no frames, or
  is a GIF or an AVI cut off before its end (`gif_has_trailer`, `riff_bytes_missing`)
  and read to that end.
  """
  import av

  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such video file")
  if max_frames is not None and max_frames < 1:
    raise ValueError(f"{path}: max_frames must be >= 1 or None, got {max_frames}")
  out = []
  try:
    with av.open(path, mode="r") as container:
      if not container.streams.video:
        raise ValueError(f"{path}: file has no video stream")
      # FFmpeg's main video stream (not a cover picture, not a short extra track):
      # the first by index was a 2-frame thumbnail track in some files.
      stream = container.streams.best("video") or container.streams.video[0]
      stream.thread_type = "AUTO"  # frame + slice threads; decoding order is unaffected
      size = None
      for frame in container.decode(stream):
        size = size or display_size(stream, frame.height, frame.width)
        if (frame.height, frame.width) == size:
          rgb = frame.to_ndarray(format="rgb24")
        else:  # (np.stack failed, naming no file)
          rgb = frame.reformat(width=size[1], height=size[0], format="rgb24",
                               interpolation="AREA").to_ndarray()
        out.append(upright(rgb, frame))
        if max_frames is not None and len(out) >= max_frames:
          break
      reached_end = max_frames is None or len(out) < max_frames
      truncated_gif = (reached_end and container.format.name == "gif"
                       and not gif_has_trailer(path))
      cut_avi = (reached_end and container.format.name == "avi"
                 and riff_bytes_missing(path))
  except av.error.FFmpegError as e:
    raise ValueError(f"{path}: not a readable video file ({type(e).__name__}: {e})") from e
  if truncated_gif:
    raise ValueError(f"{path}: a GIF cut off before its end (no trailer byte 0x3B); its "
                     "last frame would be partly garbage")
  if cut_avi:
    raise ValueError(f"{path}: an AVI cut off before its end ({cut_avi} bytes short of "
                     "its RIFF header's size); its last frame would be partly garbage")
  if not out:
    raise ValueError(f"{path}: video stream contains no decodable frames")
  return np.stack(out)


def video_grid(videos, cols: int, pad: int = 0, pad_value: int = 0) -> np.ndarray:
  """Tiles clips into one clip for logging: (B, T, H, W, C) -> (T, H', W', C).

  Row-major (cols capped at B): clip b lands in row b // cols, column b % cols, with
  rows = ceil(B / cols), H' = rows * H + (rows - 1) * pad and W' = cols * W + (cols - 1)
  * pad. Missing cells of the last row and the `pad`-pixel gutters are filled with
  `pad_value`. Dtype preserved.
  """
  videos = np.asarray(videos)
  if videos.ndim != 5:
    raise ValueError(f"video_grid: expected (B, T, H, W, C), got shape {videos.shape}")
  if cols < 1 or pad < 0:
    raise ValueError(f"video_grid: need cols >= 1 and pad >= 0, got cols={cols}, pad={pad}")
  b, t, h, w, c = videos.shape
  cols = min(cols, b)
  rows = -(-b // cols)
  # Give every cell a `pad` gutter below and right, lay out with one reshape, then cut
  # the gutter off the last row / column.
  cells = np.full((rows * cols, t, h + pad, w + pad, c), pad_value, videos.dtype)
  cells[:b, :, :h, :w] = videos
  grid = cells.reshape(rows, cols, t, h + pad, w + pad, c).transpose(2, 0, 3, 1, 4, 5)
  grid = grid.reshape(t, rows * (h + pad), cols * (w + pad), c)
  return np.ascontiguousarray(grid[:, :grid.shape[1] - pad, :grid.shape[2] - pad])
