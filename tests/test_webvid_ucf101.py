"""The `webvid_local` and `ucf101_local` TFDS builders on tiny fake trees: good rows /
listed files become examples with the right captions, ids and labels, frames equal
`read_video`, and missing or broken videos are skipped and reported by reason."""

import json
import os

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
av = pytest.importorskip("av")

from data_pipelines import ucf101, webvid  # noqa: E402
from data_pipelines.ucf101 import __main__ as ucf_cli  # noqa: E402
from data_pipelines.ucf101 import sources as ucf_sources  # noqa: E402
from data_pipelines.video_folder import sources  # noqa: E402
from data_pipelines.webvid import __main__ as webvid_cli  # noqa: E402
from videoldm_jax import video_io  # noqa: E402


def _clip(seed: int, t: int = 8, h: int = 24, w: int = 32) -> np.ndarray:
  """A smooth moving gradient: codecs keep it close, and clips differ by `seed`."""
  yy, xx = np.mgrid[0:h, 0:w]
  return np.stack([np.stack([(xx * 6 + 12 * i + 40 * seed) % 250, yy * 8,
                             np.full_like(xx, 30 * seed % 250)], -1)
                   for i in range(t)]).astype(np.uint8)


def _write_avi(path: str, frames: np.ndarray, fps: int = 25):
  """MPEG-4 Part 2 in AVI, like the UCF-101 files (write_mp4 only writes .mp4)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with av.open(path, mode="w") as c:
    s = c.add_stream("mpeg4", rate=fps)
    s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
    for f in frames:
      c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
    c.mux(s.encode(None))


def _report(builder) -> dict:
  with open(os.path.join(builder.data_dir, webvid.SKIPPED_REPORT)) as f:
    return json.load(f)


# ------------------------------------------------------------------------- WebVid

WEBVID_ROWS = [  # (videoid, page_dir, caption, what is on disk)
    (1066692580, "000001_000050", 'A dog runs, then "stops"', "good"),
    (1066692581, "000001_000050", "never downloaded", "missing"),
    (31353427, "000051_000100", "a broken download", "corrupt"),
    (31353428, "000051_000100", "Sunset over the sea", "good"),
]


@pytest.fixture(scope="module")
def webvid_tree(tmp_path_factory):
  """results CSV + videos/<page_dir>/<videoid>.mp4; returns (csv path, videos root)."""
  root = tmp_path_factory.mktemp("webvid")
  videos = root / "videos"
  csv_path = root / "results_2M_train.csv"
  lines = ["videoid,contentUrl,duration,page_dir,name"]
  for i, (vid, page, caption, kind) in enumerate(WEBVID_ROWS):
    lines.append(f'{vid},https://example.com/{vid}.mp4,PT00H00M08S,{page},'
                 f'"{caption.replace(chr(34), chr(34) * 2)}"')
    path = videos / page / f"{vid}.mp4"
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "good":
      video_io.write_mp4(str(path), _clip(i))
    elif kind == "corrupt":
      path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(600))
  csv_path.write_text("\n".join(lines) + "\n")
  return str(csv_path), str(videos)


@pytest.fixture(scope="module")
def webvid_built(webvid_tree, tmp_path_factory):
  csv_path, videos = webvid_tree
  data_dir = str(tmp_path_factory.mktemp("webvid_data"))
  return webvid.build(csv_path, videos, data_dir, max_frames=None), videos


def test_webvid_keeps_good_rows_and_reports_bad_ones(webvid_built):
  builder, videos = webvid_built
  ds = builder.as_data_source("train")
  assert len(ds) == 2
  got = {int(ds[i]["videoid"]): ds[i] for i in range(len(ds))}
  good = {vid: (page, cap) for vid, page, cap, kind in WEBVID_ROWS if kind == "good"}
  assert set(got) == set(good)
  for vid, (page, caption) in good.items():
    ex = got[vid]
    assert ex["caption"].decode() == caption
    assert ex["page_dir"].decode() == page
    assert ex["path"].decode() == f"{page}/{vid}.mp4"
    file = os.path.join(videos, page, f"{vid}.mp4")
    np.testing.assert_array_equal(ex["video"], video_io.read_video(file))
    assert ex["video"].shape == (8, 24, 32, 3) and ex["num_frames"] == 8
    assert ex["fps"] == pytest.approx(8.0)

  report = _report(builder)
  assert {s["path"]: s["reason"] for s in report["skipped"]} == {
      "000001_000050/1066692581.mp4": sources.MISSING_FILE,
      "000051_000100/31353427.mp4": sources.UNREADABLE}
  assert report["num_examples"] == 2 and report["num_rows"] == 4
  missing = [s for s in report["skipped"] if s["reason"] == sources.MISSING_FILE][0]
  assert "results_2M_train.csv line 3" in missing["detail"]
  assert builder.info.metadata["num_skipped"] == 2


def test_webvid_read_by_name_and_cli_subset(webvid_built, webvid_tree, tmp_path, capsys):
  builder, _ = webvid_built
  ds = tfds.data_source("webvid_local", split="train", data_dir=builder.data_dir_root)
  assert len(ds) == 2 and {int(ds[i]["videoid"]) for i in range(2)} == {1066692580, 31353428}
  # A trainer (data.kind='tfds', data.tfds_name) imports no builder module: TFDS reads
  # the built files by name alone.
  import subprocess
  import sys
  code = ("import sys, tensorflow_datasets as tfds; ds = tfds.data_source("
          f"'webvid_local', split='train', data_dir={str(builder.data_dir_root)!r}); "
          "assert not [m for m in sys.modules if m.startswith('data_pipelines')]; "
          "print(len(ds), sorted(int(ds[i]['videoid']) for i in range(len(ds))))")
  out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.stdout.strip() == "2 [31353428, 1066692580]", out.stderr[-2000:]

  csv_path, videos = webvid_tree
  argv = [f"--csv={csv_path}", f"--videos_root={videos}",
          f"--data_dir={tmp_path / 'data'}", "--max_rows=1", "--frame_stride=2"]
  assert webvid_cli.main(argv) == 0
  assert capsys.readouterr().out.strip().endswith(os.path.join("webvid_local", "1.0.0"))
  subset = webvid.WebVid(data_dir=str(tmp_path / "data"))
  ex = subset.as_data_source("train")
  assert len(ex) == 1 and ex[0]["videoid"] == WEBVID_ROWS[0][0]
  # --max_rows=1 read one row (the next, a missing file, was not reached).
  assert (_report(subset)["num_rows"], _report(subset)["num_skipped"]) == (1, 0)
  assert ex[0]["video"].shape == (4, 24, 32, 3)  # 8 frames, every 2nd
  # ... frames 0, 2, 4, 6 of the file (the mp4's own frames: same size, no resize)
  page = WEBVID_ROWS[0][1]
  whole = video_io.read_video(os.path.join(videos, page, f"{WEBVID_ROWS[0][0]}.mp4"))
  np.testing.assert_array_equal(ex[0]["video"], whole[::2])
  assert webvid_cli.main(argv) == 1
  assert "already built" in capsys.readouterr().err


def test_webvid_bad_inputs(webvid_tree, tmp_path):
  _, videos = webvid_tree
  wrong = tmp_path / "wrong.csv"
  wrong.write_text("id,url,caption\n1,x,y\n")
  with pytest.raises(ValueError, match=r"wrong\.csv: CSV header must have columns.*"
                     r"missing \['videoid', 'page_dir', 'name'\]"):
    webvid.build(str(wrong), videos, str(tmp_path / "d1"))

  # Malformed rows are skipped as bad_row naming line and column; with nothing else
  # usable the build fails with one error listing every row.
  rows = tmp_path / "rows.csv"
  rows.write_bytes(b"videoid,page_dir,name\nabc,000001_000050,x\n5,../../etc,y\n"
                   b"1066692581,000001_000050,z\n1066692580,000001_000050,caf\xe9\n"
                   b"99999999999999999999,000001_000050,w\n-5,000001_000050,v\n")
  with pytest.raises(webvid.NoUsableVideoError) as exc:
    webvid.build(str(rows), videos, str(tmp_path / "d2"))
  msg = str(exc.value)
  assert "webvid_local: no usable video" in msg and "none of the 6 row(s)" in msg
  # Ids past int64 (an OverflowError ended the build) or negative: bad rows as well.
  assert ("rows.csv:6: bad_row (rows.csv line 6: column 'videoid' out of range for "
          "int64: '99999999999999999999')") in msg
  assert "rows.csv:7: bad_row (rows.csv line 7: column 'videoid' out of range" in msg
  assert "rows.csv:2: bad_row (rows.csv line 2: column 'videoid' must be an integer" in msg
  assert "rows.csv:3: bad_row (rows.csv line 3: column 'page_dir'" in msg
  assert "000001_000050/1066692581.mp4: missing_file" in msg
  # A row with bytes that are not UTF-8 is one bad row, not a crash mid-build.
  assert "rows.csv:5: bad_row (rows.csv line 5: not valid UTF-8 text)" in msg
  assert not (tmp_path / "d2" / "webvid_local" / "1.0.0").exists()

  with pytest.raises(ValueError, match="WebVidConfig: max_rows must be >= 1"):
    webvid.WebVidConfig(max_rows=0)
  with pytest.raises(FileNotFoundError, match=r"/nowhere: WebVid videos root does not "
                     "exist"):
    webvid.build(str(rows), str(tmp_path / "nowhere"), str(tmp_path / "d3"))


def test_webvid_ids_with_other_leading_zeros_find_their_one_file(tmp_path):
  # A CSV saved back by a spreadsheet (or pandas) that read videoid as numbers lost the
  # zeros of 00123.mp4: every such row was a missing file, with that file right there.
  page = tmp_path / "videos" / "000001_000050"
  page.mkdir(parents=True)
  files = {"00123.mp4": 0, "456.mp4": 1, "0789.mp4": 2, "00789.mp4": 3}
  for name, seed in files.items():
    video_io.write_mp4(str(page / name), _clip(seed, t=4))
  csv_path = tmp_path / "r.csv"
  csv_path.write_text("videoid,page_dir,name\n123,000001_000050,lost zeros\n"
                      "00456,000001_000050,added zeros\n789,000001_000050,two files\n"
                      "999,000001_000050,none\n")
  builder = webvid.build(str(csv_path), str(tmp_path / "videos"), str(tmp_path / "data"),
                         max_frames=None)
  ds = builder.as_data_source("train")
  got = {ds[i]["path"].decode(): ds[i] for i in range(len(ds))}
  assert sorted(got) == ["000001_000050/00123.mp4", "000001_000050/456.mp4"]
  for name, videoid, caption in (("00123.mp4", 123, "lost zeros"),
                                 ("456.mp4", 456, "added zeros")):
    ex = got[f"000001_000050/{name}"]
    assert (int(ex["videoid"]), ex["caption"].decode()) == (videoid, caption)
    np.testing.assert_array_equal(ex["video"], video_io.read_video(str(page / name)))
  assert {s["path"]: s["detail"] for s in _report(builder)["skipped"]} == {
      "000001_000050/789.mp4": "listed in r.csv line 4 but no such file; 00789.mp4, "
                               "0789.mp4 spell videoid 789 with other leading zeros: "
                               "ambiguous",
      "000001_000050/999.mp4": "listed in r.csv line 5 but no such file"}


# ------------------------------------------------------------------------ UCF-101

CLASSES = ["ApplyEyeMakeup", "Basketball", "YoYo"]
# (list, entry as listed, file on disk or None if missing); "BasketBall" in the list
# vs "Basketball" on disk: the case mismatch of some official entries.
UCF_FILES = [
    ("train", "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi",
     "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi"),
    ("train", "Basketball/v_BasketBall_g08_c01.avi", "Basketball/v_Basketball_g08_c01.avi"),
    ("train", "YoYo/v_YoYo_g08_c01.avi", "YoYo/v_YoYo_g08_c01.avi"),
    ("test", "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi",
     "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi"),
    ("test", "Basketball/v_Basketball_g01_c01.avi", "Basketball/v_Basketball_g01_c01.avi"),
    ("test", "YoYo/v_YoYo_g01_c01.avi", None),
]


def _write_lists(splits_dir, files=UCF_FILES, number=1, train_labels=None):
  """classInd + train/test lists with CRLF line ends, as in the official zip."""
  os.makedirs(splits_dir, exist_ok=True)
  with open(os.path.join(splits_dir, "classInd.txt"), "w", newline="") as f:
    f.write("".join(f"{i + 1} {name}\r\n" for i, name in enumerate(CLASSES)))
  for split, name in (("train", "trainlist"), ("test", "testlist")):
    with open(os.path.join(splits_dir, f"{name}{number:02d}.txt"), "w", newline="") as f:
      for s, listed, _ in files:
        if s == split:
          label = ((train_labels or {}).get(listed)
                   or CLASSES.index(listed.split("/")[0]) + 1)
          f.write(f"{listed} {label}\r\n" if split == "train" else f"{listed}\r\n")


@pytest.fixture(scope="module")
def ucf_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("ucf")
  for i, (_, _, on_disk) in enumerate(UCF_FILES):
    if on_disk:
      _write_avi(str(root / "UCF-101" / on_disk), _clip(i))
  _write_lists(str(root / "ucfTrainTestlist"))
  return str(root)


@pytest.fixture(scope="module")
def ucf_built(ucf_root, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("ucf_data"))
  return ucf101.build(ucf_root, data_dir, split_number=1, max_frames=None)


def test_ucf101_splits_labels_frames(ucf_built, ucf_root):
  builder = ucf_built
  assert builder.info.features["label"].names == CLASSES
  for split in ("train", "test"):
    ds = builder.as_data_source(split)
    expected = {disk: listed for s, listed, disk in UCF_FILES if s == split and disk}
    got = {ds[i]["path"].decode(): ds[i] for i in range(len(ds))}
    assert set(got) == set(expected), split
    for disk, ex in got.items():
      cls = disk.split("/")[0]
      assert ex["label"] == CLASSES.index(cls)  # classInd index - 1
      assert ex["caption"].decode() == ucf_sources.class_caption(cls)
      np.testing.assert_array_equal(
          ex["video"], video_io.read_video(os.path.join(ucf_root, "UCF-101", disk)))
      assert ex["num_frames"] == 8 and ex["fps"] == pytest.approx(25.0)
  assert builder.as_data_source("train")[0]["video"].shape == (8, 24, 32, 3)

  report = _report(builder)
  assert report["skipped"] == [{
      "path": "YoYo/v_YoYo_g01_c01.avi", "reason": sources.MISSING_FILE,
      "detail": "listed in testlist01.txt line 3 but no such file", "split": "test"}]
  assert report["num_examples_by_split"] == {"train": 3, "test": 2}
  assert report["num_examples"] == 5 and report["split_number"] == 1


def test_ucf101_two_spellings_of_one_file_keep_the_first(ucf_root, tmp_path):
  """The class folder and the file are matched ignoring case: two list lines that name
  one file in different case passed the list's duplicate check (exact text) and gave
  TFDS one example key twice, which failed the whole build (a DuplicatedKeysError,
  shown as a missing-tensorflow error)."""
  splits = str(tmp_path / "lists")
  files = [("train", "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", None),
           ("train", "applyeyemakeup/v_ApplyEyeMakeup_g08_c01.avi", None),
           ("test", "Basketball/v_Basketball_g01_c01.avi", None)]
  _write_lists(splits, files, train_labels={files[1][1]: 1})
  builder = ucf101.build(None, str(tmp_path / "data"), videos_dir=os.path.join(
      ucf_root, "UCF-101"), splits_dir=splits, max_frames=None)
  assert len(builder.as_data_source("train")) == 1
  assert _report(builder)["skipped"] == [{
      "path": files[1][1], "reason": ucf_sources.DUPLICATE_ENTRY, "split": "train",
      "detail": "trainlist01.txt line 2 names the file of line 1 "
                "(ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi); first kept"}]


def test_ucf101_read_back_by_name(ucf_built):
  root = ucf_built.data_dir_root
  ds = tfds.data_source("ucf101_local/split_1", split="test", data_dir=root)
  assert len(ds) == 2
  # Without the lists the label names come back from the built dataset.
  assert ucf101.Ucf101(data_dir=root).info.features["label"].names == CLASSES


def test_class_caption_and_list_errors(ucf_root, tmp_path):
  assert [ucf101.class_caption(n) for n in
          ("ApplyEyeMakeup", "YoYo", "HandstandPushups", "PlayingTV")] == [
              "apply eye makeup", "yo yo", "handstand pushups", "playing tv"]
  splits = str(tmp_path / "lists")
  _write_lists(splits, train_labels={"YoYo/v_YoYo_g08_c01.avi": 2})
  with pytest.raises(ValueError, match=r"trainlist01\.txt:3: label 2 disagrees with "
                     r"class folder 'YoYo', which is 3 in .*classInd\.txt"):
    ucf101.build(None, str(tmp_path / "d1"), videos_dir=os.path.join(ucf_root, "UCF-101"),
                 splits_dir=splits)
  with open(os.path.join(splits, "classInd.txt"), "w") as f:
    f.write("1 ApplyEyeMakeup\n3 YoYo\n")
  with pytest.raises(ValueError, match=r"classInd\.txt:2: class index 3 out of order"):
    ucf101.read_class_index(os.path.join(splits, "classInd.txt"))
  # A list saved in a legacy encoding: a bare UnicodeDecodeError named neither file nor
  # line; the byte-order mark of a UTF-8 file is still accepted.
  with open(os.path.join(splits, "classInd.txt"), "wb") as f:
    f.write(b"\xef\xbb\xbf1 ApplyEyeMakeup\r\n2 Caf\xe9\r\n")
  with pytest.raises(ValueError, match=r"classInd\.txt:2: UCF-101 class index "
                     r"\(classInd\.txt\) is not valid UTF-8 text"):
    ucf101.read_class_index(os.path.join(splits, "classInd.txt"))
  with open(os.path.join(splits, "classInd.txt"), "wb") as f:
    f.write(b"\xef\xbb\xbf1 ApplyEyeMakeup\r\n\r\n2 YoYo\r\n")
  assert ucf101.read_class_index(os.path.join(splits, "classInd.txt")) == [
      "ApplyEyeMakeup", "YoYo"]
  with open(os.path.join(splits, "classInd.txt"), "wb") as f:  # old Mac line ends
    f.write(b"1 ApplyEyeMakeup\r2 YoYo\r")
  assert ucf101.read_class_index(os.path.join(splits, "classInd.txt")) == [
      "ApplyEyeMakeup", "YoYo"]
  # A TFDS config name and a split number that disagree (split 1 was built, silently).
  with pytest.raises(ValueError, match="Ucf101: config split_2 contradicts split_number=1"):
    ucf101.Ucf101(config="split_2", split_number=1)


def test_ucf101_empty_split_and_cli(ucf_root, tmp_path, capsys):
  # Split 2 here: a test list whose only file is missing -> one clear error.
  splits = os.path.join(ucf_root, "ucfTrainTestlist")
  _write_lists(splits, files=[f for f in UCF_FILES if f[0] == "train" or not f[2]],
               number=2)
  with pytest.raises(ucf101.NoUsableVideoError,
                     match=r"(?s)split 'test': none of the 1 video\(s\) listed in "
                           r".*testlist02\.txt.*YoYo/v_YoYo_g01_c01\.avi: missing_file"):
    ucf101.build(ucf_root, str(tmp_path / "d"), split_number=2)
  assert not (tmp_path / "d" / "ucf101_local" / "split_2" / "1.0.0").exists()

  argv = [f"--root={ucf_root}", f"--data_dir={tmp_path / 'cli'}", "--split_number=3"]
  assert ucf_cli.main(argv) == 1
  assert "trainlist03.txt: UCF-101 split list does not exist" in capsys.readouterr().err
  assert ucf_cli.main([f"--root={ucf_root}", f"--data_dir={tmp_path / 'cli'}",
                       "--max_frames=3", "--min_frames=2"]) == 0
  ds = ucf101.Ucf101(data_dir=str(tmp_path / "cli"), split_number=1).as_data_source("test")
  assert len(ds) == 2 and ds[0]["video"].shape[0] == 3


def test_webvid_repeated_videoid_keeps_its_first_row(webvid_tree, tmp_path):
  # WebVid's CSVs repeat some videoids; the dataset's videoid is unique: the first
  # row's caption wins, the repeat is a duplicate_caption skip naming both lines.
  from data_pipelines.webvid.builder import iter_rows
  csv_path, videos = webvid_tree
  lines = open(csv_path).read().splitlines()
  repeated = tmp_path / "repeated.csv"
  repeated.write_text("\n".join([lines[0], lines[1], lines[1].replace("then", "and")]) + "\n")
  skips = []
  rows = list(iter_rows(str(repeated), videos, skips))
  assert [r[2]["caption"] for r in rows] == ['A dog runs, then "stops"']
  assert [(s.reason, s.detail) for s in skips] == [(
      sources.DUPLICATE_CAPTION, "repeated.csv line 3 repeats videoid 1066692580 of line 2; "
      "first row kept")]


def test_webvid_row_with_more_fields_than_the_header_is_a_bad_row(webvid_tree, tmp_path):
  # An unquoted comma in a caption: the caption was cut there and trained on as
  # "A dog runs", the rest of the row dropped without a word.
  from data_pipelines.webvid.builder import iter_rows
  csv_path, videos = webvid_tree
  lines = open(csv_path).read().splitlines()
  unquoted = tmp_path / "unquoted.csv"
  unquoted.write_text("\n".join([lines[0], lines[1].replace('"A dog runs, then ""stops"""',
                                                            "A dog runs, then stops")]) + "\n")
  skips = []
  assert list(iter_rows(str(unquoted), videos, skips)) == []
  assert [(s.path, s.reason, s.detail) for s in skips] == [(
      "unquoted.csv:2", webvid.BAD_ROW, "unquoted.csv line 2: 1 field(s) more than the "
      "header; a caption holding commas must be in double quotes")]
