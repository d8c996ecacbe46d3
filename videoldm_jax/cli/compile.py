r"""videoldm-compile: will this stage's train step fit on that topology? Answered on a
laptop, before anything is launched, by compiling it ahead of time.

  videoldm-compile --config=configs/keyframe_sd15_v5p128.py --topology=v5p:4x4x4
  videoldm-compile --config=configs/keyframe_tiny.py --topology=cpu:4 --cpu_devices=4
  videoldm-compile --config=configs/keyframe_sd15_8xh100.py --topology=h100:8 --cpu_devices=8

Prints per-device memory (arguments, temporaries, outputs, peak vs the chip's HBM),
FLOPs per step and FITS / DOES NOT FIT; --json also writes the figures as one JSON
line. TPU topologies need libtpu (pip install -e '.[tpu]'); run with JAX_PLATFORMS=cpu
on a machine without TPUs. config.image_model may name a converted folder or a preset
(sd15, sd21, sd21-base): only its configs are read.
"""

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from videoldm_jax.cli import output_path, run_app

_CONFIG = config_flags.DEFINE_config_file("config", None, "stage config file")
_TOPOLOGY = flags.DEFINE_multi_string(
    "topology", None, "TPU topology (v5p:4x4x4, v5e:8x8, v4:2x2x2, v6e:4x4), cpu:N or "
    "h100:N (compiled for N CPU devices as a proxy: XLA cannot compile for absent GPUs); "
    "repeat the flag for several")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "fake CPU devices (cpu:N, h100:N)")
_JSON = flags.DEFINE_string("json", "", "append one JSON line per topology to this file")


def main(argv):
  del argv  # (run_app refuses positional arguments)
  logging.set_verbosity(logging.WARNING)
  if _CONFIG.value is None or not _TOPOLOGY.value:
    raise app.UsageError("--config and --topology are required")
  import jax
  if _CPU_DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
  # Checked before the compiles (minutes each for SD-sized configs), not after the first.
  json_path = output_path(_JSON.value, "json") if _JSON.value else None
  from videoldm_jax import compile_check
  failed = False
  for topology in _TOPOLOGY.value:
    report = compile_check.fit_report(_CONFIG.value, topology)
    print(report.summary(), flush=True)
    line = json.dumps(report.to_json())
    print(line, flush=True)
    if json_path:
      with open(json_path, "a") as f:
        f.write(line + "\n")
    failed |= report.fits is False
  sys.exit(1 if failed else 0)


def run():
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # no TPU here: libtpu only describes it
  run_app(main, __name__)


if __name__ == "__main__":
  run()
