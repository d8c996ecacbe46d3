"""videoldm_jax/host_memory.py: its GLIBC_TUNABLES merge with the user's, and on this
machine's C library they stop a thread's large blocks from being faulted in afresh at
every allocation (what XLA:CPU's per-step temporary buffer goes through)."""

import os
import subprocess
import sys

from videoldm_jax import host_memory

# In a fresh interpreter: a worker thread allocates, touches and frees a 64 MB block
# 4 times; prints the minor page faults of the last 3 rounds. libc's malloc directly:
# numpy's allocator would advise huge pages on its own.
_CHILD = """
import ctypes, resource, threading
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20  # 16384 pages of 4 KB
faults = []
def work():
  for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=work)
t.start()
t.join()
print(sum(faults[1:]))
"""
PAGES = 16 * 1024  # 4 KB pages of the block


def _faults(env: dict) -> int:
  out = subprocess.run([sys.executable, "-c", _CHILD], env=env, check=True,
                       capture_output=True, text=True)
  return int(out.stdout)


def test_user_tunables_win_and_ours_are_added():
  env = host_memory.environ_with_tunables(
      {"GLIBC_TUNABLES": "glibc.malloc.arena_max=4:glibc.malloc.tcache_count=0", "X": "1"})
  tunables = dict(t.split("=") for t in env["GLIBC_TUNABLES"].split(":"))
  assert tunables["glibc.malloc.arena_max"] == "4"  # the user's value
  assert tunables["glibc.malloc.tcache_count"] == "0"
  assert tunables["glibc.malloc.mmap_max"] == "0"
  assert tunables["glibc.malloc.trim_threshold"] == "68719476736"
  assert env["X"] == "1"
  assert host_memory.environ_with_tunables({})["GLIBC_TUNABLES"] == host_memory.GLIBC_TUNABLES
  # glibc's MALLOC_* variables set the same tunables, and GLIBC_TUNABLES beat them: the
  # user's MALLOC_ARENA_MAX=4 became arena_max=1.
  env = host_memory.environ_with_tunables({"MALLOC_ARENA_MAX": "4"})
  assert "arena_max" not in env["GLIBC_TUNABLES"] and env["MALLOC_ARENA_MAX"] == "4"
  assert "glibc.malloc.mmap_max=0" in env["GLIBC_TUNABLES"]
  for var, tunable in (("MALLOC_MMAP_MAX_", "mmap_max"),
                       ("MALLOC_TRIM_THRESHOLD_", "trim_threshold")):
    env = host_memory.environ_with_tunables({var: "7"})
    assert tunable not in env["GLIBC_TUNABLES"] and env[var] == "7", var


def test_tunables_keep_a_threads_large_blocks_in_the_process():
  base = {k: v for k, v in host_memory.environ_with_tunables().items()
          if k != "GLIBC_TUNABLES"}
  # glibc's default: each round mmaps a fresh block and faults in all of its pages.
  assert _faults(base) >= 3 * PAGES * 0.9
  # With the tunables the block is reused from the heap: almost no faults after round 1.
  assert _faults(host_memory.environ_with_tunables(base)) < 3 * PAGES * 0.1


# A child that restarts itself first (as the CPU benchmarks do), then reports the
# GLIBC_TUNABLES it runs under and what remains of its command line.
_RESTARTS = ("import os, sys\nfrom videoldm_jax import host_memory\n"
             "host_memory.restart_with_tunables()\n"
             "print(os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:])\n")


def _restarted(env: dict) -> str:
  return subprocess.run([sys.executable, "-c", _RESTARTS, "--flag=1"], env=env, check=True,
                        capture_output=True, text=True).stdout.strip()


def test_cpu_benchmarks_restart_themselves_with_the_tunables():
  base = {k: v for k, v in os.environ.items()
          if k not in ("GLIBC_TUNABLES", "VIDEOLDM_JAX_HOST_TUNABLES",
                       "VIDEOLDM_JAX_HOST_TUNABLES_RESTARTED")}
  cpu = {**base, "JAX_PLATFORMS": "cpu"}
  assert _restarted(cpu) == f"{host_memory.GLIBC_TUNABLES} ['--flag=1']"
  user = {**cpu, "GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}
  assert _restarted(user) == (f"{host_memory.environ_with_tunables(user)['GLIBC_TUNABLES']}"
                              " ['--flag=1']")
  assert "arena_max=4" in _restarted(user)
  # Left alone: another platform first, or the switch off.
  assert _restarted({**base, "JAX_PLATFORMS": "cuda,cpu"}) == "['--flag=1']"
  assert _restarted({**cpu, "VIDEOLDM_JAX_HOST_TUNABLES": "0"}) == "['--flag=1']"
  # ... or nothing to add: every tunable set by its MALLOC_* alias.
  aliases = {**cpu, "MALLOC_ARENA_MAX": "4", "MALLOC_MMAP_MAX_": "7",
             "MALLOC_TRIM_THRESHOLD_": "9"}
  again = subprocess.run(
      [sys.executable, "-c", "import os\nfrom videoldm_jax import host_memory\n"
       "host_memory.restart_with_tunables()\n"
       "print(os.environ.get('VIDEOLDM_JAX_HOST_TUNABLES_RESTARTED'))"],
      env=aliases, check=True, capture_output=True, text=True)
  assert again.stdout.strip() == "None"
  # A program read from stdin cannot be started again: it runs on as it is.
  stdin = subprocess.run([sys.executable, "-"], input=_RESTARTS, env=cpu, check=True,
                         capture_output=True, text=True)
  assert stdin.stdout.strip() == "[]"
  # The restarted process really runs under them: its large blocks stay in the process.
  restarting = subprocess.run(
      [sys.executable, "-c", "from videoldm_jax import host_memory\n"
       "host_memory.restart_with_tunables()\n" + _CHILD], env=cpu, check=True,
      capture_output=True, text=True)
  assert int(restarting.stdout) < 3 * PAGES * 0.1
