"""Checkpointer, inference export and PreemptionGuard (8 fake CPU devices, see conftest)."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from videoldm_jax.sharding import make_mesh
from videoldm_jax.train.checkpointing import Checkpointer, PreemptionGuard

REPO = Path(__file__).resolve().parents[1]
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # what Orbax 0.12 names a step while writing it


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState


def _mesh8():
  return make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def _params(mesh, seed=0):
  """{'enc': {'w': (8, 4) over (fsdp, tensor), 'b': (4,) over tensor}, 'head': (2, 3)}."""
  rng = np.random.default_rng(seed)
  put = lambda x, spec: jax.device_put(jnp.asarray(x), NamedSharding(mesh, spec))
  return {"enc": {"w": put(rng.standard_normal((8, 4), np.float32), P("fsdp", "tensor")),
                  "b": put(rng.standard_normal(4).astype(np.float32), P("tensor"))},
          "head": put(rng.standard_normal((2, 3)).astype(np.float32), P())}


def _state(mesh, step=7, seed=0):
  params = _params(mesh, seed)
  opt_state = optax.adam(1e-3).init(params)
  step = jax.device_put(jnp.int32(step), NamedSharding(mesh, P()))  # replicated scalar
  return TrainState(step=step, params=params, opt_state=opt_state)


def _abstract(tree, sharding_fn):
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_fn(p, x)), tree)


def _assert_bitwise(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _tiny(v):
  """One-leaf state for the listing tests."""
  return {"w": jnp.full((4,), v, jnp.float32)}


def test_round_trip_bitwise_with_data_and_config(tmp_path):
  mesh = _mesh8()
  state = _state(mesh)
  data, config = {"epoch": 3, "pos": [1, 2], "seed": 0}, {"lr": 1e-4, "model": {"ch": 32}}
  with Checkpointer(tmp_path / "ckpt") as ck:
    assert ck.latest_step() is None
    assert ck.save(7, state, data_state=data, config=config)
    ck.wait_until_finished()
    assert ck.latest_step() == 7 and ck.all_steps() == [7]
    abstract = _abstract(state, lambda p, x: x.sharding)
    restored, data2, config2 = ck.restore(abstract)
  assert isinstance(restored, TrainState)
  _assert_bitwise(restored, state)
  assert restored.params["enc"]["w"].sharding == state.params["enc"]["w"].sharding
  assert data2 == data and config2 == config
  # A fresh Checkpointer (a restarted job) sees the same step; a step saved without
  # data/config gives None for them.
  ck = Checkpointer(tmp_path / "ckpt")
  assert ck.latest_step() == 7
  assert ck.save(8, state, force=True)
  ck.wait_until_finished()
  _, d, c = ck.restore(abstract)
  assert d is None and c is None
  ck.close()


def test_restore_without_a_step_is_the_latest_and_loop_state_round_trips(tmp_path):
  ck = Checkpointer(tmp_path, max_to_keep=1, keep_best=1)
  for step, loss in ((1, 0.1), (2, 0.9)):  # the best step (1) is older than the latest
    ck.save(step, _tiny(step), metrics={"loss": loss}, data_state={"d": step},
            loop_state={"window_losses": {"2": loss}})
  ck.wait_until_finished()
  assert ck.best_step() == 1 and ck.latest_step() == 2
  state, data, _ = ck.restore({"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
  np.testing.assert_array_equal(state["w"], np.full(4, 2.0))
  assert data == {"d": 2} and ck.loop_state(2) == {"window_losses": {"2": 0.9}}
  # Every JSON side record is checked before the save (not in Orbax's writer thread).
  for kw in ("data_state", "loop_state", "config", "frozen_digests"):
    with pytest.raises(TypeError, match=kw):
      ck.save(3, _tiny(3), force=True, **{kw: {"x": object()}})
  ck.close()


@pytest.mark.parametrize("min_slice", [0, None])
def test_replicated_arrays_round_trip_with_and_without_replica_parallel_writes(
    tmp_path, min_slice):
  """Replicated over 8 devices: a (512, 4096) float32 leaf is 1 MiB per replica slice
  (written replica-parallel under both settings), the small ones are split over the
  replicas only with min_replica_slice_bytes=0 (Orbax's default)."""
  rep = NamedSharding(_mesh8(), P())
  rng = np.random.default_rng(1)
  state = {"big": rng.standard_normal((512, 4096), np.float32),
           "small": rng.standard_normal((16, 8), np.float32), "bias": np.arange(8.0)}
  state = {k: jax.device_put(jnp.asarray(v), rep) for k, v in state.items()}
  kwargs = {} if min_slice is None else {"min_replica_slice_bytes": min_slice}
  with Checkpointer(tmp_path / "ckpt", **kwargs) as ck:
    assert ck.save(1, state)
    ck.wait_until_finished()
    restored, _, _ = ck.restore(_abstract(state, lambda p, x: x.sharding))
  _assert_bitwise(restored, state)
  assert restored["small"].sharding == rep


def test_listing_interval_keep_n_and_best_n(tmp_path):
  ck = Checkpointer(tmp_path / "latest", max_to_keep=2, save_interval_steps=2)
  assert [ck.should_save(s) for s in range(5)] == [True, False, True, False, True]
  assert not ck.save(3, _tiny(3))                       # not due
  for step in (2, 4, 6, 8):
    assert ck.save(step, _tiny(step))
  ck.wait_until_finished()
  assert ck.all_steps() == [6, 8] and ck.latest_step() == 8
  assert not ck.should_save(8) and not ck.save(8, _tiny(0), force=True)  # already saved
  assert ck.save(9, _tiny(9), force=True)               # forced off-interval save
  ck.wait_until_finished()
  assert ck.all_steps() == [8, 9]
  ck.close()

  # Newest 2 AND best 1 by loss: step 2 (loss 1.0) outlives the newest-2 window.
  losses = {1: 5.0, 2: 1.0, 3: 4.0, 4: 3.0, 5: 2.0, 6: 6.0}
  ck = Checkpointer(tmp_path / "best", max_to_keep=2, keep_best=1)
  for step, loss in losses.items():
    ck.save(step, _tiny(step), metrics={"loss": np.float32(loss), "acc": 1 - loss / 10})
  ck.wait_until_finished()
  assert ck.all_steps() == [2, 5, 6] and ck.best_step() == 2
  ck.save(7, _tiny(7))                                   # no metrics: kept as newest only
  ck.close()
  ck = Checkpointer(tmp_path / "best", max_to_keep=2, keep_best=1)  # metrics re-read from disk
  ck.save(8, _tiny(8), metrics={"loss": 0.5})
  ck.wait_until_finished()
  assert ck.all_steps() == [7, 8] and ck.best_step() == 8
  ck.close()

  ck = Checkpointer(tmp_path / "max", max_to_keep=1, keep_best=2, best_metric="acc",
                    best_mode="max")
  for step, loss in losses.items():
    ck.save(step, _tiny(step), metrics={"acc": 1 - loss / 10})
  ck.wait_until_finished()
  assert ck.all_steps() == [2, 5, 6]                     # best acc: 2 and 5; newest: 6
  with pytest.raises(ValueError, match="best_metric 'acc'"):
    ck.save(9, _tiny(9), metrics={"loss": 1.0})
  ck.close()


@pytest.mark.parametrize("mode", ["min", "max"])
def test_non_finite_best_metric_ranks_worst(tmp_path, mode):
  # A diverged step's loss is NaN; newest last, it once came out of Orbax's sort as best.
  ck = Checkpointer(tmp_path, max_to_keep=1, keep_best=1, best_mode=mode)
  # (+inf and -inf in either mode: each is worst in one of them, unless ranked so.)
  for step, value in ((1, 1.0), (2, 0.5), (3, float("inf")), (4, -float("inf")),
                      (5, float("nan"))):
    ck.save(step, _tiny(step), metrics={"loss": value if mode == "min" else -value})
  ck.wait_until_finished()
  assert ck.best_step() == 2 and ck.all_steps() == [2, 5]  # best, and the newest
  ck.close()


def test_unranked_saves_are_not_kept_beyond_the_newest(tmp_path):
  # Preemption saves carry no metrics: kept only while among the newest (max_to_keep),
  # else a preemptible run's disk filled with them.
  ck = Checkpointer(tmp_path, max_to_keep=1, keep_best=1)
  for step in range(1, 7):
    ck.save(step, _tiny(step), metrics={"loss": 1.0 / step} if step % 2 == 0 else None,
            force=True)
  ck.wait_until_finished()
  assert ck.all_steps() == [6]  # the newest is also the best (loss 1 / 6)
  ck.close()


@pytest.mark.parametrize("target", ["one_device", "mesh_4_2_1"])
def test_restore_onto_other_mesh(tmp_path, target):
  state = _state(_mesh8(), seed=1)
  with Checkpointer(tmp_path) as ck:
    ck.save(1, state)
  if target == "one_device":
    dev = SingleDeviceSharding(jax.devices()[3])
    sharding_fn = lambda p, x: dev
  else:
    mesh = make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
    sharding_fn = lambda p, x: NamedSharding(
        mesh, P("data", "fsdp") if x.ndim == 2 and x.shape[0] % 4 == 0 else
        P("fsdp") if x.ndim == 1 else P())
  abstract = _abstract(state, sharding_fn)
  with Checkpointer(tmp_path) as ck:
    restored, _, _ = ck.restore(abstract)
  _assert_bitwise(restored, state)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
    assert got.sharding == want.sharding


_KILLED_SAVE = textwrap.dedent("""
  import os, signal, sys, time
  import jax.numpy as jnp
  from videoldm_jax.train.checkpointing import Checkpointer
  d = sys.argv[1]
  ck = Checkpointer(d)
  ck.save(1, {"small": jnp.ones(4), "big": jnp.full((8,), 1.0)})
  ck.wait_until_finished()
  ck.save(2, {"small": jnp.ones(4) * 2, "big": jnp.ones((1 << 24,))})  # 64 MB, async
  # save() returns once the arrays are on the host; the write is still running. Its
  # tmp folder may appear a moment later on a loaded machine: wait for it.
  tmp, final = os.path.join(d, "2.orbax-checkpoint-tmp"), os.path.join(d, "2")
  deadline = time.monotonic() + 30
  while not os.path.isdir(tmp) and time.monotonic() < deadline:
    time.sleep(0.005)
  if not os.path.isdir(tmp) or os.path.exists(final) or ck.latest_step() != 1:
    print(f"tmp {os.path.isdir(tmp)}, final {os.path.exists(final)}, latest "
          f"{ck.latest_step()}", file=sys.stderr, flush=True)
    os._exit(3)  # not sys.exit: interpreter shutdown would wait for Orbax's writer
  os.kill(os.getpid(), signal.SIGKILL)
""")


def test_unfinished_save_is_never_listed_or_restored(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(tmp_path)], env=env,
                        cwd=REPO, capture_output=True, text=True, timeout=60)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  assert sorted(os.listdir(tmp_path)) == ["1", "2" + TMP_SUFFIX]
  # Same shape of leftover, made by hand: a complete step copied under the tmp name.
  shutil.copytree(tmp_path / "1", tmp_path / ("5" + TMP_SUFFIX))

  abstract = {"small": jax.ShapeDtypeStruct((4,), jnp.float32),
              "big": jax.ShapeDtypeStruct((8,), jnp.float32)}
  ck = Checkpointer(tmp_path)
  assert ck.all_steps() == [1] and ck.latest_step() == 1
  state, _, _ = ck.restore(abstract)
  np.testing.assert_array_equal(state["small"], np.ones(4))
  with pytest.raises(FileNotFoundError, match="step 2"):
    ck.restore(abstract, step=2)
  # The resumed run saves step 2 again: Orbax replaces the stale tmp folder.
  assert ck.save(2, {"small": jnp.ones(4) * 3, "big": jnp.zeros(8)})
  ck.wait_until_finished()
  assert ck.latest_step() == 2 and not (tmp_path / ("2" + TMP_SUFFIX)).exists()
  np.testing.assert_array_equal(ck.restore(abstract)[0]["small"], np.full(4, 3.0))
  ck.close()


@pytest.mark.parametrize("damage", ["cut_array_file", "lost_state_metadata",
                                    "lost_json_metadata", "lost_state", "empty_state_metadata",
                                    "cut_metrics"])
def test_a_damaged_complete_step_names_its_folder_and_the_one_before(tmp_path, damage):
  # A copy cut short (gcsfuse renames are not atomic) looked complete and failed with a
  # TensorStore dump, AttributeError 'keys' or FileNotFoundError.
  # (A lost state/ or an empty state/_METADATA: a KeyError or JSONDecodeError naming no
  # folder. A cut metrics file stopped every Checkpointer from opening the folder.)
  state = {"a": jnp.arange(4096.0)}
  ck = Checkpointer(tmp_path, keep_best=2)
  for step in (1, 2, 3):  # the advice names 2, not 1
    ck.save(step, state, data_state={"i": step}, frozen_digests={"w": "x"},
            metrics={"loss": 3.0 - step}, force=True)
  ck.wait_until_finished()
  if damage == "cut_metrics":
    (tmp_path / "3" / "metrics" / "metrics").write_text('{"lo')
    ck = Checkpointer(tmp_path, keep_best=2)  # opens; step 3 is unranked
    assert ck.all_steps() == [1, 2, 3]
    np.testing.assert_array_equal(ck.restore(jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state), 3)[0]["a"],
        np.arange(4096.0))
    ck.close()
    return
  if damage == "lost_state":
    import shutil
    shutil.rmtree(tmp_path / "3" / "state")
  elif damage == "empty_state_metadata":
    (tmp_path / "3" / "state" / "_METADATA").write_bytes(b"")
  elif damage == "cut_array_file":
    biggest = max((tmp_path / "3" / "state").rglob("ocdbt.process_0/d/*"),
                  key=lambda f: f.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:biggest.stat().st_size // 2])
  elif damage == "lost_state_metadata":
    (tmp_path / "3" / "state" / "_METADATA").unlink()
  else:
    (tmp_path / "3" / "frozen_digests" / "metadata").unlink()
  ck = Checkpointer(tmp_path)
  assert ck.latest_step() == 3
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  with pytest.raises(ValueError, match=f"(?s)checkpoint {tmp_path}/3: .* damaged .*if it "
                     "fails again, delete that folder to resume from checkpoint 2"):
    ck.frozen_digests(3)
    ck.restore(abstract, 3)
  np.testing.assert_array_equal(ck.restore(abstract, 2)[0]["a"], np.arange(4096.0))
  ck.close()


def test_errors_name_directory_path_and_shapes(tmp_path):
  with pytest.raises(ValueError, match="max_to_keep must be >= 1 or None, got 0"):
    Checkpointer(tmp_path / "none_kept", max_to_keep=0)  # (every save deleted, silently)
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty")):
    Checkpointer(tmp_path / "empty").restore({"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
  state = {"params": {"w": jnp.ones((8, 4)), "b": jnp.ones(4)}}
  with Checkpointer(tmp_path / "c") as ck:
    ck.save(3, state)
  ck = Checkpointer(tmp_path / "c")
  bad = {"params": {"w": jax.ShapeDtypeStruct((8, 6), jnp.float32),
                    "b": jax.ShapeDtypeStruct((4,), jnp.float32)}}
  with pytest.raises(ValueError) as err:
    ck.restore(bad)
  msg = str(err.value)
  assert "'params/w'" in msg and "(8, 4)" in msg and "(8, 6)" in msg and "/c/3" in msg
  renamed = {"params": {"W": jax.ShapeDtypeStruct((8, 4), jnp.float32),
                        "b": jax.ShapeDtypeStruct((4,), jnp.float32)}}
  with pytest.raises(ValueError, match="params/W.*params/w"):
    ck.restore(renamed)
  with pytest.raises(TypeError, match="'params/b'"):
    ck.save(4, {"params": {"b": np.ones(4)}}, force=True)
  with pytest.raises(TypeError, match="data_state"):
    ck.save(4, state, data_state={"x": object()}, force=True)
  ck.close()


def test_orbax_never_asks_the_preemption_service(tmp_path, monkeypatch):
  # The train loop alone asks, once per step: Orbax's own calls (from should_save, save
  # and its finalize thread, with the older saved step) could move the sync point behind
  # process 0 (checkpointing._Manager).
  from jax.experimental import multihost_utils
  calls = []
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point",
                      lambda step: calls.append(step) or False)
  ck = Checkpointer(tmp_path / "ck", max_to_keep=2, save_interval_steps=2)
  for step in range(1, 5):
    if ck.should_save(step):
      ck.save(step, {"params": {"b": jax.device_put(np.full(4, step, np.float32))}})
  ck.wait_until_finished()
  assert ck.all_steps() == [2, 4] and calls == []
  ck.close()


def test_preemption_guard_sets_flag_and_restores_handler():
  before = signal.getsignal(signal.SIGTERM)
  prev_int = signal.getsignal(signal.SIGINT)
  with PreemptionGuard() as guard:
    assert not guard.stop_requested
    # Ctrl-C stays a KeyboardInterrupt unless asked for (sigint=True).
    assert signal.getsignal(signal.SIGINT) is prev_int
    os.kill(os.getpid(), signal.SIGTERM)
    # The handler runs at the next bytecode boundary of the main thread.
    for _ in range(1000):
      if guard.stop_requested:
        break
    assert guard.stop_requested and guard.signal_received == signal.SIGTERM
    assert guard.any_process_requested() and guard.should_stop(1)
    assert not guard.uses_jax_service  # one process, no jax.distributed
  assert signal.getsignal(signal.SIGTERM) is before
  with PreemptionGuard(sigint=True) as guard:
    os.kill(os.getpid(), signal.SIGINT)  # would raise KeyboardInterrupt without the guard
    for _ in range(1000):
      if guard.stop_requested:
        break
    assert guard.signal_received == signal.SIGINT
  assert signal.getsignal(signal.SIGINT) is prev_int
