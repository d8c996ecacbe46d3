"""The one train step of every stage, and the sharded train state it runs on.

A `Stage` says what trains (a predicate on parameter paths) and how a batch becomes a
loss. `build_train_step` turns any stage into a jitted, sharded, donated step:
gradients are taken with respect to the trainable parameters only (frozen ones are
closed over), so no weight gradient of the frozen image model is ever computed, and
the optimiser, the clipping and the logged gradient norm see only the trainable
leaves. A step whose loss or gradient norm is not finite leaves parameters, optimiser
state and EMA untouched and is counted in `state.skipped`.
"""

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from videoldm_jax.models.config_base import is_integer
from videoldm_jax.train.state import Path, TrainState, merge, split

LossFn = Callable[[dict, dict, jax.Array, jax.Array], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class Stage:
  """A training stage: a trainable mask and a loss.

  loss_fn(params, batch, key, step) -> (scalar loss, dict of scalar metrics), where
  params is the full tree ({'unet': ..., 'vae': ..., ...}), batch a dict of global
  arrays with the batch on axis 0 and step the int32 step counter (for schedules inside
  the loss, e.g. when a discriminator starts). Under gradient accumulation a metric
  keeps its dtype and its meaning for the whole batch: floating ones (means) are
  averaged over the microbatches, integer ones (counts) summed, boolean ones or-ed.

  group: optional path -> group name of the trainable leaves, for stages that train
  several networks with their own optimisers (generator / discriminator). The total
  loss is their sum, each network's term stopping gradients into the others, so one
  gradient of the sum gives every network its own gradient; the optimiser applies one
  transformation per group (`optax.multi_transform` with the same labels, see
  `optim.make_grouped_optimizer`) and the step logs `grad_norm/<group>`.
  """
  name: str
  is_trainable: Callable[[Path], bool]
  loss_fn: LossFn
  group: Optional[Callable[[Path], str]] = None


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def put_global(tree: Any, shardings: Any) -> Any:
  """Host arrays (every process holding the full value) -> global jax.Arrays laid out by
  `shardings`. Works in multi-process runs: each process fills only its own shards."""
  def put(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
  return jax.tree_util.tree_map(put, tree, shardings)


def state_shardings(param_shardings: dict, stage: Stage, tx: optax.GradientTransformation,
                    abstract_params: dict, mesh: Mesh) -> TrainState:
  """Shardings of every TrainState leaf: parameters, EMA and optimiser moments follow the
  parameters' shardings; counters are replicated."""
  train_sh, frozen_sh = split(param_shardings, stage.is_trainable)
  train_abs, _ = split(abstract_params, stage.is_trainable)
  opt_abs = jax.eval_shape(tx.init, train_abs)
  rep = replicated(mesh)
  opt_sh = _follow_params(opt_abs, train_sh, train_abs, rep)
  return TrainState(step=rep, trainable=train_sh, frozen=frozen_sh, opt_state=opt_sh,
                    ema=train_sh, skipped=rep)


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _follow_params(opt_abs: Any, param_sh: dict, param_abs: dict, default: Any) -> Any:
  """Sharding of every optimiser-state leaf: a leaf whose key path ends with a
  parameter's path and has its shape (Adam's mu / nu, also inside `multi_transform`'s
  per-group states) takes that parameter's sharding; counters and the like `default`."""
  sh = traverse_util.flatten_dict(param_sh)
  shapes = {k: v.shape for k, v in traverse_util.flatten_dict(param_abs).items()}
  depths = sorted({len(k) for k in sh}, reverse=True)

  def one(path, leaf):
    names = tuple(_key_name(k) for k in path)
    for d in depths:
      tail = names[-d:]
      if len(names) >= d and tail in sh and shapes[tail] == leaf.shape:
        return sh[tail]
    return default
  return jax.tree_util.tree_map_with_path(one, opt_abs)


def init_state(params: dict, stage: Stage, tx: optax.GradientTransformation,
               shardings: TrainState) -> TrainState:
  """Host params (full tree, NumPy) -> a sharded TrainState at step 0."""
  trainable, frozen = split(params, stage.is_trainable)
  trainable = put_global(trainable, shardings.trainable)
  frozen = put_global(frozen, shardings.frozen)
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(trainable)
  ema = jax.jit(lambda t: jax.tree_util.tree_map(jnp.copy, t),
                out_shardings=shardings.ema)(trainable)
  zero = put_global(np.zeros((), np.int32), shardings.step)
  return TrainState(step=zero, trainable=trainable, frozen=frozen, opt_state=opt_state,
                    ema=ema, skipped=put_global(np.zeros((), np.int32), shardings.skipped))


def abstract_train_state(abstract_params: dict, stage: Stage,
                         tx: optax.GradientTransformation) -> TrainState:
  """The TrainState of `abstract_params` as ShapeDtypeStructs (nothing allocated)."""
  train, frozen = split(abstract_params, stage.is_trainable)
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  return TrainState(step=scalar, trainable=train, frozen=frozen,
                    opt_state=jax.eval_shape(tx.init, train), ema=train, skipped=scalar)


def abstract_state(state_or_shapes: TrainState, shardings: TrainState) -> TrainState:
  """ShapeDtypeStructs carrying `shardings` (to restore a checkpoint onto them)."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_or_shapes,
      shardings)


def group_leaves(tree: dict, group: Callable[[Path], str]) -> dict[str, list]:
  """Leaves of a nested dict by group name (for per-group norms)."""
  out: dict[str, list] = {}
  for path, leaf in traverse_util.flatten_dict(tree).items():
    out.setdefault(group(path), []).append(leaf)
  return out


def _split_microbatches(batch: dict, n: int) -> dict:
  """(B, ...) leaves -> (n, B // n, ...), microbatch i = rows i, i + n, i + 2n, ...

  Strided, not consecutive blocks: with the batch axis split over devices in blocks,
  every microbatch then has rows on every device, and the step needs no all-gather
  (consecutive blocks would sit on a fraction of the devices, which XLA answers by
  gathering the batch and computing rows redundantly)."""
  def f(x):
    if x.shape[0] % n:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum={n}")
    return jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)
  return jax.tree_util.tree_map(f, batch)


def check_ema_decay(ema_decay: float) -> None:
  """ValueError unless 0 <= ema_decay < 1 (config.optim.ema_decay): a negative decay
  extrapolated past the weights; 1 or more left only the warm-up ramp, an average over
  the whole run."""
  # (NumPy scalars too: np.float32(0.99) was refused as if out of range.)
  number = isinstance(ema_decay, (int, float, np.integer, np.floating)) and not isinstance(
      ema_decay, (bool, np.bool_))
  if not (number and 0 <= ema_decay < 1):
    raise ValueError(f"config.optim.ema_decay={ema_decay!r}: expected a number in [0, 1) "
                     "(0: the EMA is the trained weights)")


def build_train_step(stage: Stage, tx: optax.GradientTransformation, *, seed: int,
                     ema_decay: float = 0.9999, grad_accum: int = 1,
                     lr_schedule: Optional[optax.Schedule | dict] = None,
                     shardings: Optional[TrainState] = None,
                     batch_sharding: Optional[Any] = None) -> Callable:
  """Jitted step(state, batch) -> (state, metrics) for any stage.

  lr_schedule: logged as metric `lr`, or {metric name: schedule} for stages with
  several optimisers (e.g. `lr` and `lr/discriminator`).
  The step's randomness is fold_in(key(seed), step): a resumed run draws exactly what an
  uninterrupted one does. With `grad_accum` = n the batch is split into n microbatches
  (microbatch i: rows i, i + n, ...) whose gradients, losses and floating metrics are
  averaged (a `lax.scan`, so memory is that of one microbatch); see `Stage` for the
  other metrics.
  `shardings` / `batch_sharding` pin the layouts; the input state is donated.
  """
  check_ema_decay(ema_decay)
  if not is_integer(grad_accum, 1):  # (True passed as 1)
    # (0 was a ZeroDivisionError when the step traced; the trainer checks it earlier.)
    raise ValueError(f"grad_accum={grad_accum!r}: expected an integer >= 1 (microbatches "
                     "per step)")
  base_key = jax.random.key(seed)
  schedules = ({} if lr_schedule is None else
               dict(lr_schedule) if isinstance(lr_schedule, dict) else {"lr": lr_schedule})

  def loss_and_grad(trainable, frozen, batch, key, step):
    def loss_of(tr):
      return stage.loss_fn(merge(tr, frozen), batch, key, step)
    (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
    return loss, metrics, grads

  def step(state: TrainState, batch: dict):
    key = jax.random.fold_in(base_key, state.step)
    if grad_accum == 1:
      loss, metrics, grads = loss_and_grad(state.trainable, state.frozen, batch, key,
                                           state.step)
    else:
      micro = _split_microbatches(batch, grad_accum)

      def body(carry, xs):
        i, mb = xs
        loss, metrics, grads = loss_and_grad(state.trainable, state.frozen, mb,
                                             jax.random.fold_in(key, i), state.step)
        acc = jax.tree_util.tree_map(jnp.add, carry, (loss, metrics, grads))
        return acc, None

      zeros = jax.tree_util.tree_map(
          jnp.zeros_like, jax.eval_shape(loss_and_grad, state.trainable, state.frozen,
                                         jax.tree_util.tree_map(lambda x: x[0], micro), key,
                                         state.step))
      total, _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum), micro))
      # Sums (jnp.add or-s booleans): the floating ones become means; integer counts
      # and flags stay as summed (divided, a count logged 1/n of the batch's as a
      # float, a flag 0.5).
      loss, metrics, grads = jax.tree_util.tree_map(
          lambda x: x / grad_accum if jnp.issubdtype(x.dtype, jnp.inexact) else x, total)

    grad_norm = optax.tree.norm(grads)
    group_norms = {}
    if stage.group is not None:
      for name, g in group_leaves(grads, stage.group).items():
        group_norms[f"grad_norm/{name}"] = optax.tree.norm(g)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # step= for transformations held until a step (optim.hold_until); others ignore it.
    updates, opt_state = optax.with_extra_args_support(tx).update(
        grads, state.opt_state, state.trainable, step=state.step)
    trainable = optax.apply_updates(state.trainable, updates)
    # EMA with the usual warm-up, so early averages are not dominated by the init;
    # it counts applied updates, as the lr schedule does (a skipped step kept the EMA).
    updates_done = state.step - state.skipped
    decay = jnp.minimum(ema_decay, (1.0 + updates_done) / (10.0 + updates_done))
    ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema,
                                 trainable)
    keep = lambda new, old: jax.tree_util.tree_map(
        lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(
        step=state.step + 1, trainable=keep(trainable, state.trainable),
        opt_state=keep(opt_state, state.opt_state), ema=keep(ema, state.ema),
        skipped=state.skipped + (~finite).astype(jnp.int32))
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, finite=finite,
                   skipped=new_state.skipped, **group_norms)
    for name, schedule in schedules.items():
      # The optimizer's schedule counts applied updates: skipped steps kept its state.
      metrics[name] = schedule(updates_done)
    return new_state, metrics

  if shardings is None:
    return jax.jit(step, donate_argnums=(0,))
  return jax.jit(step, in_shardings=(shardings, batch_sharding),
                 out_shardings=(shardings, shardings.step), donate_argnums=(0,))
