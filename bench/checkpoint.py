"""Checkpoint save and restore of a W1 / W2 train state (`train.checkpointing`), as the
trainer writes it: Orbax, async, on N fake CPU devices with the parameters replicated
over "data" (the trainer's default mesh) or split over "fsdp".

A variant is a value of `--min_replica_slice_bytes` (the size from which a replicated
array is split over its replicas for writing; 0 is Orbax's default) and one of
`--save_frozen` (false, the trainer's default: the frozen theta stays out of the
checkpoint and a restore takes it from the host copy after checking its digests, see
train/frozen.py; true: the whole state). Each gets its own Checkpointer; the variants
take turns, round by round, so that all see the same machine. One JSON line per
variant: medians of the seconds `save()` blocks the train loop, of the seconds until
the write is on disk, and of a restore onto the same shardings (as the trainer
resumes; with save_frozen=false that includes hashing theta and placing it, not
reading the pretrained folder, which a fresh start reads too); the saved leaves and
bytes.

  python -m bench.checkpoint                                   # W1 temporal, 4 devices
  python -m bench.checkpoint --workload=W1,W2 --mesh=data,fsdp --rounds=5
  python -m bench.checkpoint --workload=W2 --save_frozen=true,false \
      --min_replica_slice_bytes=1048576
"""

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import workloads  # noqa: E402
from bench.common import emit, peak_host_rss_bytes  # noqa: E402
from bench.train_step import sharded_state  # noqa: E402
from videoldm_jax import sharding  # noqa: E402
from videoldm_jax.train import checkpointing  # noqa: E402
from videoldm_jax.train import frozen as frozen_lib  # noqa: E402
from videoldm_jax.train import step as step_lib  # noqa: E402
from videoldm_jax.train.state import split  # noqa: E402

MESHES = ("data", "fsdp")


def _timed_round(ckpt: checkpointing.Checkpointer, step: int, state, target,
                 save_frozen: bool, host_params: dict, digests: dict, stage):
  """(seconds save() blocked, seconds until on disk, seconds to restore) of one save."""
  t0 = time.perf_counter()
  ckpt.save(step, frozen_lib.checkpoint_tree(state, save_frozen),
            data_state={"position": step}, frozen_digests=digests, force=True)
  t1 = time.perf_counter()
  ckpt.wait_until_finished()
  t2 = time.perf_counter()
  restored, _, _ = frozen_lib.restore(ckpt, step, target, lambda need=None: host_params,
                                      stage.is_trainable)
  jax.block_until_ready(restored)
  return t1 - t0, t2 - t0, time.perf_counter() - t2


def run(workload: str, mode: str, mesh_kind: str, devices: int,
        variants: list[tuple[int, bool]], rounds: int, root: Path) -> list[dict]:
  case = workloads.build(workload, "keyframe", mode)
  axes = {"data": 1, "fsdp": 1, "tensor": 1, mesh_kind: devices}
  mesh = sharding.make_mesh(axes, jax.devices()[:devices])
  _, state, shardings = sharded_state(case, mesh)
  target = step_lib.abstract_state(state, shardings)
  host_params = jax.device_get(state.merged())
  digests = frozen_lib.leaf_digests(split(host_params, case.stage.is_trainable)[1])
  ckpts = {v: checkpointing.Checkpointer(
      root / f"{workload}-{mode}-{mesh_kind}-{v[0]}-{v[1]}", max_to_keep=1,
      min_replica_slice_bytes=v[0]) for v in variants}
  times = {v: [] for v in variants}
  # Round 0 warms up each variant (Orbax's thread pools, the slice programs' compiles).
  for r in range(rounds + 1):
    for v in (variants if r % 2 else variants[::-1]):
      t = _timed_round(ckpts[v], r + 1, state, target, v[1], host_params, digests,
                       case.stage)
      if r:
        times[v].append(t)
  for c in ckpts.values():
    c.close()
  out = []
  for v in variants:
    block, total, restore = (float(np.median(x)) for x in zip(*times[v]))
    leaves = jax.tree_util.tree_leaves(frozen_lib.checkpoint_tree(state, v[1]))
    out.append(dict(
        bench="checkpoint", workload=workload, stage="keyframe", mode=mode,
        mesh=mesh_kind, devices=devices, min_replica_slice_bytes=v[0], save_frozen=v[1],
        leaves=len(leaves), state_bytes=int(sum(x.size * x.dtype.itemsize for x in leaves)),
        save_blocking_s=block, save_total_s=total, restore_s=restore, rounds=rounds,
        peak_host_rss_bytes=peak_host_rss_bytes(), cpus=os.cpu_count(),
        machine=platform.machine(), jax=jax.__version__))
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workload", default="W1", help="comma-separated: W1,W2")
  p.add_argument("--mode", default="temporal", help="comma-separated: temporal,full")
  p.add_argument("--mesh", default="data", help=f"comma-separated: {','.join(MESHES)}")
  p.add_argument("--devices", type=int, default=4, help="fake CPU devices in the mesh")
  p.add_argument("--min_replica_slice_bytes",
                 default=f"0,{checkpointing.MIN_REPLICA_SLICE_BYTES}",
                 help="comma-separated variants, timed in turns (0: Orbax's default)")
  p.add_argument("--save_frozen", default="false",
                 help="comma-separated: false (the trainer's default), true")
  p.add_argument("--rounds", type=int, default=3, help="timed saves per variant")
  p.add_argument("--dir", default=None, help="where to write (default: a temp folder)")
  a = p.parse_args()
  for m in a.mesh.split(","):
    if m not in MESHES:
      p.error(f"--mesh: {m!r} is not one of {MESHES}")
  if a.devices < 1 or a.rounds < 1:
    p.error("--devices and --rounds must be >= 1")
  jax.config.update("jax_num_cpu_devices", a.devices)
  flags = {"true": True, "false": False}
  if not set(a.save_frozen.split(",")) <= set(flags):
    p.error(f"--save_frozen: expected a comma-separated list of true/false, got "
            f"{a.save_frozen!r}")
  variants = [(int(b), flags[f]) for b in a.min_replica_slice_bytes.split(",")
              for f in a.save_frozen.split(",")]
  root = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="bench-checkpoint-"))
  try:
    for w in a.workload.split(","):
      for mode in a.mode.split(","):
        for m in a.mesh.split(","):
          for record in run(w, mode, m, a.devices, variants, a.rounds, root):
            emit(record)
  finally:
    if not a.dir:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
