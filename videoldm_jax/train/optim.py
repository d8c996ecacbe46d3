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
  betas outside [0, 1), eps <= 0 (an exactly zero gradient, e.g. a discriminator's
  before disc_start, gives 0 / 0: NaN weights from a step whose loss and gradient norm
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


def make_grouped_optimizer(configs: dict, group, fields: Optional[dict] = None
                           ) -> optax.GradientTransformation:
  """One `make_optimizer(configs[name])` per group of trainable leaves, `group(path)`
  naming each leaf's group (e.g. generator / discriminator): each group is clipped and
  stepped with its own settings, as two optimisers would. fields: group -> the config
  field its settings come from (for errors; default the group's name)."""
  import jax

  def labels(params):
    # tree_map_with_path, not flatten_dict: optax also calls this on placeholder trees.
    return jax.tree_util.tree_map_with_path(
        lambda path, _: group(tuple(str(getattr(k, "key", k)) for k in path)), params)

  fields = fields or {}
  return optax.multi_transform(
      {name: make_optimizer(c, fields.get(name, name)) for name, c in configs.items()}, labels)
