"""The procedural dash-cam source: determinism, resumable state, process sharding, content."""

import json
import time

import numpy as np
import pytest

from videoldm_jax.data import ClipIterator, make_clip
from videoldm_jax.data import procedural

SHAPE = dict(num_frames=8, height=64, width=64)


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_batch_format():
  batch = next(ClipIterator(batch_size=3, seed=0, **SHAPE))
  assert batch["video"].shape == (3, 8, 64, 64, 3) and batch["video"].dtype == np.uint8
  assert batch["time_of_day"].dtype == np.int32 and batch["crowdedness"].dtype == np.int32
  assert set(batch["time_of_day"]) <= {0, 1} and set(batch["crowdedness"]) <= {0, 1, 2, 3}
  assert batch["caption"].shape == (3,) and all(isinstance(c, str) for c in batch["caption"])
  np.testing.assert_array_equal(batch["index"], [0, 1, 2])


def test_labels_and_captions_cover_all_values():
  labels = [make_clip(i, 2, 32, 32, seed=3)[1:] for i in range(64)]
  assert {lab["time_of_day"] for lab, _ in labels} == {0, 1}
  assert {lab["crowdedness"] for lab, _ in labels} == {0, 1, 2, 3}
  for lab, caption in labels:
    assert ("night" in caption) == (lab["time_of_day"] == 1)
    assert ["no other cars", "one car", "two cars", "three cars"][lab["crowdedness"]] in caption


def test_determinism():
  a = _take(ClipIterator(batch_size=4, seed=7, **SHAPE), 2)
  b = _take(ClipIterator(batch_size=4, seed=7, **SHAPE), 2)
  for x, y in zip(a, b):
    _assert_batches_equal(x, y)
  c = _take(ClipIterator(batch_size=4, seed=8, **SHAPE), 2)
  for x, y in zip(a, c):
    assert not np.array_equal(x["video"], y["video"])
    np.testing.assert_array_equal(x["index"], y["index"])  # same indices, different clips


def test_clip_is_a_function_of_the_scene_not_the_length():
  # Scene parameters don't depend on T, so a longer clip extends a shorter one.
  short, lab_s, cap_s = make_clip(5, 4, 48, 64, seed=1)
  long, lab_l, cap_l = make_clip(5, 12, 48, 64, seed=1)
  np.testing.assert_array_equal(long[:4], short)
  assert (lab_s, cap_s) == (lab_l, cap_l)


def test_state_save_restore_continues_exactly():
  it = ClipIterator(batch_size=3, seed=11, **SHAPE)
  _take(it, 2)
  state = json.loads(json.dumps(it.get_state()))  # must survive JSON
  assert state["next_batch"] == 2
  expected = _take(it, 2)
  fresh = ClipIterator(batch_size=3, seed=11, **SHAPE)
  fresh.set_state(state)
  for x, y in zip(expected, _take(fresh, 2)):
    _assert_batches_equal(x, y)


def test_set_state_rejects_mismatches():
  it = ClipIterator(batch_size=2, seed=0, process_index=1, process_count=2, **SHAPE)
  with pytest.raises(ValueError, match="seed"):
    it.set_state({"next_batch": 3, "seed": 1})
  with pytest.raises(ValueError, match="global batch of 8"):
    it.set_state({"next_batch": 4, "seed": 0, "global_batch": 8})
  it.set_state({"next_batch": 4, "seed": 0, "global_batch": 4})  # 1 process x 4: fine
  assert next(it)["index"][0] == 4 * 4 + 2
  # A negative or fractional batch was truncated or blamed on the global batch.
  for bad in ({}, {"next_batch": -1}, {"next_batch": 2.7}, {"next_batch": True}):
    with pytest.raises(ValueError, match=r"an integer 'next_batch' >= 0, got"):
      it.set_state(bad)
  it.set_state({"next_batch": np.int64(4), "seed": 0, "global_batch": 4})
  # A two-process run's own state resumes it on two processes or on one.
  its = [ClipIterator(batch_size=2, seed=0, process_index=p, process_count=2, **SHAPE)
         for p in range(2)]
  for i in its:
    next(i)
  state = json.loads(json.dumps(its[1].get_state()))
  assert state == {"next_batch": 1, "seed": 0, "global_batch": 4}
  again = ClipIterator(batch_size=2, seed=0, process_index=1, process_count=2, **SHAPE)
  again.set_state(state)
  one = ClipIterator(batch_size=4, seed=0, **SHAPE)
  one.set_state(state)
  np.testing.assert_array_equal(next(again)["index"], [6, 7])
  np.testing.assert_array_equal(next(one)["index"], [4, 5, 6, 7])
  with pytest.raises(ValueError, match="need 0 <= process_index < process_count, got 2 of 2"):
    ClipIterator(batch_size=2, seed=0, process_index=2, process_count=2, **SHAPE)


def test_two_processes_are_disjoint_and_cover_one_process():
  steps, b = 3, 4
  shards = [_take(ClipIterator(batch_size=b, seed=2, process_index=p, process_count=2, **SHAPE),
                  steps) for p in range(2)]
  single = _take(ClipIterator(batch_size=2 * b, seed=2, **SHAPE), steps)
  idx = [np.concatenate([batch["index"] for batch in shard]) for shard in shards]
  assert not set(idx[0]) & set(idx[1])
  for step in range(steps):
    # Concatenated in process order (the layout of the global array), the two processes'
    # batches are exactly the batch of one process with the global batch size.
    for key in ("index", "video"):
      np.testing.assert_array_equal(
          np.concatenate([shard[step][key] for shard in shards]), single[step][key])


def test_lane_markings_move():
  for index in range(6):
    video, labels, _ = make_clip(index, 8, 64, 64, seed=0)
    if labels["crowdedness"] == 0:
      break
  else:
    pytest.fail("no car-free clip among the first 6")
  # With no cars, only the dashed markings can change: consecutive frames must differ,
  # and only below the horizon (the sky is static).
  diff = np.any(video[1:] != video[:-1], axis=-1)  # (T-1, H, W)
  assert diff.reshape(7, -1).any(axis=1).all()
  changed_rows = np.nonzero(diff.any(axis=(0, 2)))[0]
  assert changed_rows.min() > 64 * 0.38 - 1


def test_dashes_move_towards_the_camera():
  # A row at camera depth z shows in frame t + 1 what the row at depth z + ego_speed
  # showed in frame t. (test_lane_markings_move passes with the road running backwards.)
  H = W = 128
  for index in range(40):
    video, labels, _ = make_clip(index, 2, H, W, seed=0)
    if labels == {"time_of_day": 0, "crowdedness": 0}:
      break
  s = procedural._scene(0, index)
  hy, f = s["horizon"] * H, procedural.FOCAL_FRACTION * W
  depth, painted = [], []  # per ground row nearer than 8: the lane line x = +0.5 painted?
  for y in range(int(hy) + 1, H):
    d = (y + 0.5 - hy) / (H - hy)  # disparity 1 / z of the row (make_clip's geometry)
    col = int(0.5 * W + f * (0.5 - s["cam_x"]) * d)
    if 1 / d < 8 and 0 <= col < W:
      depth.append(1 / d)
      painted.append(video[:, y, col].min(axis=-1) > 180)  # (2,) white dash vs grey road
  depth, painted = np.array(depth), np.array(painted)
  moved = [painted[i, 1] == painted[np.argmin(abs(depth - z - s["ego_speed"])), 0]
           for i, z in enumerate(depth) if z + s["ego_speed"] <= depth.max()]
  assert painted.any() and not painted.all()
  # Rows are discrete (nearest depth): dash ends may land one row off.
  assert np.mean(moved) > 0.9, np.mean(moved)


def test_a_nearer_car_is_drawn_over_a_farther_one():
  # One frame (depth = the start depth, clamped as make_clip clamps it), 48 x 48: the
  # nearest car alone and with the others must look the same wherever it is drawn.
  scene, fields = procedural._scene, ("car_lane", "car_z0", "car_rate", "car_colour")

  def frame(s, cars):  # the scene with only `cars`, in this order
    perm = cars + [i for i in range(procedural.MAX_CARS) if i not in cars]
    s = {**s, "num_cars": len(cars), **{k: s[k][perm] for k in fields}}
    original, procedural._scene = procedural._scene, lambda seed, index: s
    try:
      return make_clip(0, 1, 48, 48)[0][0]
    finally:
      procedural._scene = original

  overlaps = 0
  for index in range(300):
    s = scene(3, index)
    if s["num_cars"] < 2:
      continue
    n, f = s["num_cars"], procedural.FOCAL_FRACTION * 48
    z_min = np.maximum(1.6, (np.abs(s["car_lane"] - s["cam_x"]) + 0.3) * f / 24)
    near = int(np.argmin(np.maximum(s["car_z0"], z_min)[:n]))
    others = [i for i in range(n) if i != near]
    empty, alone = frame(s, []), frame(s, [near])
    drawn = (alone != empty).any(-1)  # the nearest car's pixels
    assert (frame(s, list(range(n)))[drawn] == alone[drawn]).all(), index
    overlaps += ((frame(s, others) != empty).any(-1) & drawn).any()
  assert overlaps >= 3  # (4 of these 300 scenes have a farther car behind the nearest)


def test_night_darker_than_day():
  means = {0: [], 1: []}
  for i in range(32):
    video, labels, _ = make_clip(i, 4, 64, 64, seed=5)
    means[labels["time_of_day"]].append(video.mean())
  assert means[0] and means[1]
  # Measured: day ~136, night ~33 on the 0..255 scale; any night clip beats any day clip.
  assert max(means[1]) < 0.5 * min(means[0])


def test_batch_runtime():
  it = ClipIterator(batch_size=8, seed=0, **SHAPE)
  next(it)  # warm-up (imports, allocator)
  best = min(_timed(it) for _ in range(3))
  assert best < 0.5, f"a batch of 8 clips of 8x64x64 took {best:.3f} s"


def _timed(it) -> float:
  start = time.perf_counter()
  next(it)
  return time.perf_counter() - start


def test_every_counted_car_is_in_the_frame(monkeypatch):
  # The caption and the crowdedness label count cars; each must be seen. A car starting
  # nearer than its lane allows was drawn outside the frame (3.7% of clips had a
  # counted car cut by the edge; some none of it visible), and a receding one then
  # passed through the camera.
  scene = procedural._scene
  for index in range(400):
    n = scene(0, index)["num_cars"]
    if not n:
      continue
    full, labels, _ = procedural.make_clip(index, 3, 32, 32)
    monkeypatch.setattr(procedural, "_scene",
                        lambda seed, i: {**scene(seed, i), "num_cars": n - 1})
    without_last, _, _ = procedural.make_clip(index, 3, 32, 32)
    monkeypatch.setattr(procedural, "_scene", scene)
    assert labels["crowdedness"] == n
    assert (full != without_last).any(), f"clip {index}: car {n} of {n} is not drawn"


def test_label_field_names_a_label_of_the_clips(tmp_path):
  # data.label_field was ignored by this source: a class-conditional UNet failed with
  # "names no field of the dataset" on batches that held time_of_day.
  import ml_collections
  from videoldm_jax.data import inputs
  config = ml_collections.ConfigDict(dict(seed=0, data=dict(
      kind="procedural", batch_size=4, num_frames=2, height=16, width=16,
      label_field="crowdedness")))
  batch = next(inputs.make_iterator(config, tmp_path, {}))
  np.testing.assert_array_equal(batch["labels"], batch["crowdedness"])
  assert batch["labels"].dtype == np.int32
  config.data.update(label_field="time_of_day", batch_size=16)
  batch = next(inputs.make_iterator(config, tmp_path, {}))
  np.testing.assert_array_equal(batch["labels"], batch["time_of_day"])
  assert (batch["time_of_day"] != batch["crowdedness"]).any()  # the field is read
  config.data.batch_size = 4
  config.data.label_field = "label"  # the video sources' default: no labels here
  assert "labels" not in next(inputs.make_iterator(config, tmp_path, {}))
  config.data.label_field = "weather"
  with pytest.raises(ValueError, match=r"label_field='weather': procedural clips have the "
                     r"integer fields \('time_of_day', 'crowdedness'\)"):
    inputs.make_iterator(config, tmp_path, {})


def test_options_this_source_lacks_are_named(tmp_path, caplog):
  # data.crop / data.worker_count change nothing here: said so, not silently ignored.
  import ml_collections
  from videoldm_jax.data import inputs
  config = ml_collections.ConfigDict(dict(seed=0, data=dict(
      kind="procedural", batch_size=2, num_frames=2, height=16, width=16, crop="center",
      worker_count=4)))
  with caplog.at_level("WARNING"):
    inputs.make_iterator(config, tmp_path, {})
  assert "{'crop': 'center', 'worker_count': 4} ignored: data.kind='procedural'" in caplog.text


def test_each_process_reads_its_block_of_the_global_batch(tmp_path, monkeypatch):
  # make_iterator hands the procedural source this process's index (from JAX): as
  # process 1 of 2 it reads the second half of each global batch, not the first again.
  import jax
  import ml_collections
  from videoldm_jax.data import inputs
  config = ml_collections.ConfigDict(dict(seed=0, data=dict(
      kind="procedural", batch_size=4, num_frames=2, height=16, width=16)))
  one = inputs.make_iterator(config, tmp_path, {})
  whole = [next(one)["index"] for _ in range(2)]
  monkeypatch.setattr(jax, "process_count", lambda *a: 2)
  for pi in range(2):
    monkeypatch.setattr(jax, "process_index", lambda *a, _pi=pi: _pi)
    mine = inputs.make_iterator(config, tmp_path, {})
    for step in range(2):
      np.testing.assert_array_equal(next(mine)["index"], whole[step][2 * pi:2 * pi + 2])
    assert mine.get_state()["seed"] == config.seed  # (the clips are those of one process)
