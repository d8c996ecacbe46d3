"""Loading config files by path, so that configs/*.py can build on each other without
being an importable package."""

import importlib.util
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
