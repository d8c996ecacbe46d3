r"""videoldm-train: run (or resume) a training stage.

  videoldm-train --config=configs/keyframe_tiny.py --workdir=work/keyframe_tiny \
      --config.train.num_steps=100

Re-running the same command resumes from the newest complete checkpoint in --workdir.
SIGTERM saves a final checkpoint and exits.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from videoldm_jax.train.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "stage config file")
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, logs, samples, exports")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax reports every file at INFO
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("--config and --workdir are required")
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
