"""Compiles the C++ kernels of this folder on first use and registers them with XLA.

The kernels are XLA FFI handlers (`attention_cpu.cc`, on the helpers of
`cpu_kernels.h`). They are compiled for the CPU they run on (`-march=native`) with the
C++ compiler of the machine (`$CXX`, else `g++`)
against the XLA FFI headers that ship with jaxlib, into a cache folder
(`$VIDEOLDM_JAX_NATIVE_CACHE`, else `~/.cache/videoldm_jax/native`). The library's
name holds a hash of the sources, the compiler command, jaxlib's version and the CPU's
feature flags, so a cache shared between machines never hands one CPU code built for
another. Several processes may build at once (multi-host tests): each writes its own
temporary file and renames it into place.

Without a compiler, or when the build fails, `load()` says why and the callers keep
XLA's own implementation (models/attention.py). `VIDEOLDM_JAX_NATIVE=0` turns the
kernels off.
"""

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import jax
import jaxlib

_HERE = Path(__file__).parent
SOURCES = {"attention": _HERE / "attention_cpu.cc", "matmul": _HERE / "matmul_cpu.cc"}
HEADERS = (_HERE / "cpu_kernels.h",)  # included by every source
# Handler symbols of each library -> the FFI target names they are registered under.
TARGETS = {
    "attention": {"VideoLdmAttentionForward": "videoldm_attention_forward",
                  "VideoLdmAttentionBackward": "videoldm_attention_backward"},
    "matmul": {"VideoLdmWeightGrad": "videoldm_weight_grad",
               "VideoLdmConvWeightGrad": "videoldm_conv_weight_grad",
               "VideoLdmConvSame": "videoldm_conv_same"},
}
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")

_lock = threading.Lock()
_loaded: dict = {}  # name -> (library or None, reason it is None)


def enabled() -> bool:
  """Whether native kernels may be used at all (`VIDEOLDM_JAX_NATIVE`, default on)."""
  return os.environ.get("VIDEOLDM_JAX_NATIVE", "1") != "0"


def cache_dir() -> Path:
  return Path(os.environ.get("VIDEOLDM_JAX_NATIVE_CACHE")
              or Path.home() / ".cache" / "videoldm_jax" / "native")


BUILD_TIMEOUT_S = 600  # a compile takes ~10-30 s; a hung compiler must not hang every trace


def _cpu_flags() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith(("flags", "Features")):
        return line
  except OSError:
    pass
  return platform.processor()


def _compiler() -> Optional[str]:
  """The compiler command ($CXX may carry arguments, e.g. "ccache g++"), its program
  resolved on PATH; None where there is none."""
  try:
    words = shlex.split(os.environ.get("CXX", "g++")) or ["g++"]
  except ValueError:  # e.g. an unbalanced quote: unusable, so XLA's paths are used
    return None
  program = shutil.which(words[0])
  return None if program is None else shlex.join([program, *words[1:]])


def unbuildable_reason() -> Optional[str]:
  """Why no kernel can be built on this machine (`VIDEOLDM_JAX_NATIVE=0`, no C++
  compiler), or None where one can: then a library that fails to build is a failure,
  not an absence (the tests skip only in the first case)."""
  if not enabled():
    return "VIDEOLDM_JAX_NATIVE=0"
  if _compiler() is None:
    return f"no usable C++ compiler ($CXX={os.environ.get('CXX', 'g++')!r}) on PATH"
  return None


def library_path(name: str, compiler: str) -> Path:
  """Where the library of source `name` built by `compiler` for this CPU lives."""
  key = hashlib.sha256()
  for part in (SOURCES[name].read_bytes(), *(h.read_bytes() for h in HEADERS),
               compiler.encode(), " ".join(FLAGS).encode(),
               jaxlib.__version__.encode(), _cpu_flags().encode(), platform.machine().encode()):
    key.update(part)
    key.update(b"\0")
  return cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"


def _build(name: str, compiler: str, target: Path) -> None:
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
  os.close(fd)
  cmd = [*shlex.split(compiler), *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCES[name]),
         "-o", tmp]
  logging.info("videoldm_jax.native: compiling %s (once per machine): %s", name, " ".join(cmd))
  try:
    try:  # bounded: every trace waits on this under the lock
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
      raise RuntimeError(f"{' '.join(cmd)} did not finish in {BUILD_TIMEOUT_S} s") from e
    if proc.returncode != 0:
      raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    # mkstemp's file is 0600: other users of a shared cache could not load it and would
    # fall back to XLA without rebuilding.
    os.chmod(tmp, 0o755)
    with open(tmp, "rb") as f:  # on disk before it is named: a crash leaves no empty .so
      os.fsync(f.fileno())
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _elf_damaged(path: Path) -> bool:
  """Whether `path` is not a whole 64-bit little-endian ELF file: no ELF magic, or
  shorter than its section header table's end (where a truncated library stops)."""
  try:
    data = path.read_bytes()
  except OSError:
    return True
  if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
    return True
  shoff = int.from_bytes(data[0x28:0x30], "little")
  shentsize = int.from_bytes(data[0x3A:0x3C], "little")
  shnum = int.from_bytes(data[0x3C:0x3E], "little")
  return len(data) < shoff + shentsize * shnum


def load(name: str) -> tuple[Optional[ctypes.CDLL], str]:
  """(the library with its FFI targets registered for the CPU, "") or (None, why not).
  Builds it on the first call on a machine; later calls and processes reuse it."""
  with _lock:
    if name in _loaded:
      return _loaded[name]
    lib, reason = None, unbuildable_reason() or ""
    if not reason:
      compiler = _compiler()
      path = library_path(name, compiler)
      try:
        if not path.exists():
          _build(name, compiler, path)
        try:
          lib = ctypes.CDLL(str(path))
        except OSError as e:
          # A damaged cache entry (a crash mid-copy, a full disk) is built again; one that
          # is whole but cannot load here (a noexec cache folder) is not rebuilt by every
          # process: that is the environment.
          if not _elf_damaged(path):
            raise
          logging.warning("videoldm_jax.native: %s is damaged (%s); building it again",
                          path, e)
          _build(name, compiler, path)
          lib = ctypes.CDLL(str(path))
        for symbol, target in TARGETS[name].items():
          jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                      platform="cpu")
      except (OSError, RuntimeError, AttributeError) as e:
        lib, reason = None, f"building or loading {path} failed: {e}"
    if lib is None:
      logging.warning("videoldm_jax.native: %s kernels unavailable (%s); XLA's own "
                      "implementation is used instead", name, reason)
    _loaded[name] = (lib, reason)
    return _loaded[name]
