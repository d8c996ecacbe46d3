"""Loading config files by path, so that configs/*.py can build on each other without
being an importable package; reading a JSON config file of a model folder."""

import importlib.util
import json
import os
from types import ModuleType


def load_sibling(config_file: str, name: str) -> ModuleType:
  """The module `name`.py in the folder of `config_file` (pass `__file__`)."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{config_file}: sibling config {path} not found")
  spec = importlib.util.spec_from_file_location(f"videoldm_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def read_json_object(path) -> dict:
  """The JSON object in the file `path`; a file that is not one is named."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not a JSON file (not valid JSON: {e}); a Git LFS pointer "
                     "or a partial download?") from e
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a JSON object, got a {type(data).__name__}")
  return data
