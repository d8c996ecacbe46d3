r"""videoldm-export: an inference folder from any checkpoint of a training run.

  videoldm-export --config=configs/keyframe_tiny.py --workdir=work/keyframe_tiny \
      --step=best

Takes the same --config (and --config.* overrides) as the videoldm-train run that wrote
--workdir, restores checkpoint --step and writes WORKDIR/export/step_N from its EMA
weights, the folder the end of training writes (videoldm-sample / videoldm-generate
read it). --step: 'best' (the best by loss, kept with train.keep_best; without it the
latest), 'latest' or a step number. --weights=raw exports the trained weights instead
of their EMA, into WORKDIR/export/step_N_raw. Frozen parameters left out of the checkpoint
(train.save_frozen=false) are loaded from the run's pretrained model and checked
against the checkpoint's digests. One process is enough: the state is restored onto the
devices at hand (parameters replicated), whatever mesh trained it.
"""

from absl import app, flags, logging

from videoldm_jax.cli import run_app
from videoldm_jax.cli import train as train_cli

_STEP = flags.DEFINE_string("step", "best", "checkpoint to export: 'best', 'latest' or "
                            "a step number")
_WEIGHTS = flags.DEFINE_enum("weights", "ema", ["ema", "raw"],
                             "ema: the EMA weights (as the end of training exports); raw: "
                             "the trained weights, into step_N_raw")


def main(argv):
  del argv  # (run_app refuses positional arguments)
  logging.set_verbosity(logging.WARNING)  # Orbax reports every file at INFO
  if train_cli.CONFIG.value is None or train_cli.WORKDIR.value is None:
    raise app.UsageError("--config and --workdir are required")
  train_cli.initialize_distributed()
  from videoldm_jax.train import loop  # after JAX's start-up
  with train_cli.failed_process_exits_at_once():
    print(loop.export_checkpoint(train_cli.CONFIG.value, train_cli.WORKDIR.value,
                                 _STEP.value, _WEIGHTS.value))


def run():
  # The training run's flags this command reads (not train's --stopped_exit_code).
  run_app(main, __name__, reused_flags=(
      "config", "workdir", "coordinator_address", "num_processes", "process_id",
      "cpu_devices"))


if __name__ == "__main__":
  run()
