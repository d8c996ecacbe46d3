"""The optimiser of every stage: gradient clipping, AdamW, warmup + cosine decay.

It only ever sees the trainable parameters (phi for temporal stages), so clipping, the
logged gradient norm and the optimiser state cover exactly those; frozen parameters get
neither gradients nor moments (see train/step.py).
"""

import math
import numbers
from typing import Optional

import ml_collections
import optax


def learning_rate(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine decay to
  `lr * final_lr_fraction` at `total_steps`; warmup_steps = 0 starts at `lr`."""
  if 0 < int(config.warmup_steps) and int(config.warmup_steps) >= int(config.total_steps):
    # The decay would start at or after total_steps: a run of total_steps ends still
    # warming up (optax stretched the schedule to warmup_steps + 1).
    raise ValueError(f"warmup_steps={config.warmup_steps} must be below total_steps="
                     f"{config.total_steps} (config.optim / disc_optim: the schedule's "
                     "length, warmup included)")
  if int(config.warmup_steps) <= 0:
    return optax.cosine_decay_schedule(config.lr, max(int(config.total_steps), 1),
                                       alpha=config.get("final_lr_fraction", 0.0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.lr, warmup_steps=int(config.warmup_steps),
      decay_steps=max(int(config.total_steps), int(config.warmup_steps) + 1),
      end_value=config.lr * config.get("final_lr_fraction", 0.0))


def check_settings(config: ml_collections.ConfigDict, field: str = "optim") -> None:
  """ValueError naming `field`.X for settings that train the wrong way without a word: a
  negative lr or grad_clip (optax's clip by -1 / |g| turns every step into ascent), a
  final_lr_fraction outside [0, 1] (a negative one ends the decay in ascent), Adam
  betas outside [0, 1), eps <= 0 (an exactly zero gradient, e.g. of a weight the loss
  does not reach, gives 0 / 0: NaN weights from a step whose loss and gradient norm
  are finite, so it is not skipped), negative weight_decay, step counts of the
  schedule that are not counts."""
  checks = [("lr", config.lr, lambda v: v >= 0, ">= 0"),
            ("final_lr_fraction", config.get("final_lr_fraction", 0.0),
             lambda v: 0 <= v <= 1, "in [0, 1]"),
            ("b1", config.b1, lambda v: 0 <= v < 1, "in [0, 1)"),
            ("b2", config.b2, lambda v: 0 <= v < 1, "in [0, 1)"),
            ("eps", config.eps, lambda v: v > 0, "> 0"),
            ("weight_decay", config.weight_decay, lambda v: v >= 0, ">= 0"),
            ("grad_clip", config.get("grad_clip") or 0.0, lambda v: v >= 0,
             ">= 0 (0 or None: no clipping)"),
            ("warmup_steps", config.warmup_steps,
             lambda v: v >= 0 and float(v).is_integer(), "a whole number >= 0"),
            ("total_steps", config.total_steps,
             lambda v: v >= 1 and float(v).is_integer(), "a whole number >= 1")]
  for name, value, ok, expected in checks:
    if not (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value) and ok(value)):
      raise ValueError(f"config.{field}.{name}={value!r}: expected {expected}")


def make_optimizer(config: ml_collections.ConfigDict, field: str = "optim"
                   ) -> optax.GradientTransformation:
  """clip_by_global_norm(grad_clip) -> AdamW(schedule, b1, b2, eps, weight_decay); the
  settings checked first (`check_settings`; `field` names them in its errors)."""
  check_settings(config, field)
  parts = []
  if config.get("grad_clip"):
    parts.append(optax.clip_by_global_norm(config.grad_clip))
  parts.append(optax.adamw(learning_rate(config), b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay))
  return optax.chain(*parts)


def hold_until(inner: optax.GradientTransformation, start: int
               ) -> optax.GradientTransformationExtraArgs:
  """`inner` whose updates are exactly zero before train step `start`: no step, no
  weight decay (AdamW's decoupled decay shrank a discriminator's weights at every step
  before disc_start, where its gradient is zero). Its update needs the extra argument
  `step`, the train state's step counter (train/step.py passes it), so the hold follows
  the same step the loss's `disc_start` does, and a resumed run holds as an
  uninterrupted one. `inner` still sees every step, with a zero gradient before `start`:
  its moments stay zero and its counters (schedule, Adam's bias correction) count every
  step, as before; the parameters stay at their initialisation until `start`."""
  import jax
  import jax.numpy as jnp
  inner = optax.with_extra_args_support(inner)

  def update(updates, state, params=None, *, step=None, **extra_args):
    if step is None:
      raise TypeError("hold_until: update needs step= (the train step counter)")
    on = jnp.asarray(step) >= start
    gate = lambda tree: jax.tree_util.tree_map(
        lambda x: jnp.where(on, x, jnp.zeros_like(x)), tree)
    out, state = inner.update(gate(updates), state, params, **extra_args)
    return gate(out), state
  return optax.GradientTransformationExtraArgs(inner.init, update)


def make_grouped_optimizer(configs: dict, group, fields: Optional[dict] = None,
                           start_at: Optional[dict] = None
                           ) -> optax.GradientTransformation:
  """One `make_optimizer(configs[name])` per group of trainable leaves, `group(path)`
  naming each leaf's group (e.g. generator / discriminator): each group is clipped and
  stepped with its own settings, as two optimisers would. fields: group -> the config
  field its settings come from (for errors; default the group's name). start_at:
  group -> the train step before which its updates are zero (`hold_until`; e.g. the
  discriminator's disc_start)."""
  import jax

  def labels(params):
    # tree_map_with_path, not flatten_dict: optax also calls this on placeholder trees.
    return jax.tree_util.tree_map_with_path(
        lambda path, _: group(tuple(str(getattr(k, "key", k)) for k in path)), params)

  fields, start_at = fields or {}, start_at or {}
  unknown = set(start_at) - set(configs)
  if unknown:
    raise ValueError(f"start_at names groups without an optimiser: {sorted(unknown)}")

  def one(name, c):
    tx = make_optimizer(c, fields.get(name, name))
    return hold_until(tx, int(start_at[name])) if start_at.get(name) else tx
  return optax.multi_transform({name: one(name, c) for name, c in configs.items()}, labels)
