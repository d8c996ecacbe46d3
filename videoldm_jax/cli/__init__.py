"""Console scripts (setup.py entry points); `run_app` starts one."""

import contextlib
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from absl import app, flags

from videoldm_jax.models.config_base import is_seed


def run_app(main, module_name: str, reused_flags: Sequence[str] = ()) -> None:
  """`app.run(main)` for the entry point of module `module_name`, positional arguments
  refused (`no_positional`): `--help` shows that module's docstring and flags, and the
  flags named in `reused_flags` (defined by another command's module; only those this
  command reads). An installed script's sys.argv[0] is its wrapper, under which absl
  finds no flags (it listed none) and no description."""
  module = sys.modules[module_name]
  entry = sys.argv[0]
  shown = [*flags.FLAGS.get_flags_for_module(module_name),
           *(flags.FLAGS[name] for name in reused_flags)]
  for flag in shown:
    flags.FLAGS.register_key_flag_for_module(entry, flag)
  sys.modules["__main__"].__doc__ = module.__doc__

  def checked(argv):
    # Every command takes --flags only: an unquoted prompt's later words, a step number
    # without --step=, "--config.train.export false" (absl takes no separate value for
    # a boolean) were dropped without a word.
    no_positional(argv)
    return main(argv)
  app.run(checked, flags_parser=parse_flags)


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, with a misspelt `--config.a.b=...` field said as absl says a
  bad flag value (ml_collections raises a bare AttributeError there: a 60-line
  traceback ending in an escaped message)."""
  loaded = []
  try:
    with _keeping_loaded_configs(loaded):
      return app.parse_flags_with_usage(list(argv))
  except (AttributeError, KeyError, TypeError) as e:
    arg = e  # (ml_collections wraps a KeyError's message in a KeyError, then this)
    while isinstance(arg, (AttributeError, KeyError)) and arg.args:
      arg = arg.args[0]
    field, _, hint = str(arg).partition("\n")
    field = field.strip("'\"")
    named = [a.split("=", 1)[0] for a in argv[1:]
             if a.startswith("--config.") and field in a.split("=", 1)[0].split(".")[1:]]
    if field and named and not isinstance(e, TypeError):
      message = f"{named[0]}: the config has no field {field!r}" + (
          f" ({hint.strip()})" if hint.strip() else "")
    else:
      # An override through a field that holds a value, not a group (--config.seed.x=1:
      # a KeyError naming no field, or a TypeError indexing a string).
      message = _override_through_a_value(argv, loaded[-1] if loaded else None)
      if message is None:
        raise  # not an override's error: a config file's own, shown as it is
    print(f"FATAL Flags parsing error: {message}", file=sys.stderr)
    print("Pass --helpshort or --helpfull to see help on flags.", file=sys.stderr)
    sys.exit(1)


@contextlib.contextmanager
def _keeping_loaded_configs(loaded: list):
  """Appends to `loaded` each config the --config flag loads inside (None for a file that
  failed to load): its overrides fail after the load, and the flag then holds nothing.
  The error's message reads the config from here; loading the file again ran its
  get_config twice."""
  if "config" not in flags.FLAGS:
    yield
    return
  parser = flags.FLAGS["config"].parser
  parse = parser.parse

  def parse_and_keep(path):
    loaded.append(None)
    loaded[-1] = parse(path)
    return loaded[-1]

  parser.parse = parse_and_keep
  try:
    yield
  finally:
    del parser.parse  # (the class's method again)


def _override_through_a_value(argv: Sequence[str], config) -> Optional[str]:
  """'--config.seed.x: config.seed is a value (int), not a group of fields' for the first
  --config.a.b override whose path passes through a value of `config` (the loaded config
  file, with the overrides applied before the failing one; None: the file did not load)."""
  import ml_collections
  if config is None:
    return None
  groups = (ml_collections.ConfigDict, dict)
  for a in argv[1:]:
    name = a.split("=", 1)[0]
    if not name.startswith("--config."):
      continue
    node, parts = config, name[len("--config."):].split(".")
    for i, part in enumerate(parts[:-1]):
      if part not in node:
        break
      node = node[part]
      if not isinstance(node, groups):
        where = ".".join(["config"] + parts[:i + 1])
        return f"{name}: {where} is a value ({type(node).__name__}), not a group of fields"
  return None


def output_path(path: str, flag: str, folder: bool = False) -> Path:
  """`path` (--`flag`), its folder created: a file's parent, or with `folder` the path
  itself. A UsageError where that cannot be done or written to, raised before the work
  (a parent that is a file failed after the sampling, with a bare FileExistsError)."""
  out = Path(path).absolute()
  where = out if folder else out.parent
  if folder and out.exists() and not out.is_dir():
    raise app.UsageError(f"--{flag}={path}: exists and is not a folder")
  if not folder and out.is_dir():
    raise app.UsageError(f"--{flag}={path}: is a folder; expected a file path")
  try:
    where.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise app.UsageError(f"--{flag}={path}: cannot create the folder {where} ("
                         f"{e.strerror or e}: a part of it is a file?)") from None
  if not os.access(where, os.W_OK | os.X_OK):
    raise app.UsageError(f"--{flag}={path}: {where} is not writable")
  return out


def seed_outputs(output: Path, seeds: Sequence[int]) -> list[Path]:
  """Where each seed's video goes: `output` itself for one seed, else OUTPUT_seedN."""
  if len(seeds) == 1:
    return [output]
  return [output.with_name(f"{output.stem}_seed{s}{output.suffix}") for s in seeds]


def class_labels(classes: Optional[int], label: Optional[int], count: int,
                 model: str) -> Optional[list[int]]:
  """`count` copies of --class_label for a model with `classes` classes (None: not
  class-conditional); a missing, out-of-range or unused label is a usage error (past
  the embedding table a label gives NaN, a black image; -1 wrapped to the last class)."""
  if classes and label is None:
    raise app.UsageError(f"{model} is class-conditional ({classes} classes): pass "
                         "--class_label")
  if label is not None and not (classes and 0 <= label < classes):
    raise app.UsageError(f"--class_label={label}: " + (
        f"expected 0..{classes - 1}" if classes else f"{model} is not class-conditional"))
  return None if label is None else [label] * count


def check_at_least(*checks: tuple) -> None:
  """(flag name, value, least) triples: a UsageError naming the first flag whose value is
  below its least (a value None, unset, passes). Checked before anything loads: a 0
  count failed after the work, some with a ZeroDivisionError."""
  for name, value, least in checks:
    if value is not None and value < least:
      raise app.UsageError(f"--{name} must be >= {least}, got {value}")


def check_seed(flag: str, *seeds: int) -> None:
  """A UsageError naming --`flag` for a seed that is no `config_base.is_seed`, before
  anything loads (2^32 drew seed 0's noise, -1 that of 2^32 - 1, and larger ones
  overflowed after the model had loaded)."""
  for seed in seeds:
    if not is_seed(seed):
      raise app.UsageError(f"--{flag} must be in [0, 2^32), got {seed}")


def no_positional(argv: Sequence[str]) -> None:
  """Refuses positional arguments: an unquoted prompt's later words (or a step number
  without --step=) were dropped without a word."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {list(argv[1:])} (quote values with "
                         "spaces; every option is a --flag)")


def note_null_class(model, label: Optional[int]) -> None:
  """Says on stderr that --class_label is `model`'s null class (`sampling.null_class_label`,
  the unconditional branch of guidance): a text-free model's samples are unconditional,
  a text model's follow the prompt alone."""
  from videoldm_jax.pipelines import sampling
  if label is not None and label == sampling.null_class_label(model):
    print(f"note: --class_label={label} is the model's null class (no class): "
          f"{sampling.null_class_effect(model)}", file=sys.stderr)


def autoencoder_export(model) -> bool:
  """Whether `model` is an autoencoder-stage export no UNet stage trained on since: its
  UNet never saw this autoencoder's latents (the image_ldm stage trains it on them)."""
  return (model.decoder_training.get("stage") == "autoencoder"
          and not model.training.get("stage"))


def note_unguided(guided: bool, guidance_scale: float) -> None:
  """Says on stderr that --guidance_scale does nothing for a model without an
  unconditional branch (`sampling.guided`: no text encoder, and no null class of a
  class-conditional model trained with label dropout)."""
  if not guided and guidance_scale != 1.0:
    print(f"note: --guidance_scale={guidance_scale} ignored: the model has no text "
          "encoder and no null class (no classifier-free guidance without one)",
          file=sys.stderr)


def note_unused_negative(guided: bool, guidance_scale: float, negative_prompt: str) -> None:
  """Says on stderr that --negative_prompt does nothing at --guidance_scale=1: the
  unconditional branch it conditions is not run (`samplers.guided_denoise_fn`); the
  image was the same with or without it, said by no one."""
  if guided and guidance_scale == 1.0 and negative_prompt:
    print("note: --negative_prompt ignored: --guidance_scale=1 runs no unconditional "
          "branch (the one the negative prompt conditions)", file=sys.stderr)


def load_to_sample(model_dir: str, configs, options, negative_prompt: str,
                   class_label: Optional[int], prompt: str = ""):
  """(model, tokenizer) of `model_dir` for videoldm-sample / -sample-image: `options`
  (SampleOptions) that its `configs` (its configs-only read) cannot sample are a usage
  error before the weights load; after the load, options the model ignores get notes."""
  from videoldm_jax import pretrained
  from videoldm_jax.pipelines import sampling
  try:  # sizes and steps the model cannot sample, before its weights load
    sampling.check_sample_options(configs, options)
  except ValueError as e:
    raise app.UsageError(f"--model={model_dir}: {e}") from None
  model, tokenizer = pretrained.load_with_tokenizer(model_dir)
  guided = sampling.guided(model)
  note_unguided(guided, options.guidance_scale)
  note_unused_negative(guided, options.guidance_scale, negative_prompt)
  note_null_class(model, class_label)
  prompts = {"--prompt": prompt, "--negative_prompt": negative_prompt}
  for note in sampling.truncation_notes(model, tokenizer, prompts):
    print(f"note: {note}", file=sys.stderr)
  return model, tokenizer
