"""What a stage hands the trainer: `StageSetup`.

Every stage module (`videoldm_jax.stages.<name>`) exposes

  setup(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> StageSetup

and `train/loop.py` does the rest the same way for all of them: mesh and shardings
from the logical axes, the train state (initialised or restored), the one jitted step
of `train/step.py`, logging, checkpoints, samples and the export. A stage is thus
(models + parameters, batch preparation, loss, trainable mask, optimiser): nothing in
the loop knows which stage it runs.
"""

import contextlib
import contextvars
import dataclasses
from pathlib import Path
from typing import Callable, Collection, Iterator, Optional

import numpy as np
import optax

from videoldm_jax.train.step import Stage


@dataclasses.dataclass
class StageSetup:
  """The trainer's view of a stage.

  stage: trainable mask + loss (and optional optimiser groups), see `train.step.Stage`.
  abstract_params: the full parameter tree as ShapeDtypeStructs, e.g.
    {'unet': ..., 'vae': ..., 'text_encoder': ...}; nothing allocated.
  logical_axes: the same tree of PartitionSpecs of logical axis names.
  init_params: (need=None) -> the full tree as host NumPy arrays at step 0
    (pretrained parts loaded, new parts initialised). Called at most once per run: at
    the start, or at a resume from a checkpoint that left the frozen parameters out
    (train/frozen.py), so it must return the same frozen leaves every time. `need(path)`
    (a full path such as ('unet', 'conv_in', 'kernel')), when given, selects the leaves
    the caller keeps: a resume keeps only the frozen ones, so new leaves it rejects are
    left out rather than initialised (`init_where`); loaded ones may stay.
  make_iterator: () -> this process's iterator of host batches with get_state /
    set_state (JSON-able), e.g. `data.inputs.make_iterator(config, ...)`.
  make_batch: host batch (dict of NumPy, per process) -> the step's batch (dict of
    NumPy with the batch on axis 0); runs on the host every step.
  optimizer / lr_schedule: the optax transformation over the trainable leaves, and the
    schedule whose value is logged as `lr` (or {metric name: schedule}, one per
    optimiser: `build_train_step`).
  sample: optional (params, step) -> uint8 video (N, T, H, W, 3) or images
    (N, H, W, 3) drawn with `params` (the full tree, EMA weights, host copies on every
    process); the loop writes it to WORKDIR/samples and TensorBoard.
  export: (out_dir, params) -> None writes an inference folder from the full tree
    (EMA weights); called on process 0 only.
  samples_per_step: examples one step consumes (for samples/s).
  best_metric: the logged metric whose mean since the previous checkpoint ranks
    checkpoints for train.keep_best (stored as the checkpoint's 'loss'); the GAN
    stages rank by reconstruction, not by a total that jumps at disc_start.
  """
  stage: Stage
  abstract_params: dict
  logical_axes: dict
  init_params: Callable[..., dict]
  make_iterator: Callable[[], Iterator[dict]]
  make_batch: Callable[[dict], dict]
  optimizer: optax.GradientTransformation
  lr_schedule: optax.Schedule | dict
  export: Callable[[Path, dict], None]
  samples_per_step: int
  sample: Optional[Callable[[dict, int], np.ndarray]] = None
  extra: dict = dataclasses.field(default_factory=dict)
  best_metric: str = "loss"


_ABSTRACT = contextvars.ContextVar("videoldm_abstract_setup", default=False)


@contextlib.contextmanager
def abstract_setup():
  """Within this context stages build their StageSetup from model configs only: the
  pretrained parameters are ShapeDtypeStructs, nothing is read or allocated (for
  ahead-of-time compilation of pod-sized configs on a laptop, `videoldm-compile`)."""
  token = _ABSTRACT.set(True)
  try:
    yield
  finally:
    _ABSTRACT.reset(token)


def check_sample_config(sample) -> None:
  """config.sample of any stage, when it draws samples (every > 0): ValueError naming the
  field whose value cannot sample, at setup. The first sample comes `every` steps into
  the run, after the compile: a 0 step count, an empty prompt list or a misspelt sampler
  failed there (hours in, with `every` large), some with a bare ZeroDivisionError."""
  import math

  from videoldm_jax.diffusion.samplers import SAMPLERS
  if not sample:
    return
  every = sample.get("every", 0)
  if not isinstance(every, int) or every < 0:
    raise ValueError(f"config.sample.every={every!r}: expected a step count >= 0 (0: no "
                     "samples)")
  if not every:
    return
  for field, least in (("steps", 1), ("num_frames", 1), ("num_clips", 1),
                       ("num_context", 0)):
    value = sample.get(field)
    if value is not None and not (isinstance(value, int) and value >= least):
      raise ValueError(f"config.sample.{field}={value!r}: expected an integer >= {least}")
  if "prompts" in sample and not sample.prompts:
    raise ValueError("config.sample.prompts is empty: one video is sampled per prompt")
  if "sampler" in sample and sample.sampler not in SAMPLERS:
    raise ValueError(f"config.sample.sampler={sample.sampler!r}: expected one of {SAMPLERS}")
  for field in ("guidance_scale", "context_scale"):
    value = sample.get(field)
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
      raise ValueError(f"config.sample.{field}={value!r}: expected a finite number")


def is_abstract() -> bool:
  return _ABSTRACT.get()


def init_where(need: Optional[Callable[[tuple], bool]], prefix: str,
               have: Collection[tuple] = frozenset()) -> Callable[[tuple], bool]:
  """`where` for `models.params.init_params` of the sub-tree `prefix` (e.g. 'unet') in
  a stage's `init_params(need)`: the leaves not in `have` (paths within the sub-tree
  that came loaded) that `need` selects (None: all). A resume of an SD 1.5 key-frame
  run so skips the host init of its 0.46 B temporal parameters, which the checkpoint
  replaces: 5.6-7.6 s and 1.8 GB of host memory per process on a 2-core EPYC."""
  return lambda path: path not in have and (need is None or need((prefix,) + path))
