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


def pytest_sessionfinish(session, exitstatus):
  if _OWN_CACHE:
    import shutil
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
