"""Every stage through `videoldm-train` (the CLI users run): the stages whose own test
files exercise the trainer elsewhere (keyframe, image_ldm: test_train_loop.py;
predictor: test_context_stages.py; decoder: test_autoencoder_stages.py; upsampler:
test_upsampler.py) are not repeated. Here: the interpolator and the image
autoencoder train a few steps, checkpoint, and resume where they stopped."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parents[1]
TINY_DATA = ["--config.data.kind=procedural", "--config.data.num_frames=4",
             "--config.data.height=16", "--config.data.width=16",
             "--config.data.batch_size=2"]
CASES = {
    # One UNet level: XLA's compile time grows with the op count (the stage's context
    # encoder and its conditioning are what this case adds to the key-frame tests).
    "interpolator": ["--config=configs/interpolator_tiny.py", *TINY_DATA,
                     "--config.random_image_model.unet.block_out_channels=(32,)",
                     "--config.random_image_model.unet.attention_levels=(True,)"],
    # The generator and discriminator both train from step 1 (disc_start=1).
    "autoencoder": ["--config=configs/autoencoder_tiny.py", *TINY_DATA,
                    "--config.loss.disc_start=1"],
}


def _train(workdir: Path, args: list, steps: int, ok: bool = True) -> str:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-m", "videoldm_jax.cli.train", *args, f"--workdir={workdir}",
       f"--config.train.num_steps={steps}", "--config.train.ckpt_every=2",
       "--config.train.log_every=1", "--config.sample.every=0",
       "--config.train.export=false"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert (proc.returncode == 0) == ok, proc.stderr[-3000:]
  return proc.stderr


@pytest.mark.parametrize("stage", sorted(CASES))
def test_stage_trains_checkpoints_and_resumes_from_the_cli(stage, tmp_path):
  out = _train(tmp_path, CASES[stage], 2)
  assert f"{stage}: compiled" in out and (tmp_path / "checkpoints" / "2").is_dir()
  out = _train(tmp_path, CASES[stage], 3)
  assert "resumed from" in out and "step 3: loss" in out
  steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [s["step"] for s in steps] == [1, 2, 3]
  assert all(np.isfinite(s["loss"]) and s["skipped"] == 0 for s in steps)
  if stage == "interpolator":
    # Its checkpoints hold the digests of frozen theta, not theta: a resume whose random
    # image model is another one is refused before anything is restored.
    out = _train(tmp_path, [*CASES[stage], "--config.random_image_model.seed=1"], 4,
                 ok=False)
    assert "the frozen parameters loaded for this run are not the ones" in out, out[-3000:]
