"""Checkpoints without the frozen parameters: their digests go in instead.

The frozen part of a train state (theta, the VAE and the text encoder of a key-frame
stage) never changes during a run, yet it is over a third of an SD 1.5 key-frame
checkpoint (1.07 B float32 parameters: 4.3 of 11.6 GB, configs/keyframe_sd15.py),
written again at every save. By default (`train.save_frozen=False`) a checkpoint holds
every other field of the `TrainState` and, as JSON, one SHA-256 digest per frozen leaf
(with its shape and dtype). A resume loads the frozen leaves again through the stage's
`init_params` (the pretrained folder, or a seeded init) and refuses to go on when any
of them differs from what the run trained with, naming the leaf.
`train.save_frozen=True` writes them into every checkpoint, for runs whose pretrained
source may change or vanish; such checkpoints (and those of earlier versions, which
always held them) restore without `init_params`.
"""

import dataclasses
import hashlib
import os
from concurrent import futures
from typing import Any, Callable, Optional

import jax
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils

from videoldm_jax import distributed
from videoldm_jax.train import step as step_lib
from videoldm_jax.train.checkpointing import Checkpointer
from videoldm_jax.train.state import Path, TrainState

FIELD = "frozen"  # the TrainState field left out


def leaf_digest(value: Any) -> str:
  """'<shape> <dtype> <sha256 of the bytes>' of one array (host NumPy)."""
  # (np.ascontiguousarray returns ndim >= 1: a 0-d leaf was named (1,), its digest that
  # of a 1-element vector.)
  value = np.asarray(value)
  h = hashlib.sha256(np.ascontiguousarray(value).reshape(-1).view(np.uint8))
  return f"{value.shape} {value.dtype.name} {h.hexdigest()}"


def leaf_digests(tree: dict) -> dict[str, str]:
  """Nested dict of host arrays -> {'unet/conv_in/kernel': leaf_digest(...)}.

  The leaves are hashed on all cores (hashlib releases the GIL): the ~1.1 B frozen
  parameters of SD 1.5 are 4.3 GB of bytes.
  """
  flat = {"/".join(p): v for p, v in traverse_util.flatten_dict(tree).items()}
  with futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
    return dict(zip(flat, pool.map(leaf_digest, flat.values())))


def _gathered_digests(tree: dict) -> dict[str, str]:
  """leaf_digests of a tree of global (possibly multi-host sharded) arrays, gathered one
  leaf at a time so that host memory holds one leaf beyond the state."""
  return {"/".join(p): leaf_digest(multihost_utils.process_allgather(v, tiled=True))
          for p, v in traverse_util.flatten_dict(tree).items()}


def checkpoint_tree(state: TrainState, save_frozen: bool) -> Any:
  """The pytree a checkpoint holds: the state, or its fields but `frozen` as a dict."""
  if save_frozen:
    return state
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
          if f.name != FIELD}


def _differences(saved: dict[str, str], loaded: dict[str, str]) -> Optional[str]:
  """What differs between two leaf_digests, or None."""
  missing, extra = sorted(set(saved) - set(loaded)), sorted(set(loaded) - set(saved))
  differ = [k for k in sorted(saved) if k in loaded and saved[k] != loaded[k]]
  if not (missing or extra or differ):
    return None
  parts = []
  if missing:
    parts.append(f"trained with but not loaded: {missing[:4]}")
  if extra:
    parts.append(f"loaded but not trained with: {extra[:4]}")
  if missing or extra:
    parts.append("other leaves are frozen: another model, or another split into "
                 "trainable and frozen parameters (e.g. the stage's mode)")
  short = lambda d: d[:-52] + "…"  # shape, dtype and the first 12 hex digits
  for k in differ[:4]:
    parts.append(f"'{k}': trained with {short(saved[k])}, loaded {short(loaded[k])}")
  return (f"{len(missing) + len(extra) + len(differ)} of {len(set(saved) | set(loaded))} "
          f"leaves differ (shape, dtype, sha256): " + "; ".join(parts))


def check_same(saved: dict[str, str], loaded: dict[str, str], where: str) -> None:
  """Raises ValueError naming the frozen leaves whose loaded digest is not the saved one;
  on every process when any process's differ (each loads its own copy of the
  pretrained model: one bad copy must not leave the others waiting in a collective)."""
  problem = _differences(saved, loaded)
  bad = distributed.process_flags(problem is not None)
  if bad.any() and problem is None:
    problem = (f"processes {np.flatnonzero(bad).tolist()} loaded other frozen "
               "parameters (their logs name the leaves)")
  if problem is not None:
    raise ValueError(
        f"{where}: the frozen parameters loaded for this run are not the ones it was "
        f"trained with: {problem}. Resume with the pretrained model and seed the run "
        "started from (see the checkpoint's config), or start a new workdir. "
        "Checkpoints written with train.save_frozen=True hold the frozen parameters "
        "themselves.")


def _frozen_leaves(init_params: Callable[..., dict],
                   is_trainable: Callable[[Path], bool]) -> dict:
  """The frozen leaves of `init_params(need)`, told to keep only those: the stage then
  leaves out (need not initialise) the trainable ones, which the checkpoint holds."""
  frozen = lambda path: not is_trainable(path)
  flat = traverse_util.flatten_dict(init_params(frozen))
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if frozen(k)})


def restore(ckpt: Checkpointer, step: int, target: TrainState,
            init_params: Callable[..., dict], is_trainable: Callable[[Path], bool]
            ) -> tuple[TrainState, Optional[dict], dict[str, str]]:
  """-> (state, data_state, frozen digests) of checkpoint `step`.

  target: the TrainState of ShapeDtypeStructs with shardings to restore onto. The frozen
  leaves come from the checkpoint when it holds them, else from `init_params(need)` (the
  host tree; `need` selects the frozen leaves) after their digests matched the
  checkpoint's.
  """
  where = f"checkpoint {ckpt.directory}/{step}"
  saved = ckpt.frozen_digests(step)
  if FIELD in ckpt.state_fields(step):
    state, data_state, _ = ckpt.restore(target, step)
    return state, data_state, saved if saved is not None else _gathered_digests(state.frozen)
  if saved is None:
    if ckpt.saved_config(step) is not None:  # videoldm-train wrote it: a part is lost
      raise ValueError(ckpt.damaged(step, "it holds neither the frozen parameters nor "
                                          "frozen_digests/"))
    raise ValueError(f"{where}: holds neither the frozen parameters nor their digests "
                     "(not written by videoldm-train?)")
  # (No digests saved and none wanted: nothing to build. Frozen leaves the run had none
  # of, e.g. LPIPS switched on since, are named by check_same.)
  frozen_host = (_frozen_leaves(init_params, is_trainable)
                 if saved or jax.tree_util.tree_leaves(target.frozen) else {})
  check_same(saved, leaf_digests(frozen_host), where)
  rest, data_state, _ = ckpt.restore(checkpoint_tree(target, False), step)
  frozen = step_lib.put_global(
      frozen_host, jax.tree_util.tree_map(lambda s: s.sharding, target.frozen))
  state = TrainState(frozen=frozen, **rest)
  return state, data_state, saved
