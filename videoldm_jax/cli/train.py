r"""videoldm-train: run (or resume) a training stage.

  videoldm-train --config=configs/keyframe_tiny.py --workdir=work/keyframe_tiny \
      --config.train.num_steps=100

Re-running the same command resumes from the newest complete checkpoint in --workdir.
SIGTERM saves a checkpoint and exits with --stopped_exit_code (143, as for a process
ended by SIGTERM): not 0, so that a launcher (launch/gpu_slurm.sbatch, a Kubernetes
Job) tells a stopped run from a finished one and starts it again.
Multi-host: TPU VMs, SLURM and Open MPI 4
are detected from the environment; any other launcher passes --coordinator_address,
--num_processes and --process_id (see videoldm_jax/distributed.py and launch/).
"""

import contextlib
import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from videoldm_jax.cli import output_path, run_app

CONFIG = config_flags.DEFINE_config_file("config", None, "stage config file")
WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, logs, samples, exports")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "",
                                   "HOST:PORT of process 0 (explicit multi-process start)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "processes in the job")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "this process's index")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", 0, "fake CPU devices per process (tests / local_multiprocess.sh)")
_STOPPED_EXIT_CODE = flags.DEFINE_integer(
    "stopped_exit_code", 143,
    "exit status of a run stopped by SIGTERM (saved, not finished); 143 = 128 + SIGTERM, "
    "the status of a process the signal ended. 0 makes a stopped run look finished.")


@contextlib.contextmanager
def failed_process_exits_at_once():
  """Around a command's work after `initialize_distributed`: an exception on one of
  several processes prints its traceback and ends that process with status 1 at once.
  Through JAX's shutdown barrier it was held 300 s waiting for the others, which wait in
  their next collective; the launcher (or srun --kill-on-bad-exit) stops them once this
  one is gone. One process: the exception propagates as usual."""
  try:
    yield
  except Exception:  # pylint: disable=broad-except
    import jax
    if jax.process_count() == 1:
      raise
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def initialize_distributed() -> None:
  """jax.distributed from the flags or the launcher's environment (before any JAX use)."""
  from videoldm_jax import distributed
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                         _CPU_DEVICES.value)


def main(argv):
  del argv  # (run_app refuses positional arguments)
  logging.set_verbosity(logging.WARNING)  # Orbax reports every file at INFO
  if CONFIG.value is None or WORKDIR.value is None:
    raise app.UsageError("--config and --workdir are required")
  if not 0 <= _STOPPED_EXIT_CODE.value <= 255:
    raise app.UsageError(f"--stopped_exit_code={_STOPPED_EXIT_CODE.value}: an exit "
                         "status is 0-255")
  output_path(WORKDIR.value, "workdir", folder=True)
  initialize_distributed()
  from videoldm_jax.train import loop  # after JAX's start-up
  with failed_process_exits_at_once():
    try:
      loop.train_and_evaluate(CONFIG.value, WORKDIR.value)
    except loop.Stopped as e:
      # With several processes, none leaves before all have closed the checkpoint:
      # JAX's shutdown barrier (at exit, from jax.distributed) holds each until all
      # arrive, so a launcher that kills the rest on a non-zero exit (srun
      # --kill-on-bad-exit) cannot cut a save short.
      loop.log(f"videoldm-train: {e} (exit {_STOPPED_EXIT_CODE.value})")
      sys.exit(_STOPPED_EXIT_CODE.value)


def run():
  run_app(main, __name__)


if __name__ == "__main__":
  run()
