"""The key-frame trainer as users run it (`videoldm-train` in subprocesses), starting
from a converted image-model folder: killed with SIGKILL, stopped with SIGTERM,
resumed, it ends bitwise where an uninterrupted run ends."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.run_log import RunLog

# Checkpoints every 3 steps; killed at a random logged step after the first, stopped by
# SIGTERM once the resumed run has logged a step past its checkpoint, resumed to the end.
# The interruptions are placed by logged steps, not by time, so fast saves or a slow
# host move neither of them past the last step.
STEPS, EVERY = 24, 3
FLAGS = [f"--config.train.num_steps={STEPS}", f"--config.train.ckpt_every={EVERY}",
         "--config.train.log_every=1", "--config.train.export=false",
         "--config.data.num_frames=4", "--config.data.height=16", "--config.data.width=16",
         "--config.sample.every=0", "--config.train.keep=100", "--config.train.keep_best=1"]


ROOT = Path(__file__).parents[1]


def _env():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  return env


@pytest.fixture(scope="module")
def image_model(tmp_path_factory):
  """A converted-format image LDM folder (what videoldm-convert writes), random weights.
  Its UNet has one level: these tests are about the trainer's processes, and XLA's
  compile time grows with the op count (a cold tiny key-frame step: 23 s instead of
  43-54 s with two levels)."""
  out = tmp_path_factory.mktemp("image") / "ldm"
  subprocess.run([sys.executable, "-m", "videoldm_jax.cli.init_random",
                  "--config=configs/image_tiny.py", f"--output={out}",
                  "--config.unet.block_out_channels=(32,)",
                  "--config.unet.attention_levels=(True,)"], cwd=ROOT,
                 env=_env(), check=True, capture_output=True, timeout=300)
  return out


def _start(workdir: Path, image_model: Path, *more: str) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, "-m", "videoldm_jax.cli.train", "--config=configs/keyframe_tiny.py",
       f"--config.image_model={image_model}", f"--workdir={workdir}", *FLAGS, *more],
      cwd=ROOT,
      env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(proc, workdir: Path, step: int, timeout=300):
  t0 = time.time()
  while not (workdir / "checkpoints" / str(step)).is_dir():
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    assert time.time() - t0 < timeout, "no checkpoint in time"
    time.sleep(0.05)


def _final_state(workdir: Path) -> dict:
  return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(STEPS) / "state")


def _ranked(workdir: Path) -> dict:
  """Step -> the metrics ranking it for keep_best (only checkpoints saved on schedule)."""
  return {int(p.parents[1].name): json.loads(p.read_text())
          for p in (workdir / "checkpoints").glob("*/metrics/metrics")}


def _finish(proc) -> str:
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, image_model):
  workdir = tmp_path_factory.mktemp("a")
  out = _finish(_start(workdir, image_model))
  assert f"step {STEPS}:" in out
  metrics = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  return _final_state(workdir), _ranked(workdir), metrics


def test_checkpoint_saves_are_not_counted_as_step_time(uninterrupted):
  # The steps logged right after a save were timed with the save's wait for the
  # previous (async) save and its copy to the host: ~20x the others for this tiny
  # model (2-3 s against 0.1 s), showing an MFU of a few percent in every interval.
  after = [m["step_time"] for m in uninterrupted[2] if m["step"] % EVERY == 1 and m["step"] > 1]
  others = [m["step_time"] for m in uninterrupted[2] if m["step"] % EVERY != 1]
  assert np.median(after) < 8 * np.median(others), (after, others)


def test_checkpoints_are_ranked_by_their_windows_mean_loss(uninterrupted):
  # keep_best ranks checkpoint k by the mean loss of steps k - EVERY + 1 .. k (one
  # batch's loss is too noisy to pick a model by), as logged in metrics.jsonl.
  _, ranked, metrics = uninterrupted
  loss = {m["step"]: m["loss"] for m in metrics}
  for k in range(EVERY, STEPS + 1, EVERY):
    window = [loss[s] for s in range(k - EVERY + 1, k + 1)]
    assert ranked[k]["loss"] == pytest.approx(np.mean(window), rel=1e-6), k
    assert ranked[k]["loss"] != pytest.approx(loss[k], rel=1e-6), k  # not the last alone


def _complete_steps(workdir: Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_sigkill_and_sigterm_then_resume_is_bitwise_identical(uninterrupted, image_model,
                                                             tmp_path):
  rng = np.random.default_rng(int(time.time()))
  # Killed at its first logged step, mostly before its first checkpoint: the next run
  # starts again from step 0 (or resumes) and drops the lines logged past its start.
  proc = _start(tmp_path, image_model)
  RunLog(proc).wait_for_step_after(0)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  proc = _start(tmp_path, image_model)
  log = RunLog(proc)
  _wait_for_checkpoint(proc, tmp_path, EVERY)
  # Killed right after a random logged step k <= 4 * EVERY past the first checkpoint
  # (the run is a step or two ahead of its log), so its last checkpoint is about k and
  # well before STEPS - 2 * EVERY: the resumed run has steps left to be stopped in.
  log.wait_for_step_after(int(rng.integers(EVERY, 4 * EVERY)))
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = _complete_steps(tmp_path)[-1]
  assert EVERY <= killed_at <= STEPS - 2 * EVERY, killed_at
  # Resume; then a SIGTERM makes it save where it is and exit with --stopped_exit_code
  # (143 by default; 75 here, a scheduler's "requeue me"), not finished.
  proc = _start(tmp_path, image_model, "--stopped_exit_code=75")
  log = RunLog(proc)
  log.wait_for_step_after(killed_at)
  proc.send_signal(signal.SIGTERM)
  out = log.finish(returncode=75)
  assert f"resumed from {tmp_path / 'checkpoints'}/{killed_at}" in out, out[-2000:]
  assert "NOTE resumed with a config other" not in out  # the same flags
  assert "stop requested" in out, out[-2000:]
  stopped = int(re.search(r"stop requested \(SIGTERM\): saved step (\d+), exiting", out)[1])
  assert killed_at < stopped < STEPS and (tmp_path / "checkpoints" / str(stopped)).is_dir()
  assert (f"videoldm-train: stopped at step {stopped} of {STEPS} (SIGTERM); checkpoint "
          f"{stopped} saved: run the same command again to resume (exit 75)") in out
  # Resume to the end.
  out = _finish(_start(tmp_path, image_model))
  assert f"resumed from {tmp_path / 'checkpoints'}/{stopped}" in out
  # The steps the killed run logged past its checkpoint were dropped on resume and
  # logged again: every step once, in order.
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  logged = [json.loads(ln)["step"] for ln in lines]
  assert logged == list(range(1, STEPS + 1)), logged
  # keep_best ranks each scheduled checkpoint by the mean loss since the previous one,
  # across the kill and the stop (the stop save is unranked and carries its window on).
  ref_state, ref_ranked, _ = uninterrupted
  assert sorted(ref_ranked) == list(range(EVERY, STEPS + 1, EVERY))
  assert _ranked(tmp_path) == ref_ranked
  resumed = _final_state(tmp_path)
  ref_leaves = jax.tree_util.tree_leaves_with_path(ref_state)
  got_leaves = jax.tree_util.tree_leaves_with_path(resumed)
  assert [p for p, _ in ref_leaves] == [p for p, _ in got_leaves]
  for (path, a), (_, b) in zip(ref_leaves, got_leaves):
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a),
                                  err_msg=jax.tree_util.keystr(path))


def test_trains_from_a_latent_cache_of_the_same_vae_and_profiles(image_model, tmp_path):
  from videoldm_jax.data.latent_cache import LatentCacheSource
  from videoldm_jax.data.procedural import make_clip
  subprocess.run([sys.executable, "-m", "videoldm_jax.cli.cache_latents",
                  f"--model={image_model}", "--procedural_clips=8", "--num_frames=4",
                  "--height=16", "--width=16", "--seed=3", "--batch_size=4",
                  "--num_shards=2", f"--output={tmp_path / 'cache'}"], cwd=ROOT, env=_env(),
                 check=True, capture_output=True, timeout=300)
  # --seed picks the procedural stream: the records' captions are those of seed 3's
  # clips (seed 0's differ), and their text embeddings are cached.
  cache = LatentCacheSource(tmp_path / "cache")
  captions = {int(r["index"]): r["caption"] for r in cache}
  expected = {i: make_clip(i, 4, 16, 16, seed=3)[2] for i in range(8)}
  assert captions == expected != {i: make_clip(i, 4, 16, 16)[2] for i in range(8)}
  assert cache.info["has_context"] and "context" in cache[0]
  # --notext caches none.
  subprocess.run([sys.executable, "-m", "videoldm_jax.cli.cache_latents",
                  f"--model={image_model}", "--procedural_clips=1", "--num_frames=1",
                  "--height=16", "--width=16", "--num_shards=1", "--notext",
                  f"--output={tmp_path / 'notext'}"], cwd=ROOT, env=_env(), check=True,
                 capture_output=True, timeout=300)
  cache = LatentCacheSource(tmp_path / "notext")
  assert not cache.info["has_context"] and "context" not in cache[0]
  proc = subprocess.run(
      [sys.executable, "-m", "videoldm_jax.cli.train", "--config=configs/keyframe_tiny.py",
       f"--config.image_model={image_model}", f"--workdir={tmp_path / 'run'}", *FLAGS,
       "--config.train.num_steps=3", "--config.data.kind=latent_cache",
       f"--config.data.cache_dir={tmp_path / 'cache'}",
       # The last step is no multiple of either: it is logged and saved all the same.
       "--config.train.log_every=2", "--config.train.ckpt_every=2",
       # and a profile of its last two steps
       "--config.train.profile_start=1", "--config.train.profile_steps=2"],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "step 3: loss" in proc.stderr
  logged = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines()]
  assert logged == [2, 3] and _complete_steps(tmp_path / "run") == [2, 3]
  assert f"profile of steps 2-3: {tmp_path / 'run' / 'profile'}" in proc.stderr
  traces = list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))
  assert len(traces) == 1
  # It holds the step's XLA ops (the thunk executor names its events after them).
  data = jax.profiler.ProfileData.from_file(str(traces[0]))
  assert any("fusion" in e.name for p in data.planes for line in p.lines for e in line.events)


def test_image_ldm_stage_trains_all_of_theta_and_exports_an_image_model(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "videoldm_jax.cli.train", "--config=configs/image_ldm_tiny.py",
       f"--workdir={tmp_path}", "--config.train.num_steps=4", "--config.train.log_every=1",
       "--config.sample.every=3", "--config.data.num_frames=2", "--config.data.height=16",
       "--config.data.width=16",
       # One UNet level: the test is about the stage's plumbing (all of theta trains, the
       # export is an image model, samples are written), and XLA's compile time grows
       # with the op count (the train step and the 25-step sampler both compile it).
       "--config.random_image_model.unet.block_out_channels=(32,)",
       "--config.random_image_model.unet.attention_levels=(True,)"],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "step 4: loss" in proc.stderr and "0.00M frozen" not in proc.stderr
  # Step 3 is logged one step late, after its samples were written (25 denoising steps
  # and an mp4, tens of train steps long): its step time leaves them out.
  steps = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert steps[2]["step_time"] < 10 * steps[1]["step_time"], steps
  # samples/s counts images: 4 clips (image_ldm_tiny's batch) of 2 frames per step.
  assert all(abs(s["samples_per_s"] * s["step_time"] - 8) < 1e-6 for s in steps), steps
  from videoldm_jax import pretrained
  model = pretrained.load(tmp_path / "export" / "step_4")
  assert model.temporal_config is None  # an image model, usable as theta of a video LDM
  assert model.training == {"stage": "image_ldm", "num_frames": 2, "frame_stride": 1,
                            "height": 16, "width": 16}
  # Every sample.every steps, and at the last step (4 is no multiple of 3).
  assert sorted(p.name for p in (tmp_path / "samples").glob("*.mp4")) == ["step_3.mp4",
                                                                         "step_4.mp4"]


def test_profile_window_spans_its_steps_and_ends_with_the_run(monkeypatch, tmp_path):
  # The loop calls before(step) before dispatching step + 1 and after(step + 1) once it
  # is dispatched. A window of steps 2-3 starts before step 2's dispatch and stops after
  # step 3's; a window past the run's end (or a stop inside it) stops at the last step,
  # else no profile is written.
  from videoldm_jax.train import perf
  calls = []
  monkeypatch.setattr(perf.jax.profiler, "start_trace", lambda d: calls.append("start"))
  monkeypatch.setattr(perf.jax.profiler, "stop_trace", lambda: calls.append("stop"))
  for window, steps, expected in (
      ((1, 2), 5, ["start", 2, 3, "stop", 4, 5]),
      ((1, 10), 3, ["start", 2, 3, "stop"]),
      ((1, 0), 4, [2, 3, 4])):  # profile_steps=0 (the configs' default): no profile
    calls.clear()
    trace = perf.StepTrace(tmp_path, *window)
    for step in range(steps):
      trace.before(step)
      calls.append(step + 1)
      trace.after(step + 1, None, last=step + 1 == steps)
    assert calls == [1] + expected, (window, calls)
  with pytest.raises(ValueError, match="profile_steps=-1"):
    perf.StepTrace(tmp_path, 1, -1)


def test_tensorboard_writer_starts_without_importing_torch(tmp_path):
  """tensorboardX imports torch when installed (2.5 s per trainer start); the trainer's
  writer keeps it out and leaves torch importable afterwards."""
  code = (
      "import sys\n"
      "from videoldm_jax.train import perf\n"
      f"w = perf.summary_writer({str(tmp_path)!r})\n"
      "w.add_scalar('train/loss', 1.5, 3)\n"
      "w.close()\n"
      "assert 'torch' not in sys.modules, 'torch was imported'\n"
      "import torch\n"
      "print('torch', torch.__version__)\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.startswith("torch ")
  events = list(tmp_path.glob("events.out.tfevents.*"))
  assert len(events) == 1 and b"train/loss" in events[0].read_bytes()


def test_max_steps_in_flight_is_checked_before_anything_runs(tmp_path):
  from videoldm_jax.config_files import load_sibling
  from videoldm_jax.train import loop
  config = load_sibling(str(ROOT / "configs" / "_"), "keyframe_tiny").get_config()
  config.train.max_steps_in_flight = 0
  with pytest.raises(ValueError, match=r"train.max_steps_in_flight=0: expected >= 1"):
    loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  # The same for the loop's other counts: log_every=0 failed after the compile and the
  # first step (ZeroDivisionError), num_steps=0 exported the untrained model, keep=0
  # and ckpt_every=0 failed in Orbax naming no config field.
  config.train.max_steps_in_flight = 2
  # (a seed of 2^32 trained, then failed at the first training sample)
  for seed in (-1, 2 ** 32):
    bad = config.copy_and_resolve_references()
    bad.seed = seed
    with pytest.raises(ValueError, match=rf"config.seed={seed}: expected a whole number in "
                       r"\[0, 2\^32\)"):
      loop.train_and_evaluate(bad, str(tmp_path / "run"))
  for field in ("num_steps", "log_every", "ckpt_every", "keep"):
    bad = config.copy_and_resolve_references()
    bad.train[field] = 0
    with pytest.raises(ValueError, match=rf"config.train.{field}=0: expected >= 1"):
      loop.train_and_evaluate(bad, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
  # "--config.train.export false": absl takes no separate value for a boolean; the
  # "false" was dropped and the run exported all the same.
  proc = subprocess.run(
      [sys.executable, "-m", "videoldm_jax.cli.train", "--config=configs/keyframe_tiny.py",
       f"--workdir={tmp_path / 'run'}", "--config.train.export", "false"], cwd=ROOT,
      env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
      timeout=600)
  assert proc.returncode != 0 and "unexpected arguments: ['false']" in proc.stderr, \
      proc.stderr[-2000:]
  assert not (tmp_path / "run").exists()


def test_keep_best_ranks_a_window_by_its_finite_losses():
  # One skipped (NaN) step made its checkpoint's whole window rank worst; the step left
  # the weights as they were.
  from videoldm_jax.train.loop import window_mean
  assert window_mean([1.41, float("nan"), 1.23]) == pytest.approx(1.32)
  assert window_mean([2.0, float("inf")]) == 2.0
  assert window_mean([float("nan")]) == float("inf")  # nothing finite: ranked last


def test_export_folders_appear_only_when_complete(tmp_path):
  # A finished run whose export folder exists does nothing, so a half-written one
  # (a SIGTERM during the final export) must never carry the final name.
  from videoldm_jax.pretrained import write_folder
  out = tmp_path / "export" / "step_5"
  out.parent.mkdir()

  def interrupted(folder):
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    raise KeyboardInterrupt  # a signal mid-write

  with pytest.raises(KeyboardInterrupt):
    write_folder(out, interrupted)
  assert list(out.parent.iterdir()) == []
  (out.parent / ".step_5.partial").mkdir()  # left by a SIGKILL
  write_folder(out, lambda folder: (folder.mkdir(), (folder / "x").write_text("1")))
  assert (out / "x").read_text() == "1"
  assert [p.name for p in out.parent.iterdir()] == ["step_5"]
  # The newest EMA export, by step number: not a raw-weights export, not step 40 < 100.
  from videoldm_jax.train.loop import latest_export
  for name in ("step_40", "step_100", "step_200_raw", ".step_300.partial"):
    (out.parent / name).mkdir()
  assert latest_export(tmp_path).name == "step_100"


def test_config_changes_on_resume_are_listed():
  from videoldm_jax.train.loop import config_changes
  saved = {"optim": {"lr": 1e-3}, "data": {"sizes": [1, 2]}, "old": 1}
  now = {"optim": {"lr": 6e-3}, "data": {"sizes": (1, 2)}, "new": 2}  # tuples saved as lists
  assert config_changes(saved, now) == ["new: (absent) -> 2", "old: 1 -> (absent)",
                                        "optim.lr: 0.001 -> 0.006"]
  assert config_changes(saved, saved) == []
  # Nested lists of tuples (the sharding rules) saved as lists of lists are no change;
  # a change three levels down is named by its whole path.
  saved = {"rules": [["a", ["b", "c"]]], "m": {"u": {"ch": 1}}}
  now = {"rules": [("a", ("b", "c"))], "m": {"u": {"ch": 2}}}
  assert config_changes(saved, now) == ["m.u.ch: 1 -> 2"]


def test_resume_drops_metrics_logged_after_the_checkpoint_and_cut_lines(tmp_path):
  from videoldm_jax.train.loop import _drop_metrics_after
  path = tmp_path / "metrics.jsonl"
  lines = "".join(json.dumps({"step": i, "loss": 0.5}) + "\n" for i in range(1, 6))
  path.write_text(lines + '{"step": 6, "lo')  # the kill cut the last write short
  _drop_metrics_after(path, 4)
  assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4]
  assert path.read_text().endswith("\n")


def test_a_resumed_runs_tensorboard_writer_purges_the_steps_it_redoes(tmp_path):
  """purge_step writes TensorBoard's SessionLog START at the resumed run's first step:
  TensorBoard then drops the killed run's events from there on (no doubled curves)."""
  import struct
  from tensorboardX.proto import event_pb2
  from videoldm_jax.train import perf

  first = perf.summary_writer(tmp_path / "a")
  first.close()
  resumed = perf.summary_writer(tmp_path / "b", purge_step=4)
  resumed.add_scalar("train/loss", 1.0, 4)
  resumed.close()

  def events(folder):
    (path,) = folder.glob("events.out.tfevents.*")
    data, out = path.read_bytes(), []
    while data:  # TFRecords: length, its CRC, the record, its CRC
      (n,) = struct.unpack("<Q", data[:8])
      out.append(event_pb2.Event.FromString(data[12:12 + n]))
      data = data[12 + n + 4:]
    return out

  starts = lambda folder: [e.step for e in events(folder)
                           if e.HasField("session_log")
                           and e.session_log.status == event_pb2.SessionLog.START]
  assert starts(tmp_path / "b") == [4] and starts(tmp_path / "a") == []


def test_uri_workdirs_are_refused_before_anything_runs(tmp_path):
  # Metrics, TensorBoard, samples and exports use local file APIs: a gs:// workdir used
  # to become the local folder ./gs:/bucket/..., found out at the first checkpoint.
  from videoldm_jax.train import loop
  with pytest.raises(ValueError, match="URIs are not supported.*gcsfuse"):
    loop.train_and_evaluate(None, "gs://bucket/run")
  with pytest.raises(ValueError, match="URIs are not supported"):
    loop.export_checkpoint(None, "gs://bucket/run")
  assert loop.local_workdir("rel/dir") == Path.cwd() / "rel" / "dir"


def test_batches_the_mesh_cannot_split_are_config_errors(tmp_path):
  # Checked before the models load; they failed in XLA's partitioner with an error
  # naming no config field (batch 4 on 8 devices), or in the C++ kernels' partitioner
  # (microbatches of 2 rows on 4 devices).
  from videoldm_jax import sharding
  from videoldm_jax.config_files import load_sibling
  from videoldm_jax.train import loop
  config = load_sibling(str(ROOT / "configs" / "x.py"), "keyframe_tiny").get_config()
  config.data.batch_size = 4  # default mesh: data=-1, all 8 test devices
  with pytest.raises(ValueError, match=r"batch_size=4 does not split over the batch axes "
                     r"\('data', 'fsdp'\) .* \(8 ways\); use a multiple of 8"):
    loop.train_and_evaluate(config, str(tmp_path / "run"))
  mesh = sharding.make_mesh({"data": 4, "fsdp": 1, "tensor": 1}, jax.devices()[:4])
  with pytest.raises(ValueError, match=r"batch_size=4 / train.grad_accum=2 must be a whole "
                     r"microbatch .* multiple of 8"):
    sharding.check_batch_split(4, 2, mesh, ("data", "fsdp"))
  sharding.check_batch_split(8, 2, mesh, ("data", "fsdp"))
  # One device: the batch axes split nothing, the microbatches still must be whole.
  one = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  with pytest.raises(ValueError, match=r"batch_size=6 / train.grad_accum=4 must be a whole "
                     r"microbatch"):
    sharding.check_batch_split(6, 4, one, ("data", "fsdp"))
