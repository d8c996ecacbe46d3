"""The Grain video pipeline: exact frames, determinism, exact resume, per-process shards,
resize/crop/flip, joint image/video examples, worker processes."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("grain")
tfds = pytest.importorskip("tensorflow_datasets")

from videoldm_jax.data.grain_pipeline import make_video_dataset, resize_and_crop  # noqa: E402
from videoldm_jax.data.procedural import make_clip  # noqa: E402

N_LIST, L_LIST, H_LIST, W_LIST = 12, 10, 20, 30


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """A TFDS data_dir holding the tiny procedural_driving dataset, built once."""
  from data_pipelines.procedural_driving import build
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  build("tiny", data_dir)
  return data_dir


@pytest.fixture(scope="module")
def tfds_train(tfds_dir):
  """The tiny procedural_driving train split (64 clips, 32x64x64)."""
  return tfds.builder("procedural_driving/tiny", data_dir=tfds_dir).as_data_source("train")


def _list_source(n=N_LIST, length=L_LIST, height=H_LIST, width=W_LIST):
  """Examples whose pixels say where they came from: channel 0 = frame number, channel 1
  = clip number, channel 2 = column (so flips are visible)."""
  out = []
  for i in range(n):
    v = np.zeros((length, height, width, 3), np.uint8)
    v[..., 0] = np.arange(length)[:, None, None]
    v[..., 1] = i
    v[..., 2] = np.arange(width)[None, None, :]
    out.append({"video": v, "caption": f"clip {i}", "label": i % 3})
  return out


def _take(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


KW = dict(num_frames=8, height=64, width=64, process_index=0, process_count=1)


def test_tfds_batches_match_make_clip(tfds_train):
  ds = make_video_dataset(tfds_train, batch_size=4, num_frames=32, height=64, width=64,
                          seed=0, process_index=0, process_count=1)
  batch = _take(ds, 1)[0]
  assert batch["video"].dtype == np.uint8 and batch["video"].shape == (4, 32, 64, 64, 3)
  for key in ("time_of_day", "crowdedness", "index"):
    assert batch[key].dtype == np.int64 and batch[key].shape == (4,)
  assert "labels" not in batch  # the dataset has no `label` field
  assert batch["image_only"].dtype == bool and batch["image_only"].shape == (4, 32)
  assert not batch["image_only"].any()
  assert batch["caption"].shape == (4,) and batch["frame_caption"].shape == (4, 32)
  for b in range(4):
    # 32 source frames, 32 requested: the clip is taken whole, unresized.
    video, labels, caption = make_clip(int(batch["index"][b]), 32, 64, 64, 0)
    np.testing.assert_array_equal(batch["video"][b], video)
    assert batch["time_of_day"][b] == labels["time_of_day"]
    assert batch["crowdedness"][b] == labels["crowdedness"]
    assert batch["caption"][b] == caption and (batch["frame_caption"][b] == caption).all()


def test_same_seed_same_batches_different_seed_different_order(tfds_train):
  kw = dict(KW, batch_size=4, crop="random", hflip=True, image_fraction=0.25)
  a = _take(make_video_dataset(tfds_train, seed=3, **kw), 3)
  b = _take(make_video_dataset(tfds_train, seed=3, **kw), 3)
  for x, y in zip(a, b):
    _assert_batches_equal(x, y)
  c = _take(make_video_dataset(tfds_train, seed=4, **kw), 3)
  order = lambda batches: np.concatenate([x["source_index"] for x in batches])
  assert not np.array_equal(order(a), order(c))


def test_epochs_cover_the_source_and_reshuffle(tfds_train):
  ds = make_video_dataset(tfds_train, seed=0, batch_size=8, num_epochs=2, **dict(KW, height=16,
                                                                                 width=16))
  order = np.concatenate([b["source_index"] for b in ds])
  assert order.shape == (128,)
  first, second = order[:64], order[64:]
  assert sorted(first) == list(range(64)) and sorted(second) == list(range(64))
  assert not np.array_equal(first, second)
  unshuffled = make_video_dataset(tfds_train, seed=0, batch_size=8, num_epochs=1,
                                  shuffle=False, **dict(KW, height=16, width=16))
  assert np.concatenate([b["source_index"] for b in unshuffled]).tolist() == list(range(64))


def test_resume_mid_epoch_continues_exactly(tfds_train):
  kw = dict(KW, batch_size=4, crop="random", hflip=True, image_fraction=0.3, seed=7,
            frame_stride=2)
  it = iter(make_video_dataset(tfds_train, **kw))
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # the JSON round trip a checkpoint does
  expected = [next(it) for _ in range(3)]
  resumed = iter(make_video_dataset(tfds_train, **kw))
  resumed.set_state(state)
  for want in expected:
    _assert_batches_equal(next(resumed), want)


def test_two_processes_get_disjoint_shares_of_the_epoch(tfds_train):
  shares = []
  for p in range(2):
    ds = make_video_dataset(tfds_train, seed=1, batch_size=4, num_epochs=1, process_index=p,
                            process_count=2, num_frames=4, height=16, width=16)
    batches = list(ds)
    assert len(batches) == 8  # 64 / 2 processes / 4 per batch
    shares.append(np.concatenate([b["source_index"] for b in batches]))
  assert not set(shares[0]) & set(shares[1])
  assert sorted(np.concatenate(shares)) == list(range(64))
  # Together the two hosts read exactly what one host with the global batch would.
  single = np.concatenate([b["source_index"] for b in make_video_dataset(
      tfds_train, seed=1, batch_size=8, num_epochs=1, process_index=0, process_count=1,
      num_frames=4, height=16, width=16)])
  # In process order the blocks are the global batch, element for element.
  np.testing.assert_array_equal(single[:8], np.concatenate([shares[0][:4], shares[1][:4]]))
  np.testing.assert_array_equal(single[8:16], np.concatenate([shares[0][4:8],
                                                              shares[1][4:8]]))


def test_uneven_source_gives_every_process_the_same_count():
  src = _list_source(n=9)
  counts = []
  for p in range(2):
    ds = make_video_dataset(src, seed=0, batch_size=1, num_epochs=1, process_index=p,
                            process_count=2, num_frames=2, height=H_LIST, width=W_LIST)
    counts.append(len(list(ds)))
  assert counts == [4, 4]
  # A last round that is not a whole batch per process (12 clips, 2 processes of 4,
  # kept): the shares stay disjoint and cover the epoch.
  shares = [np.concatenate([b["source_index"] for b in make_video_dataset(
      _list_source(n=12), seed=0, batch_size=4, num_epochs=1, process_index=p,
      process_count=2, num_frames=2, height=H_LIST, width=W_LIST, drop_remainder=False)])
            for p in range(2)]
  assert not set(shares[0]) & set(shares[1])
  assert sorted(np.concatenate(shares).tolist()) == list(range(12))


def test_the_last_partial_batch_is_dropped_unless_asked_for():
  # 10 clips in batches of 4: 8 clips per epoch by default, all 10 with the remainder.
  kw = dict(seed=0, batch_size=4, num_frames=2, height=8, width=8, num_epochs=1,
            process_index=0, process_count=1)
  sizes = lambda **more: [len(b["source_index"]) for b in make_video_dataset(
      _list_source(n=10), **kw, **more)]
  assert sizes() == [4, 4] and sizes(drop_remainder=False) == [4, 4, 2]
  # The same batches with worker processes (they batch before the iterator).
  assert sizes(drop_remainder=False, worker_count=1) == [4, 4, 2]


def test_too_few_clips_for_one_batch_is_named_not_an_empty_iterator():
  # 3 clips, 1 epoch, batches of 4: the iterator ended at once, without an error.
  kw = dict(seed=0, batch_size=4, num_frames=2, height=8, width=8, num_epochs=1,
            process_index=0, process_count=1)
  with pytest.raises(ValueError, match=r"the source has 3 clips; 1 epoch\(s\) of them give "
                     r"each of the 1 processes 3, fewer than one batch of 4"):
    make_video_dataset(_list_source(n=3), **kw)
  # 5 clips, 2 epochs, 2 processes: 5 each, under a batch of 6 per process.
  with pytest.raises(ValueError, match=r"5 clips; 2 epoch\(s\) .* the 2 processes 5, "):
    make_video_dataset(_list_source(n=5), **{**kw, "num_epochs": 2, "process_count": 2,
                                             "batch_size": 6})
  # Enough epochs, the remainder kept, or endless repeats: batches as before.
  assert [len(b["source_index"]) for b in make_video_dataset(
      _list_source(n=3), **{**kw, "num_epochs": 3})] == [4, 4]
  assert [len(b["source_index"]) for b in make_video_dataset(
      _list_source(n=3), **kw, drop_remainder=False)] == [3]
  assert len(_take(make_video_dataset(_list_source(n=3), **{**kw, "num_epochs": None}),
                   1)[0]["source_index"]) == 4


def test_state_of_a_two_process_run_resumes_it():
  # The state records the global batch (2 processes x 2): a run resumed with the same
  # processes continues where it stopped.
  from videoldm_jax.data.inputs import ShareIterator
  src = _list_source()

  def share(pi):
    return ShareIterator(iter(make_video_dataset(src, seed=0, batch_size=2, num_frames=2,
                                                 height=8, width=8, process_index=pi,
                                                 process_count=2)), 2, 2)
  for pi in range(2):
    run = share(pi)
    next(run)
    state = json.loads(json.dumps(run.get_state()))
    assert state["global_batch"] == 4
    resumed = share(pi)
    resumed.set_state(state)
    _assert_batches_equal(next(resumed), next(run))


def test_trainer_reads_its_process_share_of_a_video_dataset(tfds_dir, tmp_path, monkeypatch):
  # make_iterator gives each of 2 processes its half of the global batch (data.batch_size
  # is global): together the batch one process reads alone.
  import importlib

  import jax

  from videoldm_jax import distributed
  from videoldm_jax.data import inputs
  config = importlib.import_module("configs.keyframe_tiny").get_config()
  config.data.update(kind="tfds", tfds_name="procedural_driving/tiny", data_dir=tfds_dir,
                     batch_size=4, num_frames=2, height=16, width=16)
  whole = next(inputs.make_iterator(config, tmp_path, {}))["source_index"]
  monkeypatch.setattr(jax, "process_count", lambda *a: 2)
  monkeypatch.setattr(distributed, "wait_for_all", lambda *a: None)
  halves = []
  for pi in range(2):
    monkeypatch.setattr(jax, "process_index", lambda *a, _pi=pi: _pi)
    it = inputs.make_iterator(config, tmp_path, {})
    halves.append(next(it)["source_index"])
    assert it.get_state()["global_batch"] == 4
  np.testing.assert_array_equal(np.concatenate(halves), whole)
  # Read alone (statistics one process computes): the whole batch, without the run's
  # Grain worker processes, at any process count.
  config.data.worker_count = 2
  alone = inputs.make_iterator(config, tmp_path, {}, alone=True)
  assert alone.get_state()["worker_count"] == 0
  np.testing.assert_array_equal(next(alone)["source_index"], whole)


def test_default_process_index_comes_from_jax(monkeypatch):
  ds = make_video_dataset(_list_source(), seed=0, batch_size=2, num_frames=2, height=H_LIST,
                          width=W_LIST)
  assert _take(ds, 1)[0]["video"].shape == (2, 2, H_LIST, W_LIST, 3)
  # As process 1 of 2 (what JAX says), the share is that of process_index=1 given.
  import jax
  kw = dict(seed=0, batch_size=2, num_frames=2, height=H_LIST, width=W_LIST, num_epochs=1)
  given = [b["source_index"] for b in make_video_dataset(
      _list_source(), process_index=1, process_count=2, **kw)]
  monkeypatch.setattr(jax, "process_index", lambda *a: 1)
  monkeypatch.setattr(jax, "process_count", lambda *a: 2)
  got = [b["source_index"] for b in make_video_dataset(_list_source(), **kw)]
  assert len(got) == len(given) and all(np.array_equal(a, b) for a, b in zip(got, given))


@pytest.mark.parametrize("stride,T", [(1, 4), (3, 3)])
def test_clip_sampling_takes_strided_consecutive_frames(stride, T):
  ds = make_video_dataset(_list_source(), seed=0, batch_size=6, num_frames=T,
                          frame_stride=stride, height=H_LIST, width=W_LIST, process_index=0,
                          process_count=1)
  starts = set()
  for batch in _take(ds, 4):
    frame_ids = batch["video"][:, :, 0, 0, 0].astype(int)  # (B, T)
    np.testing.assert_array_equal(np.diff(frame_ids, axis=1), stride)
    np.testing.assert_array_equal(batch["video"][:, :, 0, 0, 1],
                                  np.broadcast_to(batch["source_index"][:, None], (6, T)))
    np.testing.assert_array_equal(batch["label"], batch["source_index"] % 3)
    # The label field is also the class labels a class-conditional UNet reads.
    assert batch["labels"].dtype == np.int32
    np.testing.assert_array_equal(batch["labels"], batch["source_index"] % 3)
    starts.update(frame_ids[:, 0].tolist())
  assert len(starts) > 1  # the start is random, not always 0
  # ... over every valid start (24 draws of at most 7), the last one included
  assert max(starts) == L_LIST - 1 - (T - 1) * stride and min(starts) == 0


@pytest.mark.parametrize("crop", ["center", "random"])
@pytest.mark.parametrize("height,width", [(16, 16), (12, 24), (40, 40)])
def test_resize_and_crop_shapes(crop, height, width):
  ds = make_video_dataset(_list_source(), seed=0, batch_size=3, num_frames=2, crop=crop,
                          height=height, width=width, process_index=0, process_count=1)
  batch = _take(ds, 1)[0]
  assert batch["video"].shape == (3, 2, height, width, 3) and batch["video"].dtype == np.uint8


def test_resize_keeps_aspect_and_center_crops():
  rng = np.random.default_rng(0)
  frames = rng.integers(0, 256, (2, 40, 80, 3), dtype=np.uint8)
  # A scale that rounds a side just under its target (11 * 20 / 11 -> 30 columns of
  # 29.99..., say) is never a pixel short.
  assert resize_and_crop(frames[:1, :11, :11], 20, 30, "center").shape == (1, 20, 30, 3)
  out = resize_and_crop(frames, 20, 20, "center")
  # 40x80 -> shorter side to 20 -> 20x40 (aspect kept), then the middle 20 columns.
  ref = np.asarray(Image.fromarray(frames[1]).resize((40, 20), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(out[1], ref[:, 10:30])
  # Random crops of one clip share one offset; same-size input is returned untouched.
  crops = resize_and_crop(frames, 40, 40, "random", np.random.default_rng(1))
  x0 = int(np.argmax([(frames[0, :, x:x + 40] == crops[0]).all() for x in range(41)]))
  np.testing.assert_array_equal(crops, frames[:, :, x0:x0 + 40])
  # ... drawn from the generator, uniformly over every offset: both edges are reached.
  offsets = set()
  for seed in range(64):
    crops = resize_and_crop(frames, 40, 40, "random", np.random.default_rng(seed))
    offsets.add(int(np.argmax([(frames[0, :, x:x + 40] == crops[0]).all()
                               for x in range(41)])))
  assert len(offsets) > 20 and {0, 40} <= offsets, offsets
  np.testing.assert_array_equal(resize_and_crop(frames, 40, 80, "center"), frames)
  # Tall frames: the middle rows, and random offsets along the height.
  tall = frames.transpose(0, 2, 1, 3)  # (2, 80, 40, 3)
  ref = np.asarray(Image.fromarray(tall[1]).resize((20, 40), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(resize_and_crop(tall, 20, 20, "center")[1], ref[10:30])
  rows = {int(np.argmax([(tall[0, y:y + 40] == resize_and_crop(
      tall, 40, 40, "random", np.random.default_rng(seed))[0]).all() for y in range(41)]))
      for seed in range(64)}
  assert len(rows) > 20 and {0, 40} <= rows, rows


def test_random_crops_and_flips_take_one_draw_per_clip():
  # A clip is one camera: every frame gets its clip's crop offset and flip; about half
  # the clips are flipped; image examples (frames of several clips) are flipped too.
  kw = dict(seed=0, batch_size=16, num_frames=4, height=10, width=10, process_index=0,
            process_count=1, crop="random", hflip=True)
  videos = np.concatenate([b["video"] for b in _take(make_video_dataset(_list_source(), **kw),
                                                     8)])
  columns = videos[..., 2].astype(int)  # (128, T, 10, 10): the source column of each pixel
  assert (columns == columns[:, :1]).all()  # one offset and flip for all of a clip's frames
  flipped = columns[:, 0, 0, 0] > columns[:, 0, 0, -1]
  assert 0.35 < flipped.mean() < 0.65, flipped.mean()
  assert len(set(np.minimum(columns[:, 0, 0, 0], columns[:, 0, 0, -1]).tolist())) > 3
  images = make_video_dataset(_list_source(), **{**kw, "num_frames": 1}, image_fraction=1.0)
  image_columns = np.concatenate([b["video"] for b in _take(images, 8)])[..., 2].astype(int)
  assert (image_columns[:, 0, 0, 0] > image_columns[:, 0, 0, -1]).any()
  # ... and randomly cropped (not centred): many offsets.
  assert len(set(np.minimum(image_columns[:, 0, 0, 0], image_columns[:, 0, 0, -1]).tolist())) > 3
  # The image / video coin is drawn whatever image_fraction: the video examples of a
  # stream with image examples are those of a stream without, crops and flips included.
  videos, mixed = (np.concatenate([b["video"] for b in _take(make_video_dataset(
      _list_source(), **kw, image_fraction=f), 4)]) for f in (0.0, 0.5))
  flags = np.concatenate([b["image_only"][:, 0] for b in _take(make_video_dataset(
      _list_source(), **kw, image_fraction=0.5), 4)])
  assert 0 < flags.sum() < len(flags)
  np.testing.assert_array_equal(mixed[~flags], videos[~flags])


def test_hflip_mirrors_some_examples_and_nothing_else():
  kw = dict(seed=0, batch_size=16, num_frames=3, height=H_LIST, width=W_LIST, process_index=0,
            process_count=1)
  plain = _take(make_video_dataset(_list_source(), hflip=False, **kw), 1)[0]
  flipped = _take(make_video_dataset(_list_source(), hflip=True, **kw), 1)[0]
  mirrored = [np.array_equal(f, p[:, :, ::-1]) for f, p in zip(flipped["video"], plain["video"])]
  same = [np.array_equal(f, p) for f, p in zip(flipped["video"], plain["video"])]
  assert all(m or s for m, s in zip(mirrored, same))
  assert any(mirrored) and any(same)


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_image_only_flags_follow_image_fraction(fraction):
  ds = make_video_dataset(_list_source(), seed=0, batch_size=8, num_frames=4, height=H_LIST,
                          width=W_LIST, image_fraction=fraction, process_index=0,
                          process_count=1)
  batches = _take(ds, 8)
  flags = np.concatenate([b["image_only"] for b in batches])  # (64, T)
  assert (flags == flags[:, :1]).all()  # one flag per example, repeated over its frames
  share = flags[:, 0].mean()
  if fraction in (0.0, 1.0):
    assert share == fraction
  else:
    assert 0.3 < share < 0.7
  for b in batches:
    for video, image, index, caps, labels in zip(b["video"], b["image_only"][:, 0],
                                                 b["source_index"], b["frame_caption"],
                                                 b["frame_labels"]):
      clips = video[:, 0, 0, 1].astype(int)  # which clip each frame came from
      assert clips[0] == index
      # Each frame's own clip's caption and label (the source's label is i % 3).
      assert caps.tolist() == [f"clip {c}" for c in clips]
      # The example's own caption and label: its frame 0's clip.
      j = list(b["source_index"]).index(index)
      assert b["caption"][j] == f"clip {index}" and b["labels"][j] == index % 3
      assert labels.tolist() == [c % 3 for c in clips] and labels.dtype == np.int32
      if image:
        assert len(set(clips.tolist())) == 4  # frames from 4 different clips
      else:
        assert (clips == index).all()
  if fraction:
    # An image example's frame is any frame of its clip (channel 0: the frame number),
    # not always the first.
    frames = np.concatenate([b["video"][b["image_only"][:, 0]][:, :, 0, 0, 0]
                             for b in batches])
    assert len(set(frames.ravel().tolist())) > 5, frames


def test_image_examples_draw_any_frame_of_the_clip():
  # Channel 0 holds the frame number: the first and the last frame both come up.
  ds = make_video_dataset(_list_source(), seed=0, batch_size=16, num_frames=1, height=8,
                          width=8, image_fraction=1.0, process_index=0, process_count=1)
  frames = {int(x) for b in _take(ds, 4) for x in b["video"][:, 0, 0, 0, 0]}
  assert {0, L_LIST - 1} <= frames, frames


def test_image_examples_take_frames_of_clips_of_any_length():
  # An image example's frames come from several clips, each of its own length: a frame
  # index drawn from the first clip's length fell outside a shorter one, and never
  # reached the end of a longer one.
  source = _list_source(n=2, length=40) + _list_source(n=2, length=2)
  ds = make_video_dataset(source, seed=0, batch_size=4, num_frames=3, height=8, width=8,
                          process_index=0, process_count=1, image_fraction=1.0)
  frames = np.concatenate([b["video"][..., 0] for b in _take(ds, 5)])  # source frame no.
  assert frames.max() > 2


def test_text_and_label_fields_in_their_other_spellings():
  # TFDS hands text over as UTF-8 bytes (or 0-d arrays of them) and labels as 0-d
  # arrays of any integer type.
  src = _list_source(n=2)
  examples = [dict(src[0], caption="café sur la route".encode(), label=np.array(2, np.uint8)),
              dict(src[1], caption=np.array(b"a road"), label=np.array(1, np.uint8))]
  batch = _take(make_video_dataset(examples, seed=0, batch_size=2, num_frames=2, height=8,
                                   width=8, process_index=0, process_count=1,
                                   shuffle=False), 1)[0]
  assert list(batch["caption"]) == ["café sur la route", "a road"]
  assert batch["labels"].dtype == np.int32 and list(batch["labels"]) == [2, 1]


def test_short_clips_are_replaced_deterministically_with_a_warning(caplog):
  """A clip shorter than num_frames at frame_stride needs is replaced by another, drawn
  from the example's own random stream: the same on every run, none too short."""
  src = _list_source()
  for i in (1, 4, 6):  # 3 of 8 clips keep only 3 of their 10 frames
    src[i] = dict(src[i], video=src[i]["video"][:3], path=f"/data/short{i}.mp4")
  kw = dict(seed=0, batch_size=4, num_frames=4, height=H_LIST, width=W_LIST,
            process_index=0, process_count=1, num_epochs=2, shuffle=True)
  with caplog.at_level("WARNING"):
    first = list(make_video_dataset(src, **kw))
  warned = [r.getMessage() for r in caplog.records if "replaced by another clip" in r.getMessage()]
  again = list(make_video_dataset(src, **kw))
  used = np.concatenate([b["source_index"] for b in first])
  assert len(used) == 2 * N_LIST and not set(used.tolist()) & {1, 4, 6}
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["video"], b["video"])
  for b in first:  # frames, clip number and label all come from the replacement
    np.testing.assert_array_equal(b["video"][:, 0, 0, 0, 1], b["source_index"])
    np.testing.assert_array_equal(b["labels"], b["source_index"] % 3)
  # Each short clip is reported once per process (not at every epoch).
  assert sorted(m.split(" has ")[0] for m in warned) == [
      f"grain_pipeline: source example {i} (/data/short{i}.mp4)" for i in (1, 4, 6)]
  assert "--min_frames=4" in warned[0]
  # 7 of 8 clips short: 16 random draws all fail for 12% of the examples ((7/8)^16);
  # they gave up with an error mid-run. The clips are then tried in turn.
  mostly_short = [dict(c, video=c["video"][:3]) if i != 5 else c for i, c in enumerate(src)]
  runs = [list(make_video_dataset(mostly_short, **kw)) for _ in range(2)]
  used = np.concatenate([b["source_index"] for b in runs[0]])
  assert len(used) == 2 * N_LIST and set(used.tolist()) == {5}
  for a, b in zip(*runs):
    np.testing.assert_array_equal(a["video"], b["video"])
  # A replacement is drawn, not always the same neighbour (which would see its clip
  # twice as often): unshuffled, clip 1's place takes several clips over the epochs.
  in_order = make_video_dataset(src, **{**kw, "shuffle": False, "num_epochs": 10,
                                         "batch_size": 1})
  used = np.concatenate([b["source_index"] for b in in_order]).reshape(10, N_LIST)
  assert len(set(used[:, 1].tolist())) >= 3, used[:, 1]


def test_clear_errors():
  src = _list_source()
  with pytest.raises(ValueError, match="crop must be one of"):
    make_video_dataset(src, seed=0, batch_size=1, num_frames=2, height=8, width=8,
                       crop="middle", process_index=0, process_count=1)
  with pytest.raises(ValueError, match="process_index < process_count"):
    make_video_dataset(src, seed=0, batch_size=1, num_frames=2, height=8, width=8,
                       process_index=2, process_count=2)
  # (stride 0 failed only when read, "slice step cannot be zero"; 1.5 was taken)
  # (2.9 frames were truncated to 2; seed -1 failed inside Grain, naming no argument)
  for bad, said in ((dict(frame_stride=0), "frame_stride must be an integer >= 1, got 0"),
                    (dict(num_frames=2.9), "num_frames must be an integer >= 1, got 2.9"),
                    (dict(seed=-1), r"seed must be an integer in \[0, 2\^32\), got -1"),
                    (dict(image_fraction=1.5), r"image_fraction must be in \[0, 1\], got 1.5")):
    with pytest.raises(ValueError, match=f"make_video_dataset: {said}"):
      make_video_dataset(src, **{**dict(seed=0, batch_size=1, num_frames=2, height=8,
                                        width=8, process_index=0, process_count=1), **bad})
  too_long = make_video_dataset(src, seed=0, batch_size=1, num_frames=L_LIST + 1, height=8,
                                width=8, process_index=0, process_count=1)
  with pytest.raises(ValueError, match=r"source example \d+ has 10 frames, fewer than "
                     r"num_frames=11 .* and so has every other clip of the source \(\d+\)"):
    _take(too_long, 1)
  no_frames = [{"video": np.zeros((0, 8, 8, 3), np.uint8), "path": b"/data/empty.mp4"}]
  with pytest.raises(ValueError, match=r"source example 0 \(/data/empty.mp4\): 'video' "
                     "has no frames"):
    _take(make_video_dataset(no_frames, seed=0, batch_size=1, num_frames=1, height=8,
                             width=8, process_index=0, process_count=1, image_fraction=1.0), 1)
  bad = make_video_dataset([{"frames": np.zeros((4, 8, 8, 3), np.uint8)}], seed=0,
                           batch_size=1, num_frames=2, height=8, width=8, process_index=0,
                           process_count=1)
  with pytest.raises(KeyError, match="source example 0: expected a dict with a 'video'"):
    _take(bad, 1)
  # A label past int32 (the class embedding's index type) is named, not wrapped.
  huge = [dict(src[0], label=np.int64(2 ** 31))]
  with pytest.raises(ValueError, match=r"source example 0: label field 'label' = "
                     "2147483648 does not fit int32"):
    _take(make_video_dataset(huge, seed=0, batch_size=1, num_frames=2, height=8, width=8,
                             process_index=0, process_count=1), 1)
  # A label that is a number but not an integer is refused, not dropped (a class-
  # conditional UNet would then say the dataset has no label field) nor truncated.
  for value, said in ((True, "bool True"), (np.bool_(False), "bool .*False")):
    with pytest.raises(ValueError, match=rf"source example 0: label field 'label' must be "
                       rf"one integer .* got {said}"):
      _take(make_video_dataset([dict(src[0], label=value)], seed=0, batch_size=1,
                               num_frames=2, height=8, width=8, process_index=0,
                               process_count=1), 1)
  with pytest.raises(ValueError, match="make_video_dataset: the source is empty"):
    make_video_dataset([], seed=0, batch_size=1, num_frames=2, height=8, width=8,
                       process_index=0, process_count=1)
  floats = [dict(src[0], label=1.5)]
  with pytest.raises(ValueError, match=r"source example 0: label field 'label' must be "
                     "one integer .* got float 1.5"):
    _take(make_video_dataset(floats, seed=0, batch_size=1, num_frames=2, height=8, width=8,
                             process_index=0, process_count=1), 1)
  # Text under that name is other data (a text model's dataset): not batched as labels.
  named = make_video_dataset([dict(src[0], label="a cat")], seed=0, batch_size=1,
                             num_frames=2, height=8, width=8, process_index=0,
                             process_count=1)
  assert "labels" not in _take(named, 1)[0]
  # Integer fields that only some examples have are named (Grain's batching, which
  # stacks them, would fail naming neither example nor field).
  mixed = [dict(src[0], crowd=2), {k: v for k, v in src[1].items() if k != "label"}]
  for order, missing, extra in (([0, 1], "'crowd', 'label'", ""), ([1, 0], "",
                                                                   "'crowd', 'label'")):
    ds = make_video_dataset([mixed[i] for i in order], seed=0, batch_size=2, num_frames=2,
                            height=8, width=8, process_index=0, process_count=1,
                            shuffle=False)
    with pytest.raises(ValueError, match=rf"source example 1: integer fields .* differ from "
                       rf"example 0's .* \(missing here: \[{missing}\], extra: \[{extra}\]\)"):
      _take(ds, 1)


def test_worker_processes_cover_the_epoch_and_resume(tfds_train):
  kw = dict(seed=2, batch_size=4, num_epochs=1, num_frames=4, height=16, width=16,
            process_index=0, process_count=1, worker_count=2)
  it = iter(make_video_dataset(tfds_train, **kw))
  head = [next(it)["source_index"].copy() for _ in range(3)]
  state = json.loads(json.dumps(it.get_state()))
  tail = [b["source_index"].copy() for b in it]
  it.close()
  assert sorted(np.concatenate(head + tail)) == list(range(64))
  resumed = iter(make_video_dataset(tfds_train, **kw))
  resumed.set_state(state)
  again = [b["source_index"].copy() for b in resumed]
  resumed.close()
  assert len(again) == len(tail)
  for a, b in zip(again, tail):
    np.testing.assert_array_equal(a, b)
  # The same batches as without workers, and as two processes' halves side by side:
  # each worker batched every W-th example, so batches depended on the worker and
  # process counts (other clips for some counts).
  plain = [b["source_index"].copy() for b in make_video_dataset(
      tfds_train, **dict(kw, worker_count=0))]
  np.testing.assert_array_equal(np.concatenate(head + tail), np.concatenate(plain))
  halves = []
  for pi in range(2):
    it = iter(make_video_dataset(tfds_train, **dict(kw, batch_size=2, process_index=pi,
                                                    process_count=2, worker_count=3)))
    halves.append([next(it)["source_index"].copy() for _ in range(3)])
    it.close()
  np.testing.assert_array_equal(np.concatenate([np.concatenate(h) for h in zip(*halves)]),
                                np.concatenate(head))


def test_trainer_reads_any_tfds_dataset_by_name(tfds_dir, tmp_path):
  """`--config.data.kind=tfds --config.data.tfds_name=NAME` (README) in every config
  with an input: the fields exist (an override of a missing one fails in absl), and
  the trainer's iterator reads the named dataset."""
  import importlib
  from pathlib import Path

  from videoldm_jax.data import inputs
  configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.py"))
  assert len(configs) > 10
  for path in configs:
    config = importlib.import_module(f"configs.{path.stem}").get_config()
    if "data" in config and "kind" in config.data:
      assert "tfds_name" in config.data and "split" in config.data, path
  config = importlib.import_module("configs.keyframe_tiny").get_config()
  config.data.update(kind="tfds", tfds_name="procedural_driving/tiny", data_dir=tfds_dir,
                     batch_size=2, num_frames=4, height=32, width=32)
  batch = next(inputs.make_iterator(config, tmp_path, {}))
  assert batch["video"].shape == (2, 4, 32, 32, 3) and batch["video"].dtype == np.uint8
  # config.data.frame_stride reaches the clip sampler: every other frame, other clips.
  config.data.frame_stride = 2
  strided = next(inputs.make_iterator(config, tmp_path, {}))
  assert strided["video"].shape == batch["video"].shape
  assert not np.array_equal(strided["video"], batch["video"])
  config.data.frame_stride = 1
  # config.data.split picks the split read (other scenes in procedural_driving's).
  config.data.split = "validation"
  validation = next(inputs.make_iterator(config, tmp_path, {}))
  assert validation["video"].shape == batch["video"].shape
  assert not np.array_equal(validation["video"], batch["video"])
  config.data.split = "train"
  config.data.tfds_name = ""
  with pytest.raises(ValueError, match="data.tfds_name"):
    inputs.make_iterator(config, tmp_path, {})


def test_resume_with_another_worker_count_names_the_field(tfds_train):
  # Grain's state with worker processes is per worker: the other layout was a bare
  # KeyError ('exhausted' / 'next_index').
  from videoldm_jax.data.inputs import ShareIterator
  kw = dict(seed=2, batch_size=4, num_epochs=1, num_frames=4, height=16, width=16,
            process_index=0, process_count=1)
  plain = ShareIterator(iter(make_video_dataset(tfds_train, **kw, worker_count=0)), 4, 1)
  next(plain)
  saved = json.loads(json.dumps(plain.get_state()))
  workers = ShareIterator(iter(make_video_dataset(tfds_train, **kw, worker_count=1)), 4, 1, 1)
  with pytest.raises(ValueError, match="written without Grain worker processes, this run "
                     "has some: resume with the checkpoint's config.data.worker_count"):
    workers.set_state(saved)
  next(workers)
  saved = json.loads(json.dumps(workers.get_state()))
  workers._it.close()
  plain = ShareIterator(iter(make_video_dataset(tfds_train, **kw, worker_count=0)), 4, 1)
  with pytest.raises(ValueError, match="written with Grain worker processes, this run has "
                     "none"):
    plain.set_state(saved)
  # Another count of workers: Grain took the per-worker states and repeated or skipped
  # examples (fewer workers: an IndexError).
  two = ShareIterator(iter(make_video_dataset(tfds_train, **kw, worker_count=2)), 4, 1, 2)
  with pytest.raises(ValueError, match=r"written with 1 Grain worker processes, this run has "
                     r"2: resume with the checkpoint's config.data.worker_count=1"):
    two.set_state(saved)
  two._it.close()
  # A state of the earlier per-example worker layout (no worker_count recorded).
  old = {k: v for k, v in saved.items() if k != "worker_count"}
  one = ShareIterator(iter(make_video_dataset(tfds_train, **kw, worker_count=1)), 4, 1, 1)
  with pytest.raises(ValueError, match="built batches example by example"):
    one.set_state(old)
  one._it.close()
  with pytest.raises(ValueError, match="built batches example by example"):
    plain.set_state(old)  # not "resume with the checkpoint's worker_count" first
  # An old bare plain state in a run with workers (a KeyError), and a state of another
  # data kind (the procedural iterator's), named for what they are.
  one = ShareIterator(iter(make_video_dataset(tfds_train, **kw, worker_count=1)), 4, 1, 1)
  with pytest.raises(ValueError, match="written without Grain worker processes"):
    one.set_state({"next_index": 8})
  one._it.close()
  with pytest.raises(ValueError, match=r"data state \['global_batch', 'next_batch', 'seed'\] "
                     "is not a Grain pipeline's: .* another config.data.kind"):
    plain.set_state({"next_batch": 1, "seed": 3, "global_batch": 4})


def test_video_share_state_resumes_with_another_process_count(tfds_train):
  from videoldm_jax.data.inputs import ShareIterator
  kw = dict(seed=4, num_frames=4, height=16, width=16)

  def on_two_processes(state, workers=0):
    """The next global batch's source indices, read by 2 processes resumed at `state`."""
    halves = []
    for pi in range(2):
      it = ShareIterator(iter(make_video_dataset(
          tfds_train, **kw, batch_size=2, process_index=pi, process_count=2,
          worker_count=workers)), 2, 2, workers)
      it.set_state(state)
      halves.append(next(it)["source_index"])
      if workers:
        it._it.close()
    return np.concatenate(halves)

  one = ShareIterator(iter(make_video_dataset(tfds_train, **kw, batch_size=4,
                                              process_index=0, process_count=1)), 4, 1)
  first = [next(one)["source_index"].copy() for _ in range(3)]
  saved = json.loads(json.dumps(one.get_state()))
  after = next(one)["source_index"]
  np.testing.assert_array_equal(on_two_processes(saved), after)
  assert len(first) == 3
  # With worker processes too: their per-worker state is the same at any process count.
  one = ShareIterator(iter(make_video_dataset(tfds_train, **kw, worker_count=2, batch_size=4,
                                              process_index=0, process_count=1)), 4, 1, 2)
  for _ in range(3):
    next(one)
  saved_w = json.loads(json.dumps(one.get_state()))
  one._it.close()
  np.testing.assert_array_equal(on_two_processes(saved_w, workers=2), after)
  # An older checkpoint's bare Grain state (3 batches of 4 elements).
  bare = ShareIterator(iter(make_video_dataset(tfds_train, **kw, batch_size=4,
                                               process_index=0, process_count=1)), 4, 1)
  bare.set_state({"next_index": 12})
  np.testing.assert_array_equal(next(bare)["source_index"], after)
  # It counts the batches before the resume (3) as well: resumed again, on two
  # processes, from the state it saves, the data goes on where it is, not at batch 1.
  assert bare.get_state()["batches"] == 4
  again = json.loads(json.dumps(bare.get_state()))
  after_that = next(bare)["source_index"]
  np.testing.assert_array_equal(on_two_processes(again), after_that)


# pipeline(): batches made by two Grain worker processes; children(): this process's.
_WORKERS_HEAD = '''
import os, signal, time
import numpy as np
from videoldm_jax.data.grain_pipeline import make_video_dataset


def children():
  me, kids = os.getpid(), []
  for d in filter(str.isdigit, os.listdir("/proc")):
    try:
      stat = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
      continue
    if int(stat[1]) == me:
      kids.append(int(d))
  return kids


def pipeline():
  src = [{"video": np.zeros((3, 16, 16, 3), np.uint8), "caption": "c", "label": 0}
         for _ in range(8)]
  return iter(make_video_dataset(src, batch_size=2, num_frames=2, height=16, width=16,
                                 seed=0, process_index=0, process_count=1, worker_count=2))
'''
_ORPHAN_SCRIPT = _WORKERS_HEAD + '''
if __name__ == "__main__":
  it = pipeline()
  next(it)
  print(" ".join(map(str, children())), flush=True)
  os.kill(os.getpid(), signal.SIGKILL)
'''


def test_worker_processes_exit_when_the_trainer_is_killed(tmp_path):
  # A SIGKILLed trainer (preemption, OOM) left its Grain workers running, ~220 MB each;
  # every relaunch added more.
  script, out = tmp_path / "orphan.py", tmp_path / "pids.txt"
  script.write_text(_ORPHAN_SCRIPT)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]),
                                         os.environ.get("PYTHONPATH", "")]))
  with open(out, "w") as f:  # a file, not a pipe: orphans would hold a pipe open
    subprocess.run([sys.executable, str(script)], stdout=f, stderr=subprocess.DEVNULL,
                   env=env, cwd=tmp_path, timeout=300)
  pids = [int(p) for p in out.read_text().split()]
  assert len(pids) >= 2, pids  # the workers (and multiprocessing's resource tracker)
  def running(pid: int) -> bool:  # (a zombie that PID 1 has not reaped runs nothing)
    try:
      return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
      return False

  deadline = time.monotonic() + 20
  try:
    while time.monotonic() < deadline and any(map(running, pids)):
      time.sleep(0.5)
    alive = [p for p in pids if running(p)]
    assert not alive, f"processes still running after the parent's SIGKILL: {alive}"
  finally:
    for p in pids:
      try:
        os.kill(p, 9)
      except OSError:
        pass


_SIGTERM_SCRIPT = _WORKERS_HEAD + '''
if __name__ == "__main__":
  it = pipeline()
  next(it), next(it)  # a batch from each worker: both have started
  for pid in children():
    os.kill(pid, signal.SIGTERM)
  time.sleep(1)
  # More batches than the workers had ready (a few each).
  for _ in range(20):
    next(it)
  print("read on", flush=True)
'''


def test_worker_processes_outlive_a_sigterm_to_the_process_group(tmp_path):
  # SLURM (--signal, scancel) and a VM's shutdown send SIGTERM to every process of the
  # job: the trainer saves at the end of its step, and needs its workers until then.
  # They died of it, and an input-bound run (no batch ready) crashed in next() instead
  # of saving ("Worker process was terminated unexpectedly with exit code -15").
  script = tmp_path / "sigterm.py"
  script.write_text(_SIGTERM_SCRIPT)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]),
                                         os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                        env=env, cwd=tmp_path, timeout=300)
  assert proc.returncode == 0 and "read on" in proc.stdout, proc.stderr[:3000]
