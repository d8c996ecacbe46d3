"""Ahead-of-time compilation of a stage's train step for a target topology.

`fit_report(config, topology)` builds the stage from configs only (no parameters read
or allocated, `stages.base.abstract_setup`), lays its train state and a global batch
out on the config's mesh over the topology's devices, lowers and compiles the one
jitted step, and reads XLA's per-device memory analysis and cost analysis. On a
CPU-only machine TPU topologies come from libtpu's topology descriptions
(`pip install -e .[tpu]`); "cpu:N" compiles for N local (fake) CPU devices instead, and
"h100:N" does the same for a model traced as for GPUs, against an H100's memory (a
proxy: see GPU_MEMORY).
"""

import dataclasses
import math
import re
import tempfile
import time
from pathlib import Path
from typing import Optional

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from videoldm_jax import sharding
from videoldm_jax.models import attention
from videoldm_jax.stages import base
from videoldm_jax.train import step as step_lib

GiB = 1024 ** 3
# HBM per chip (public spec sheets); memory per device is HBM per chip / devices per
# chip (one each as described below).
HBM_PER_CHIP = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5litepod": 16 * GiB, "v5p": 95 * GiB,
                "v6e": 32 * GiB}
# TPU generations whose training devices are megacore chips (libtpu's compile-only
# topology describes them per TensorCore by default: twice the devices, half the HBM).
MEGACORE = ("v4",)
# GPUs: XLA cannot compile for a GPU on a machine without one, so "h100:N" compiles the
# step for N fake CPU devices (the same sharding and per-device state; temporaries from
# XLA CPU's buffer assignment, a proxy for the GPU program's) traced as for a GPU, and
# compares it with the card's memory (nvidia-smi's total for the 80 GB H100).
GPU_MEMORY = {"h100": 81559 * 1024 ** 2}
# Compilation needs headroom for the runtime, fragmentation and host transfers.
FIT_FRACTION = 0.95


@dataclasses.dataclass
class FitReport:
  """Per-device figures of one compiled train step (bytes, FLOPs)."""
  stage: str
  topology: str
  devices: int
  mesh: dict
  params: int
  trainable_params: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  peak_bytes: int
  device_memory_bytes: Optional[int]
  flops_per_device: float
  compile_s: float
  # Set when the TPU compiler itself refused the program for lack of memory (its
  # message); the byte figures then come from that message and the state's shardings.
  compile_error: Optional[str] = None
  # The compiler's whole message in that case: beyond its first line it may say which
  # allocations are the largest, i.e. what to shrink.
  compile_message: Optional[str] = None

  @property
  def fits(self) -> Optional[bool]:
    if self.compile_error is not None:
      return False
    if self.device_memory_bytes is None:
      return None
    return self.peak_bytes <= FIT_FRACTION * self.device_memory_bytes

  def verdict(self) -> str:
    return {True: "FITS", False: "DOES NOT FIT", None: "UNKNOWN (no memory size)"}[self.fits]

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d.update(fits=self.fits, verdict=self.verdict(),
             peak_gib=self.peak_bytes / GiB, flops_per_step=self.flops_per_device * self.devices)
    # Unknown figures (nan: a compile that ran out of memory counts no FLOPs) as null:
    # json.dumps would write NaN, which strict JSON readers refuse.
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in d.items()}

  def summary(self) -> str:
    mem = ("?" if self.device_memory_bytes is None
           else f"{self.device_memory_bytes / GiB:.1f} GiB")
    return (f"{self.stage} on {self.topology} ({self.devices} devices, mesh {self.mesh}): "
            f"params {self.params / 1e6:.1f}M ({self.trainable_params / 1e6:.1f}M trainable)\n"
            f"  per device: arguments {self.argument_bytes / GiB:.2f} GiB, temporaries "
            + ("unknown" if self.temp_bytes < 0 else f"{self.temp_bytes / GiB:.2f} GiB")
            + f", outputs {self.output_bytes / GiB:.2f} GiB "
            f"(aliased {self.alias_bytes / GiB:.2f}), peak {self.peak_bytes / GiB:.2f} GiB "
            f"of {mem}\n"
            + ("  FLOPs per step: not counted (no program)"  # (it printed "nan TFLOP")
               if not math.isfinite(self.flops_per_device) else
               f"  FLOPs per step: {self.flops_per_device * self.devices / 1e12:.2f} TFLOP "
               f"({self.flops_per_device / 1e12:.3f} per device)")
            + f"; compiled in {self.compile_s:.0f}s\n  {self.verdict()}"
            + (" (a proxy: compiled for CPU devices, see compile_check.GPU_MEMORY)"
               if self.topology.partition(":")[0] in GPU_MEMORY else "")
            + (f" (XLA: {self.compile_error})" if self.compile_error else "")
            + (f"\n  compiler's report:\n{_indent(self.compile_message, MESSAGE_LINES)}"
               if self.compile_message else ""))


MESSAGE_LINES = 80  # of the compiler's out-of-memory report shown in the summary


def _indent(text: str, max_lines: int) -> str:
  lines = text.splitlines()[1:]
  more = len(lines) - max_lines
  shown = ["    " + line for line in lines[:max_lines]]
  return "\n".join(shown + ([f"    ... ({more} more lines in the JSON report)"]
                            if more > 0 else []))


def topology_devices(topology: str) -> tuple[list, Optional[int]]:
  """'v5p:4x4x4' (libtpu topology, TPU), 'cpu:N' or 'h100:N' (N local fake CPU devices)
  -> (devices, memory per device)."""
  kind, _, shape = topology.partition(":")
  if kind == "cpu" or kind in GPU_MEMORY:
    if shape and not (shape.isdigit() and int(shape) >= 1):
      raise ValueError(f"topology {topology!r}: {kind}:N needs a device count N >= 1")
    n = int(shape or len(jax.devices("cpu")))
    devices = jax.devices("cpu")
    if len(devices) < n:
      raise ValueError(f"topology {topology!r}: only {len(devices)} CPU devices; start with "
                       f"--cpu_devices={n}")
    return devices[:n], GPU_MEMORY.get(kind)
  if kind not in HBM_PER_CHIP or not shape:
    raise ValueError(f"topology {topology!r}: expected cpu:N, h100:N or one of "
                     f"{sorted(HBM_PER_CHIP)} with a chip grid, e.g. v5p:4x4x4, v5e:8x8")
  try:
    from jax.experimental import topologies
    # A v4 chip's two TensorCores run as one JAX device on a TPU VM (megacore); the
    # compile-only description splits them unless asked for that chip config.
    extra = {"chip_config_name": "megacore"} if kind in MEGACORE else {}
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, **extra)
  except Exception as e:  # libtpu missing, busy, or the topology unknown
    hint = ("another process on this machine is using libtpu (one at a time): wait for "
            "it, or remove the lockfile if no such process is left"
            if "lockfile" in str(e) else "install the TPU extra: pip install -e '.[tpu]'")
    raise RuntimeError(f"topology {topology!r}: libtpu could not describe it ({e}); "
                       f"{hint}") from e
  devices = list(desc.devices)
  chips = math.prod(int(x) for x in shape.split("x"))
  return devices, HBM_PER_CHIP[kind] * chips // len(devices)


def _abstract_batch(setup: base.StageSetup, config: ml_collections.ConfigDict) -> dict:
  """The global batch's shapes, from one synthetic host batch through make_batch.

  With `data.kind = "latent_cache"` the batch holds what a cache written by
  videoldm-cache-latents holds (scaled latents and, for text models, caption embeddings),
  so the step is compiled without the VAE encoder and the text encoder in it."""
  d = config.data
  b = int(d.batch_size)
  host = {"caption": np.array([""] * b), "time_of_day": np.zeros((b,), np.int64),
          "crowdedness": np.zeros((b,), np.int64), "index": np.arange(b)}
  ldm = setup.extra.get("ldm")
  if ldm is not None and ldm.unet_config.num_class_embeds is not None:
    host["labels"] = np.zeros((b,), np.int32)  # from data.label_field
  if d.kind == "latent_cache":
    if ldm is None:
      raise ValueError(f"config.data.kind='latent_cache': stage {config.stage!r} does not "
                       "train on VAE latents of the video LDM; use a video data kind")
    # (sizes the models cannot take were refused by the stage's set-up)
    f, vae = ldm.vae_config.downsample_factor, ldm.vae_config
    host["latents"] = np.zeros((b, d.num_frames, d.height // f, d.width // f,
                                vae.latent_channels), np.float32)
    if ldm.text_config is not None:
      t = ldm.text_config
      host["context"] = np.zeros((b, t.max_position_embeddings, t.hidden_size), np.float32)
  else:
    t = int(d.num_frames)
    host["video"] = np.zeros((b, t, d.height, d.width, 3), np.uint8)
    if d.kind != "procedural":
      # What the Grain pipeline's batches hold beside the clips (grain_pipeline.py):
      # each frame's caption and label (per-frame conditioning with image_fraction > 0
      # and of class-conditional models) and the image-only flags.
      host["frame_caption"] = np.full((b, t), "")
      host["image_only"] = np.zeros((b, t), bool)
      if "labels" in host:
        host["frame_labels"] = np.zeros((b, t), np.int32)
  return {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype)
          for k, v in setup.make_batch(host).items()}


def fit_report(config: ml_collections.ConfigDict, topology: str) -> FitReport:
  """Compiles `config`'s train step for `topology` and measures it (module docstring).

  The model is traced as on a host of the target platform: `config.train.attention`
  resolves for a TPU topology as it would on a TPU host, not for this process's CPU."""
  previous = attention.implementation()
  kind = topology.partition(":")[0]
  platform = "cpu" if kind == "cpu" else "gpu" if kind in GPU_MEMORY else "tpu"
  attention.set_implementation(config.train.get("attention", "auto"), platform=platform)
  try:
    return _fit_report(config, topology)
  finally:
    attention.set_implementation(*previous)


def _fit_report(config: ml_collections.ConfigDict, topology: str) -> FitReport:
  from videoldm_jax.train.loop import stage_setup, step_partitioning
  devices, mem = topology_devices(topology)
  with tempfile.TemporaryDirectory() as tmp, base.abstract_setup():
    setup = stage_setup(config, Path(tmp))
    batch = _abstract_batch(setup, config)
  stage, tx = setup.stage, setup.optimizer
  mesh = sharding.make_mesh(dict(config.mesh), devices,
                            dcn_shape=dict(config.get("dcn_mesh", {})))
  sharding.check_rules(config.rules)  # (entries checked as written, before tuple())
  rules = [tuple(r) for r in config.rules]
  param_sh = sharding.shardings_for(setup.logical_axes, mesh, setup.abstract_params, rules)
  shardings = step_lib.state_shardings(param_sh, stage, tx, setup.abstract_params, mesh)
  state = step_lib.abstract_state(
      step_lib.abstract_train_state(setup.abstract_params, stage, tx), shardings)
  batch_sh = NamedSharding(mesh, PartitionSpec(tuple(config.batch_axes)))
  sharding.check_batch_split(config.data.batch_size, config.train.grad_accum, mesh,
                             tuple(config.batch_axes), topology, rules)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh)
           for k, v in batch.items()}
  train_step = step_lib.build_train_step(
      stage, tx, seed=config.seed, ema_decay=config.optim.ema_decay,
      grad_accum=config.train.grad_accum, lr_schedule=setup.lr_schedule,
      shardings=shardings, batch_sharding=batch_sh)
  t0 = time.perf_counter()
  with step_partitioning(config, mesh):
    lowered = train_step.lower(state, batch)
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))
  common = dict(stage=stage.name, topology=topology, devices=len(devices),
                mesh=dict(zip(mesh.axis_names, (int(s) for s in mesh.devices.shape))),
                params=count(setup.abstract_params), trainable_params=count(state.trainable),
                device_memory_bytes=mem)
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    # XLA's memory assignment failed: the step DOES NOT FIT. Report what it needed.
    arg = _per_device_bytes((state, batch))
    temp = required_temp_bytes(str(e))
    # temp -1: XLA's message did not say; the peak is then at least the arguments.
    return FitReport(**common, argument_bytes=arg, output_bytes=arg, alias_bytes=arg,
                     temp_bytes=temp, peak_bytes=arg + max(temp, 0),
                     flops_per_device=float("nan"),
                     compile_s=time.perf_counter() - t0,
                     compile_error=str(e).splitlines()[0][:500],
                     compile_message=str(e)[:MESSAGE_CHARS])
  compile_s = time.perf_counter() - t0
  m = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  arg, out = int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
  alias, temp = int(m.alias_size_in_bytes), int(m.temp_size_in_bytes)
  return FitReport(
      **common, argument_bytes=arg, output_bytes=out, alias_bytes=alias, temp_bytes=temp,
      # Donated state buffers are reused for the outputs (aliased), so they count once.
      peak_bytes=arg + out - alias + temp,
      flops_per_device=float(cost.get("flops", 0.0)), compile_s=compile_s)


MESSAGE_CHARS = 50_000
_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}


def required_temp_bytes(message: str) -> int:
  """Bytes of temporaries XLA's out-of-memory message says the program needs, e.g.
  '... required for HLO temporaries (24.02G) exceeds available HBM (15.75G)'; -1 when
  the message names no such figure."""
  m = re.search(r"HLO temporaries \(([\d.]+)([KMGT]?)\)", message)
  if m is None:
    return -1
  return int(float(m.group(1)) * _UNITS[m.group(2)])


def _per_device_bytes(tree) -> int:
  """Bytes that device 0 holds of `tree` (ShapeDtypeStructs with shardings)."""
  total = 0
  for x in jax.tree_util.tree_leaves(tree):
    shard = x.sharding.shard_shape(x.shape)
    total += int(np.prod(shard)) * np.dtype(x.dtype).itemsize
  return total
