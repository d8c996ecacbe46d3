"""Console scripts (setup.py entry points); `run_app` starts one."""

import sys

from absl import app, flags


def run_app(main, module_name: str) -> None:
  """`app.run(main)` for the entry point of module `module_name`: `--help` shows that
  module's docstring and flags. An installed script's sys.argv[0] is its wrapper, under
  which absl finds no flags (it listed none) and no description."""
  module = sys.modules[module_name]
  entry = sys.argv[0]
  for flag in flags.FLAGS.get_flags_for_module(module_name):
    flags.FLAGS.register_key_flag_for_module(entry, flag)
  sys.modules["__main__"].__doc__ = module.__doc__
  app.run(main)
