"""MP4 / GIF round trips, error messages and the logging grid of `videoldm_jax.video_io`."""

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av")
from PIL import Image, ImageSequence  # noqa: E402

from videoldm_jax import video_io  # noqa: E402

T, H, W = 12, 48, 64  # a 64x48 (W x H) clip


def _moving_pattern(t=T, h=H, w=W) -> np.ndarray:
  """(t, h, w, 3) uint8: three sinusoids drifting in different directions, so that every
  frame differs from its neighbours and each channel carries its own structure."""
  tt, y, x = np.arange(t)[:, None, None], np.arange(h)[None, :, None], np.arange(w)[None, None, :]
  r = 128 + 100 * np.sin(2 * np.pi * (x - 3 * tt) / 32)
  g = 128 + 100 * np.sin(2 * np.pi * (y + 2 * tt) / 24)
  b = 128 + 60 * np.cos(2 * np.pi * (x + y - 4 * tt) / 40)
  return np.stack(np.broadcast_arrays(r, g, b), -1).astype(np.uint8)


def _mae(a, b) -> float:
  return float(np.mean(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def test_mp4_round_trip(tmp_path):
  video = _moving_pattern()
  path = str(tmp_path / "clip.mp4")
  assert video_io.write_mp4(path, video, fps=8) == (H, W)
  out = video_io.read_video(path)
  assert out.shape == video.shape and out.dtype == np.uint8
  # Bound: MAE <= 8 on the 0..255 scale. yuv420p alone (encode-side RGB->YUV, 2x2 chroma
  # subsampling, decode-side YUV->RGB) costs ~5.3 on this colourful pattern, independent
  # of crf (measured: crf 0 -> 5.34, crf 18 -> 5.72; an ideal numpy 4:2:0 round trip
  # gives 5.19). The margin covers x264 / swscale version drift; the bugs this guards
  # against (swapped channels, wrong range, shifted frames) cost tens.
  assert _mae(out, video) < 8.0
  # Frames stay in order: each decoded frame is far closer to its own source than to
  # the neighbour (the pattern moves 2-4 px per frame).
  for i in range(1, T):
    assert _mae(out[i], video[i]) < 0.5 * _mae(out[i], video[i - 1])
  assert video_io.read_video(path, max_frames=5).shape == (5, H, W, 3)
  with pytest.raises(ValueError, match="max_frames must be >= 1"):
    video_io.read_video(path, max_frames=0)
  # Tagged as what the conversion made (BT.601 / SMPTE 170M, limited range), for this
  # writer and the streaming one: untagged, players assume BT.709 for HD sizes.
  import av
  with video_io.Mp4Writer(str(tmp_path / "streamed.mp4"), fps=8) as writer:
    writer.append(video[:2])
  for f in (path, tmp_path / "streamed.mp4"):
    with av.open(str(f)) as container:
      cc = container.streams.video[0].codec_context
      assert (int(cc.colorspace), cc.color_primaries, cc.color_trc, int(cc.color_range)) \
          == (6, 6, 6, 1), f


def test_mp4_grey_is_nearly_lossless(tmp_path):
  # Without chroma, 4:2:0 loses nothing, so what remains is 8-bit limited-range rounding
  # (0.49 measured for the conversion alone) plus x264 at crf 18 (1.19 in total): a bound
  # of 2, far tighter than the colour test, exercises the encoder path itself.
  video = _moving_pattern().mean(-1, keepdims=True).astype(np.uint8).repeat(3, -1)
  path = str(tmp_path / "grey.mp4")
  video_io.write_mp4(path, video, fps=8, crf=18)
  assert _mae(video_io.read_video(path), video) < 2.0


def test_lossless_mp4_files_are_byte_identical_run_to_run(tmp_path):
  # 48 px wide: a width at which lossy x264 encodes of the same frames varied after
  # other FFmpeg work in the process (write_mp4's docstring); a decode runs between
  # the encodes, as when a generated clip is checked or evaluated.
  rng = np.random.default_rng(0)
  steps = rng.integers(0, 256, (16, 32, 48, 3))
  video = (np.cumsum(steps, axis=0) // 8 % 256).astype(np.uint8)  # drifting noise
  files = []
  for i in range(8):
    path = str(tmp_path / f"v{i}.mp4")
    with video_io.Mp4Writer(path, fps=8, crf=0) as writer:
      writer.append(video[:5])
      writer.append(video[5:])
    files.append(Path(path).read_bytes())
    decoded = video_io.read_video(path)
  assert all(f == files[0] for f in files[1:])
  # Lossless in YUV 4:2:0: what remains is the colour conversion and chroma subsampling.
  assert decoded.shape == video.shape


def test_mp4_odd_size_padding(tmp_path):
  video = _moving_pattern()[:, :47, :63]
  path = str(tmp_path / "odd.mp4")
  assert video_io.write_mp4(path, video) == (48, 64)
  streamed = str(tmp_path / "odd_streamed.mp4")  # the chain's writer pads the same way
  with video_io.Mp4Writer(streamed, fps=8) as writer:
    writer.append(video[:2])
    writer.append(video[2:])
  for out in (video_io.read_video(path), video_io.read_video(streamed)):
    assert out.shape == (T, 48, 64, 3)
    assert _mae(out[:, :47, :63], video) < 8.0
    # The added row and column repeat the edge (black would cost the codec and the eye).
    assert _mae(out[:, 47], out[:, 46]) < 8.0 and _mae(out[:, :, 63], out[:, :, 62]) < 8.0
  with pytest.raises(ValueError, match="odd.mp4.*even"):
    video_io.write_mp4(path, video, pad_odd=False)
  # One odd side only, either one: only that side grows.
  for h, w in ((48, 63), (47, 64)):
    clip = _moving_pattern()[:4, :h, :w]
    one = str(tmp_path / f"one_{h}x{w}.mp4")
    assert video_io.write_mp4(one, clip) == (48, 64)
    with video_io.Mp4Writer(str(tmp_path / f"s_{h}x{w}.mp4"), fps=8) as writer:
      writer.append(clip)
    for out in (video_io.read_video(one), video_io.read_video(str(tmp_path / f"s_{h}x{w}.mp4"))):
      assert out.shape == (4, 48, 64, 3) and _mae(out[:, :h, :w], clip) < 8.0


def test_a_failed_write_leaves_no_file_behind(tmp_path, monkeypatch):
  # The write fails after the encoder has written the temporary file (at the rename, as
  # a full disk or a vanished folder would): no partial file is left, and a file of
  # that name written before is left as it was.
  import os
  clip = _moving_pattern()[:4]
  path = str(tmp_path / "v.mp4")
  video_io.write_mp4(path, clip)
  before = open(path, "rb").read()
  partial = []

  def failing(src, dst):
    partial.append(os.path.getsize(src))
    raise OSError("disk full")
  monkeypatch.setattr(os, "replace", failing)
  with pytest.raises(OSError, match="disk full"):
    video_io.write_mp4(path, clip[::-1])
  monkeypatch.undo()
  assert partial and partial[0] > 0  # (it had been written)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]
  assert open(path, "rb").read() == before


def test_written_rate_and_frame_count_are_the_ones_asked_for(tmp_path):
  # NTSC's 30000/1001 stays exact (not 30, not 24), in both writers.
  import av
  from fractions import Fraction
  clip = _moving_pattern()[:3]
  plain, streamed = str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4")
  video_io.write_mp4(plain, clip, fps=30000 / 1001)
  with video_io.Mp4Writer(streamed, fps=30000 / 1001) as writer:
    writer.append(clip)
  for path in (plain, streamed):
    with av.open(path) as container:
      stream = container.streams.video[0]
      assert stream.average_rate == Fraction(30000, 1001) and stream.frames == 3, path


def test_writers_refuse_what_they_cannot_write_and_closed_writers(tmp_path):
  frames = np.zeros((2, 8, 8, 3), np.uint8)
  for bad, message in ((np.zeros((0, 8, 8, 3), np.uint8), "no frames|T >= 1|empty"),
                       (np.zeros((2, 8, 8, 1), np.uint8), r"\(T, H, W, 3\)"),
                       (np.zeros((2, 8, 8, 4), np.uint8), r"\(T, H, W, 3\)")):
    for write in (lambda f: video_io.write_mp4(str(tmp_path / "x.mp4"), f),
                  lambda f: video_io.write_gif(str(tmp_path / "x.gif"), f)):
      with pytest.raises(ValueError, match=message):
        write(bad)
  for fps in (0, float("nan"), float("inf"), "x"):
    with pytest.raises(ValueError, match=r"x.gif: fps must be a positive number"):
      video_io.write_gif(str(tmp_path / "x.gif"), frames, fps=fps)
  for n in (0, 2.5, "3"):
    with pytest.raises(ValueError, match=r"x.npy: num_frames must be an integer >= 1"):
      video_io.NpyWriter(str(tmp_path / "x.npy"), n)
  video_io.write_mp4(str(tmp_path / "q.mp4"), frames, crf=51)  # x264's lowest quality
  assert not list(tmp_path.glob("x.*"))
  # A closed writer takes nothing more; closing again returns the file.
  for writer in (video_io.Mp4Writer(str(tmp_path / "c.mp4"), fps=8),
                 video_io.NpyWriter(str(tmp_path / "c.npy"), 2)):
    writer.append(frames)
    path = writer.close()
    assert writer.close() == path
    with pytest.raises(ValueError, match="append\\(\\) after close\\(\\)"):
      writer.append(frames)


def test_write_mp4_rejects_bad_input(tmp_path):
  path = str(tmp_path / "bad.mp4")
  with pytest.raises(TypeError, match="to_uint8"):
    video_io.write_mp4(path, np.zeros((2, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
    video_io.write_mp4(path, np.zeros((8, 8, 3), np.uint8))
  # Rates and qualities a writer cannot honour are named: fps=1e-4 rounded to a rate of
  # 0 (written as 24 fps), crf=-0.5 was read as 0 (lossless), None a bare TypeError.
  frames = np.zeros((2, 8, 8, 3), np.uint8)
  for kwargs, message in ((dict(fps=1e-4), r"fps must be a positive number of at least "
                           r"1/1001, got 0.0001"),
                          (dict(fps="x"), r"fps must be .* got 'x'"),
                          (dict(crf=-0.5), r"crf must be an integer in \[0, 51\], got -0.5"),
                          (dict(crf=None), r"crf must be an integer .* got None"),
                          (dict(crf=51.9), r"crf must be .* got 51.9")):
    with pytest.raises(ValueError, match=rf"bad.mp4: {message}"):
      video_io.write_mp4(path, frames, **kwargs)
    with pytest.raises(ValueError, match=rf"bad.mp4: {message}"):
      video_io.Mp4Writer(path, **kwargs)
  # A NumPy scalar rate (datasets store fps as float32) is a rate: it was a TypeError
  # in Fraction().
  video_io.write_mp4(path, frames, fps=np.float32(8))
  assert video_io.read_video(path).shape == (2, 8, 8, 3)


def test_gif_round_trip_exact(tmp_path):
  # 5 colours in moving 8x8 checker cells: fits a GIF palette, so it must survive exactly.
  colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [20, 30, 40]],
                     np.uint8)
  tt, y, x = np.arange(T)[:, None, None], np.arange(H)[None, :, None], np.arange(W)[None, None, :]
  video = colours[(x // 8 + y // 8 + tt) % 5]
  path = str(tmp_path / "clip.gif")
  video_io.write_gif(path, video, fps=8)
  with Image.open(path) as im:
    assert im.info["loop"] == 0  # loop forever
    assert im.info["duration"] == 120  # 1/8 s rounded to GIF's 10 ms ticks
    frames = np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])
  video_io.write_gif(str(tmp_path / "six.gif"), video[:2], fps=6)
  with Image.open(str(tmp_path / "six.gif")) as im:
    assert im.info["duration"] == 170  # 16.7 ticks, rounded (not cut to 160 ms)
  np.testing.assert_array_equal(frames, video)
  # PyAV reads GIFs too.
  np.testing.assert_array_equal(video_io.read_video(path), video)


def test_fast_gif_keeps_its_speed(tmp_path):
  # Browsers show GIF delays under 20 ms as 100 ms: 120 fps (8 ms) played 12x slow.
  # Every 3rd frame at 40 fps instead (a 25 ms delay, GIF's 10 ms ticks: 20 ms).
  colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]], np.uint8)
  video = np.broadcast_to(colours[np.arange(12) % 4][:, None, None], (12, 8, 8, 3))
  path = str(tmp_path / "fast.gif")
  video_io.write_gif(path, np.ascontiguousarray(video), fps=120)
  with Image.open(path) as im:
    assert im.info["duration"] == 20
    frames = np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])
  np.testing.assert_array_equal(frames, video[::3])
  # 60 fps: every 2nd frame at 30 fps, a 33 ms delay in 10 ms ticks: 30 ms (at 60 fps
  # the 20 ms of 50 fps would play 1.5x fast).
  video_io.write_gif(path, np.ascontiguousarray(video), fps=60)
  with Image.open(path) as im:
    assert im.info["duration"] == 30 and im.n_frames == 6


def test_slow_gif_rates_fit_the_16_bit_delay(tmp_path):
  # A delay is at most 65535 hundredths of a second: 0.001 fps overflowed in Pillow
  # (OverflowError, no path named); 0.0016 fps is a 625 s delay, which fits.
  frames = np.zeros((2, 4, 4, 3), np.uint8)
  frames[1] = 255
  with pytest.raises(ValueError, match=r"x.gif: fps 0.001 is slower than a GIF can show"):
    video_io.write_gif(str(tmp_path / "x.gif"), frames, fps=0.001)
  video_io.write_gif(str(tmp_path / "y.gif"), frames, fps=0.0016)
  with Image.open(tmp_path / "y.gif") as im:
    assert im.info["duration"] == 625_000


def test_gif_many_colours_shared_palette(tmp_path):
  video = _moving_pattern()  # thousands of colours -> median-cut palette
  path = str(tmp_path / "many.gif")
  video_io.write_gif(path, video, fps=4)
  with Image.open(path) as im:
    frames = np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])
  assert frames.shape == video.shape
  # Measured 5.6 (Pillow 13 median cut + k-means). A fixed 6x6x7 colour cube over this
  # ~200-wide range would give ~8, so < 7 checks that the palette adapts to the clip.
  assert _mae(frames, video) < 7.0


@pytest.mark.parametrize("content", [b"", b"this is not a video\n" * 10])
def test_read_video_unreadable_file(tmp_path, content):
  path = tmp_path / "broken.mp4"
  path.write_bytes(content)
  with pytest.raises(ValueError, match="broken.mp4"):
    video_io.read_video(str(path))
  with pytest.raises(FileNotFoundError, match="missing.mp4"):
    video_io.read_video(str(tmp_path / "missing.mp4"))


def test_to_uint8():
  # (x + 1) * 127.5 rounded, clipped: 0.5 -> 191.25 -> 191, -0.5 -> 63.75 -> 64.
  x = np.array([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5])
  np.testing.assert_array_equal(video_io.to_uint8(x), [0, 0, 64, 128, 191, 255, 255])


def test_to_uint8_names_non_finite_values(caplog):
  # NaN was cast to 0 with only NumPy's RuntimeWarning: a diverged sampler's output
  # passed as a black video.
  with caplog.at_level("WARNING"):
    out = video_io.to_uint8(np.array([np.nan, np.inf, -np.inf, 0.0, np.nan]))
  np.testing.assert_array_equal(out, [0, 255, 0, 128, 0])
  assert "to_uint8: 4 of 5 values are NaN or infinite" in caplog.text


def test_video_grid_layout():
  b, t, h, w = 5, 2, 3, 4
  videos = (np.arange(b)[:, None, None, None, None] + 1
            + np.zeros((b, t, h, w, 3))).astype(np.uint8)
  grid = video_io.video_grid(videos, cols=3, pad=1, pad_value=255)
  assert grid.shape == (t, 2 * h + 1, 3 * w + 2, 3)
  # More columns than clips: one row of B cells, no empty columns.
  assert video_io.video_grid(videos[:2], cols=4, pad=1).shape == (t, h, 2 * w + 1, 3)
  for i in range(b):
    r, c = divmod(i, 3)
    cell = grid[:, r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w]
    np.testing.assert_array_equal(cell, videos[i])
  assert np.all(grid[:, h] == 255) and np.all(grid[:, :, w] == 255)  # gutters
  assert np.all(grid[:, h + 1:, 2 * (w + 1):] == 255)  # empty 6th cell
  # No padding: a plain tiling.
  assert video_io.video_grid(videos[:4], cols=2).shape == (t, 2 * h, 2 * w, 3)


def test_a_cut_off_gif_is_refused_by_name(tmp_path):
  # A GIF states no frame count or duration: cut off, it decoded without an error, its
  # last frame garbage below the cut.
  path = tmp_path / "whole.gif"
  video_io.write_gif(str(path), _moving_pattern(), fps=4)
  assert video_io.gif_has_trailer(str(path))
  assert video_io.read_video(str(path)).shape == (T, H, W, 3)
  cut = tmp_path / "cut.gif"
  cut.write_bytes(path.read_bytes()[:int(path.stat().st_size * 0.95)])
  assert not video_io.gif_has_trailer(str(cut))
  with pytest.raises(ValueError, match=r"cut.gif: a GIF cut off before its end"):
    video_io.read_video(str(cut))
  assert video_io.read_video(str(cut), max_frames=2).shape == (2, H, W, 3)  # intact part
  with pytest.raises(ValueError, match=r"cut.gif: a GIF cut off"):  # (all of it asked for)
    video_io.read_video(str(cut), max_frames=100)
  padded = tmp_path / "padded.gif"  # bytes after the trailer (a transfer's line ending)
  padded.write_bytes(path.read_bytes() + b"\r\n")
  assert video_io.read_video(str(padded)).shape == (T, H, W, 3)


def test_a_stream_that_changes_resolution_reads_at_its_first_size(tmp_path):
  # Two MPEG-TS files one after the other (a legal stream): np.stack failed naming no
  # file; frames are scaled to the first size, as the dataset builders do.
  import av
  parts = []
  for i, (h, w) in enumerate(((48, 64), (32, 48))):
    f = tmp_path / f"p{i}.ts"
    with av.open(str(f), "w", format="mpegts") as c:
      s = c.add_stream("libx264", rate=8)
      s.width, s.height, s.pix_fmt = w, h, "yuv420p"
      for frame in _moving_pattern(4, h, w):
        c.mux(s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
      c.mux(s.encode(None))
    parts.append(f.read_bytes())
  joined = tmp_path / "joined.ts"
  joined.write_bytes(b"".join(parts))
  out = video_io.read_video(str(joined))
  assert out.shape[1:] == (48, 64, 3) and out.shape[0] >= 5, out.shape
  # The later frames are the 32 x 48 part scaled up, not cropped or padded: they match
  # its pattern resized to 48 x 64 (per pixel, to the codec's and the resize's error).
  from PIL import Image
  small = _moving_pattern(4, 32, 48)
  want = np.stack([np.asarray(Image.fromarray(f).resize((64, 48), Image.Resampling.BILINEAR))
                   for f in small])
  later = out[4:]
  assert _mae(later, want[:len(later)]) < 16.0, _mae(later, want[:len(later)])


def test_non_square_pixels_are_shown_square(tmp_path):
  # Anamorphic video: 48x48 coded pixels shown 16:9 wide (sample aspect ratio 16/9).
  # Stored as coded, its frames trained squashed.
  import av
  from fractions import Fraction
  path = tmp_path / "anamorphic.mp4"
  with av.open(str(path), "w") as c:
    s = c.add_stream("libx264", rate=8)
    s.width, s.height, s.pix_fmt = 48, 48, "yuv420p"
    s.codec_context.sample_aspect_ratio = Fraction(16, 9)
    for frame in _moving_pattern(3, 48, 48):
      c.mux(s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    c.mux(s.encode(None))
  assert video_io.read_video(str(path)).shape == (3, 48, 85, 3)  # 48 * 16 / 9 = 85.3
  from data_pipelines.video_folder import sources
  assert sources.decode_clip(str(path), max_frames=None).frames.shape == (3, 48, 85, 3)
  assert sources.decode_clip(str(path), max_frames=None,
                             resize_short_side=24).frames.shape == (3, 24, 42, 3)


def test_files_being_written_are_not_clips(tmp_path):
  # A run killed mid-write (SIGKILL, the OOM killer) leaves the writer's temporary file:
  # named NAME.tmp-PID.npy, it loaded as a full-shape clip (black past the kill) and
  # videoldm-eval took it for one.
  from videoldm_jax.cli import evaluate
  video = _moving_pattern(4)
  np.save(tmp_path / "done.npy", video)
  writer = video_io.open_writer(str(tmp_path / "clip.npy"), num_frames=8)
  writer.append(video)  # half of it, then "killed": left as it is
  assert [p.name.split("-")[0] for p in tmp_path.iterdir() if p.name.startswith(".")] == [
      ".clip.npy.partial"]
  assert [f.name for f in evaluate.expand_inputs(str(tmp_path))] == ["done.npy"]


def test_the_main_video_stream_is_read_not_the_first(tmp_path):
  # A Matroska file whose stream 0 is a 2-frame 16 x 16 track and stream 1 the video:
  # both readers took stream 0.
  import av
  from data_pipelines.video_folder import sources
  path = str(tmp_path / "two.mkv")
  with av.open(path, "w") as c:
    small = c.add_stream("libx264", rate=8)
    small.width = small.height = 16
    main = c.add_stream("libx264", rate=8)
    main.width = main.height = 32
    small.pix_fmt = main.pix_fmt = "yuv420p"
    for i in range(40):
      c.mux(main.encode(av.VideoFrame.from_ndarray(np.full((32, 32, 3), 100, np.uint8),
                                                   format="rgb24")))
      if i < 2:
        c.mux(small.encode(av.VideoFrame.from_ndarray(np.full((16, 16, 3), 10, np.uint8),
                                                      format="rgb24")))
    c.mux(small.encode(None))
    c.mux(main.encode(None))
  assert video_io.read_video(path).shape == (40, 32, 32, 3)
  assert sources.decode_clip(path, max_frames=None).frames.shape == (40, 32, 32, 3)


def test_gif_previews_shrink_the_longer_side_to_the_limit():
  from videoldm_jax.pipelines.streaming import _downscale
  assert _downscale(np.zeros((40, 100, 3), np.uint8), 50).shape == (20, 50, 3)
  assert _downscale(np.zeros((100, 40, 3), np.uint8), 50).shape == (50, 20, 3)
  small = np.ones((30, 20, 3), np.uint8)
  assert _downscale(small, 50) is small
