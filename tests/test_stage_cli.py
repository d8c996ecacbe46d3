"""Every stage through `videoldm-train` (the CLI users run): the stages whose own test
files exercise the trainer elsewhere (keyframe, image_ldm: test_train_loop.py;
predictor: test_context_stages.py; decoder: test_autoencoder_stages.py; upsampler:
test_upsampler.py) are not repeated. Here: the interpolator and the image
autoencoder train a few steps, checkpoint, resume where they stopped, export an
earlier checkpoint (videoldm-export) and, run again when finished, do nothing; a diverged
run reports its skipped steps."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from videoldm_jax import pretrained

ROOT = Path(__file__).parents[1]
TINY_DATA = ["--config.data.kind=procedural", "--config.data.num_frames=4",
             "--config.data.height=16", "--config.data.width=16",
             "--config.data.batch_size=2"]
CASES = {
    # One UNet level: XLA's compile time grows with the op count (the stage's context
    # encoder and its conditioning are what this case adds to the key-frame tests).
    # Without the level's transformers: the middle block's one still holds every kind
    # of layer (text cross-attention, temporal attention), and the first run and the
    # resume took 34 + 14 CPU s against 44 + 21 with them (one measurement each).
    "interpolator": ["--config=configs/interpolator_tiny.py", *TINY_DATA,
                     "--config.random_image_model.unet.block_out_channels=(32,)",
                     "--config.random_image_model.unet.attention_levels=(False,)"],
    # The generator and discriminator both train from step 1 (disc_start=1). A one-level
    # autoencoder (no downsampling): these tests are about the CLI, checkpoints and
    # exports, and a cold run of its train step took 27 s of CPU against 39 s for the f4
    # one (the diverged run below, one measurement); the exports' latent statistics
    # encode 64 clips with it too.
    "autoencoder": ["--config=configs/autoencoder_tiny.py", *TINY_DATA,
                    "--config.loss.disc_start=1",
                    "--config.random_image_model.vae.block_out_channels=(32,)"],
}


def _run(cli: str, workdir: Path, args: list, steps: int, ok: bool = True,
         export: bool = False) -> str:
  """Runs videoldm-<cli> (train / export) with the test's trainer flags; its output."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-m", f"videoldm_jax.cli.{cli}", *args, f"--workdir={workdir}",
       f"--config.train.num_steps={steps}", "--config.train.ckpt_every=2",
       "--config.train.log_every=1", "--config.sample.every=0",
       f"--config.train.export={str(export).lower()}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert (proc.returncode == 0) == ok, proc.stderr[-3000:]
  return proc.stdout + proc.stderr


@pytest.mark.parametrize("stage", sorted(CASES))
def test_stage_trains_checkpoints_and_resumes_from_the_cli(stage, tmp_path):
  out = _run("train", tmp_path, CASES[stage], 2)
  assert f"{stage}: compiled" in out and (tmp_path / "checkpoints" / "2").is_dir()
  out = _run("train", tmp_path, CASES[stage], 3)
  assert "resumed from" in out and "step 3: loss" in out
  assert ("NOTE resumed with a config other than the checkpoint's: train.num_steps: 2 -> 3"
          in out), out[-3000:]
  steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [s["step"] for s in steps] == [1, 2, 3]
  assert all(np.isfinite(s["loss"]) and s["skipped"] == 0 for s in steps)
  # Step 2 ended the first run and was observed right after step 1's log (log_every=1):
  # the gap between the two observations measures nothing (it read 0.001 s, MFU 700%+),
  # so the last step reports the step time logged before it.
  assert steps[1]["step_time"] == steps[0]["step_time"]
  if stage == "interpolator":
    # A change of parameter shapes fails the restore: the config change that caused it
    # is named beside the shape list (it was logged only after a successful restore).
    out = _run("train", tmp_path, [*CASES[stage], "--config.temporal.conv_kernel=(5,1,1)"],
               4, ok=False)
    assert "shape mismatch" in out and ("The config differs from the checkpoint's: "
                                        "temporal.conv_kernel: [3, 1, 1] -> [5, 1, 1]") in out, \
        out[-3000:]

  # An earlier checkpoint exported after the run: its EMA weights, in the folder format
  # of the end-of-training export (the autoencoder's leaves out the discriminator).
  if stage == "interpolator":
    # How --step is resolved does not depend on the stage (loop.export_checkpoint):
    # checked for this case only, with --step=7 and --step=latest below (the
    # autoencoder's launches took 10 and 2 CPU s: its export encodes 64 clips).
    out = _run("export", tmp_path, CASES[stage], 3)  # --step=best: the latest (keep_best=0)
    assert f"{tmp_path / 'export' / 'step_3'}: exported" in out, out[-3000:]
    assert "NOTE exporting" not in out  # the flags of the run that saved step 3
  out = _run("export", tmp_path, [*CASES[stage], "--step=2"], 3)
  folder = tmp_path / "export" / "step_2"
  assert f"{folder}: exported" in out, out[-3000:]
  state = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "2" / "state")
  ema = traverse_util.flatten_dict(state["ema"])
  exported = traverse_util.flatten_dict(pretrained.load(folder).params)
  shared = [p for p in ema if p in exported]
  assert len(shared) >= len(ema) // 2, (len(shared), len(ema))
  for p in shared:
    np.testing.assert_array_equal(exported[p], ema[p], err_msg="/".join(p))
  # The trained weights themselves, beside it.
  out = _run("export", tmp_path, [*CASES[stage], "--step=2", "--weights=raw"], 3)
  assert f"{folder}_raw: exported" in out, out[-3000:]
  trained = traverse_util.flatten_dict(state["trainable"])
  raw = traverse_util.flatten_dict(pretrained.load(f"{folder}_raw").params)
  assert any(not np.array_equal(trained[p], ema[p]) for p in shared)  # EMA differs
  for p in shared:
    np.testing.assert_array_equal(raw[p], trained[p], err_msg="/".join(p))
  if stage == "interpolator":  # (--step=latest: the newest checkpoint, exported already)
    out = _run("export", tmp_path, [*CASES[stage], "--step=7"], 3, ok=False)
    assert "expected 'best', 'latest' or one of the complete steps" in out, out[-3000:]
    out = _run("export", tmp_path, [*CASES[stage], "--step=latest"], 3)
    assert (f"{tmp_path / 'export' / 'step_3'}: exists already, left as it is (checkpoint "
            f"{tmp_path / 'checkpoints'}/3, the latest") in out, out[-3000:]
  # The finished command run again: with its export missing, only that is written;
  # then (exported) nothing is loaded, compiled or trained, and the run's last metrics
  # are kept. Each case is run once, with a changed config (the seed), which takes the
  # same path as the run's own flags (config_changes only feeds the NOTE): one launch
  # each instead of two.
  last = (tmp_path / "last_metrics.json").read_text()
  # Writing weights reads no data: a changed data config (here the seed, for which the
  # data state refuses to resume) refused the export of a finished run.
  if stage == "interpolator":  # (the autoencoder's was never written)
    shutil.rmtree(tmp_path / "export" / "step_3")
  out = _run("train", tmp_path, [*CASES[stage], "--config.seed=7"], 3, export=True)
  assert f"{stage}: already at step 3 of 3; writing the missing export" in out, out[-3000:]
  assert "compiled" not in out and (tmp_path / "export" / "step_3").is_dir()
  assert (tmp_path / "last_metrics.json").read_text() == last
  out = _run("train", tmp_path, [*CASES[stage], "--config.seed=7"], 3,
             export=True)  # step_3 exported just above
  assert f"{stage}: already at step 3 of 3; nothing to run" in out, out[-3000:]
  assert "resumed" not in out and (tmp_path / "last_metrics.json").read_text() == last
  # (The run saved step 3 without train.export; writing the export saved no checkpoint.)
  assert ("NOTE the finished run's config differs from this one: seed: 0 -> 7; "
          "train.export: False -> True; nothing is retrained") in out, out[-3000:]

  if stage == "interpolator":
    # --step=best asked of a run that ranked nothing (trained with keep_best=0) says so.
    # Its export exists: nothing is restored (the state moved away here would fail it).
    state_dir = tmp_path / "checkpoints" / "3" / "state"
    state_dir.rename(tmp_path / "state_aside")
    out = _run("export", tmp_path, [*CASES[stage], "--config.train.keep_best=1",
                                    "--step=best"], 3)
    (tmp_path / "state_aside").rename(state_dir)
    assert "the latest: no checkpoint holds the metrics that rank them" in out, out[-3000:]
    assert "step_3: exists already, left as it is" in out, out[-3000:]
    assert ("NOTE exporting with a config other than the run's (checkpoint 3): "
            "train.keep_best: 0 -> 1; pass the training run's --config flags") in out
    # Its checkpoints hold the digests of frozen theta, not theta: a resume whose random
    # image model is another one is refused before anything is restored.
    out = _run("train", tmp_path, [*CASES[stage], "--config.random_image_model.seed=1"],
               4, ok=False)
    assert "the frozen parameters loaded for this run are not the ones" in out, out[-3000:]


def test_diverged_steps_are_skipped_and_reported(tmp_path):
  # Peak lr 1e38 after a one-step warmup from 0 (optim.learning_rate): step 1 changes
  # nothing, step 2's update (Adam: about lr per weight) overflows the forward of every
  # later step, so steps 3 and 4 are skipped, each leaving the parameters as they were.
  out = _run("train", tmp_path, [*CASES["autoencoder"], "--config.optim.lr=1e38",
                                 "--config.optim.warmup_steps=1"], 4)
  assert re.search(r"step 2: loss .* skipped 0 eta \d+:\d\d:\d\d", out), out[-3000:]
  assert ("WARNING step 3: 1 step(s) since the last log had a non-finite loss" in out
          and "WARNING step 4: 1 step(s)" in out and "(2 in total)" in out
          and "WARNING step 2" not in out), out[-3000:]
  assert "NaN or Inf found" not in out  # tensorboardX's warning per value, silenced
  assert re.search(r"autoencoder: steps 1-4 in [\d.]+s \([\d.]+s per step .*\), 2 skipped "
                   r"in all; checkpoints \[2, 4\]", out), out[-3000:]
  steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [s["skipped"] for s in steps] == [0, 0, 1, 2]
  # Making a batch is part of each step's wall time; the last step makes none.
  assert all(0 < s["input_s"] < s["step_time"] for s in steps[:-1]), steps
  assert steps[-1]["input_s"] == 0
  # The skipped steps left the weights, their EMA and the optimiser state as step 2 saved
  # them; only the step and skip counts moved.
  saved = {step: ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / str(step)
                                                    / "state") for step in (2, 4)}
  assert [(saved[s]["step"], saved[s]["skipped"]) for s in (2, 4)] == [(2, 0), (4, 2)]
  for tree in ("trainable", "ema", "opt_state"):
    two, four = (jax.tree_util.tree_leaves_with_path(saved[s][tree]) for s in (2, 4))
    assert [p for p, _ in two] == [p for p, _ in four] and len(two) > 10, tree
    for (path, a), (_, b) in zip(two, four):
      np.testing.assert_array_equal(b, a, err_msg=tree + jax.tree_util.keystr(path))


def test_console_scripts_list_their_flags_in_help():
  # An installed script's sys.argv[0] is its wrapper, under which absl found no flags:
  # `--help` printed only "USAGE: ... [flags]".
  script = Path(sys.executable).parent / "videoldm-sample"
  if not script.exists():
    pytest.skip("the console scripts are not installed in this environment")
  out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert "prompt -> video clips" in out.stdout and "--class_label" in out.stdout, out.stdout


def test_a_failed_override_loads_the_config_file_once(tmp_path):
  # Its message needs the config, which the flag no longer holds once an override
  # failed: the file was loaded again, its get_config run twice (a config's own error
  # too, before it was shown).
  (tmp_path / "counted.py").write_text(
      "import sys\nimport ml_collections\n\n\ndef get_config():\n"
      "  print('get_config ran', file=sys.stderr)\n"
      "  return ml_collections.ConfigDict(dict(seed=0, data=dict(kind='procedural')))\n")
  (tmp_path / "broken.py").write_text(
      "import sys\n\n\ndef get_config():\n"
      "  print('get_config ran', file=sys.stderr)\n  return {}['no_such_key']\n")
  for config, override, message in (
      ("counted.py", "--config.seed.x=1",
       "FATAL Flags parsing error: --config.seed.x: config.seed is a value (int), not a "
       "group of fields"),
      ("counted.py", "--config.data.kind.x=1",
       "FATAL Flags parsing error: --config.data.kind.x: config.data.kind is a value "
       "(str), not a group of fields"),
      ("broken.py", "--config.seed=1", "KeyError: 'no_such_key'")):
    proc = subprocess.run(
        [sys.executable, "-m", "videoldm_jax.cli.train", f"--config={tmp_path / config}",
         override, f"--workdir={tmp_path / 'w'}"], cwd=ROOT, capture_output=True,
        text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("get_config ran") == 1, proc.stderr[-3000:]


def test_misspelt_config_fields_and_unusable_outputs_are_usage_errors(tmp_path):
  # Each failed with a traceback: a misspelt field in ml_collections' escaped
  # AttributeError (60 lines), an output under a file after the sampling had run.
  (tmp_path / "a_file").touch()
  cases = [
      ("train", ["--config=configs/keyframe_tiny.py", f"--workdir={tmp_path / 'w'}",
                 "--config.train.num_stpes=3"],
       "FATAL Flags parsing error: --config.train.num_stpes: the config has no field "
       "'num_stpes' (Did you mean \"num_steps\" instead of \"num_stpes\"?)"),
      ("train", ["--config=configs/keyframe_tiny.py", "--config.sede=1",
                 f"--workdir={tmp_path / 'w'}"],
       "FATAL Flags parsing error: --config.sede: the config has no field 'sede'"),
      ("train", ["--config=configs/keyframe_tiny.py", "--config.trian.num_steps=3",
                 f"--workdir={tmp_path / 'w'}"],  # a misspelt group
       "FATAL Flags parsing error: --config.trian.num_steps: the config has no field "
       "'trian' (Did you mean \"train\""),
      # Through a value, not a group (a KeyError naming no field; a TypeError).
      ("train", ["--config=configs/keyframe_tiny.py", "--config.seed.x=1",
                 f"--workdir={tmp_path / 'w'}"],
       "FATAL Flags parsing error: --config.seed.x: config.seed is a value (int), not a "
       "group of fields"),
      ("train", ["--config", "configs/keyframe_tiny.py", "--config.data.kind.x=1",
                 f"--workdir={tmp_path / 'w'}"],
       "FATAL Flags parsing error: --config.data.kind.x: config.data.kind is a value (str), "
       "not a group of fields"),
      # (sys.exit(256) exits 0: a stopped run would look finished)
      ("train", ["--config=configs/keyframe_tiny.py", f"--workdir={tmp_path / 'w'}",
                 "--stopped_exit_code=256"], "--stopped_exit_code=256: an exit "),
      # (0 is a valid --stopped_exit_code: the workdir is what is wrong here)
      ("train", ["--config=configs/keyframe_tiny.py", f"--workdir={tmp_path / 'a_file'}",
                 "--stopped_exit_code=0"],
       f"--workdir={tmp_path / 'a_file'}: exists and is not a folder"),
      # (found after the compile before: minutes of an SD-sized config's compile lost)
      ("compile", ["--config=configs/keyframe_tiny.py", "--topology=cpu:1",
                   f"--json={tmp_path / 'a_file' / 'fit.jsonl'}"],
       f"--json={tmp_path / 'a_file' / 'fit.jsonl'}: cannot create the folder"),
      ("cache_latents", ["--model=no_such_model", "--procedural_clips=-2",
                         f"--output={tmp_path / 'cache'}"],
       "--procedural_clips must be >= 0, got -2"),
      ("cache_latents", ["--model=no_such_model", f"--output={tmp_path / 'cache'}"],
       "give exactly one of --tfds_name and --procedural_clips"),
      ("cache_latents", ["--model=no_such_model", "--procedural_clips=2", "--seed=-1",
                         f"--output={tmp_path / 'cache'}"],
       "--seed must be in [0, 2^32), got -1"),
      ("cache_latents", ["--model=no_such_model", "--procedural_clips=2", "--num_shards=0",
                         f"--output={tmp_path / 'cache'}"],
       "--num_shards must be >= 1, got 0"),
      ("sample", ["--model=no_such_model", f"--output={tmp_path / 'a_file' / 'v.mp4'}"],
       f"--output={tmp_path / 'a_file' / 'v.mp4'}: cannot create the folder "
       f"{tmp_path / 'a_file'}"),
      ("cache_latents", ["--model=no_such_model", "--procedural_clips=2",
                         f"--output={tmp_path / 'a_file'}"],
       f"--output={tmp_path / 'a_file'}: exists and is not a folder"),
      # 30 rows were encoded to 7 latent rows, which the model's 2-level UNet cannot take
      ("cache_latents", [f"--model={tmp_path / 'model'}", "--procedural_clips=2",
                         "--height=30", "--width=32", f"--output={tmp_path / 'cache'}"],
       "--height=30 --width=32: must be positive multiples of 8"),
      ("cache_latents", [f"--model={tmp_path / 'model'}", "--procedural_clips=2",
                         "--height=32", "--width=30", f"--output={tmp_path / 'cache'}"],
       "--height=32 --width=30: must be positive multiples of 8"),
      ("cache_latents", [f"--model={tmp_path / 'model'}", "--procedural_clips=2",
                         "--height=0", "--width=32", f"--output={tmp_path / 'cache'}"],
       "--height=0 --width=32: must be positive multiples of 8")]
  subprocess.run([sys.executable, "-m", "videoldm_jax.cli.init_random", "--config="
                  "configs/image_tiny.py", f"--output={tmp_path / 'model'}"], cwd=ROOT,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=True, timeout=300)
  for cli, args, message in cases:
    proc = subprocess.run([sys.executable, "-m", f"videoldm_jax.cli.{cli}", *args], cwd=ROOT,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and message in proc.stderr, (cli, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
