"""JSON round-trip for the frozen dataclasses that describe models."""

import dataclasses
import json
import numbers
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T", bound="JsonConfig")


def _jsonable(value):
  if isinstance(value, tuple):
    return [_jsonable(v) for v in value]
  return value


def _frozen(value):
  if isinstance(value, list):
    return tuple(_frozen(v) for v in value)
  return value


def _conforms(value, annotation) -> bool:
  """Whether `value` (JSON-decoded, lists made tuples) fits a field's `annotation`:
  bool, int, float (a whole number too), str, None, tuple[X, ...], tuple[X, Y, Z] and
  unions of those; other annotations are not checked."""
  origin = typing.get_origin(annotation)
  if origin in (typing.Union, types.UnionType):
    return any(_conforms(value, a) for a in typing.get_args(annotation))
  if origin is tuple:
    args = typing.get_args(annotation)
    if not isinstance(value, tuple):
      return False
    if len(args) == 2 and args[1] is Ellipsis:
      return all(_conforms(v, args[0]) for v in value)
    return len(value) == len(args) and all(_conforms(v, a) for v, a in zip(value, args))
  if annotation is type(None):
    return value is None
  if annotation is bool:
    return isinstance(value, bool)
  if annotation is int:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
  if annotation is float:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
  if annotation is str:
    return isinstance(value, str)
  if annotation is dict:
    return isinstance(value, dict)
  return True


def _describe(annotation) -> str:
  if typing.get_origin(annotation) is None:
    return getattr(annotation, "__name__", str(annotation))
  return str(annotation).replace("typing.", "").replace("NoneType", "None")


def is_integer(value, least=None) -> bool:
  """An integer (Python or NumPy, not a bool) and, given `least`, >= least: what a count
  must be (a float was truncated, True counted as 1)."""
  return (isinstance(value, numbers.Integral) and not isinstance(value, bool)
          and (least is None or value >= least))


def is_seed(value) -> bool:
  """An integer (not a bool) in [0, 2^32): what every seed of a run must be. JAX's keys
  keep a seed's low 32 bits (2^32 would repeat seed 0's draws), and NumPy's SeedSequence
  takes a larger one as two words (ids that could equal another seed's)."""
  return is_integer(value, 0) and value < 2 ** 32


def check_fields(cls: type, d: dict[str, Any], source: str,
                 section: bool = False) -> dict[str, Any]:
  """`d` (a JSON object) with lists made tuples, or ValueError naming `source` for keys
  that are no fields of the dataclass `cls` and values of another type than the
  field's (see `_conforms`). With `section`, `source` is the path of a section of the
  stage config (`config.temporal`) and a wrong value is named by its field's path, as a
  --config.temporal.conv_kernel override writes it."""
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise ValueError(f"{source}: unknown {cls.__name__} fields {unknown}; "
                     f"expected a subset of {sorted(names)}")
  values = {k: _frozen(v) for k, v in d.items()}
  # A string for a number or a number for a list failed deep in the model (a
  # TypeError in a reshape), or was taken ("1e-5" as an epsilon) and failed later.
  hints = typing.get_type_hints(cls)
  for k, v in values.items():
    if not _conforms(v, hints[k]):
      given = (f"{source}.{k}={v!r}" if section
               else f"{source}: {cls.__name__}.{k}={_jsonable(v)!r}")
      raise ValueError(f"{given}: expected {_describe(hints[k])}")
  return values


@dataclasses.dataclass(frozen=True)
class JsonConfig:
  """Base of model configs: hashable (usable as a Flax module field) and JSON-able."""

  def to_dict(self) -> dict[str, Any]:
    return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

  @classmethod
  def from_dict(cls: type[T], d: dict[str, Any], source: str = "config") -> T:
    return cls(**check_fields(cls, d, source))

  @classmethod
  def from_config(cls: type[T], section, path: str) -> T:
    """From the section `path` of a stage config (`config.temporal`, a ConfigDict):
    a wrong value is named by its field's path (`config.temporal.conv_kernel=(3,)`),
    not by this class."""
    return cls(**check_fields(cls, dict(section), path, section=True))

  def replace(self: T, **kw) -> T:
    return dataclasses.replace(self, **kw)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)
