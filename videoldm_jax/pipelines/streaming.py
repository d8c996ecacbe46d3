"""Streaming stages of the generation chain (`pipelines/generate.py`).

Memory stays flat in the video's length: nothing holds the whole video. Key frames are
produced window by window (only the last S key latents survive a prediction round) and
pushed through a chain of streaming stages, each of which keeps a bounded buffer:

  interpolation  (`Interpolation`) buffers key frames until it has `interp_window` of
                 them, fills in window [k_0 .. k_{n-1}] and emits frames from k_0 up to,
                 not including, k_{n-1}; k_{n-1} is the first known frame of the next
                 window, so consecutive windows share their boundary key frame (no gap,
                 no duplicate). The last window reaches back over key frames already
                 filled in (their frames are not emitted again) and also emits the last
                 key frame.
  cut            (`Cut`) frames past the requested length are dropped here.
  decoding /     (`OverlapChunker`) chunks of `chunk` frames, each processed together
  upsampling     with `overlap` frames before it (already emitted) and `overlap` after it
                 (emitted by the next call); the outputs of context frames are dropped.
  sink           converts to uint8, appends to a `video_io` writer (mp4 or npy, which
                 close atomically) and keeps the first few frames, downscaled, for the gif.

Every call of a stage has the same number of frames (one compiled program per stage,
however long the video; only a video shorter than one window differs), and stages that
share a config share their compiled UNet / text encoder / decoder, also across videos.
"""

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from videoldm_jax import video_io

# Each stage takes chunks of frames (1, n, ...) through push() and returns what it can
# emit (or None); flush() emits the rest at the end of the video.


def cat_frames(a: Optional[jax.Array], b: jax.Array) -> jax.Array:
  """(1, n, ...) frames `b` appended to `a` (or `b` when `a` is None) along time."""
  return b if a is None else jnp.concatenate([a, b], axis=1)


class _Buffered:
  """A frame buffer with absolute indices (buf[:, i] is frame `start` + i), a counter
  of calls to `fn` and an optional progress bar. fn(frames, call index, index of the
  first frame in the video): the call index gives each call its own noise, the frame
  index lets noise follow the frames (the same frame, the same noise, in every call
  that holds it)."""

  def __init__(self, fn, bar=None):
    self.fn, self.bar = fn, bar
    self.buf, self.start, self.total, self.calls = None, 0, 0, 0

  def _append(self, frames: jax.Array) -> None:
    self.buf = cat_frames(self.buf, frames)
    self.total += frames.shape[1]

  def _frames(self, first: int, last: int) -> jax.Array:
    return self.buf[:, first - self.start:last - self.start]

  def _drop_before(self, first: int) -> None:
    self.buf, self.start = self._frames(first, self.total), first

  def _run(self, first: int, last: int) -> jax.Array:
    out = self.fn(self._frames(first, last), self.calls, first)
    self.calls += 1
    return out

  def _emit(self, outs: list) -> Optional[jax.Array]:
    if not outs:
      return None
    out = jnp.concatenate(outs, axis=1)
    if self.bar is not None:
      self.bar.update(out.shape[1])
    return out


class Interpolation(_Buffered):
  """Streaming `interpolate`: key frames in, stride-times as many frames out, in windows
  of `window` key frames that share their boundary key frame (module docstring).

  interpolate_fn(keys (1, window, h, w, C), call index, first key's index) ->
  (1, stride (window - 1) + 1, h, w, C), exactly `keys` at every stride-th frame. Every
  call has `window` keys (one compiled shape): the last window reaches back over key
  frames already filled in, and only its new frames are emitted (a video of fewer than
  `window` key frames is one shorter call). Keeps at most 2 window - 1 key frames plus
  one pushed chunk.
  """

  def __init__(self, interpolate_fn, stride: int, window: int, bar=None):
    super().__init__(interpolate_fn, bar)
    self.stride, self.window = stride, window
    self.done = 0  # the frames before key frame `done` are emitted

  def push(self, keys: jax.Array) -> Optional[jax.Array]:
    self._append(keys)
    outs = []
    while self.total - self.done >= self.window:
      frames = self._run(self.done, self.done + self.window)
      outs.append(frames[:, :self.stride * (self.window - 1)])  # last key: next window's
      self.done += self.window - 1
      self._drop_before(max(0, self.done - (self.window - 1)))  # history: last window
    return self._emit(outs)

  def flush(self) -> Optional[jax.Array]:
    if self.total == self.done:
      return None
    if self.total - self.done == 1:  # only the last key frame, known: nothing to fill in
      out = self._frames(self.done, self.total)
    else:
      first = max(0, self.total - self.window)
      out = self._run(first, self.total)[:, self.stride * (self.done - first):]
    self.done, self.buf = self.total, None
    return self._emit([out])


class OverlapChunker(_Buffered):
  """Streaming frame-aligned processing (decode, upsample) in chunks with context.

  fn(frames (1, W, ...), call index, first frame's index) -> (1, W, ...) frame for
  frame, W = chunk + 2 overlap for every call (one compiled shape; a video shorter than
  W is one shorter call). The first call covers frames [0, W) and emits
  [0, W - overlap); each further call emits the next `chunk` frames, seeing `overlap`
  frames on each side of them (their outputs are dropped); the last call covers the
  last W frames of the video and emits what is left (so it sees >= overlap frames
  before). The true start and end of the video have no context frames, as in
  whole-video processing. Keeps at most W - 1 + chunk + overlap frames plus one pushed
  chunk.
  """

  def __init__(self, fn, chunk: int, overlap: int, bar=None):
    super().__init__(fn, bar)
    self.chunk, self.overlap = chunk, overlap
    self.size = chunk + 2 * overlap
    self.done = 0  # frames [0, done) are emitted

  def push(self, frames: jax.Array) -> Optional[jax.Array]:
    self._append(frames)
    outs = []
    while True:
      end = self.size if self.done == 0 else self.done + self.chunk + self.overlap
      if self.total < end:
        break
      first = end - self.size
      outs.append(self._run(first, end)[:, self.done - first:end - self.overlap - first])
      self.done = end - self.overlap
      self._drop_before(max(0, self.done - (self.size - 1)))  # history: last call
    return self._emit(outs)

  def flush(self) -> Optional[jax.Array]:
    if self.total == self.done:
      return None
    first = max(0, self.total - self.size)
    out = self._run(first, self.total)[:, self.done - first:]
    self.done, self.buf = self.total, None
    return self._emit([out])


class Cut:
  """Passes on the first `num_frames` frames and drops the rest: what the last window
  makes past the video's end (up to F - 1 frames at F = 4^passes) is neither decoded
  nor upsampled."""

  def __init__(self, num_frames: int):
    self.remaining = num_frames

  def push(self, frames: jax.Array) -> Optional[jax.Array]:
    out = frames[:, :max(0, self.remaining)]
    self.remaining -= out.shape[1]
    return out if out.shape[1] else None

  def flush(self) -> None:
    return None


class Sink:
  """float frames (1, n, H, W, 3) in [-1, 1] -> uint8 -> video writer (cut at num_frames),
  keeping the first gif_max_frames frames, downscaled, for the preview."""

  def __init__(self, writer: video_io.Mp4Writer | video_io.NpyWriter, num_frames: int,
               gif_frames: int, gif_size: int, bar=None):
    self.writer, self.remaining, self.bar = writer, num_frames, bar
    self.gif_frames, self.gif_size, self.preview = gif_frames, gif_size, []

  def push(self, frames: jax.Array) -> None:
    if self.remaining <= 0:
      return None
    frames = video_io.to_uint8(np.asarray(frames[0, :self.remaining]))
    self.writer.append(frames)
    self.remaining -= frames.shape[0]
    for frame in frames[:max(0, self.gif_frames - len(self.preview))]:
      self.preview.append(_downscale(frame, self.gif_size))
    if self.bar is not None:
      self.bar.update(frames.shape[0])
    return None

  def flush(self) -> None:
    return None


def _downscale(frame: np.ndarray, max_size: int) -> np.ndarray:
  """(H, W, 3) uint8 -> at most max_size on the longer side (box filter)."""
  h, w = frame.shape[:2]
  factor = max(h, w) / max_size
  if factor <= 1:
    return frame
  from PIL import Image
  size = (max(1, round(w / factor)), max(1, round(h / factor)))
  return np.asarray(Image.fromarray(frame).resize(size, Image.Resampling.BOX))


class Pipeline:
  """Stages in series: push() sends a chunk as far as it goes; flush() flushes each stage
  in order and sends what it emits through the stages after it."""

  def __init__(self, stages):
    self.stages = stages

  def push(self, x, start: int = 0) -> None:
    for stage in self.stages[start:]:
      x = stage.push(x)
      if x is None:
        return

  def flush(self) -> None:
    for i, stage in enumerate(self.stages):
      x = stage.flush()
      if x is not None:
        self.push(x, i + 1)
