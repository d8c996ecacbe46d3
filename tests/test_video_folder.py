"""The `video_folder` TFDS builder: a folder mixing good and broken videos still builds,
every bad item is skipped with the right reason, good clips round-trip exactly."""

import json
import logging
import os
import types

import ml_collections
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
av = pytest.importorskip("av")

from data_pipelines import video_folder as vf  # noqa: E402
from data_pipelines.video_folder import __main__ as cli  # noqa: E402
from data_pipelines.video_folder import sources  # noqa: E402
from videoldm_jax import video_io  # noqa: E402
from videoldm_jax.data import inputs  # noqa: E402


def _clip(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
  """A smooth moving gradient with a bright square: codecs keep it close to the input
  (random noise would not), and it uses < 256 colours, so GIF stores it exactly."""
  yy, xx = np.mgrid[0:h, 0:w]
  frames = []
  for i in range(t):
    f = np.zeros((h, w, 3), np.uint8)
    f[..., 0] = (xx * 160 // max(w - 1, 1) + 20 * i + seed * 30) % 200
    f[..., 1] = yy * 160 // max(h - 1, 1)
    f[..., 2] = 90
    f[2:10, 2 + 2 * i:10 + 2 * i] = 240
    frames.append(f)
  return np.stack(frames) // 16 * 16  # coarse levels: few colours for GIF


def _write_pyav(path: str, frames: np.ndarray, codec: str, pix_fmt: str, fps: int = 8,
                options=None):
  """Writes a clip with any PyAV encoder (for the containers video_io does not write)."""
  with av.open(path, mode="w", options=options or {}) as c:
    s = c.add_stream(codec, rate=fps)
    s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
    s.bit_rate = 4_000_000  # mpeg4's default (~200 kb/s) blurs even these tiny clips
    for f in frames:
      c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
    c.mux(s.encode(None))


# Good files: relative path -> the frames written. One per supported extension.
GOOD = {
    "a.mp4": _clip(12, 24, 32, 0),
    "c.gif": _clip(8, 24, 32, 1),
    "sub/b.webm": _clip(10, 24, 32, 2),
    "sub/e.mov": _clip(8, 24, 32, 3),
    "sub/f.avi": _clip(8, 24, 32, 4),
    # Odd resolution (ffv1 has no even-size rule): stored as-is, no crop or pad.
    "sub/deeper/odd.mkv": _clip(9, 25, 33, 5),
}
CAPTIONS = {"a.mp4": "a car turns left", "sub/b.webm": 'rain, then "sun"',
            "sub/deeper/odd.mkv": "odd sized"}
EXPECTED_SKIPS = {
    "empty.mp4": sources.EMPTY_FILE,        # zero bytes
    "trunc.mp4": sources.UNREADABLE,        # first half of an mp4: no moov atom
    "trunc_fast.mp4": sources.TRUNCATED,    # moov first ("faststart"), tail cut off
    "audio.mkv": sources.NO_VIDEO_STREAM,   # audio only
    "notes.mp4": sources.UNREADABLE,        # a text file named .mp4
    "short.mp4": sources.TOO_SHORT,         # 2 frames < min_frames=4
    "gone.mp4": sources.MISSING_FILE,       # caption row, file does not exist
}


def _write_good(src: str):
  for rel, frames in GOOD.items():
    path = os.path.join(src, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ext = os.path.splitext(rel)[1]
    if ext == ".mp4":
      video_io.write_mp4(path, frames)
    elif ext == ".gif":
      video_io.write_gif(path, frames)
    elif ext == ".webm":
      _write_pyav(path, frames, "libvpx-vp9", "yuv420p")
    elif ext == ".mov":
      _write_pyav(path, frames, "libx264", "yuv420p")
    elif ext == ".avi":
      _write_pyav(path, frames, "mpeg4", "yuv420p")
    else:
      _write_pyav(path, frames, "ffv1", "yuv444p")


def _write_bad(src: str):
  open(os.path.join(src, "empty.mp4"), "wb").close()
  data = open(os.path.join(src, "a.mp4"), "rb").read()
  with open(os.path.join(src, "trunc.mp4"), "wb") as f:
    f.write(data[:len(data) // 2])
  fast = os.path.join(src, "fast.tmp.mp4")
  _write_pyav(fast, _clip(12, 24, 32), "libx264", "yuv420p",
              options={"movflags": "faststart"})
  data = open(fast, "rb").read()
  os.remove(fast)
  with open(os.path.join(src, "trunc_fast.mp4"), "wb") as f:
    f.write(data[:len(data) // 2])
  with av.open(os.path.join(src, "audio.mkv"), mode="w") as c:
    s = c.add_stream("pcm_s16le", rate=8000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16",
                                       layout="mono")
    frame.sample_rate = 8000
    for packet in [*s.encode(frame), *s.encode(None)]:
      c.mux(packet)
  with open(os.path.join(src, "notes.mp4"), "w") as f:
    f.write("these are my notes, not a video\n")
  video_io.write_mp4(os.path.join(src, "short.mp4"), _clip(2, 24, 32))
  with open(os.path.join(src, "readme.txt"), "w") as f:  # not a candidate: ignored
    f.write("hello\n")


class _ListHandler(logging.Handler):
  def __init__(self):
    super().__init__()
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
  """Builds the mixed good/bad folder once; returns (builder, source dir, log lines)."""
  root = tmp_path_factory.mktemp("mixed")
  src, data = str(root / "src"), str(root / "data")
  os.makedirs(src)
  _write_good(src)
  _write_bad(src)
  captions = os.path.join(str(root), "captions.csv")
  with open(captions, "w", newline="") as f:
    f.write("path,caption\n")
    for rel, text in CAPTIONS.items():
      f.write(f'{rel},"{text.replace(chr(34), chr(34) * 2)}"\n')
    f.write("gone.mp4,a file that is not there\nshort.mp4,too short to keep\n")
  handler = _ListHandler()
  log = logging.getLogger("data_pipelines.video_folder")
  log.addHandler(handler)
  try:
    builder = vf.build(src, data, captions, min_frames=4, max_frames=None)
  finally:
    log.removeHandler(handler)
  return builder, src, handler.messages


def test_mixed_folder_skips_bad_items_with_reasons(mixed):
  builder, _, messages = mixed
  report = json.loads(open(os.path.join(builder.data_dir, vf.SKIPPED_REPORT)).read())
  assert {s["path"]: s["reason"] for s in report["skipped"]} == EXPECTED_SKIPS
  paths = [s["path"] for s in report["skipped"]]
  assert paths == sorted(paths)  # (so that two builds' reports diff well)
  assert report["num_skipped"] == len(EXPECTED_SKIPS)
  assert report["num_examples"] == len(GOOD)
  assert report["skipped_by_reason"] == {
      "empty_file": 1, "missing_file": 1, "no_video_stream": 1, "too_short": 1,
      "truncated": 1, "unreadable": 2}
  assert builder.report == report
  summary = [m for m in messages if "skipped 7" in m]
  assert len(summary) == 1 and "unreadable=2" in summary[0], messages
  # Stored videos the caption file has no row for are listed, not silent.
  uncaptioned = sorted(set(GOOD) - set(CAPTIONS))
  assert uncaptioned and report["uncaptioned"] == uncaptioned
  assert report["num_uncaptioned"] == len(uncaptioned)
  assert f"{len(uncaptioned)} of them without a caption row" in summary[0]
  assert builder.info.metadata["num_skipped"] == 7
  # (the dataset's own metadata keeps the counts by reason, readable without the report)
  assert dict(builder.info.metadata["skipped_by_reason"]) == report["skipped_by_reason"]


def test_good_clips_present_exact_and_captioned(mixed):
  builder, src, _ = mixed
  ds = builder.as_data_source("train")
  assert len(ds) == len(GOOD)
  examples = {ds[i]["path"].decode(): ds[i] for i in range(len(ds))}
  assert set(examples) == set(GOOD)
  for rel, written in GOOD.items():
    ex = examples[rel]
    video = ex["video"]
    assert video.dtype == np.uint8 and video.shape == written.shape, (rel, video.shape)
    # Same decoder as read_video: bit-identical to it ...
    np.testing.assert_array_equal(video, video_io.read_video(os.path.join(src, rel)))
    # ... and within the codecs' lossy bound of what was written.
    err = np.abs(video.astype(np.int16) - written).mean()
    assert err < 6, (rel, err)
    assert ex["num_frames"] == written.shape[0]
    assert ex["caption"].decode() == CAPTIONS.get(rel, "")
    assert ex["fps"] == pytest.approx(8.0, rel=0.05)  # gif: 12 cs delay = 8.33 fps


def _built_with(**build_options):
  """A data source whose TFDS metadata records these build options."""
  return types.SimpleNamespace(dataset_info=types.SimpleNamespace(
      metadata={"build_options": build_options}))


def test_tfds_data_source_by_name(mixed, caplog):
  builder, _, _ = mixed
  ds = tfds.data_source("video_folder", split="train", data_dir=builder.data_dir_root)
  assert len(ds) == len(GOOD)
  assert ds[0]["video"].ndim == 4 and ds[0]["video"].shape[-1] == 3
  # The trainer reads min_frames from the build's metadata: 4 frames are enough for
  # num_frames=2 at stride 3, not for 3 (7 frames needed).
  for num_frames, warned in ((2, False), (3, True)):
    caplog.clear()
    with caplog.at_level("WARNING"):
      inputs._check_clip_lengths(ds, ml_collections.ConfigDict(dict(
          num_frames=num_frames, frame_stride=3)), "vf")
    text = caplog.text
    assert ("vf was built with min_frames=4" in text) == warned, text
    assert ("vf was built with min_frames=4, but num_frames=3 at frame_stride=3 need 7 "
            "frames" in text) == warned, text
  # Clips cut to max_frames when built are all too short: an error, not the advice to
  # rebuild with a min_frames above max_frames (which the builder refuses).
  cut = _built_with(min_frames=1, max_frames=8)
  with pytest.raises(ValueError, match=r"vf was built with max_frames=8 .* need 10: lower "
                     r"data.num_frames / frame_stride, or rebuild with --max_frames=10"):
    inputs._check_clip_lengths(cut, ml_collections.ConfigDict(dict(
        num_frames=10, frame_stride=1)), "vf")
  for num_frames, stride in ((8, 1), (4, 2)):  # spans of exactly max_frames fit
    inputs._check_clip_lengths(cut, ml_collections.ConfigDict(dict(
        num_frames=num_frames, frame_stride=stride)), "vf")


def test_a_dataset_built_smaller_than_the_training_size_is_named(caplog):
  # Built with --resize_short_side=64 and trained at 128 x 128: every frame upscaled 2x
  # by the pipeline (blurred), without a word.
  small = _built_with(min_frames=8, max_frames=None, resize_short_side=64)
  for (height, width), warned in (((128, 128), True), ((64, 96), False),
                                  ((48, 160), False)):
    caplog.clear()
    with caplog.at_level("WARNING"):
      inputs._check_clip_lengths(small, ml_collections.ConfigDict(dict(
          num_frames=8, frame_stride=1, height=height, width=width)), "vf")
    assert ("vf was built with resize_short_side=64 (frames at most 64 pixels on their "
            f"shorter side), smaller than data.height={height} x data.width={width}: "
            "every frame will be upscaled; rebuild with --resize_short_side="
            f"{max(height, width)} or more" in caplog.text) == warned, caplog.text


def test_all_bad_source_raises_one_clear_error(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  video_io.write_mp4(str(src / "a.mp4"), _clip(12, 24, 32))  # only to truncate it
  _write_bad(str(src))
  os.remove(src / "a.mp4")
  caps = tmp_path / "caps.jsonl"
  caps.write_text(json.dumps({"path": "gone.mp4", "caption": "x"}) + "\n")
  with pytest.raises(vf.NoUsableVideoError) as exc:
    vf.build(str(src), str(tmp_path / "data"), str(caps))
  msg = str(exc.value)
  assert "no usable video" in msg and str(src) in msg
  for name, reason in EXPECTED_SKIPS.items():
    assert f"{name}: {reason}" in msg, msg
  assert "readme.txt" not in msg
  # Nothing half-built is left behind.
  assert not (tmp_path / "data" / "video_folder" / "1.0.0").exists()

  empty = tmp_path / "empty_src"
  empty.mkdir()
  with pytest.raises(vf.NoUsableVideoError, match="no file ending in"):
    vf.build(str(empty), str(tmp_path / "data2"))


def test_cli_stride_resize_and_overwrite(tmp_path, capsys):
  src = tmp_path / "src"
  src.mkdir()
  frames = _clip(12, 24, 32)
  video_io.write_mp4(str(src / "clip.mp4"), frames, fps=8)
  caps = tmp_path / "caps.jsonl"
  caps.write_text(json.dumps({"path": "./clip.mp4", "caption": "jsonl caption"}) + "\n")
  argv = [f"--source={src}", f"--data_dir={tmp_path / 'data'}", f"--captions={caps}",
          "--target_fps=4", "--max_frames=4", "--resize_short_side=12"]
  assert cli.main(argv) == 0
  out_dir = capsys.readouterr().out.strip().splitlines()[-1]
  assert os.path.exists(os.path.join(out_dir, vf.SKIPPED_REPORT))
  ex = vf.VideoFolder(data_dir=str(tmp_path / "data")).as_data_source("train")[0]
  # 8 fps / target 4 -> stride 2; first 4 kept frames; shorter side 24 -> 12.
  assert ex["video"].shape == (4, 12, 16, 3) and ex["num_frames"] == 4
  assert ex["fps"] == pytest.approx(4.0) and ex["caption"] == b"jsonl caption"
  full = video_io.read_video(str(src / "clip.mp4"))[::2][:4].astype(np.float32)
  pooled = full.reshape(4, 12, 2, 16, 2, 3).mean((2, 4))  # 2x2 area average
  assert np.abs(ex["video"] - pooled).mean() < 4

  assert cli.main(argv) == 1  # refuses to silently reuse / clobber a build
  assert "already built" in capsys.readouterr().err
  assert cli.main(argv[:-1] + ["--overwrite"]) == 0  # full size again
  ex = vf.VideoFolder(data_dir=str(tmp_path / "data")).as_data_source("train")[0]
  assert ex["video"].shape == (4, 24, 32, 3)


def test_caption_file_errors_name_file_and_line(tmp_path):
  bad_csv = tmp_path / "c.csv"
  bad_csv.write_text("file,text\na.mp4,x\n")
  with pytest.raises(ValueError, match=r"c\.csv: CSV header must have columns"):
    sources.read_captions(str(bad_csv), str(tmp_path))
  bad_jsonl = tmp_path / "c.jsonl"
  bad_jsonl.write_text('{"path": "a.mp4", "caption": "ok"}\n{not json\n')
  with pytest.raises(ValueError, match=r"c\.jsonl:2: not valid JSON"):
    sources.read_captions(str(bad_jsonl), str(tmp_path))
  # Captions under another key were read as empty captions, counted nowhere.
  other_key = tmp_path / "k.jsonl"
  other_key.write_text('{"path": "a.mp4", "text": "a car"}\n')
  with pytest.raises(ValueError, match=r'k\.jsonl:1: expected an object with a non-empty '
                     r'string "path" and a string "caption"'):
    sources.read_captions(str(other_key), str(tmp_path))
  # A byte-order mark before the first object is not part of it.
  bom = tmp_path / "b.jsonl"
  bom.write_bytes(b"\xef\xbb\xbf" + b'{"path": "a.mp4", "caption": "ok"}\n')
  assert sources.read_captions(str(bom), str(tmp_path))[0] == [("a.mp4", "ok")]
  # Columns by their header, in any order, others ignored.
  reordered = tmp_path / "r.csv"
  reordered.write_text("caption,source,path\na red car,cam 2,a.mp4\n")
  assert sources.read_captions(str(reordered), str(tmp_path))[0] == [("a.mp4", "a red car")]
  dup = tmp_path / "d.csv"
  dup.write_text("path,caption\na.mp4,first\n./a.mp4,second\n")
  rows, skips = sources.read_captions(str(dup), str(tmp_path))
  assert rows == [("a.mp4", "first")] and [s.reason for s in skips] == ["duplicate_caption"]
  # Names match in Unicode NFC: "café" typed (NFC) names a file stored decomposed (NFD,
  # as a macOS copy leaves it), and the two spellings in one file are one key.
  # Exact names first: two files whose names differ only in that form are two videos.
  nfc, nfd = "caf\u00e9.mp4", "cafe\u0301.mp4"
  match = lambda videos, rows: sources.match_captions(videos, rows, str(tmp_path), "u.csv")
  assert match([nfd], [(nfc, "a cup")]) == ({nfd: "a cup"}, [])
  captions, skips = match([nfd], [(nfd, "exact"), (nfc, "again")])
  assert captions == {nfd: "exact"} and [s.reason for s in skips] == ["duplicate_caption"]
  assert skips[0].detail.endswith("another Unicode form; the row naming it exactly is kept")
  captions, skips = match([nfd], [(nfc, "first"), (nfd, "exact")])  # exact wins, not first
  assert captions == {nfd: "exact"} and skips[0].path == nfc
  assert skips[0].detail.endswith("the row naming it exactly is kept")
  # A row outside the folder names no video there.
  assert [(k.path, k.reason, k.detail) for k in match([nfd], [("../x.mp4", "out")])[1]] == [
      ("../x.mp4", "missing_file", "listed in u.csv but outside the source folder")]
  # A short row (no caption field: a missing comma) is not an empty caption; a row with
  # an empty path is refused as well.
  short = tmp_path / "s.csv"
  short.write_text("path,caption\na.mp4\nb.mp4,a red car\n")
  with pytest.raises(ValueError, match=r"s\.csv:2: row has no 'caption' field"):
    sources.read_captions(str(short), str(tmp_path))
  short.write_text("path,caption\na.mp4,\n,a red car\n")
  with pytest.raises(ValueError, match=r"s\.csv:3: row has an empty 'path'"):
    sources.read_captions(str(short), str(tmp_path))
  # A long row (an unquoted comma in its caption) was read as the caption "a red car".
  short.write_text("path,caption\na.mp4,a red car, then a bus\n")
  with pytest.raises(ValueError, match=r"s\.csv:2: row has 3 fields, the header 2; put a "
                     "caption holding commas in double quotes"):
    sources.read_captions(str(short), str(tmp_path))
  short.write_text("path,caption\na.mp4,\n")  # an empty caption, written
  assert sources.read_captions(str(short), str(tmp_path))[0] == [("a.mp4", "")]
  assert match([nfc, nfd], [(nfc, "one"), (nfd, "two")]) == ({nfc: "one", nfd: "two"}, [])
  # An absolute path is taken relative to the folder as spelled on disk (a decomposed
  # folder name stays as it is).
  folder = tmp_path / "Cafe\u0301"
  folder.mkdir()
  (folder / "u.jsonl").write_text(json.dumps({"path": str(folder / "a.mp4"),
                                              "caption": "hi"}) + "\n", encoding="utf-8")
  assert sources.read_captions(str(folder / "u.jsonl"), str(folder))[0] == [("a.mp4", "hi")]


def test_a_row_equal_in_nfc_to_two_files_names_both(tmp_path):
  # "été" stored twice, composed (NFC) and decomposed (NFD): two videos. A row naming
  # one exactly captions it alone; a row in a third spelling (one accent of each form)
  # equals both in NFC and names neither: skipped as missing, which said "no such file"
  # while both files were there.
  composed, decomposed = "\u00e9t\u00e9.mp4", "e\u0301te\u0301.mp4"
  mixed = "\u00e9te\u0301.mp4"
  src = tmp_path / "src"
  src.mkdir()
  for seed, name in enumerate((composed, decomposed)):
    video_io.write_mp4(str(src / name), _clip(4, 16, 16, seed))
  caps = tmp_path / "c.csv"
  caps.write_text(f"path,caption\n{decomposed},exact\n{mixed},which one\n",
                  encoding="utf-8")
  builder = vf.build(str(src), str(tmp_path / "data"), str(caps), max_frames=None)
  ds = builder.as_data_source("train")
  got = {ds[i]["path"].decode(): ds[i]["caption"].decode() for i in range(len(ds))}
  assert got == {composed: "", decomposed: "exact"}
  assert builder.report["uncaptioned"] == [composed]
  assert [(s["path"], s["reason"], s["detail"]) for s in builder.report["skipped"]] == [
      (mixed, "missing_file", "listed in c.csv but no such file; it equals 2 files in "
       "Unicode NFC ('e\\u0301te\\u0301.mp4', '\\xe9t\\xe9.mp4'): ambiguous, spell the "
       "row as one of them exactly")]


def test_training_on_an_unbuilt_video_folder_names_the_folder(tmp_path, monkeypatch):
  # TFDS's own error for a registered builder with nothing built was "splits is empty".
  import ml_collections
  from videoldm_jax.data import inputs
  data = ml_collections.ConfigDict(dict(kind="video_folder", data_dir=str(tmp_path)))
  with pytest.raises(FileNotFoundError, match=r"no built video_folder dataset in it .*"
                     r"python -m data_pipelines.video_folder --source=VIDEOS"):
    inputs._tfds_source(data, tmp_path)
  # A dataset named but data.kind left at its default trained on the default data.
  config = ml_collections.ConfigDict(dict(seed=0, data=dict(
      kind="procedural", tfds_name="webvid_local", batch_size=2)))
  with pytest.raises(ValueError, match=r"data.tfds_name='webvid_local' is read only with "
                     r"data.kind='tfds', but data.kind='procedural'"):
    inputs.make_iterator(config, tmp_path, {})
  config.data.update(tfds_name="", cache_dir="/cache/x")
  with pytest.raises(ValueError, match=r"data.cache_dir='/cache/x' is read only with "
                     r"data.kind='latent_cache', but data.kind='procedural'"):
    inputs.make_iterator(config, tmp_path, {})
  # A global batch the processes do not divide.
  import jax
  config.data.cache_dir = ""
  monkeypatch.setattr(jax, "process_count", lambda *a: 3)
  with pytest.raises(ValueError, match="data.batch_size=2 is not divisible by the 3 "
                     "processes"):
    inputs.make_iterator(config, tmp_path, {})
  monkeypatch.undo()
  # Video-pipeline options that procedural clips and latent caches do not have (an
  # image_fraction trained without still images, silently).
  for kind in ("procedural", "latent_cache"):
    config = ml_collections.ConfigDict(dict(seed=0, data=dict(
        kind=kind, batch_size=2, image_fraction=0.5, hflip=True, frame_stride=1)))
    with pytest.raises(ValueError, match=r"\{'image_fraction': 0.5, 'hflip': True\} are "
                       f"options of the video pipelines .*data.kind='{kind}'"):
      inputs.make_iterator(config, tmp_path, {})
    config.data.update(image_fraction=0.0, hflip=False, frame_stride=2)
    with pytest.raises(ValueError, match=r"\{'frame_stride': 2\} are options of the "
                       f"video pipelines .*data.kind='{kind}'"):
      inputs.make_iterator(config, tmp_path, {})


def test_config_validation():
  with pytest.raises(ValueError, match="not both"):
    vf.VideoFolderConfig(frame_stride=2, target_fps=4)
  with pytest.raises(ValueError, match="min_frames=8 > max_frames=4"):
    vf.VideoFolderConfig(max_frames=4, min_frames=8)


def _write_with(path: str, frames: np.ndarray, codec: str, *, fps: int = 8, pts=None,
                rotation=None, audio_seconds: float = 0.0):
  """A clip with what `_write_pyav` cannot set: frame timestamps (gaps), a display
  rotation, or an AAC track of `audio_seconds` (longer than the video)."""
  with av.open(path, mode="w") as c:
    s = c.add_stream(codec, rate=fps)
    s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
    s.bit_rate = 4_000_000
    if rotation is not None:
      s.set_display_rotation(rotation)
    a = c.add_stream("aac", rate=16000) if audio_seconds else None
    for i, f in enumerate(frames):
      vf_ = av.VideoFrame.from_ndarray(f, format="rgb24")
      if pts is not None:
        vf_.pts = pts[i]
      c.mux(s.encode(vf_))
    c.mux(s.encode(None))
    for start in range(0, int(audio_seconds * 16000), 1024):
      af = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                      layout="mono")
      af.sample_rate, af.pts = 16000, start
      c.mux(a.encode(af))
    if a is not None:
      c.mux(a.encode(None))


def test_decode_clip_container_cases(tmp_path):
  clip = _clip(40, 24, 32, 6)
  # Portrait phone video: landscape frames plus a display rotation of +90 degrees
  # (counter-clockwise), shown upright as np.rot90(frames, 1) by players and by the
  # ffmpeg command line (compared pixel for pixel when this was written).
  rotated = str(tmp_path / "portrait.mp4")
  _write_with(rotated, clip[:6], "libx264", rotation=90)
  via_clip = sources.decode_clip(rotated, max_frames=None).frames
  np.testing.assert_array_equal(video_io.read_video(rotated), via_clip)
  assert via_clip.shape == (6, 32, 24, 3)
  right = np.rot90(clip[:6], 1, axes=(1, 2)).astype(int)
  wrong = np.rot90(clip[:6], 3, axes=(1, 2)).astype(int)
  assert np.abs(via_clip - right).mean() < 4 < 30 < np.abs(via_clip - wrong).mean()

  # Matroska declares no frame count: a cut file is caught by its stated duration.
  full = str(tmp_path / "full.mkv")
  _write_with(full, clip, "libx264")
  data = open(full, "rb").read()
  cut = str(tmp_path / "cut.mkv")
  with open(cut, "wb") as f:
    f.write(data[:len(data) * 4 // 10])
  with pytest.raises(sources.SkipError, match=r"truncated: container states the video ends "
                     r"at 5\.00 s but the last frame ends at"):
    sources.decode_clip(cut, max_frames=None)
  # ... but an audio track that outlasts the video (10 s vs 5 s) is not a cut.
  audio = str(tmp_path / "audio_longer.mkv")
  _write_with(audio, clip, "libx264", audio_seconds=10.0)
  assert sources.decode_clip(audio, max_frames=None).frames.shape[0] == 40
  # ... nor is a video of two frames beside 5 s of audio (FFmpeg gave the short track
  # the file's duration; its own DURATION tag says 0.25 s).
  short = str(tmp_path / "short_with_audio.mkv")
  _write_with(short, clip[:2], "libx264", audio_seconds=5.0)
  assert sources.decode_clip(short, max_frames=None).frames.shape[0] == 2

  # An AVI whose frame count includes the empty chunks FFmpeg writes for dropped frames
  # (timestamps 0..19, then every second one up to 38): complete, 30 frames, kept.
  gaps = str(tmp_path / "gaps.avi")
  _write_with(gaps, clip[:30], "mpeg4", pts=list(range(20)) + list(range(22, 42, 2)))
  assert sources.decode_clip(gaps, max_frames=None).frames.shape[0] == 30
  # The same file cut short still is truncated (count and duration both fall short).
  data = open(gaps, "rb").read()
  with open(str(tmp_path / "gaps_cut.avi"), "wb") as f:
    f.write(data[:len(data) * 2 // 3])
  with pytest.raises(sources.SkipError, match="truncated: container declares"):
    sources.decode_clip(str(tmp_path / "gaps_cut.avi"), max_frames=None)

  # A GIF states neither: cut off, it decoded without an error, its last frame garbage
  # below the cut. Its trailer byte tells.
  gif = tmp_path / "whole.gif"
  video_io.write_gif(str(gif), clip[:10], fps=4)
  assert sources.decode_clip(str(gif), max_frames=None).frames.shape[0] == 10
  (tmp_path / "cut.gif").write_bytes(gif.read_bytes()[:-50])  # mid last frame
  with pytest.raises(sources.SkipError, match="truncated: the GIF ends without its trailer"):
    sources.decode_clip(str(tmp_path / "cut.gif"), max_frames=None)


def test_target_fps_picks_frames_by_time_in_a_variable_rate_video(tmp_path):
  # A phone-style variable frame rate: 2 s at 30 fps, then 2 s at 10 fps. target_fps=10
  # kept every 2nd frame: 15 fps, then 5 fps, labelled 10.5. By timestamps: every 3rd
  # frame of the first part, every frame of the second.
  frames = np.zeros((80, 32, 40, 3), np.uint8)
  for i in range(80):  # frame i lights cell i of an 8 x 10 grid of 4 x 4 cells
    frames[i, 4 * (i // 10):4 * (i // 10) + 4, 4 * (i % 10):4 * (i % 10) + 4] = 255

  def kept(clip):
    cells = clip.frames.mean(-1).reshape(-1, 8, 4, 10, 4).mean((2, 4))
    return [int(c.argmax()) for c in cells]

  path = str(tmp_path / "vfr.mp4")
  _write_with(path, frames, "libx264", fps=30,
              pts=list(range(60)) + list(range(60, 120, 3)))
  clip = sources.decode_clip(path, max_frames=None, target_fps=10)
  # The frames follow a 30 fps grid (FFmpeg's guessed rate; its average is 80 frames
  # over 3.8 s): every 3rd frame, 0.1 s apart, of the first part, every frame after.
  assert kept(clip) == list(range(0, 60, 3)) + list(range(60, 80)), kept(clip)
  assert clip.fps == pytest.approx(10)
  # A constant rate keeps frames 0, s, 2s, ... as before.
  path = str(tmp_path / "cfr.mp4")
  _write_with(path, frames[:40], "libx264", fps=30)
  clip = sources.decode_clip(path, max_frames=None, target_fps=10)
  assert kept(clip) == list(range(0, 40, 3)) and clip.fps == pytest.approx(10)
  # The nearest whole stride: 30 / 11 = 2.7 keeps every 3rd frame (10 fps), not every
  # 2nd (15 fps, further from 11).
  clip = sources.decode_clip(path, max_frames=None, target_fps=11)
  assert kept(clip) == list(range(0, 40, 3)) and clip.fps == pytest.approx(10)
  # A constant rate with its last frame held for 1 s (an average rate of 20.8 fps):
  # still every 3rd frame, not slots of the average (0, 3, 6, 9, 12, 14, ...).
  path = str(tmp_path / "held.mp4")
  _write_timed(path, 64, hold_ms=1000)
  originals = np.stack([np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)
                        for i in range(64)]).astype(np.float32)
  clip = sources.decode_clip(path, max_frames=None, target_fps=10)
  ids = [int(np.abs(originals - f.astype(np.float32)).mean((1, 2, 3)).argmin())
         for f in clip.frames]
  assert ids == list(range(0, 64, 3)), ids
  # A 30 fps GIF: delays of whole centiseconds, 3, 3, 4, ... (an average rate of 33.3,
  # one over the shortest): every 3rd frame at 10 fps (was 0, 3, 5, 8, ... at 11.1).
  from PIL import Image
  gif = str(tmp_path / "30fps.gif")
  delays = [10 * (round((i + 1) * 100 / 30) - round(i * 100 / 30)) for i in range(60)]
  Image.fromarray(frames[0]).save(gif, save_all=True, append_images=[
      Image.fromarray(f) for f in frames[1:60]], duration=delays, loop=0)
  clip = sources.decode_clip(gif, max_frames=None, target_fps=10)
  assert kept(clip) == list(range(0, 60, 3)) and clip.fps == pytest.approx(10), kept(clip)


def _write_timed(path: str, n: int, *, hold_ms: int = 33, first_pts: int = 0,
                 options=None):
  """n frames 33 ms apart in a 1 ms time base, the last packet lasting `hold_ms` (a
  screen recording's held last frame), the first at `first_pts` ms."""
  from fractions import Fraction
  with av.open(path, "w", options=options or {}) as c:
    s = c.add_stream("libx264", rate=30)
    s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
    s.codec_context.time_base = Fraction(1, 1000)
    packets = []
    for i in range(n):
      f = av.VideoFrame.from_ndarray(np.random.default_rng(i).integers(
          0, 255, (32, 32, 3), dtype=np.uint8), format="rgb24")
      f.pts, f.time_base = first_pts + i * 33, Fraction(1, 1000)
      packets += s.encode(f)
    packets += s.encode(None)
    for p in packets:
      p.duration = hold_ms if p.pts == first_pts + (n - 1) * 33 else 33
      c.mux(p)


def test_truncation_check_on_held_frames_and_late_starts(tmp_path):
  # The stated duration includes how long the last frame is shown (1 s here): complete,
  # not cut, in a Matroska file (no frame count) and a fragmented mp4.
  for name, options in (("hold.mkv", None),
                        ("hold.mp4", {"movflags": "frag_keyframe+empty_moov"})):
    _write_timed(str(tmp_path / name), 60, hold_ms=1000, options=options)
    assert sources.decode_clip(str(tmp_path / name), max_frames=None).frames.shape[0] == 60
  # A stream that starts at 5 s, cut: caught by the frame count and by the duration
  # measured from the stream's start (frame times are absolute).
  for name, options in (("late.mp4", {"movflags": "faststart"}), ("late.mkv", None)):
    _write_timed(str(tmp_path / name), 80, first_pts=5000, options=options)
    assert sources.decode_clip(str(tmp_path / name), max_frames=None).frames.shape[0] == 80
    data = open(tmp_path / name, "rb").read()
    with open(tmp_path / f"cut_{name}", "wb") as f:
      f.write(data[:len(data) * 8 // 10])
    with pytest.raises(sources.SkipError, match="truncated"):
      sources.decode_clip(str(tmp_path / f"cut_{name}"), max_frames=None)


def test_a_cut_off_avi_is_truncated_not_kept_short(tmp_path):
  # Cut off, an AVI loses its index and FFmpeg states the duration of what is left, so
  # only the frame count fell short: the file was kept (18 of 40 frames, the last partly
  # garbage). UCF-101 is AVI. Its RIFF header's size tells a cut file. (Noise frames:
  # big packets, so the cuts below end the file cleanly between or inside them.)
  base = np.random.default_rng(0).integers(0, 256, (24, 32, 3), np.uint8)
  whole = str(tmp_path / "whole.avi")
  _write_pyav(whole, np.stack([np.roll(base, 3 * i, axis=1) for i in range(40)]), "mpeg4",
              "yuv420p")
  assert video_io.riff_bytes_missing(whole) == 0
  assert sources.decode_clip(whole, max_frames=None).frames.shape[0] == 40
  data = open(whole, "rb").read()
  cut = str(tmp_path / "cut.avi")
  for keep in (len(data) // 2, len(data) * 7 // 10):
    with open(cut, "wb") as f:
      f.write(data[:keep])
    assert video_io.riff_bytes_missing(cut) == len(data) - keep
    with pytest.raises(sources.SkipError, match=r"truncated: container declares 40 frames "
                       r"but only \d+ could be read: .*bytes short of its RIFF header"):
      sources.decode_clip(cut, max_frames=None)
    # videoldm-eval's reader too (a UCF-101 --real folder is AVI).
    with pytest.raises(ValueError, match=r"cut\.avi: an AVI cut off before its end \("
                       f"{len(data) - keep} bytes short"):
      video_io.read_video(cut)
  # Frames before the cut are intact: a clip that stops there is kept.
  assert sources.decode_clip(cut, max_frames=4).frames.shape[0] == 4
  assert video_io.read_video(cut, max_frames=4).shape[0] == 4
  assert video_io.read_video(whole).shape[0] == 40


def test_a_source_too_slow_for_target_fps_is_named(tmp_path, caplog):
  # A 2 fps video built with --target_fps=8 keeps every frame, at 2 fps: it was stored
  # beside the 8 fps clips without a word (its motion trains 4x faster).
  src = tmp_path / "src"
  src.mkdir()
  video_io.write_mp4(str(src / "slow.mp4"), _clip(8, 24, 32), fps=2)
  video_io.write_mp4(str(src / "fast.mp4"), _clip(16, 24, 32), fps=16)
  with caplog.at_level("WARNING"):
    builder = vf.build(str(src), str(tmp_path / "data"), target_fps=8, min_frames=2)
  assert "slow.mp4: kept at its own 2 fps, not near target_fps=8 (every frame stored)" \
      in caplog.text
  assert "fast.mp4" not in caplog.text
  fps = {ex["path"]: float(ex["fps"]) for ex in builder.as_data_source("train")}
  assert fps == {b"slow.mp4": 2.0, b"fast.mp4": 8.0}


def test_find_videos_links_and_undecodable_names(tmp_path):
  src = tmp_path / "src"
  (src / "own").mkdir(parents=True)
  video_io.write_mp4(str(src / "own" / "a.mp4"), _clip(4, 24, 32))
  outside = tmp_path / "src_more"  # (its path starts with the source folder's)
  outside.mkdir()
  video_io.write_mp4(str(outside / "b.mp4"), _clip(4, 24, 32))
  os.symlink(outside, src / "linked")        # followed: its videos are candidates
  os.symlink(src, src / "own" / "loop")      # a loop back to the root: walked once
  os.symlink(outside, src / "zz_same")       # a second link to the same folder: once
  os.symlink(src / "own", src / "current")   # into the tree: own/ keeps its name
  with open(os.path.join(os.fsencode(str(src)), b"caf\xe9.mp4"), "wb") as f:
    f.write(b"not valid utf-8 in the name")  # Latin-1 name from an old archive
  os.symlink(src / "own" / "a.mp4", src / "0_a_again.mp4")  # a file link: stored once
  videos, skips = sources.find_videos(str(src))
  assert videos == ["linked/b.mp4", "own/a.mp4"]
  assert [(s.path, s.reason) for s in skips] == [("caf\\xe9.mp4", "undecodable_name"),
                                                 ("0_a_again.mp4", "duplicate_file")]
  # A caption naming the link captions the video stored under its real path.
  rows = [("0_a_again.mp4", "a road"), ("linked/b.mp4", "a car")]
  assert sources.match_captions(videos, rows, str(src), "c.csv") == (
      {"own/a.mp4": "a road", "linked/b.mp4": "a car"}, [])


def test_video_extensions_match_in_any_case(tmp_path):
  # Cameras name their files DSC0001.MP4; the folder's videos are found by extension
  # whatever its case (the bytes are not read here: any content is a candidate).
  for name in ("DSC0001.MP4", "b.Mov", "c.mp4", "notes.TXT"):
    (tmp_path / name).write_bytes(b"x")
  assert sources.find_videos(str(tmp_path))[0] == ["DSC0001.MP4", "b.Mov", "c.mp4"]


def test_cli_max_frames_zero_keeps_every_frame():
  args = cli._parser().parse_args(["--source=s", "--data_dir=d", "--max_frames=0"])
  assert cli.decode_kwargs(args)["max_frames"] is None  # (0 was refused by the config)


def test_language_suffixed_duration_tag_is_the_tracks_end():
  # mkvmerge writes DURATION-eng per track. Without it a cut-off Matroska video beside a
  # longer audio track has no stated end of its own, and its truncation goes unseen.
  stream = types.SimpleNamespace(metadata={"DURATION-eng": "00:01:01.500000000"},
                                 time_base=None, duration=None)
  container = types.SimpleNamespace(duration=None, start_time=None, streams=[stream] * 2)
  assert sources._declared_span(container, stream) == (0.0, 61.5)
  stream.metadata = {"DURATION": "01:00:02.500000000"}  # hours too
  assert sources._declared_span(container, stream) == (0.0, 3602.5)


def test_truncation_margins_are_two_frames_or_five_percent():
  # A container's frame count or end time is often a frame or two off (edit lists, a
  # held last frame): only a larger shortfall is a cut.
  assert not sources._is_truncated(10, 8) and sources._is_truncated(10, 7)     # 2 frames
  assert not sources._is_truncated(100, 95) and sources._is_truncated(100, 94)  # 5%
  assert not sources._ends_early((0.0, 1.0), 0.8, 10.0)    # 2 / fps = 0.2 s
  assert sources._ends_early((0.0, 1.0), 0.7, 10.0)
  assert not sources._ends_early((0.0, 100.0), 95.0, 10.0)  # 5% of 100 s
  assert sources._ends_early((0.0, 100.0), 94.0, 10.0)


def test_caption_file_with_bytes_that_are_not_utf8(tmp_path):
  bad = tmp_path / "latin1.csv"
  bad.write_bytes(b"path,caption\na.mp4,fine\nb.mp4,caf\xe9 au lait\n")
  with pytest.raises(ValueError, match=r"latin1\.csv:3: not valid UTF-8 text"):
    sources.read_captions(str(bad), str(tmp_path))
  # A byte-order mark (Excel's "CSV UTF-8" writes one) is no part of the first column.
  bom = tmp_path / "excel.csv"
  bom.write_bytes("\ufeffpath,caption\na.mp4,x\n".encode("utf-8"))
  assert [row[1] for row in sources.read_captions(str(bom), str(tmp_path))[0]] == ["x"]
  bad_jsonl = tmp_path / "latin1.jsonl"
  bad_jsonl.write_bytes(b'{"path": "a.mp4", "caption": "caf\xe9"}\n')
  with pytest.raises(ValueError, match=r"latin1\.jsonl:1: not valid UTF-8 text"):
    sources.read_captions(str(bad_jsonl), str(tmp_path))


def test_resize_short_side_scales_down_only():
  # Stored clips are scaled so that their shorter side is resize_short_side, never up
  # (upscaling adds storage, not information); the other side rounds to the nearest.
  assert sources._target_size(24, 32, 64) == (24, 32)
  assert sources._target_size(48, 64, 24) == (24, 32)
  assert sources._target_size(101, 50, 25) == (50, 25)  # 50.5 -> 50 (round half even)
  assert sources._target_size(36, 52, 24) == (24, 35)  # 34.67 -> 35, not 34
  assert sources._target_size(52, 36, 24) == (35, 24)
  assert sources._target_size(90, 60, None) == (90, 60)


def test_an_unexpected_decoder_error_skips_that_file_only(tmp_path, monkeypatch):
  # PyAV / FFmpeg may raise anything on a hostile file: one such file is a decode_error
  # skip naming the exception, not the end of the build.
  from data_pipelines.video_folder import builder
  good = tmp_path / "good.mp4"
  video_io.write_mp4(str(good), _clip(4, 24, 32))
  real = sources.decode_clip

  def decode(path, **kw):
    if path.endswith("bad.mp4"):
      raise RuntimeError("codec exploded")
    return real(path, **kw)

  monkeypatch.setattr(sources, "decode_clip", decode)
  skips = []
  items = [("bad.mp4", str(tmp_path / "bad.mp4"), {}), ("good.mp4", str(good), {})]
  out = list(builder.decode_examples(items, skips, vf.VideoFolderConfig()))
  assert [key for key, _ in out] == ["good.mp4"] and out[0][1]["video"].shape[0] == 4
  assert [(k.path, k.reason, k.detail) for k in skips] == [
      ("bad.mp4", "decode_error", "RuntimeError: codec exploded")]
