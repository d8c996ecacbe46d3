"""videoldm_jax/host_memory.py: its GLIBC_TUNABLES merge with the user's, and on this
machine's C library they stop a thread's large blocks from being faulted in afresh at
every allocation (what XLA:CPU's per-step temporary buffer goes through)."""

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


def test_tunables_keep_a_threads_large_blocks_in_the_process():
  base = {k: v for k, v in host_memory.environ_with_tunables().items()
          if k != "GLIBC_TUNABLES"}
  # glibc's default: each round mmaps a fresh block and faults in all of its pages.
  assert _faults(base) >= 3 * PAGES * 0.9
  # With the tunables the block is reused from the heap: almost no faults after round 1.
  assert _faults(host_memory.environ_with_tunables(base)) < 3 * PAGES * 0.1
