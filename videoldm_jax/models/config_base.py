"""JSON round-trip for the frozen dataclasses that describe models."""

import dataclasses
import json
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


@dataclasses.dataclass(frozen=True)
class JsonConfig:
  """Base of model configs: hashable (usable as a Flax module field) and JSON-able."""

  def to_dict(self) -> dict[str, Any]:
    return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

  @classmethod
  def from_dict(cls: type[T], d: dict[str, Any], source: str = "config") -> T:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"{source}: unknown {cls.__name__} fields {unknown}; "
                       f"expected a subset of {sorted(names)}")
    return cls(**{k: _frozen(v) for k, v in d.items()})

  def replace(self: T, **kw) -> T:
    return dataclasses.replace(self, **kw)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)
