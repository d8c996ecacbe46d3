"""Train-state checkpoints (Orbax): async, crash-safe, keep-N + best-N, restore onto any mesh.

One `Checkpointer` owns one directory, laid out by Orbax's CheckpointManager:

  DIR/<step>/state/    the saved pytree (Orbax PyTree format: OCDBT/zarr; every leaf a
                       global jax.Array, each process writes the shards it owns); the
                       trainer's is its TrainState without the frozen parameters
  DIR/<step>/data/     JSON: the input pipeline's position (optional)
  DIR/<step>/config/   JSON: the run config (optional)
  DIR/<step>/frozen_digests/  JSON: digests of the frozen parameters left out of
                       state/ (optional; see train/frozen.py)
  DIR/<step>/loop/     JSON: train-loop state a resumed run carries on with (optional;
                       a preemption save's losses since the last ranked checkpoint)
  DIR/<step>/metrics/  JSON: the metrics that rank steps for `keep_best` (when > 0)

Crash safety comes from Orbax, and `latest_step` / `restore` rely on it: a step is
written into `DIR/<step>.orbax-checkpoint-tmp/` and renamed to `DIR/<step>/` only after
every item and the step metadata are on disk (on GCS, where renames are not atomic,
Orbax writes `commit_success.txt` last instead). Orbax lists steps only in final form, so
a save killed mid-write is invisible; its tmp folder stays until that step is saved
again (Orbax then deletes it first).

The inference export (theta + EMA phi for sampling) is a `pretrained` model folder,
written by `train.loop.export`. `PreemptionGuard` tells the train loop, at the same step
on every process, that SIGTERM (or optionally SIGINT) came, before a final forced save.
JSON and Orbax only: nothing here pickles.
"""

import json
import os
import signal
import threading
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as ocm
# Not re-exported by Orbax (pinned < 0.13 in setup.py); the same per-array metadata
# store that Orbax's default jax.Array handler writes.
from orbax.checkpoint._src.metadata import array_metadata_store

from videoldm_jax import distributed

STATE, DATA, CONFIG, FROZEN_DIGESTS = "state", "data", "config", "frozen_digests"
LOOP = "loop"
JSON_ITEMS = (DATA, CONFIG, FROZEN_DIGESTS, LOOP)

# Orbax splits a replicated array into one slice per replica so that every replica
# writes a part ("replica-parallel"). Each slice is an eager jax op, compiled once per
# new shape and dispatched once per replica: for the ~1300 small leaves of the tiny
# key-frame state on 4 CPU devices that took 7 s per save, longer than the write.
# Below 1 MiB per slice a write costs about as much as a dispatch, so one replica
# writes the whole array; large arrays keep replica-parallel writes.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _state_handler(min_replica_slice_bytes: int) -> ocp.PyTreeCheckpointHandler:
  """Orbax's PyTree handler with the standard type handlers, except that jax.Arrays
  are written replica-parallel only from `min_replica_slice_bytes` per slice."""
  arrays = ocp.type_handlers.ArrayHandler(
      array_metadata_store=array_metadata_store.Store(),
      min_slice_bytes_for_replica_parallel=min_replica_slice_bytes)
  registry = ocp.type_handlers.create_type_handler_registry(
      *[(ty, ocp.type_handlers.get_type_handler(ty))
        for ty in ocp.type_handlers.supported_types() if ty is not jax.Array],
      (jax.Array, arrays))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _key_str(key) -> str:
  """One pytree key -> the name used in error messages and to match checkpoint trees.

  Orbax stores dataclass / namedtuple fields as dict keys and sequences by index, so
  attribute, dict and index keys all reduce to their plain text.
  """
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _path_str(path) -> str:
  return "/".join(_key_str(k) for k in path) or "<root>"


def _flat(tree, is_leaf=None) -> dict[str, Any]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return {_path_str(p): leaf for p, leaf in leaves}


def _default_sharding(where: str, path: str) -> jax.sharding.Sharding:
  # One process: the first device is an unambiguous home. Several processes: a guess
  # would silently give every host a different copy, so the caller must say.
  if jax.process_count() > 1:
    raise ValueError(f"{where}: abstract leaf '{path}' has no sharding; with "
                     f"{jax.process_count()} processes every leaf needs a global sharding")
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _abstractify(tree, where: str):
  """Tree of jax.Arrays / ShapeDtypeStructs -> ShapeDtypeStructs that all carry a sharding."""
  def one(path, leaf):
    name = _path_str(path)
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
      sharding = getattr(leaf, "sharding", None) or _default_sharding(where, name)
      return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    raise TypeError(f"{where}: abstract leaf '{name}' is a {type(leaf).__name__}; "
                    "expected jax.ShapeDtypeStruct or jax.Array")
  return jax.tree_util.tree_map_with_path(one, tree)


def _check_matches(saved_meta, abstract, where: str) -> None:
  """Raises ValueError naming the first differing leaves of the saved tree and `abstract`.

  `saved_meta` is Orbax's metadata tree (leaves have `.shape`). Dtypes may differ on
  purpose (Orbax casts on restore, e.g. float32 -> bfloat16), so only paths and shapes
  are compared.
  """
  saved = _flat(saved_meta, is_leaf=lambda x: hasattr(x, "shape"))
  wanted = _flat(abstract)
  missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
  if missing or extra:
    raise ValueError(f"{where}: checkpoint tree does not match abstract_state; requested "
                     f"but not in checkpoint: {missing[:8]}; in checkpoint but not "
                     f"requested: {extra[:8]}")
  bad = [f"'{k}': checkpoint shape {tuple(saved[k].shape)}, abstract_state shape "
         f"{tuple(wanted[k].shape)}" for k in sorted(wanted)
         if tuple(saved[k].shape) != tuple(wanted[k].shape)]
  if bad:
    raise ValueError(f"{where}: shape mismatch for {len(bad)} parameter(s): "
                     + "; ".join(bad[:8]))


def _check_saveable(state, where: str) -> None:
  """Every leaf must be a jax.Array; with several processes a global one (else Orbax fails
  later, in a background thread, with "host local jax.Array")."""
  multi = jax.process_count() > 1
  for name, leaf in _flat(state).items():
    if not isinstance(leaf, jax.Array):
      raise TypeError(f"{where}: state leaf '{name}' is a {type(leaf).__name__}; put it "
                      "on the mesh as a jax.Array (e.g. replicated) before saving")
    if multi and leaf.is_fully_addressable:
      raise ValueError(f"{where}: state leaf '{name}' is host-local; make it a global "
                       "array (device_put with a NamedSharding over the global mesh)")


def _json_checked(obj, what: str, where: str):
  """Fails now, in the caller's thread, rather than inside Orbax's background write."""
  try:
    json.dumps(obj)
  except (TypeError, ValueError) as e:
    raise TypeError(f"{where}: {what} is not JSON-serialisable: {e}") from e
  return obj


class Checkpointer:
  """Periodic train-state checkpoints in `directory` (see the module docstring).

  max_to_keep: the newest N complete steps are kept (None: keep all).
  keep_best: additionally keep the N best steps by `metrics[best_metric]`
    (`best_mode` 'min' or 'max'), even when older than the newest `max_to_keep`.
  save_interval_steps: `should_save(step)` is true every this many steps.
  async_save: `save` returns once device buffers are copied to host; the write runs in
    the background. Call `wait_until_finished()` / `close()` before exiting.
  min_replica_slice_bytes: a replicated array is split over its replicas for writing
    only when each part has at least this many bytes (0: always, Orbax's default).
  All processes must make the same calls in the same order (Orbax syncs them).
  """

  def __init__(self, directory, *, max_to_keep: Optional[int] = 3, keep_best: int = 0,
               best_metric: str = "loss", best_mode: str = "min",
               save_interval_steps: int = 1, async_save: bool = True,
               min_replica_slice_bytes: int = MIN_REPLICA_SLICE_BYTES):
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
    if keep_best < 0:
      raise ValueError(f"keep_best must be >= 0, got {keep_best}")
    if best_mode not in ("min", "max"):
      raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
    path = str(directory)
    # Orbax wants absolute paths; URIs (gs://...) already are.
    self.directory = epath.Path(path if "://" in path else os.path.abspath(path))
    self.best_metric, self.keep_best, self.best_mode = best_metric, keep_best, best_mode
    # Orbax's default decision policy also saves the first step of a run whatever the
    # interval (InitialSavePolicy); a pure interval is more predictable. The preemption
    # stop step is saved by the train loop itself (force=True; see _Manager).
    decide = ocm.FixedIntervalPolicy(save_interval_steps)
    common = dict(save_decision_policy=decide, enable_async_checkpointing=async_save)
    if keep_best:
      # Orbax's max_to_keep + best_fn means "keep the N best", not "N latest AND K best";
      # the union of both needs explicit preservation policies. Steps saved without
      # metrics (e.g. a preemption save) are kept by LatestN only, so they cannot pile
      # up. best_fn must still be set: Orbax writes metrics only when it is.
      get_metric = lambda m: float(m[best_metric])
      policy = ocm.AnyPreservationPolicy([
          ocm.LatestN(n=max_to_keep),
          ocm.BestN(get_metric_fn=get_metric, reverse=(best_mode == "min"), n=keep_best,
                    keep_checkpoints_without_metrics=False)])
      options = ocp.CheckpointManagerOptions(
          best_fn=get_metric, best_mode=best_mode, preservation_policy=policy, **common)
    else:
      options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, **common)
    # Registered handlers let a fresh manager read metadata of existing steps.
    handlers = {STATE: _state_handler(min_replica_slice_bytes),
                **{k: ocp.JsonCheckpointHandler() for k in JSON_ITEMS}}
    self._mgr = _Manager(self.directory, options=options, item_handlers=handlers)
    self._state_metadata: dict[int, Any] = {}  # a complete step never changes

  # -- listing ----------------------------------------------------------------------

  def _step_dir(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def all_steps(self) -> list[int]:
    """Complete steps on disk, ascending. A save still in flight (async) or killed
    mid-write is not listed: its final folder does not exist yet."""
    return sorted(s for s in self._mgr.all_steps()
                  if ocp.step.is_path_finalized(self._step_dir(s)))

  def latest_step(self) -> Optional[int]:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def best_step(self) -> Optional[int]:
    """Best complete step by `best_metric` (needs keep_best > 0), else the latest."""
    best = self._mgr.best_step() if self.keep_best else None
    return best if best in self.all_steps() else self.latest_step()

  def should_save(self, step: int) -> bool:
    """True at the save interval, once per step and only after the newest saved step."""
    return bool(self._mgr.should_save(int(step)))

  # -- save / restore ---------------------------------------------------------------

  def _metadata(self, step: int):
    if step not in self._state_metadata:
      if not (self._step_dir(step) / STATE).is_dir():
        raise ValueError(self.damaged(step, "it has no state/"))
      try:
        metadata = self._mgr.item_metadata(step)[STATE]
      except Exception as e:  # noqa: BLE001  (an empty _METADATA: JSONDecodeError, ...)
        first = (str(e).splitlines() or [type(e).__name__])[0][:300]
        raise ValueError(self.damaged(step, f"reading state/'s metadata failed: {first}")
                         ) from e
      if metadata is None:  # state/_METADATA lost
        raise ValueError(self.damaged(step, "its state/ has no metadata"))
      self._state_metadata[step] = metadata
    return self._state_metadata[step]

  def state_fields(self, step: int) -> list[str]:
    """Top-level names of the state saved at `step` (a TrainState's fields, also those
    holding an empty tree)."""
    return sorted(_key_str(k) for k in self._metadata(step).keys())

  def damaged(self, step: int, why: str) -> str:
    """The message for a complete-looking step that cannot be read: what to do."""
    older = [s for s in self.all_steps() if s < step]
    then = f"resume from checkpoint {older[-1]}" if older else "start from scratch"
    return (f"checkpoint {self._step_dir(step)}: {why}. It looks complete but cannot be "
            f"read: damaged (a file lost or cut short), or a passing I/O error; if it "
            f"fails again, delete that folder to {then}")

  def _json_item(self, step: int, name: str) -> Optional[Any]:
    if not (self._step_dir(step) / name).exists():
      return None
    items = ocp.args.Composite(**{name: ocp.args.JsonRestore()})
    try:
      return self._mgr.restore(step, args=items)[name]
    except Exception as e:  # noqa: BLE001  (Orbax / TensorStore raise plain Exception)
      raise ValueError(self.damaged(step, f"reading {name}/ failed: {e}")) from e

  def frozen_digests(self, step: int) -> Optional[dict]:
    """The frozen-parameter digests saved with `step`, or None."""
    return self._json_item(step, FROZEN_DIGESTS)

  def saved_config(self, step: int) -> Optional[dict]:
    """The run config saved with `step`, or None."""
    return self._json_item(step, CONFIG)

  def loop_state(self, step: int) -> Optional[dict]:
    """The train-loop state saved with `step` (`save(loop_state=)`), or None."""
    return self._json_item(step, LOOP)

  def save(self, step: int, state, *, data_state: Optional[dict] = None,
           config: Optional[dict] = None, metrics: Optional[dict] = None,
           frozen_digests: Optional[dict] = None, loop_state: Optional[dict] = None,
           force: bool = False) -> bool:
    """Starts saving `state` (pytree of global jax.Arrays) as `step`; True if started.

    Skipped (False) when `step` is not due (unless `force`) or is already saved or being
    saved: a forced save after a preemption may land on a step just saved periodically.
    metrics: scalars (JSON-able after float()) ranking this step when keep_best > 0.
    frozen_digests: {leaf path: digest} of parameters `state` leaves out (train/frozen.py).
    loop_state: JSON the train loop reads back on resume (`loop_state`).
    """
    step = int(step)
    where = f"checkpoint {self._step_dir(step)}"
    if step in self._mgr.all_steps() or not (force or self.should_save(step)):
      return False
    _check_saveable(state, where)
    items = {STATE: ocp.args.PyTreeSave(state)}
    if data_state is not None:
      items[DATA] = ocp.args.JsonSave(_json_checked(data_state, "data_state", where))
    if config is not None:
      items[CONFIG] = ocp.args.JsonSave(_json_checked(config, "config", where))
    if frozen_digests is not None:
      items[FROZEN_DIGESTS] = ocp.args.JsonSave(
          _json_checked(frozen_digests, "frozen_digests", where))
    if loop_state is not None:
      items[LOOP] = ocp.args.JsonSave(_json_checked(loop_state, "loop_state", where))
    if metrics is not None:
      metrics = {k: float(np.asarray(v)) for k, v in metrics.items()}
      if self.keep_best and self.best_metric not in metrics:
        raise ValueError(f"{where}: metrics {sorted(metrics)} lack best_metric "
                         f"'{self.best_metric}'")
      if self.keep_best and not np.isfinite(metrics[self.best_metric]):
        # A diverged step (NaN loss) ranks worst: Orbax's sort could place NaN first.
        metrics[self.best_metric] = float("inf") if self.best_mode == "min" else -float("inf")
    return bool(self._mgr.save(step, args=ocp.args.Composite(**items),
                               metrics=metrics if self.keep_best else None, force=True))

  def restore(self, abstract_state, step: Optional[int] = None):
    """-> (state, data_state | None, config | None) of `step` (default: latest complete).

    abstract_state: the state's tree of jax.ShapeDtypeStruct(shape, dtype,
      sharding=NamedSharding(mesh, spec)) (or of jax.Arrays): leaves are read straight
      into that sharding, on any mesh; the one used at save time does not matter.
      Leaves without a sharding go to the first device (single process only).
    Raises FileNotFoundError if there is no complete checkpoint (or not `step`), and
    ValueError naming the parameter path and both shapes if the trees differ.
    """
    complete = self.all_steps()
    if step is None:
      if not complete:
        raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
      step = complete[-1]
    elif int(step) not in complete:
      raise FileNotFoundError(f"no complete checkpoint for step {step} in "
                              f"{self.directory}; complete steps: {complete}")
    step = int(step)
    where = f"checkpoint {self._step_dir(step)}"
    abstract = _abstractify(abstract_state, where)
    # Before Orbax reads anything: a tree or shape Orbax refuses fails its restore
    # part-way, with un-awaited reads reported as ignored exceptions afterwards.
    _check_matches(self._metadata(step), abstract, where)
    # Each item is a folder of the step's (Orbax's step metadata says the same after
    # reading every array's metadata once more: 0.45 s of a W1 state's 2.1 s restore).
    items = {STATE: ocp.args.PyTreeRestore(
        abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))}
    items.update({k: ocp.args.JsonRestore() for k in (DATA, CONFIG)
                  if (self._step_dir(step) / k).exists()})
    try:
      out = self._mgr.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{where}: restore failed: {e}") from e
    except Exception as e:  # noqa: BLE001  (TensorStore: plain Exception on a cut file)
      # Its first line: TensorStore appends a page of spec after it.
      first = (str(e).splitlines() or [type(e).__name__])[0][:300]
      raise ValueError(self.damaged(step, f"reading it failed: {first}")) from e
    return out[STATE], out.get(DATA), out.get(CONFIG)

  def wait_until_finished(self) -> None:
    """Blocks until the in-flight async save is on disk (re-raises its error, if any)."""
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class _Manager(ocp.CheckpointManager):
  """Orbax's CheckpointManager, minus its own questions to JAX's preemption service.

  Orbax asks the service from `should_save` and `save`, and after an async save from its
  finalize thread, with the saved (older) step. The service keeps the last step each
  process reported: a notice right after that late call puts the sync point behind
  process 0's loop (two processes calling the service in that order: the other one
  stopped at the late step + 1, process 0 never stopped), so the others would wait in
  the stop save's collectives while process 0 ran on. The train loop asks once per
  step (`PreemptionGuard.should_stop`) and saves the stop step itself.
  """

  def reached_preemption(self, step: int) -> bool:
    return False

  def _get_metrics(self, step):
    # Orbax reads every step's metrics when it opens the folder and catches only a
    # missing file: one cut short stopped every Checkpointer (keep_best or not) with a
    # JSONDecodeError naming no step. Such a step ranks as unranked, and says so.
    try:
      return super()._get_metrics(step)
    except (ValueError, OSError) as e:
      logging.warning("checkpoint %s: its metrics cannot be read (%s); the step is "
                      "unranked for keep_best", self.directory / str(step), e)
      return None


# -- preemption ---------------------------------------------------------------------

class PreemptionGuard:
  """`with PreemptionGuard(start_step) as guard:` ... `if guard.should_stop(step): ...`
  (save, then leave the loop).

  One process: installs handlers for SIGTERM (what schedulers and TPU/GPU VM maintenance
  send before a kill) and, with `sigint=True`, SIGINT. The handler only sets a flag:
  Python runs it between bytecodes of the main thread, possibly inside a JAX dispatch or
  an Orbax call, so doing the save there could deadlock or corrupt state. Previous
  handlers come back on exit. Must be entered from the main thread (a Python rule for
  signal handlers).

  After `jax.distributed.initialize`, JAX's preemption service already owns SIGTERM: its
  notifier (installed by `initialize`, so it also hears a SIGTERM during loading,
  restore or compile) tells the coordination service, which picks the step after the furthest
  process's current one as the sync point, in background threads. `should_stop(step)`
  asks it (a host-local read, tens of microseconds): every process gets True at the same
  step, and no collective waits for the device. The guard installs no handler then (one
  would replace the notifier's); SIGTERM is the only signal it hears. The service
  compares step numbers, and a notice before the first one would fix the sync point at
  step 1: construct the guard with the run's start step as soon as that is known, and
  let nothing else ask the service (see `_Manager`). Where the service is off
  (`jax_enable_preemption_service=False`), several processes fall back to this guard's
  handlers and an allgather of the flags at every step.
  """

  def __init__(self, start_step: int = 0, *, sigint: bool = False):
    self._signals = (signal.SIGTERM,) + ((signal.SIGINT,) if sigint else ())
    self._previous: dict[int, Any] = {}
    self._event = threading.Event()
    self.signal_received: Optional[int] = None
    self.uses_jax_service = _jax_preemption_service(start_step)
    if self.uses_jax_service and sigint:
      raise ValueError("sigint=True: JAX's preemption service (on after "
                       "jax.distributed.initialize) hears SIGTERM only")

  def _handler(self, signum, frame):  # noqa: ARG002  (signature fixed by `signal`)
    self.signal_received = signum
    self._event.set()

  @property
  def stop_requested(self) -> bool:
    """This process's own flag (the handlers', or `request_stop`'s)."""
    return self._event.is_set()

  def request_stop(self) -> None:
    """Sets the flag by hand (tests, or a trainer that stops for other reasons)."""
    if self.uses_jax_service:
      raise RuntimeError("request_stop: under JAX's preemption service only SIGTERM "
                         "stops the processes together")
    self._event.set()

  def should_stop(self, step: int) -> bool:
    """True when the processes should save `step` and exit; the same on all of them.

    Call it on every process at every step, with the number of the step just run.
    """
    if self.uses_jax_service:
      if multihost_utils.reached_preemption_sync_point(int(step)):
        self.signal_received = signal.SIGTERM
        return True
      return False
    return self.any_process_requested()

  def any_process_requested(self) -> bool:
    """True if the flag is set on any process (a collective: call on all of them; it
    waits for the device work already queued)."""
    return bool(distributed.process_flags(self.stop_requested).any())

  def __enter__(self):
    if self.uses_jax_service:
      return self
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError("PreemptionGuard must be entered from the main thread")
    for sig in self._signals:
      self._previous[sig] = signal.signal(sig, self._handler)
    return self

  def __exit__(self, *exc):
    for sig, prev in self._previous.items():
      # None: the old handler was not installed from Python; the default is the
      # closest thing we can put back.
      signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
    self._previous.clear()
    return False


def _jax_preemption_service(step: int) -> bool:
  """Whether JAX's preemption service runs in this process (after
  `jax.distributed.initialize`, unless `jax_enable_preemption_service` is off); if so,
  tells it the current step."""
  if not jax.distributed.is_initialized():
    return False
  try:
    # Also the first step number the service sees: a notice that came before it would
    # put the sync point at step 1, never reached by a resumed run.
    multihost_utils.reached_preemption_sync_point(int(step))
  except RuntimeError as e:
    if "Preemption sync manager has not been initialized" in str(e):
      return False  # initialized with jax_enable_preemption_service off
    raise
  return True
