"""Test-wide JAX set-up: CPU only, 8 fake devices, float32 matmuls at full precision, a
session-wide persistent compilation cache."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent compilation cache for the session, inherited by the trainer
# subprocesses: a resumed or repeated run of the same tiny config loads its compiled
# step instead of compiling it again (the bulk of the suite's time on 2 cores).
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="videoldm-jax-test-cache-")
  # Every compiled program, not only those over 1 s: a trainer subprocess also compiles
  # dozens of small ones (data placement, metrics, the matmul peak): a repeated tiny
  # trainer run took 41.7-44.2 s with them cached, 45.5 s without (one measurement).
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402  (must come after the environment above)

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def max_rel_err(ours, ref) -> float:
  """max |ours - ref| / max |ref|: the parity metric used throughout the tests."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


@pytest.fixture(scope="session")
def torch_cpu():
  """PyTorch, single-threaded-deterministic, for reference computations."""
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  return torch


def perturb_all_weights(module, torch, seed: int = 0, scale: float = 0.05):
  """Adds noise to EVERY parameter of a torch module, so that no zero-initialised
  layer can hide a wrong mapping; norm scales stay around 1."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in module.named_parameters():
      p.add_(torch.randn(p.shape, generator=g) * scale)
  return module


# Seconds each test file took (the sum of its tests' setup, call and teardown in a
# fresh-clone run of launch/test.sh at 7803b7f on the 2-core Intel Xeon host,
# 2026-12-07); files under 15 s are left out. With `--dist loadfile` each of the two
# workers runs whole files, taking the next one when it is nearly done: files go out
# heaviest first and the light ones fill the end (longest-processing-time-first).
# xdist's own order, most tests first, sent out three-minute files last: replaying that
# run's times, it kept one worker busy 1360 s against 1229 s for the other, this order
# 1295 s against 1294 s (1701 / 1510 s against 1608 / 1603 s in the morning's run).
FILE_SECONDS = {
    "test_train_options.py": 237, "test_multiprocess.py": 230, "test_stage_cli.py": 207,
    "test_compile_check.py": 176, "test_autoencoder_stages.py": 171,
    "test_generate.py": 151, "test_context_stages.py": 142, "test_train_loop.py": 131,
    "test_upsampler.py": 131, "test_video_unet.py": 122, "test_train_step.py": 92,
    "test_eval.py": 91, "test_class_guidance.py": 87, "test_context_models.py": 85,
    "test_ab_step.py": 74, "test_convert_pipeline.py": 61, "test_unet_vae_parity.py": 59,
    "test_native_attention.py": 53, "test_fast_layer_forms.py": 47,
    "test_video_decoder.py": 45, "test_flops_and_attention.py": 32,
    "test_grain_pipeline.py": 27, "test_logical_axes.py": 16, "test_latent_cache.py": 16,
}


def pytest_configure(config):
  # xdist reorders files by their number of tests unless told not to (the option
  # exists from pytest-xdist 3.8; without xdist there is nothing to reorder).
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  # A stable sort: each file's tests stay together and in their order; the files
  # without a weight keep pytest's (alphabetical) order after the weighed ones.
  items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))


def pytest_sessionfinish(session, exitstatus):
  if _OWN_CACHE:
    import shutil
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
