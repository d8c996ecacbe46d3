"""`train_and_evaluate(config, workdir)`: the training job of any stage, start to end.

The stage module `videoldm_jax.stages.<config.stage>` supplies a `StageSetup` (models
and parameters, batch preparation, loss, trainable mask, optimiser; see
stages/base.py). This loop is the same for all of them: it builds the mesh, restores
the newest checkpoint in `workdir` (or initialises the parameters), then loops: host
batch -> global arrays -> the jitted step. It logs loss, step time, samples/s and MFU
to the console, TensorBoard and WORKDIR/metrics.jsonl (process 0 only), checkpoints
(train state without the frozen parameters unless `train.save_frozen`, their digests,
data-iterator state, config) on schedule and on SIGTERM, samples, and finally exports
an inference folder from the EMA weights. A run stopped by SIGTERM saves, then raises
`Stopped` (videoldm-train exits 143), so that no caller takes it for a finished one.
"""

import collections
import importlib
import importlib.util
import json
import math
import os
import re
import signal
import time
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from videoldm_jax import distributed, pretrained, sharding, video_io
from videoldm_jax.models import attention
from videoldm_jax.models.config_base import is_seed
from videoldm_jax.stages import base
from videoldm_jax.stages.base import StageSetup
from videoldm_jax.train import flops as flops_lib
from videoldm_jax.train import frozen as frozen_lib
from videoldm_jax.train import optim as optim_lib
from videoldm_jax.train import perf
from videoldm_jax.train import step as step_lib
from videoldm_jax.train.checkpointing import Checkpointer, PreemptionGuard
from videoldm_jax.train.step_log import StepLog, last_metrics, log, save_last_metrics
from videoldm_jax.train.state import split

# config.stage -> module with `setup(config, workdir) -> StageSetup`.
STAGES = ("image_ldm", "keyframe", "predictor", "interpolator", "decoder", "autoencoder",
          "upsampler")


class Stopped(Exception):
  """Raised by `train_and_evaluate`, on every process, when SIGTERM stopped the run
  before `train.num_steps`: after the checkpoint of `step` is saved and closed. The run
  is not finished; the same call (command) resumes it from `step`."""

  def __init__(self, step: int, num_steps: int, why: str):
    super().__init__(f"stopped at step {step} of {num_steps} ({why}); checkpoint {step} "
                     "saved: run the same command again to resume")
    self.step, self.num_steps, self.why = step, num_steps, why


def stage_setup(config: ml_collections.ConfigDict, workdir: Path) -> StageSetup:
  """The StageSetup of `config.stage`."""
  available = [s for s in STAGES
               if importlib.util.find_spec(f"videoldm_jax.stages.{s}") is not None]
  if config.stage not in available:
    raise ValueError(f"config.stage={config.stage!r}; expected one of {available}")
  base.check_sample_config(config.get("sample"))
  return importlib.import_module(f"videoldm_jax.stages.{config.stage}").setup(config, workdir)


def _to_global(batch: dict, batch_sharding: NamedSharding, process_count: int) -> dict:
  def put(x):
    global_shape = (x.shape[0] * process_count,) + x.shape[1:]
    return jax.make_array_from_process_local_data(batch_sharding, x, global_shape)
  return {k: put(np.asarray(v)) for k, v in batch.items()}


def _gathered(tree):
  """Full host copies of (possibly multi-host sharded) arrays."""
  return jax.tree_util.tree_map(
      lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def export_dir(workdir: Path, step: int, weights: str = "ema") -> Path:
  """WORKDIR/export/step_N (EMA weights) or step_N_raw (the trained weights)."""
  if weights not in ("ema", "raw"):
    raise ValueError(f"weights={weights!r}: expected 'ema' or 'raw'")
  return workdir / "export" / (f"step_{step}" + ("_raw" if weights == "raw" else ""))


def latest_export(workdir: Path) -> Optional[Path]:
  """The newest EMA export WORKDIR/export/step_N (by N; step_N_raw is not one), or None."""
  steps = [p for p in Path(workdir).glob("export/step_*") if re.fullmatch(r"step_\d+", p.name)]
  return max(steps, key=lambda p: int(p.name.split("_")[1]), default=None)


def export(workdir: Path, setup: StageSetup, state, step: int, weights: str = "ema") -> Path:
  """Writes export_dir(workdir, step, weights) from the EMA (or the trained) weights;
  the stage decides the format. A folder that exists already is left as it is."""
  out = export_dir(workdir, step, weights)
  params = _gathered(state.merged(use_ema=weights == "ema"))
  error = None
  if jax.process_index() == 0 and not out.exists():
    try:
      pretrained.write_folder(out, lambda folder: setup.export(folder, params))
    except Exception as e:  # noqa: BLE001  (re-raised below, after the others hear of it)
      error = e
  # Every process learns whether process 0's write failed, so none waits for an export
  # that will not come (until the coordination service's timeout).
  failed = jax.process_count() > 1 and bool(multihost_utils.broadcast_one_to_all(
      np.int32(error is not None)))
  if error is not None:
    raise error
  if failed:
    raise RuntimeError(f"process 0 failed to write the export {out}; see its log")
  return out


def write_samples(workdir: Path, setup: StageSetup, state, step: int, writer) -> None:
  """EMA samples -> workdir/samples/step_N.{mp4,gif} + first/middle/last frames in TB."""
  videos = setup.sample(_gathered(state.merged(use_ema=True)), step)
  if jax.process_index() != 0:
    return
  videos = np.asarray(videos)
  if videos.ndim == 4:  # images: one-frame clips
    videos = videos[:, None]
  clip = video_io.video_grid(videos, cols=len(videos), pad=2)
  out = workdir / "samples" / f"step_{step}.mp4"
  out.parent.mkdir(parents=True, exist_ok=True)
  video_io.write_mp4(str(out), clip, fps=8)
  video_io.write_gif(str(out.with_suffix(".gif")), clip, fps=8)
  if writer is not None:
    frames = clip[[0, len(clip) // 2, len(clip) - 1]]
    writer.add_image("samples", np.concatenate(list(frames), axis=0), step,
                     dataformats="HWC")
  log(f"samples: {out}")


def _checkpointer(config: ml_collections.ConfigDict, workdir: Path) -> Checkpointer:
  return Checkpointer(workdir / "checkpoints", max_to_keep=config.train.keep,
                      keep_best=config.train.keep_best,
                      save_interval_steps=config.train.ckpt_every)


def _prepared(config: ml_collections.ConfigDict, workdir: Path, mesh_shape: dict,
              dcn_shape: dict, training: bool = True):
  """(stage setup, mesh, state shardings) of a run of `config` on that mesh; for
  training, the batch is checked against the mesh before anything is loaded."""
  attention.set_implementation(config.train.get("attention", "auto"))
  mesh = sharding.make_mesh(mesh_shape, dcn_shape=dcn_shape)
  sharding.check_rules(config.rules)  # (entries checked as written, before tuple())
  rules = [tuple(r) for r in config.rules]
  if training:
    sharding.check_batch_split(config.data.batch_size, config.train.grad_accum, mesh,
                               tuple(config.batch_axes), rules=rules)
  setup = stage_setup(config, workdir)
  param_sh = sharding.shardings_for(setup.logical_axes, mesh, setup.abstract_params, rules)
  shardings = step_lib.state_shardings(param_sh, setup.stage, setup.optimizer,
                                       setup.abstract_params, mesh)
  return setup, mesh, shardings


def step_partitioning(config: ml_collections.ConfigDict, mesh: Mesh):
  """The context to trace the train step of `config` in on `mesh`: its batch axes and
  the mesh axes the rules give the attention heads (`attention.partitioned`)."""
  return attention.partitioned(mesh, tuple(config.batch_axes),
                               sharding.mesh_axes(config.rules, "heads"))


def _restored(ckpt: Checkpointer, step: int, setup: StageSetup, shardings):
  """(state, data_state, frozen digests) of checkpoint `step`, on `shardings`."""
  target = step_lib.abstract_state(
      step_lib.abstract_train_state(setup.abstract_params, setup.stage, setup.optimizer),
      shardings)
  return frozen_lib.restore(ckpt, step, target, setup.init_params, setup.stage.is_trainable)


def local_workdir(workdir: str) -> Path:
  """`workdir` as an absolute path; a URI (gs://...) is refused: metrics, TensorBoard,
  samples and exports are written with local file APIs."""
  if "://" in str(workdir):
    raise ValueError(f"--workdir={workdir}: URIs are not supported; use a filesystem "
                     "path every process sees (a Filestore / NFS mount, or the bucket "
                     "mounted with gcsfuse)")
  return Path(workdir).absolute()


def export_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                      step: str = "best", weights: str = "ema") -> Path:
  """Writes WORKDIR/export/step_N (as the end of training does) from a checkpoint of the
  run of `config` in `workdir`; returns the folder.

  step: 'best' (the best by loss when `train.keep_best` > 0, else the latest),
    'latest', or a step number. A folder that exists already is left as it is.
  weights: 'ema' (what the end of training exports) or 'raw': the trained weights
    themselves, into step_N_raw (for short fine-tunes, where the EMA lags).
  """
  workdir = local_workdir(workdir)
  export_dir(workdir, 0, weights)  # checks `weights` before anything is loaded
  if not (workdir / "checkpoints").is_dir():
    raise FileNotFoundError(f"{workdir / 'checkpoints'} does not exist: is {workdir} the "
                            "--workdir of a videoldm-train run?")
  with _checkpointer(config, workdir) as ckpt:
    complete = ckpt.all_steps()
    if not complete:
      raise FileNotFoundError(f"no complete checkpoint in {ckpt.directory}")
    if step == "best":
      n = ckpt.best_step()
      ranked = config.train.keep_best and (ckpt.directory / str(n) / "metrics").exists()
      why = ("best by loss (train.keep_best)" if ranked
             else "the latest: train.keep_best=0 ranks none" if not config.train.keep_best
             else "the latest: no checkpoint holds the metrics that rank them (the run "
                  "trained with train.keep_best=0)")
    elif step == "latest":
      n, why = complete[-1], "the latest"
    elif str(step).isdigit() and int(step) in complete:
      n, why = int(step), "as asked"
    else:
      raise ValueError(f"step={step!r}: expected 'best', 'latest' or one of the complete "
                       f"steps in {ckpt.directory}: {complete}")
    changes = config_changes(ckpt.saved_config(n) or {}, config.to_dict())
    if changes:
      # The export is built from this config (model configs, the training record):
      # fields that change no parameter shape (an upsampler's scale, the frame size)
      # would be written into the export unnoticed.
      log(f"NOTE exporting with a config other than the run's (checkpoint {n}): "
          f"{'; '.join(changes)}; pass the training run's --config flags")
    n, existed = _agreed(n, workdir, weights)
    out = export_dir(workdir, n, weights)
    if not existed:  # (else nothing to restore: minutes at SD scale for a no-op)
      # The state restores onto any mesh: the devices at hand, parameters replicated
      # (the training mesh may need a pod).
      setup, _, shardings = _prepared(config, workdir, dict(data=-1, fsdp=1, tensor=1), {},
                                      training=False)
      state, _, _ = _restored(ckpt, n, setup, shardings)
      export(workdir, setup, state, n, weights)
  log(f"{out}: {'exists already, left as it is' if existed else 'exported'} "
      f"(checkpoint {ckpt.directory}/{n}, {why}; {'EMA' if weights == 'ema' else 'trained'} "
      "weights)")
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the stage `config.stage`; returns the last logged metrics, or
  raises `Stopped` when SIGTERM stopped it (after saving)."""
  workdir = local_workdir(workdir)
  max_in_flight = config.train.get("max_steps_in_flight", 2)
  # Before anything loads or compiles (log_every=0 failed after the first step with a
  # ZeroDivisionError; num_steps=0 exported the untrained model).
  for field, value in (("max_steps_in_flight", max_in_flight),
                       ("num_steps", config.train.num_steps),
                       ("log_every", config.train.log_every),
                       ("ckpt_every", config.train.ckpt_every),
                       ("keep", config.train.keep)):
    if value is not None and value < 1:  # (keep=None: Orbax keeps every checkpoint)
      raise ValueError(f"config.train.{field}={value}: expected >= 1")
  seed = config.get("seed", 0)
  if not is_seed(seed):  # (the training samples refused it after the first steps)
    raise ValueError(f"config.seed={seed!r}: expected a whole number in [0, 2^32)")
  step_lib.check_ema_decay(config.optim.ema_decay)
  for field in ("optim", "disc_optim"):  # (the stages' optimisers check them again)
    if field in config:
      optim_lib.check_settings(config[field], field)
  workdir.mkdir(parents=True, exist_ok=True)
  with _checkpointer(config, workdir) as ckpt:  # closed on errors too
    return _train_and_evaluate(config, workdir, ckpt, max_in_flight)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: Path,
                        ckpt: Checkpointer, max_in_flight: int) -> dict:
  # Process 0's view of the workdir for every process: a process that decided alone
  # (a lagging shared filesystem) could skip collectives the others enter.
  latest, exported = _agreed(ckpt.latest_step(), workdir)
  # First, before the slow parts (pretrained models, restore, compile): with several
  # processes, a SIGTERM during them then stops the run after its first step (see
  # PreemptionGuard).
  guard = PreemptionGuard(latest or 0)
  num_steps = config.train.num_steps
  if latest is not None and latest >= num_steps and (exported or not config.train.export):
    # A finished run started again (a retrying launcher, a re-run pipeline): nothing to
    # load, compile or write; the last metrics stay as the run left them.
    log(f"{config.stage}: already at step {latest} of {num_steps}; nothing to run")
    changes = config_changes(ckpt.saved_config(latest) or {}, config.to_dict())
    if changes:
      # (A re-run pipeline with new flags, e.g. the demo after an update, would otherwise
      # go on with the old model without a word.)
      log(f"NOTE the finished run's config differs from this one: {'; '.join(changes)}; "
          "nothing is retrained (train in a new --workdir to use it)")
    return last_metrics(workdir)
  setup, mesh, shardings = _prepared(config, workdir, dict(config.mesh),
                                     dict(config.get("dcn_mesh", {})))
  stage, tx = setup.stage, setup.optimizer
  pc, pi = jax.process_count(), jax.process_index()

  save_frozen = config.train.get("save_frozen", False)
  carried = {}  # losses of the ranking window a preemption save left open
  data_state = None
  if latest is not None:
    changes = config_changes(ckpt.saved_config(latest) or {}, config.to_dict())
    try:
      state, data_state, frozen_digests = _restored(ckpt, latest, setup, shardings)
    except ValueError as e:
      if not changes:
        raise
      # A config change that alters parameter shapes (e.g. a context stage resumed
      # without its context_channels): the cause belongs beside the shape list.
      raise ValueError(f"{e}\nThe config differs from the checkpoint's: "
                       f"{'; '.join(changes)}; where these change parameter shapes, resume "
                       "with the run's --config flags") from e
    if data_state is None:  # videoldm-train always writes it
      raise ValueError(ckpt.damaged(latest, "it has no data/ (the input pipeline's "
                                            "position)"))
    log(f"resumed from {ckpt.directory}/{latest}")
    if changes:
      # Allowed (a longer run, another lr), but the run then differs from one that was
      # never interrupted: said once, here.
      log(f"NOTE resumed with a config other than the checkpoint's: {'; '.join(changes)}")
    carried = {int(k): v for k, v in
               (ckpt.loop_state(latest) or {}).get("window_losses", {}).items()}
  if pi == 0:
    # Lines after the checkpoint (all of them without one) belong to steps this run
    # repeats: a run killed before its first checkpoint restarts from step 0.
    _drop_metrics_after(workdir / "metrics.jsonl", latest or 0)
  if latest is None:
    params = setup.init_params()
    frozen_digests = frozen_lib.leaf_digests(split(params, stage.is_trainable)[1])
    state = step_lib.init_state(params, stage, tx, shardings)
    del params
  setup.init_params = None  # drops the stage's host copy of the pretrained parameters
  if int(state.step) >= num_steps:
    # Finished, but its export is missing: written from the restored state, no compile.
    step = int(state.step)
    log(f"{stage.name}: already at step {step} of {num_steps}; writing the missing export")
    log(f"exported {export(workdir, setup, state, step)}")
    return last_metrics(workdir)
  # After the export-only case: writing weights restores no data state (a changed data
  # config, e.g. another worker_count, refused the export of a finished run; only the
  # autoencoder stage's latent statistics read clips, from the start).
  data = setup.make_iterator()
  if data_state is not None:
    data.set_state(data_state)

  batch_sh = NamedSharding(mesh, PartitionSpec(tuple(config.batch_axes)))
  train_step = step_lib.build_train_step(
      stage, tx, seed=config.seed, ema_decay=config.optim.ema_decay,
      grad_accum=config.train.grad_accum, lr_schedule=setup.lr_schedule,
      shardings=shardings, batch_sharding=batch_sh)
  step = int(state.step)
  next_batch = lambda: _to_global(setup.make_batch(next(data)), batch_sh, pc)
  first = next_batch()
  t0 = time.perf_counter()
  with step_partitioning(config, mesh):
    compiled = train_step.lower(state, first).compile()
    # MFU counts model FLOPs (matmuls + convolutions, forward + backward, per device),
    # as bench/train_step.py does; XLA's own count is logged beside it.
    flops = flops_lib.model_flops(train_step, state, first) / jax.device_count()
  # The peak of the dtype the model computes in (bf16 runs on a GPU's tensor cores at
  # several times its float32 rate).
  peak = perf.matmul_peak_flops(dtype=jnp.dtype(config.train.get("compute_dtype", "float32")))
  log(f"{stage.name}: compiled in {time.perf_counter() - t0:.1f}s; model "
      f"{flops / 1e9:.2f} GFLOP/step/device (XLA {perf.compiled_flops(compiled) / 1e9:.2f}); "
      f"matmul peak {peak / 1e9:.0f} GFLOP/s/device")
  # The processes start the first step together: where one loaded the step from the
  # compilation cache and another compiled it (on CPU, only process 0 writes the cache,
  # and the key holds the process), the first step's collective gave up after 30 s.
  distributed.wait_for_all("train step compiled")
  writer = perf.summary_writer(workdir / "tb", purge_step=step + 1)
  n_params = {k: sum(x.size for x in jax.tree_util.tree_leaves(v))
              for k, v in (("trainable", state.trainable), ("frozen", state.frozen))}
  log(f"params: {n_params['trainable'] / 1e6:.2f}M trainable, "
      f"{n_params['frozen'] / 1e6:.2f}M frozen; start at step {step}")

  _check_schedule_length(config)
  # Losses (setup.best_metric) logged since the last checkpoint, by step: their mean
  # (with the saved step's own) ranks checkpoints for train.keep_best; one batch's loss
  # is mostly timestep noise.
  # A preemption save leaves the window open (it is ranked by nothing): the resumed run
  # carries on with its losses, so it keeps the checkpoints an uninterrupted run keeps.
  window_losses, saved_at = carried, step
  batch = first
  step_log = StepLog(workdir, writer, num_steps, setup.samples_per_step, flops, peak, step,
                     int(state.skipped))
  t_start, start_step = time.perf_counter(), step
  pending = None  # (step, metrics on device) not yet logged

  def write_log(at: int, metrics: dict, **kwargs) -> None:
    m = step_log.write(at, metrics, **kwargs)
    if at > saved_at:  # a step logged one step late may belong to the saved window
      window_losses[at] = m[setup.best_metric]

  trace = perf.StepTrace(workdir / "profile" / (f"process_{pi}" if pc > 1 else ""),
                         config.train.get("profile_start", 10),
                         config.train.get("profile_steps", 0))
  if trace.end > trace.start and not step <= trace.start < config.train.num_steps:
    log(f"no profile: steps {trace.start + 1}-{trace.end} are not ahead of this run "
        f"(steps {step + 1}-{config.train.num_steps})")
  in_flight = collections.deque()
  stopped = None  # why, when a signal stopped the run
  with guard:
    while step < config.train.num_steps:
      trace.before(step)
      state, metrics = compiled(state, batch)
      step += 1
      # At most train.max_steps_in_flight steps queued on the device: the host, ahead,
      # waits for an older step before it makes the next batch (each queued step holds
      # its batch in device memory; nothing else in the loop waits between logs).
      in_flight.append(metrics["loss"])
      if len(in_flight) > max_in_flight:
        in_flight.popleft().block_until_ready()
      logged_now = pending is not None
      if pending is not None:
        # Logged one step late: the copy started when that step was dispatched, and the
        # device is already busy with this one, so reading it costs no stall.
        write_log(*pending)
        pending = None
      stop = guard.should_stop(step) and step < config.train.num_steps
      trace.after(step, (state, metrics), last=stop or step == config.train.num_steps)
      if step % config.train.log_every == 0 or step == config.train.num_steps or stop:
        for leaf in jax.tree_util.tree_leaves(metrics):
          leaf.copy_to_host_async()
        pending = (step, metrics)
        if step == config.train.num_steps or stop:
          write_log(*pending, timed=not logged_now)
          pending = None
      regular = ckpt.should_save(step) or step == config.train.num_steps
      if regular or stop:
        if pending is not None and pending[0] == step:
          # Logged before the save: a kill after the save completes would otherwise
          # lose this step's line for good (the resumed run starts after it).
          write_log(*pending, timed=not logged_now, before_batch=True)
          pending = None
        loop_state = None
        if regular:
          window_losses[step] = float(metrics[setup.best_metric])
          ranked = {"loss": window_mean(window_losses.values())}
        else:
          # A preemption save mid-window: unranked (kept as one of the newest only);
          # its window, the steps an uninterrupted run logs, goes on in the resumed run.
          ranked = None
          loop_state = {"window_losses": {str(k): v for k, v in window_losses.items()
                                          if k % config.train.log_every == 0}}
        # The save copies the state to the host: the copy and the synchronous part of
        # the write are not step time.
        off_step(step_log, state, lambda: ckpt.save(
            step, frozen_lib.checkpoint_tree(state, save_frozen),
            data_state=data.get_state(), config=config.to_dict(), metrics=ranked,
            frozen_digests=frozen_digests, loop_state=loop_state, force=True))
        if regular:
          window_losses, saved_at = {}, step
      if stop:
        sig = guard.signal_received
        stopped = ("SIGTERM to some process" if guard.uses_jax_service
                   else signal.Signals(sig).name if sig else "a signal to another process")
        log(f"stop requested ({stopped}): saved step {step}, exiting")
        break
      every = config.sample.every if "sample" in config else 0
      if setup.sample is not None and every and (step % every == 0
                                                 or step == config.train.num_steps):
        off_step(step_log, state, lambda: write_samples(workdir, setup, state, step, writer))
      if step < config.train.num_steps:
        t_input = time.perf_counter()
        batch = next_batch()
        step_log.input(time.perf_counter() - t_input)
  ckpt.wait_until_finished()
  ran, elapsed = step - start_step, time.perf_counter() - t_start
  last = step_log.last
  log(f"{stage.name}: steps {start_step + 1}-{step} in {elapsed:.1f}s "
      f"({elapsed / ran:.3f}s per step with logging, checkpoints and samples), "
      f"{int(last.get('skipped', 0))} skipped in all; checkpoints {ckpt.all_steps()} "
      f"in {ckpt.directory}")
  if pi == 0:
    # Before the export: a run killed during the export writes it when started again
    # (the finished-run branch), returning these metrics.
    save_last_metrics(workdir, last, step)
  if step >= config.train.num_steps and config.train.export:
    out = export(workdir, setup, state, step)
    log(f"exported {out}")
  if writer is not None:
    writer.close()
  if stopped is not None:
    raise Stopped(step, config.train.num_steps, stopped)
  return last


def off_step(step_log: StepLog, state, work: Callable[[], object]) -> None:
  """Runs `work` (a checkpoint save, samples: it reads `state`) and reports its seconds
  as not step time, after waiting for `state`: the steps still queued on the device are
  step time. (Samples timed with that wait inside hid up to train.max_steps_in_flight
  steps' device time from the log that followed: MFU above 100% on CPU.)"""
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  work()
  step_log.off_step(time.perf_counter() - t0)


def _agreed(latest: Optional[int], workdir: Path, weights: str = "ema"
            ) -> tuple[Optional[int], bool]:
  """(a checkpoint step, whether its `weights` export exists) as process 0 sees them: on
  a shared filesystem another host's view may lag, and a process that chose another
  step, or skipped the restore, would leave the others waiting in its collectives."""
  exported = latest is not None and export_dir(workdir, latest, weights).exists()
  if jax.process_count() == 1:
    return latest, exported
  got = multihost_utils.broadcast_one_to_all(
      np.array([-1 if latest is None else latest, exported], np.int32))
  return (None if got[0] < 0 else int(got[0])), bool(got[1])


def window_mean(losses) -> float:
  """The rank of a checkpoint for train.keep_best: the mean of its window's finite logged
  losses (a skipped, NaN step left the weights as they were, so it says nothing about
  them); inf when none is finite."""
  finite = [x for x in losses if math.isfinite(x)]
  return sum(finite) / len(finite) if finite else math.inf


def config_changes(saved: dict, now: dict) -> list[str]:
  """'field: saved -> now' for every config field that differs (dotted paths)."""
  def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
      if isinstance(v, dict):
        out.update(flat(v, f"{prefix}{k}."))
      else:
        out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out
  a, b = flat(saved), flat(json.loads(json.dumps(now)))  # tuples saved as lists
  show = lambda d, k: repr(d[k]) if k in d else "(absent)"
  return [f"{k}: {show(a, k)} -> {show(b, k)}" for k in sorted(a.keys() | b.keys())
          if k not in a or k not in b or a[k] != b[k]]


def _drop_metrics_after(path: Path, step: int) -> None:
  """Keeps the lines of metrics.jsonl up to `step`: a run killed after its last
  checkpoint logged steps that the resumed run logs again."""
  if not path.exists():
    return
  def logged_at(line: str) -> float:
    try:
      return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
      return float("inf")  # a line cut short by the kill: dropped

  lines = path.read_text().splitlines(keepends=True)
  keep = [ln for ln in lines if ln.strip() and logged_at(ln) <= step]
  if len(keep) != len(lines):
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def _check_schedule_length(config: ml_collections.ConfigDict) -> None:
  """Says when a learning-rate schedule (optim.total_steps, and the decoder stage's
  disc_optim.total_steps) and the run (train.num_steps) end at different steps."""
  steps = config.train.num_steps
  for name in ("optim", "disc_optim"):
    total = config.get(name, {}).get("total_steps")
    if total is None or total == steps:
      continue
    if steps > total:
      log(f"WARNING: train.num_steps={steps} > {name}.total_steps={total}: steps "
          f"{total + 1}-{steps} train at the schedule's final learning rate "
          f"(lr * final_lr_fraction)")
    else:
      log(f"note: the learning rate decays until {name}.total_steps={total}; this run "
          f"stops at train.num_steps={steps}, before it has decayed")


