"""XLA flags the package sets by default, before any JAX backend starts.

XLA reads `XLA_FLAGS` once, when the first backend initialises (the first computation,
not `import jax`), so setting it at package import takes effect for every program that
imports `videoldm_jax` before computing anything, including the trainer's subprocesses.

The one default today is for XLA:CPU. jax 0.10 routes single convolutions through
YNNPACK ("individual_convolution" fusions), which on our 2-core Zen 2 host (AVX2) runs
the 3x3 weight gradient of our ResBlocks at about half the rate of XLA's own
convolution path (40-88 vs 139-174 GFLOP/s) and the forward at 85-164 vs 170-185
(bench/README.md, "XLA:CPU convolutions off YNNPACK"). Removing that one type from XLA's default list
keeps YNNPACK for individual dots and reductions. The flag is a debug option of every
backend; GPU and TPU ignore it.
"""

import os
import re

YNN_FUSION_FLAG = "xla_cpu_experimental_ynn_fusion_type"
# The leading "-" removes one type from XLA's default list instead of replacing it.
DEFAULT_FLAGS = (f"--{YNN_FUSION_FLAG}=-individual_convolution",)
# Set to 0 to run with XLA's own defaults (bench comparisons, bug reports to XLA).
OPT_OUT_ENV = "VIDEOLDM_JAX_XLA_DEFAULTS"
# The defaults this package added to XLA_FLAGS, so that a child process that opts out
# (inheriting its parent's XLA_FLAGS) can take them out again.
ADDED_ENV = "VIDEOLDM_JAX_XLA_ADDED"


def with_defaults(flags: str) -> str:
  """`flags` (an XLA_FLAGS string) plus each default whose flag the user did not name.

  The user's string is kept as written (quoted values with several spaces included);
  defaults are appended. A value that does not start with "-" is, to XLA, the path of
  a file of flags: its contents are used (appending to the path made XLA abort on a
  file named "path --flag"); an unreadable file is left for XLA to report.
  """
  flags, readable = _as_written(flags)
  if not readable:
    return flags
  out = flags.rstrip()
  names = {f.split("=", 1)[0] for f in out.split()}
  for flag in DEFAULT_FLAGS:
    if flag.split("=", 1)[0] not in names:
      out = f"{out} {flag}" if out else flag
  return out


def _as_written(flags: str) -> tuple[str, bool]:
  """(the flags an XLA_FLAGS value gives, whether they could be read): a value that
  does not start with "-" names a file of them."""
  if flags.strip() and not flags.lstrip().startswith("-"):
    try:
      with open(flags.strip()) as f:
        return f.read(), True
    except OSError:
      return flags, False
  return flags, True


def apply_defaults(environ=None) -> None:
  """Adds the package's XLA defaults to `environ["XLA_FLAGS"]` (os.environ by default)
  unless `VIDEOLDM_JAX_XLA_DEFAULTS=0`, which instead removes defaults an earlier
  import (a parent process's) added. A flag the user already set wins."""
  environ = os.environ if environ is None else environ
  before = environ.get("XLA_FLAGS", "")
  if environ.get(OPT_OUT_ENV, "1") == "0":
    added = set(environ.pop(ADDED_ENV, "").split())
    flags = before
    for flag in added:  # whole words only: the rest is kept as written (quoted spaces)
      flags = re.sub(rf"(^|\s+){re.escape(flag)}(?=\s|$)", "", flags)
    if added:
      environ["XLA_FLAGS"] = flags.strip()
    return
  environ["XLA_FLAGS"] = with_defaults(before)
  mine = set(environ.get(ADDED_ENV, "").split())
  # (A flag the user wrote, in the string or in its file, is theirs, not added.)
  mine |= {f for f in DEFAULT_FLAGS if f in environ["XLA_FLAGS"].split()
           and f not in _as_written(before)[0].split()}
  if mine:
    environ[ADDED_ENV] = " ".join(sorted(mine))
