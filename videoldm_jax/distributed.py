"""Multi-host start-up: `jax.distributed.initialize` from flags or the environment.

Call `initialize()` once per process before any other JAX call. Where the processes
come from decides how they find each other:

  explicit    --coordinator_address=HOST:PORT --num_processes=N --process_id=I (any
              launcher; launch/local_multiprocess.sh uses it on loopback)
  TPU VM      a multi-host slice (TPU_WORKER_HOSTNAMES / the metadata server): JAX
              auto-detects everything
  SLURM       srun with SLURM_NTASKS > 1 (launch/gpu_slurm.sbatch); each task drives
              the GPUs it can see (`local_device_ids`)
  Open MPI    mpirun with OMPI_COMM_WORLD_SIZE > 1 (Open MPI 4; version 5 needs the
              explicit flags)
  nothing     one process: no initialisation

`cpu_devices` > 0 gives each process that many fake CPU devices with gloo
collectives: this is how tests and `local_multiprocess.sh` run multi-host code paths
on one machine.
"""

import dataclasses
import ipaddress
import os
from typing import Mapping, Optional


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process joins the job (see `detect`)."""
  kind: str                       # explicit | tpu | slurm | mpi | single
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None


def tpu_chips() -> int:
  """TPU chips on this host's PCI bus, as JAX's Cloud TPU start-up counts them (0 on
  other hosts, or where that private helper is gone)."""
  try:
    from jax._src import hardware_utils
    return int(hardware_utils.num_available_tpu_chips_and_device_id()[0])
  except Exception:  # noqa: BLE001  (private API: absent means "not known to be a TPU")
    return 0


def detect(env: Mapping[str, str], coordinator_address: str = "", num_processes: int = 0,
           process_id: int = -1, chips: int = 0, uses_tpu: bool = True) -> Launch:
  """The launch kind from flags (which win) or the environment; raises on half-given
  flags instead of hanging at start-up. chips: `tpu_chips()` of this host: a TPU VM
  (GCE: no TPU_WORKER_HOSTNAMES; JAX asks the metadata server for the slice's
  workers) joins through JAX's auto-detection. uses_tpu=False (a CPU run on a TPU
  worker: fake devices, JAX_PLATFORMS without tpu): neither kind of TPU slice is
  joined; it would wait for the slice's other workers."""
  given = [bool(coordinator_address), num_processes > 0, process_id >= 0]
  if any(given):
    if not all(given):
      raise ValueError(
          "distributed start-up: --coordinator_address, --num_processes and --process_id "
          f"go together; got coordinator_address={coordinator_address!r}, "
          f"num_processes={num_processes}, process_id={process_id}")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"distributed start-up: --process_id={process_id} is not in "
                       f"[0, {num_processes})")
    # JAX checks none of it: a port that is not a number, or 0, crashed the processes
    # (a segfault or abort in the coordination service, C++ stacks and no word of the
    # flag), no port was an IndexError inside JAX, and one above 65535 started anyway,
    # on whatever port gRPC made of it.
    host, _, port = coordinator_address.rpartition(":")
    if not (host and port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
      raise ValueError(f"distributed start-up: --coordinator_address={coordinator_address}: "
                       "expected HOST:PORT with PORT in 1-65535 (e.g. 10.0.0.1:12345)")
    return Launch("explicit", coordinator_address, num_processes, process_id)
  if uses_tpu and env.get("TPU_WORKER_HOSTNAMES") and "," in env["TPU_WORKER_HOSTNAMES"]:
    return Launch("tpu")  # GKE
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in env:
    return Launch("slurm")
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    if "OMPI_MCA_orte_hnp_uri" not in env:
      # JAX finds the coordinator through Open MPI 4's ORTE URI; Open MPI 5 (PRRTE)
      # has none, and initialize() would fail with a message about its arguments.
      raise ValueError(
          "distributed start-up: Open MPI without OMPI_MCA_orte_hnp_uri (Open MPI 5?) "
          "is not auto-detected by JAX; pass --coordinator_address=HOST:PORT (rank 0's "
          "host) --num_processes=$OMPI_COMM_WORLD_SIZE --process_id=$OMPI_COMM_WORLD_RANK")
    return Launch("mpi")
  if uses_tpu and chips > 0 and "TPU_SKIP_MDS_QUERY" not in env:  # set at all: JAX skips GCE too
    return Launch("tpu")  # a Cloud TPU VM (GCE): one host or a slice, from the metadata
  return Launch("single")


def local_device_ids(launch: Launch, env: Mapping[str, str]) -> Optional[list[int]]:
  """The GPUs (indices among the visible ones) a SLURM or Open MPI task drives (None:
  JAX's default).

  JAX's SLURM default is [SLURM_LOCALID]: one GPU per task, numbered by the task's rank
  on its node. That is wrong both ways: a task bound to its GPU (--gpus-per-task=1 with
  GPU binding: CUDA_VISIBLE_DEVICES holds one id) sees it as GPU 0, so ranks 1..7 ask
  for a GPU they cannot see; and a task owning a whole node (MODE=per_node) would
  drive one of its GPUs. So: every visible GPU when CUDA_VISIBLE_DEVICES is set (None
  when it hides them all), else the task's block of SLURM_GPUS_PER_TASK GPUs. Open MPI
  ranks (JAX's default: GPU OMPI_COMM_WORLD_LOCAL_RANK) likewise drive every visible
  GPU when CUDA_VISIBLE_DEVICES is set. JAX_LOCAL_DEVICE_IDS, when set, wins.
  """
  if launch.kind not in ("slurm", "mpi") or env.get("JAX_LOCAL_DEVICE_IDS"):
    return None
  if "CUDA_VISIBLE_DEVICES" in env:
    visible = []
    for d in env["CUDA_VISIBLE_DEVICES"].split(","):
      # CUDA reads the list up to its first invalid entry: "-1", "" or SLURM's
      # "NoDevFiles" hide every GPU, "0,-1,2" shows GPU 0 only.
      d = d.strip()
      if not (d.isdigit() or d.startswith(("GPU-", "MIG-"))):
        break
      visible.append(d)
    # (No GPU visible: JAX's default; the task runs on the CPU.)
    return list(range(len(visible))) if visible else None
  if launch.kind == "mpi":
    return None
  value = env.get("SLURM_GPUS_PER_TASK", "1") or "1"
  try:  # --gpus-per-task=[type:]count
    per_task = int(value.rsplit(":", 1)[-1])
  except ValueError:
    raise ValueError(f"SLURM_GPUS_PER_TASK={value!r}: expected a GPU count, optionally "
                     "after a type (e.g. 2 or a100:2)") from None
  local = int(env.get("SLURM_LOCALID", "0") or 0)
  return list(range(local * per_task, (local + 1) * per_task))


def _is_loopback(host: str) -> bool:
  """Whether `host` of a HOST:PORT address is this machine's loopback: localhost,
  127.x.x.x, or [::1] (brackets, as IPv6 hosts are written before a port)."""
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host.strip("[]")).is_loopback
  except ValueError:  # a host name
    return False


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               cpu_devices: int = 0, timeout_s: int = 300) -> Launch:
  """Joins the job described by the flags / environment (module docstring). Returns the
  detected `Launch`. Must run before the first JAX computation."""
  import jax
  # A run that will not use the TPU (fake CPU devices, JAX_PLATFORMS without tpu) on a
  # worker of a slice must not join the slice's other workers.
  platforms = os.environ.get("JAX_PLATFORMS", "")
  uses_tpu = cpu_devices <= 0 and (not platforms or "tpu" in platforms)
  launch = detect(os.environ, coordinator_address, num_processes, process_id,
                  chips=tpu_chips() if uses_tpu else 0, uses_tpu=uses_tpu)
  if cpu_devices > 0:
    jax.config.update("jax_num_cpu_devices", int(cpu_devices))
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if launch.kind == "single":
    return launch
  if launch.kind == "explicit":
    kwargs = dict(coordinator_address=launch.coordinator_address,
                  num_processes=launch.num_processes, process_id=launch.process_id,
                  initialization_timeout=timeout_s)
    if _is_loopback(launch.coordinator_address.rsplit(":", 1)[0]):
      # One machine: never listen beyond loopback (JAX's default binds every address).
      kwargs["coordinator_bind_address"] = launch.coordinator_address
    jax.distributed.initialize(**kwargs)
  else:  # tpu, slurm, mpi: JAX's cluster auto-detection reads the environment
    jax.distributed.initialize(initialization_timeout=timeout_s,
                               local_device_ids=local_device_ids(launch, os.environ))
  return launch


def process_flags(flag: bool):
  """(process_count,) bool array: every process's `flag` (a collective: call it on all
  of them; it waits for the device work already queued)."""
  import jax
  import numpy as np
  if jax.process_count() == 1:
    return np.array([bool(flag)])
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).astype(bool)


def wait_for_all(name: str, timeout_s: int = 3600) -> None:
  """Blocks until every process has called `wait_for_all(name)` (nothing with one
  process). A barrier of the coordination service, not a collective: the first CPU
  collective of a device set gives up after gloo's fixed 30 s if another process has
  not reached it (one process compiling a step the other loaded from the compilation
  cache). `name` must be unique within the run; `timeout_s` bounds the wait (a process
  that dies is reported sooner, by the service's heartbeat)."""
  import jax
  if jax.process_count() == 1:
    return
  from orbax.checkpoint import multihost
  multihost.sync_global_processes(name, timeout=int(timeout_s),
                                  processes=set(range(jax.process_count())))
