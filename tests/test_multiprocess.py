"""Multi-host code paths on one machine: two JAX processes x two fake CPU devices
(launch/local_multiprocess.sh, loopback coordinator, gloo collectives) train the tiny
key-frame model exactly as one process with four devices does, each process reading
its own block of every global batch; their checkpoint resumes in a one-process run.
A SIGTERM to one process stops both at the same step, also during the compile; a
process that reaches the first step over 30 s after the other does not fail it."""

import json
import os
import re
import signal
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from tests.run_log import RunLog

ROOT = Path(__file__).parents[1]
FLAGS = ["--config=configs/keyframe_tiny.py", "--config.train.ckpt_every=3",
         "--config.train.log_every=1", "--config.train.export=false",
         "--config.data.num_frames=4", "--config.data.height=16", "--config.data.width=16",
         "--config.sample.every=0",
         # One UNet level: this file tests processes, not the architecture, and XLA's
         # compile time grows with the op count (cold: 23 s instead of 43-54 s).
         "--config.random_image_model.unet.block_out_channels=(32,)",
         "--config.random_image_model.unet.attention_levels=(True,)"]


def _env():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  # The trainer's steps hold custom_partitioning ops (the C++ kernels), whose lowering
  # writes a Python object's id into the HLO: every launch missed the session's
  # persistent cache and compiled its step again (19 s of a 24 s tiny trainer run with
  # --cpu_devices=4; the one-process resume below loads the one-process run's step).
  # JAX's flag hashes the HLO without that id, set only for conftest's own cache (one
  # session of unchanged code). Without the id the HLO no longer says which kernel an
  # op wraps: two custom_partitioning ops with the same operand / result types and
  # sharding rule would share a cached program (a sin and a cos kernel did, in a
  # reviewer's repro). The kernels' ops all differ there today (weight gradient,
  # convolutions, attention forward and backward); a kernel option that changes the
  # computation but not the signature would need its own rule before this is safe.
  if Path(env.get("JAX_COMPILATION_CACHE_DIR", "")).name.startswith("videoldm-jax-test-cache-"):
    env.setdefault("JAX_REMOVE_CUSTOM_PARTITIONING_PTR_FROM_CACHE_KEY", "true")
  return env


def _losses(workdir: Path) -> dict:
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return {json.loads(x)["step"]: json.loads(x)["loss"] for x in lines}


def _train_cmd(workdir: Path, steps: int, *extra: str) -> list:
  return [sys.executable, "-m", "videoldm_jax.cli.train", f"--workdir={workdir}", *FLAGS,
          f"--config.train.num_steps={steps}", *extra]


def _train(workdir: Path, steps: int, *extra: str) -> str:
  out = subprocess.run(_train_cmd(workdir, steps, *extra), cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stderr


# videoldm-train with process 1's step compile 40 s late, as when process 0 loads the
# step from the compilation cache and process 1 compiles it (on CPU only process 0
# writes the cache, and the key holds the process): the first step's gloo collective
# gave up after its fixed 30 s ("Gloo context initialization failed: DEADLINE_EXCEEDED")
# in loaded test runs, until the trainer waited for all processes after its compile.
# Should process 0 start its first step meanwhile (a trainer without that wait), process
# 1 goes on 35 s after that start (the file LATE_MARK tells when), so that the gap is
# over 30 s however long the rest of each process's start-up takes: a fixed 40 s wait
# before the compile let a trainer without the wait pass in a loaded run.
LATE_PROCESS_1 = ("import os, time\n"
                  "import jax\n"
                  "from videoldm_jax.cli import train\n"
                  "compile, call = jax.stages.Lowered.compile, jax.stages.Compiled.__call__\n"
                  "mark = os.environ['LATE_MARK']\n"
                  "def late(self, *args, **kwargs):\n"
                  "  out = compile(self, *args, **kwargs)\n"
                  "  if jax.process_index() == 1:\n"
                  "    end = time.time() + 40\n"
                  "    while time.time() < end and not os.path.exists(mark):\n"
                  "      time.sleep(0.1)\n"
                  "    if os.path.exists(mark):\n"
                  "      time.sleep(max(0.0, os.path.getmtime(mark) + 35 - time.time()))\n"
                  "  return out\n"
                  "def first_step(self, *args, **kwargs):\n"
                  "  if jax.process_index() == 0 and not os.path.exists(mark):\n"
                  "    open(mark, 'w').close()\n"
                  "  return call(self, *args, **kwargs)\n"
                  "jax.stages.Lowered.compile = late\n"
                  "jax.stages.Compiled.__call__ = first_step\n"
                  "train.run()\n")


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """(two-process workdir, its log, one-process workdir): 3 steps on 2 processes x 2
  devices, and 4 steps on one process x 4 devices, run side by side (the one-process
  run fills process 1's wait)."""
  base = tmp_path_factory.mktemp("mp")
  workdir, one = base / "two procs", base / "one"  # a space: quoting must hold
  with open(base / "one.log", "w") as ref_log:  # (a file: a pipe left unread can fill)
    reference = subprocess.Popen(_train_cmd(one, 4, "--cpu_devices=4"), cwd=ROOT,
                                 env=_env(), stdout=ref_log, stderr=subprocess.STDOUT)
  cmd = ["bash", "launch/local_multiprocess.sh", "--num_processes=2",
         "--devices_per_process=2", "--", sys.executable, "-c", LATE_PROCESS_1,
         f"--workdir={workdir}", *FLAGS, "--config.train.num_steps=3"]
  out = subprocess.run(cmd, cwd=ROOT, env={**_env(), "LATE_MARK": str(base / "p0 stepped")},
                       capture_output=True, text=True, timeout=600)
  assert reference.wait(timeout=600) == 0, (base / "one.log").read_text()[-3000:]
  assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
  return workdir, out.stdout + out.stderr, one


def test_two_processes_match_one_process_and_resume_in_one(two_process_run):
  two, log, one = two_process_run
  assert "[p1]" in log and "[p0] step 3" in log
  assert "[p1] step" not in log  # only process 0 logs
  ref, got = _losses(one), _losses(two)
  assert sorted(got) == [1, 2, 3]
  # Same global batches (each process reads its block), same RNG, same mesh size: the
  # same losses up to the order of floating-point reductions across processes.
  np.testing.assert_allclose([got[s] for s in (1, 2, 3)], [ref[s] for s in (1, 2, 3)],
                             rtol=1e-5)
  assert sorted(p.name for p in (two / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]
  # The two-process checkpoint (train state + data position) resumes in one process and
  # step 4 is the uninterrupted one-process run's step 4.
  err = _train(two, 4, "--cpu_devices=4")
  assert "resumed from" in err
  np.testing.assert_allclose(_losses(two)[4], ref[4], rtol=1e-5)


def test_dry_run_prints_one_command_per_process():
  out = subprocess.run(
      ["bash", "launch/local_multiprocess.sh", "--dry_run", "--num_processes=3",
       "--devices_per_process=2", "--port=12345", "--", "videoldm-train",
       "--config=configs/keyframe_tiny.py", "--workdir=/tmp/a b"], cwd=ROOT,
      capture_output=True, text=True, check=True).stdout.splitlines()
  assert out == [
      f"JAX_PLATFORMS=cpu videoldm-train --config=configs/keyframe_tiny.py "
      f"--workdir=/tmp/a\\ b --coordinator_address=127.0.0.1:12345 --num_processes=3 "
      f"--process_id={i} --cpu_devices=2" for i in range(3)]


def test_half_given_flags_are_an_error_not_a_hang():
  from videoldm_jax import distributed
  with pytest.raises(ValueError, match="go together"):
    distributed.detect({}, coordinator_address="127.0.0.1:1", num_processes=2)
  with pytest.raises(ValueError, match="not in"):
    distributed.detect({}, "127.0.0.1:1", 2, 2)
  # JAX crashed on a port that is not one (C++ stacks, the flag unnamed).
  for bad in ("127.0.0.1", "127.0.0.1:abc", "127.0.0.1:0", "h:65536", ":1234", "h:\u0661"):
    with pytest.raises(ValueError, match="expected HOST:PORT with PORT in 1-65535"):
      distributed.detect({}, bad, 2, 0)
  assert distributed.detect({}, "[::1]:65535", 2, 1).kind == "explicit"
  assert distributed.detect({}).kind == "single"
  assert distributed.detect({"SLURM_NTASKS": "8", "SLURM_PROCID": "3"}).kind == "slurm"
  # An salloc shell (the allocation's variables, not a task of it): one process.
  assert distributed.detect({"SLURM_NTASKS": "8"}).kind == "single"
  # A one-task srun: one process driving every GPU, no coordinator.
  assert distributed.detect({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}).kind == "single"
  assert distributed.detect({"OMPI_COMM_WORLD_SIZE": "4",
                             "OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1"}).kind == "mpi"
  with pytest.raises(ValueError, match="Open MPI 5.*--process_id=\\$OMPI_COMM_WORLD_RANK"):
    distributed.detect({"OMPI_COMM_WORLD_SIZE": "4"})
  assert distributed.detect({"TPU_WORKER_HOSTNAMES": "a,b"}).kind == "tpu"
  assert distributed.detect({"TPU_WORKER_HOSTNAMES": "a"}).kind == "single"  # one host
  # A GCE TPU VM sets no such variable: its TPU chips on the PCI bus tell (JAX then
  # asks the metadata server for the slice); JAX's own opt-out is respected.
  assert distributed.detect({}, chips=4).kind == "tpu"
  assert distributed.detect({"TPU_SKIP_MDS_QUERY": "1"}, chips=4).kind == "single"
  assert distributed.detect({"TPU_SKIP_MDS_QUERY": ""}, chips=4).kind == "single"
  assert distributed.tpu_chips() == 0  # this test host
  # A CPU run (fake devices, JAX_PLATFORMS=cpu) on a TPU worker joins no slice: on GKE
  # it waited up to 300 s for the slice's other workers.
  assert distributed.detect({"TPU_WORKER_HOSTNAMES": "a,b"}, uses_tpu=False).kind == "single"
  assert distributed.detect({}, chips=4, uses_tpu=False).kind == "single"
  assert distributed.detect({"SLURM_NTASKS": "8", "SLURM_PROCID": "3"},
                            "h:1", 2, 1).kind == "explicit"  # flags win


def test_initialize_binds_loopback_and_keeps_cpu_runs_off_the_slice(monkeypatch):
  # What initialize hands JAX (recorded, not run): a one-machine coordinator listens on
  # loopback only; a CPU run (JAX_PLATFORMS=cpu) on a TPU worker joins nothing.
  import jax
  from videoldm_jax import distributed
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  distributed.initialize("127.0.0.1:1234", 2, 0)
  assert calls[-1]["coordinator_bind_address"] == "127.0.0.1:1234"
  distributed.initialize("[::1]:1234", 2, 0)
  assert calls[-1]["coordinator_bind_address"] == "[::1]:1234"
  distributed.initialize("10.0.0.2:1234", 2, 0)
  assert "coordinator_bind_address" not in calls[-1]
  calls.clear()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setattr(distributed, "tpu_chips", lambda: 4)  # a TPU VM's PCI bus
  # (JAX's import sets this on a host without TPU chips, as this one, where libtpu is
  # installed, as in the test extras; left, it kept every case below off the slice
  # whatever initialize decided.)
  monkeypatch.delenv("TPU_SKIP_MDS_QUERY", raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "")
  launch = distributed.initialize()  # a TPU run on a TPU VM joins its slice
  assert launch.kind == "tpu" and len(calls) == 1
  calls.clear()
  monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")  # a TPU among the platforms: joins too
  assert distributed.initialize().kind == "tpu" and len(calls) == 1
  calls.clear()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert distributed.initialize().kind == "single" and calls == []
  # Fake CPU devices on a TPU VM, JAX_PLATFORMS unset: a CPU run all the same.
  monkeypatch.delenv("JAX_PLATFORMS")
  settings = []
  monkeypatch.setattr(jax.config, "update", lambda *a: settings.append(a))
  assert distributed.initialize(cpu_devices=2).kind == "single" and calls == []
  assert ("jax_num_cpu_devices", 2) in settings
  # A SLURM task bound to one GPU (seen as device 0) is given that device.
  for k, v in {"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1",
               "CUDA_VISIBLE_DEVICES": "1", "JAX_PLATFORMS": "cpu"}.items():
    monkeypatch.setenv(k, v)
  monkeypatch.delenv("JAX_LOCAL_DEVICE_IDS", raising=False)
  assert distributed.initialize().kind == "slurm"
  assert calls[-1]["local_device_ids"] == [0]
  # One process: its own stop flag (True asked every run to stop after its first step).
  assert distributed.process_flags(False).tolist() == [False]
  assert distributed.process_flags(True).tolist() == [True]


def test_slurm_tasks_drive_the_gpus_they_see():
  """JAX's SLURM default, [SLURM_LOCALID], asks a task bound to one GPU (seen as GPU 0)
  for GPU 3, and gives a task owning a node one GPU of 8."""
  from videoldm_jax import distributed
  slurm = distributed.Launch("slurm")
  task = {"SLURM_NTASKS": "16", "SLURM_PROCID": "11", "SLURM_LOCALID": "3"}
  ids = lambda **env: distributed.local_device_ids(slurm, {**task, **env})
  assert ids(CUDA_VISIBLE_DEVICES="3") == [0]                   # per_gpu, bound
  assert ids(CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7") == list(range(8))  # per_node
  # CUDA stops at the first invalid entry: -1 hides every GPU (it gave [0]).
  assert ids(CUDA_VISIBLE_DEVICES="0,-1,2") == [0]
  assert ids(CUDA_VISIBLE_DEVICES="-1") is None and ids(CUDA_VISIBLE_DEVICES="") is None
  assert ids(CUDA_VISIBLE_DEVICES="NoDevFiles") is None
  assert ids(CUDA_VISIBLE_DEVICES="GPU-8f6c,GPU-1a2b") == [0, 1]  # UUIDs
  assert ids(CUDA_VISIBLE_DEVICES="MIG-ab12,MIG-cd34") == [0, 1]  # MIG instances
  assert ids(SLURM_GPUS_PER_TASK="1") == [3]                    # per_gpu, unbound
  assert ids(SLURM_GPUS_PER_TASK="8", SLURM_LOCALID="0") == list(range(8))
  assert ids(SLURM_GPUS_PER_TASK="a100:2") == [6, 7]  # --gpus-per-task=TYPE:COUNT
  with pytest.raises(ValueError, match=r"SLURM_GPUS_PER_TASK='two': expected a GPU count"):
    ids(SLURM_GPUS_PER_TASK="two")
  # The coordinator of a one-machine job binds loopback only (JAX's default: every
  # address); [::1] and 127.0.1.1 were not recognised.
  loopback = ("localhost", "127.0.0.1", "127.0.1.1", "[::1]")
  assert all(distributed._is_loopback(h) for h in loopback)
  assert not any(distributed._is_loopback(h) for h in ("10.0.0.2", "[::]", "node-3"))
  assert ids(JAX_LOCAL_DEVICE_IDS="5", CUDA_VISIBLE_DEVICES="3") is None  # JAX reads it
  assert distributed.local_device_ids(distributed.Launch("tpu"), task) is None
  mpi = distributed.Launch("mpi")
  assert distributed.local_device_ids(mpi, {"CUDA_VISIBLE_DEVICES": "2,3"}) == [0, 1]
  assert distributed.local_device_ids(mpi, {}) is None  # JAX's: the rank's local GPU


CHECK_SAME = """
import sys
import types
import numpy as np
from videoldm_jax import distributed
flags = dict(a[2:].split("=", 1) for a in sys.argv[1:])
distributed.initialize(flags["coordinator_address"], int(flags["num_processes"]),
                       int(flags["process_id"]), int(flags["cpu_devices"]))
import jax
from videoldm_jax.train import frozen
saved = {"vae/w": frozen.leaf_digest(np.zeros(3, np.float32))}
frozen.check_same(saved, dict(saved), "ckpt")  # the same everywhere: no error
loaded = {"vae/w": frozen.leaf_digest(np.ones(3, np.float32))}
try:
  frozen.check_same(saved, loaded if jax.process_index() == 1 else dict(saved), "ckpt")
  print("no error")
except ValueError as e:
  print("refused:", e)
"""


def _export_with_a_lagging_view(workdir: Path, tmp_path: Path, port: int) -> None:
  """videoldm-export on two processes whose views of the workdir differ (a shared
  filesystem lagging on one host; here process 1 reads a copy that already holds the
  export): process 1 skipped the restore and its collectives, and process 0 waited in
  them. Both now follow process 0's view."""
  import shutil
  lagging = tmp_path / "lagging"
  shutil.copytree(workdir, lagging)
  (step,) = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()
             and (workdir / "export" / f"step_{p.name}").exists()]
  (lagging / "export" / f"step_{step}_raw").mkdir()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "videoldm_jax.cli.export",
       f"--workdir={workdir if i == 0 else lagging}", *FLAGS,
       "--config.train.num_steps=3", f"--step={step}", "--weights=raw",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={i}", "--cpu_devices=2"],
      cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  try:
    logs = [p.communicate(timeout=150)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert all(p.returncode == 0 for p in procs), logs
  assert f"step_{step}_raw: exported" in logs[0], logs[0][-3000:]
  from videoldm_jax import pretrained
  assert "unet" in pretrained.load(workdir / "export" / f"step_{step}_raw").params


@pytest.mark.parametrize("fails", [False, True], ids=["written", "fails"])
def test_export_of_a_two_process_run(two_process_run, tmp_path, fails):
  """The finished two-process run, started again with exports on, writes its missing
  export (no compile) on process 0. Written: Orbax's save used to wait for every
  process in a barrier while the others waited for process 0, and the run hung. Fails
  (WORKDIR/export is a file): process 1 must raise at once too, not wait in a
  collective until the coordinator times out."""
  import shutil
  import socket
  import time
  from videoldm_jax import pretrained
  workdir = tmp_path / "run"
  shutil.copytree(two_process_run[0], workdir)
  if fails:
    (workdir / "export").write_text("not a folder")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen(
      [sys.executable, "-m", "videoldm_jax.cli.train", f"--workdir={workdir}", *FLAGS,
       "--config.train.num_steps=3", "--config.train.export=true",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={i}", "--cpu_devices=2"],
      cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  t0 = time.monotonic()
  try:
    logs = [p.communicate(timeout=180)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()  # (before the fixes both waited out JAX's timeouts)
  assert "writing the missing export" in logs[0], logs[0][-3000:]
  assert time.monotonic() - t0 < 120
  if not fails:
    assert all(p.returncode == 0 for p in procs), logs
    # step_3, or step_4 once the module's resume test has run on the shared fixture.
    exports = sorted((workdir / "export").glob("step_*"))
    assert len(exports) == 1, exports
    model = pretrained.load(exports[0])
    assert model.training["stage"] == "keyframe" and "unet" in model.params
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    _export_with_a_lagging_view(workdir, tmp_path, port)
    return
  assert all(p.returncode not in (0, None) for p in procs), logs
  assert "Error" in logs[0] and "export" in logs[0]
  assert "process 0 failed to write the export" in logs[1], logs[1][-3000:]


def test_frozen_parameters_differing_on_one_process_stop_every_process(tmp_path):
  # Each process loads its own copy of the pretrained model at a resume; one bad copy
  # must stop all of them (a lone raise would leave the others in the restore's
  # collectives until the coordinator times out).
  script = tmp_path / "check_same.py"
  script.write_text(CHECK_SAME)
  out = subprocess.run(["bash", "launch/local_multiprocess.sh", "--num_processes=2",
                        "--devices_per_process=1", "--", sys.executable, str(script)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
  log = out.stdout + out.stderr
  assert "[p0] refused: ckpt: the frozen parameters" in log, log[-3000:]
  assert "processes [1] loaded other frozen parameters" in log, log[-3000:]
  assert "[p1] refused: ckpt: the frozen parameters" in log
  assert "'vae/w': trained with (3,) float32" in log and "no error" not in log


def _python_pid(workdir: Path, process_id: int) -> int:
  """The pid of the trainer process `process_id` of the run in `workdir` (the launcher
  runs it in a subshell piped into sed)."""
  want = [f"--workdir={workdir}", f"--process_id={process_id}"]
  for proc in Path("/proc").iterdir():
    try:
      argv = (proc / "cmdline").read_bytes().decode().split("\0")
    except (OSError, ValueError):
      continue
    if all(w in argv for w in want) and "videoldm_jax.cli.train" in argv:
      return int(proc.name)
  raise AssertionError(f"no trainer process {process_id} for {workdir}")


def _start_two(workdir: Path, steps: int, service: bool = True) -> subprocess.Popen:
  # (log_every and export as a run's usual: a stop's step is logged all the same, and a
  # stopped run exports nothing)
  cmd = ["bash", "launch/local_multiprocess.sh", "--num_processes=2",
         "--devices_per_process=2", "--", sys.executable, "-m", "videoldm_jax.cli.train",
         f"--workdir={workdir}", *FLAGS, f"--config.train.num_steps={steps}",
         "--config.train.ckpt_every=1000", "--config.train.log_every=4",
         "--config.train.export=true"]
  env = {**_env(), "JAX_ENABLE_PREEMPTION_SERVICE": str(service).lower()}
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _stopped_at(log: str, service: bool = True) -> int:
  # Process 1 got the signal; process 0 logs.
  why = "SIGTERM to some process" if service else "a signal to another process"
  found = re.search(rf"\[p0\] stop requested \({why}\): saved step (\d+), exiting", log)
  assert found, log[-3000:]
  return int(found[1])


@pytest.mark.parametrize("service", [True, False], ids=["jax_service", "allgather"])
def test_sigterm_to_one_process_stops_both_at_one_step(tmp_path, service):
  # JAX's preemption service hears the SIGTERM (the trainer must not replace its
  # handler) and picks the step at which both save, with no collective in the loop.
  # With the service off, the guard's handler and an allgather per step do it.
  steps = 60
  proc = _start_two(tmp_path, steps, service)
  log = RunLog(proc)
  log.wait_for_step_after(2)
  os.kill(_python_pid(tmp_path, 1), signal.SIGTERM)
  out = log.finish(returncode=143)  # both stopped, saved (the launcher's status)
  stopped = _stopped_at(out, service)
  assert 3 <= stopped < steps, out[-3000:]
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()
                if p.name.isdigit()) == [str(stopped)]
  assert max(_losses(tmp_path)) == stopped
  assert not (tmp_path / "export").exists()
  if not service:
    return
  # Resumed; a SIGTERM once process 0 has restored, while both compile: the service
  # heard of the start step before the restore, so the run stops after its first step
  # (without that, the sync point would be step 1 and the run would go on to the end).
  proc = _start_two(tmp_path, stopped + 40)
  log = RunLog(proc)
  log.wait_for_text(f"resumed from {tmp_path / 'checkpoints'}/{stopped}")
  os.kill(_python_pid(tmp_path, 1), signal.SIGTERM)
  # The signal came before the loop (the compile takes ~20 s), else this would not test
  # the start step; the sync point is then the run's first step.
  assert not any("compiled in" in x for x in log.drain()), log.text()[-3000:]
  out = log.finish(returncode=143)
  assert _stopped_at(out) == stopped + 1, out[-3000:]


def test_a_process_that_fails_exits_at_once(tmp_path):
  """Process 1's run fails (say a read error on its host) while process 0 waits in a
  collective: process 1 used to sit 300 s in JAX's shutdown barrier and end in SIGABRT;
  it now exits 1 at once and the launcher kills process 0."""
  wrapper = ("import sys\n"
             "from videoldm_jax.cli import train\n"
             "from videoldm_jax.train import loop\n"
             "real = loop.train_and_evaluate\n"
             "def fail_on_1(config, workdir):\n"
             "  if '--process_id=1' in sys.argv:\n"
             "    raise OSError('disk error on host 1')\n"
             "  return real(config, workdir)\n"
             "loop.train_and_evaluate = fail_on_1\n"
             "train.run()\n")
  _assert_process_1_fails_at_once(2, wrapper, f"--workdir={tmp_path / 'run'}", *FLAGS,
                                  "--config.train.num_steps=3")


def test_a_process_that_fails_to_export_exits_at_once(tmp_path):
  """videoldm-export joins the training run's processes too: process 1 failing (here
  before its restore) while process 0 waits in a collective sat 300 s in JAX's shutdown
  barrier; it now exits 1 at once, as videoldm-train's processes do."""
  wrapper = ("import sys\n"
             "from videoldm_jax import distributed\n"
             "from videoldm_jax.cli import export\n"
             "from videoldm_jax.train import loop\n"
             "def fail_on_1(*args):\n"
             "  if '--process_id=1' in sys.argv:\n"
             "    raise OSError('disk error on host 1')\n"
             "  distributed.process_flags(True)  # a collective process 1 never joins\n"
             "loop.export_checkpoint = fail_on_1\n"
             "export.run()\n")
  _assert_process_1_fails_at_once(1, wrapper, "--config=configs/keyframe_tiny.py",
                                  f"--workdir={tmp_path / 'run'}")


def _assert_process_1_fails_at_once(devices: int, wrapper: str, *args: str) -> None:
  """Two processes run `wrapper` (python -c) with `args`; process 1 raises OSError:
  the launcher exits 1 with its message, well before JAX's 300 s shutdown barrier."""
  import time
  cmd = ["bash", "launch/local_multiprocess.sh", "--num_processes=2",
         f"--devices_per_process={devices}", "--", sys.executable, "-c", wrapper, *args]
  t0 = time.monotonic()
  out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=300)
  log = out.stdout + out.stderr
  assert out.returncode == 1, log[-3000:]
  assert "[p1] OSError: disk error on host 1" in log, log[-3000:]
  assert time.monotonic() - t0 < 120, log[-3000:]


def test_a_mesh_axis_spanning_processes_outside_the_batch_axes_is_a_config_error(tmp_path):
  # tensor=2 over 2 processes of 1 device: both hold the same batch rows, but each loads
  # its own; JAX failed at the first batch, after the models loaded ("Invalid host
  # data"). Now refused before anything loads.
  out = subprocess.run(
      ["bash", "launch/local_multiprocess.sh", "--num_processes=2", "--devices_per_process=1",
       "--", sys.executable, "-m", "videoldm_jax.cli.train", "--config=configs/keyframe_tiny.py",
       f"--workdir={tmp_path}", "--config.data.kind=procedural", "--config.mesh.tensor=2"],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  log = out.stdout + out.stderr
  assert out.returncode != 0, log[-3000:]
  assert ("batch shard (0, 0) (over ('data', 'fsdp')) is held by devices of processes "
          "[0, 1]") in log, log[-3000:]
  assert ("mesh axes ['tensor'] outside config.batch_axes span processes. Keep them within "
          "one process's 1 devices") in log
  from videoldm_jax import sharding
  two = np.array([[[types.SimpleNamespace(process_index=i) for i in range(2)]]])
  assert sharding.shared_batch_shards(two, ("data", "fsdp", "tensor"), ("data", "fsdp")) == {
      (0, 0): [0, 1]}
  assert sharding.shared_batch_shards(two.reshape(2, 1, 1), ("data", "fsdp", "tensor"),
                                      ("data", "fsdp")) == {}
