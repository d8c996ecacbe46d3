"""How the C library should hand host memory to XLA:CPU (for CPU training runs).

XLA:CPU allocates a program's temporary buffer afresh at every execution (one
`posix_memalign` of the whole buffer: 1.7 GB for the W1 train step, 3.4 GB for W2) and
frees it at the end. The execution runs on a worker thread, and glibc serves a block
that large from a thread's arena with its own `mmap` and returns it with `munmap`, so
every step faults in every page again: 0.47 M minor faults per W1 step, 0.84 M per W2
step. In the KVM guest of 2026-12-03 a fault cost 2.4-5.6 us: 1.1-1.3 s (W1) and
4.2-4.7 s (W2) of kernel time per step, a quarter to a third of the step's CPU time
(bench/README.md).

`GLIBC_TUNABLES` below keeps that memory in the process: one arena (so the buffer comes
from the main heap, which may grow by `brk`), no `mmap` for large blocks, and no
trimming of the heap's free top. After the first step the pages stay (0 faults per step
in 4 of 5 measured runs); the process keeps its peak heap. The cost is one malloc lock
for all threads: user time per W2 step rose 1.2-1.9 s, against 3.7-4.2 s less kernel
time; in steps timed interleaved with and without, W1 and W2 temporal ran 1.19x and
1.25x faster (medians over 6 rounds, on a noisy host).

The C library reads `GLIBC_TUNABLES` only when a process starts, so the package cannot
set it for itself: the CPU benchmarks restart themselves with it (`restart_with_tunables`)
or pass `environ_with_tunables()` to their child processes, and a CPU training run takes
it by `export GLIBC_TUNABLES=$(python -m videoldm_jax.host_memory)` before it starts. It is
not a default of the launch scripts: their tiny runs compile longer under the one
malloc lock than their steps save (a 100-step keyframe_tiny run, alternating, 3 runs
each on a 2-core Zen 4: steps 0.104-0.114 s instead of 0.117-0.160 s, but the compile
17.8 s instead of 14.8 s and the whole process 36.5-40.0 s instead of 34.3-36.9 s).
Other C libraries ignore the variable. Accelerator hosts keep the temporaries on the
device.
"""

import os
import sys
from typing import Mapping, Optional

# trim_threshold: 64 GiB, i.e. never give the heap's free top back to the kernel.
GLIBC_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                  "glibc.malloc.trim_threshold=68719476736")


# glibc's older variables for the same tunables: GLIBC_TUNABLES overrides them, so one
# the user set (MALLOC_ARENA_MAX is common in containers) must keep ours out.
_ALIASES = {"glibc.malloc.arena_max": "MALLOC_ARENA_MAX",
            "glibc.malloc.mmap_max": "MALLOC_MMAP_MAX_",
            "glibc.malloc.trim_threshold": "MALLOC_TRIM_THRESHOLD_"}


def environ_with_tunables(environ: Optional[Mapping[str, str]] = None) -> dict:
  """A copy of `environ` (os.environ by default) whose GLIBC_TUNABLES also holds ours;
  a tunable the user already set wins, in GLIBC_TUNABLES or by its MALLOC_* alias."""
  env = dict(os.environ if environ is None else environ)
  tunables = dict(t.split("=", 1) for t in env.get("GLIBC_TUNABLES", "").split(":")
                  if "=" in t)
  for tunable in GLIBC_TUNABLES.split(":"):
    name, value = tunable.split("=", 1)
    if _ALIASES[name] not in env:
      tunables.setdefault(name, value)
  env["GLIBC_TUNABLES"] = ":".join(f"{k}={v}" for k, v in tunables.items())
  return env


_RESTARTED = "VIDEOLDM_JAX_HOST_TUNABLES_RESTARTED"  # set in the restarted process


def restart_with_tunables() -> None:
  """For a CPU run (the first of `JAX_PLATFORMS` is "cpu") whose GLIBC_TUNABLES lacks
  ours: replaces this process by the same command line with `environ_with_tunables()`
  (os.execve; call it before any work). Without it a benchmark run by hand measured
  another program than the one it reports: the W2 temporal step took 3.9-4.3 s instead
  of 3.3 s (bench/README.md). `VIDEOLDM_JAX_HOST_TUNABLES=0` keeps the process as it
  is (to time the difference). A program read from stdin (`python -`, a REPL) cannot
  be started again and is left as it is, as is a process this restarted once."""
  platform = os.environ.get("JAX_PLATFORMS", "").split(",")[0]
  if platform != "cpu" or os.environ.get("VIDEOLDM_JAX_HOST_TUNABLES", "1") == "0":
    return
  if sys.argv[0] in ("", "-") or os.environ.get(_RESTARTED):
    return
  env = environ_with_tunables()
  # (Unset and empty are the same: every tunable set by its MALLOC_* alias restarted
  # the process for nothing.)
  if env["GLIBC_TUNABLES"] == os.environ.get("GLIBC_TUNABLES", ""):
    return
  env[_RESTARTED] = "1"
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


if __name__ == "__main__":  # prints the merged value, for `export GLIBC_TUNABLES=$(...)`
  print(environ_with_tunables()["GLIBC_TUNABLES"])
