"""Launch scripts in --dry_run mode: the exact commands they would run, with arguments
containing spaces surviving every level of quoting (local shell, ssh, srun)."""

import os
import signal
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
USER_CMD = ["videoldm-train", "--config=configs/keyframe_sd15.py", "--workdir=/runs/kf 1"]
# Set inside a Slurm job: they would change gpu_slurm.sbatch's defaults.
_HOST_VARS = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "GPUS_PER_NODE")


def _env(extra=None):
  return {**{k: v for k, v in os.environ.items() if k not in _HOST_VARS}, **(extra or {})}


def _dry(script, *args, env=None):
  out = subprocess.run(["bash", script, "--dry_run", *args, "--", *USER_CMD], cwd=ROOT,
                       env=_env(env), capture_output=True, text=True, check=True)
  return [shlex.split(line) for line in out.stdout.splitlines() if not line.startswith("#")]


def _refused(script, *args, env=None):
  """`script --dry_run ARGS -- USER_CMD` run expecting exit 2: its stderr."""
  out = subprocess.run(["bash", script, "--dry_run", *args, "--", *USER_CMD], cwd=ROOT,
                       env=_env(env), capture_output=True, text=True, timeout=60)
  assert out.returncode == 2, (out.returncode, out.stderr)
  assert out.stdout == ""  # refused before printing (or running) anything
  return out.stderr


def test_tpu_pod_creates_copies_installs_and_runs_on_all_workers():
  env = dict(TPU_NAME="vldm pod", ZONE="us-east5-a", PROJECT="proj",
             ACCELERATOR_TYPE="v5p-128", SPOT="1", REMOTE_DIR="code dir")
  cmds = _dry("launch/tpu_pod.sh", env=env)
  base = ["gcloud", "compute", "tpus", "tpu-vm"]
  create, archive, scp, unpack, install, run = cmds
  assert create == base + ["create", "vldm pod", "--zone=us-east5-a", "--project=proj",
                           "--accelerator-type=v5p-128", "--version=v2-alpha-tpuv5",
                           "--spot"]
  assert archive[:2] == ["git", "archive"]
  assert scp[:5] == base + ["scp"] and "--worker=all" in scp
  for c in (unpack, install, run):
    assert c[:6] == base + ["ssh", "vldm pod"] and "--worker=all" in c
  remote = run[run.index("--command") + 1]
  # Re-running (the way to resume) must not delete the code folder: a relative
  # --workdir lives there.
  assert "rm " not in unpack[unpack.index("--command") + 1]
  # ... and unpacks into it (elsewhere `cd` would run the code of an earlier launch).
  assert shlex.split(unpack[unpack.index("--command") + 1])[-2:] == ["-C", "code dir"]
  # The remote shell splits the line once more: the user's argv comes back intact.
  words = shlex.split(remote)
  assert words[:2] == ["cd", "code dir"] and words[-3:] == USER_CMD
  assert "pip install -q -e '.[tpu]'" in install[install.index("--command") + 1]
  # A worker .venv of an older Python (made before REMOTE_PYTHON was set) is recreated.
  assert "venv --clear .venv" in install[install.index("--command") + 1]


def test_tpu_pod_warns_of_what_git_archive_leaves_out(tmp_path):
  # The workers get `git archive HEAD`: an edited file's change and a file never
  # committed (a config just written) are not there; both are said before the launch.
  repo = tmp_path / "checkout"
  (repo / "launch").mkdir(parents=True)
  (repo / "launch" / "tpu_pod.sh").write_text((ROOT / "launch" / "tpu_pod.sh").read_text())
  git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], check=True,
                                  capture_output=True)
  git("init", "-q")
  git("add", "-A")
  git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
  env = _env(dict(TPU_NAME="pod", ZONE="z"))
  run = lambda: subprocess.run(["bash", "launch/tpu_pod.sh", "--dry_run", "--", *USER_CMD],
                               cwd=repo, env=env, capture_output=True, text=True,
                               check=True).stderr
  assert "warning" not in run()
  # What .gitignore leaves out (.venv/, work dirs) is meant not to travel: no warning.
  (repo / ".gitignore").write_text("ignored/\n")
  git("add", ".gitignore")
  git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "ignore")
  (repo / "ignored").mkdir()
  (repo / "ignored" / "f").write_text("x\n")
  assert "warning" not in run()
  (repo / "configs").mkdir()
  (repo / "configs" / "my_run.py").write_text("x = 1\n")
  assert "files not in git are not copied (git archive HEAD): configs/my_run.py" in run()


def test_demo_resumes_from_the_newest_export_by_step_number(tmp_path):
  # step_1000 after step_500 (a plain sort put step_500 last); a raw-weights export is
  # not a step.
  for name in ("step_500", "step_1000", "step_1000_raw", "step_90"):
    (tmp_path / "export" / name).mkdir(parents=True)
  script = ROOT / "launch" / "demo.sh"
  out = subprocess.run(
      ["bash", "-c", f"eval \"$(sed -n '/^latest()/,/^}}/p' {shlex.quote(str(script))})\"; "
       f"latest {shlex.quote(str(tmp_path))}"], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == str(tmp_path / "export" / "step_1000")


def test_scripts_find_their_checkout_whatever_cdpath_says(tmp_path):
  # An exported CDPATH naming a folder that holds launch/ (or .ci/) made `cd launch/..`
  # go there: test.sh sourced that folder's venv.sh and ran its tests, tpu_pod.sh packed
  # its repository. Each script runs in a stub checkout, with a decoy that says so.
  checkout, decoy = tmp_path / "checkout", tmp_path / "decoy"
  for folder in (checkout, decoy):
    for sub in ("launch", ".ci", "bin"):
      (folder / sub).mkdir(parents=True)
    (folder / "launch/venv.sh").write_text(f"install_package() {{ echo {folder.name}; }}\n")
  for name in ("launch/test.sh", ".ci/run"):
    (checkout / name).write_text((ROOT / name).read_text())
  (checkout / "bin/python").write_text("#!/usr/bin/env bash\necho \"python in $PWD\"\n")
  (checkout / "bin/python").chmod(0o755)
  env = _env({"CDPATH": str(decoy), "PATH": f"{checkout / 'bin'}:{os.environ['PATH']}"})
  for script in ("launch/test.sh", ".ci/run"):
    out = subprocess.run(["bash", script], cwd=checkout, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, (script, out.stderr)
    assert out.stdout.splitlines() == ["checkout", f"python in {checkout}"], (script, out)
  env = dict(TPU_NAME="v", ZONE="z", CDPATH=str(decoy))
  create, archive, *_ = _dry("launch/tpu_pod.sh", env=env)  # (cd printed nothing)
  assert create[4] == "create" and archive[:2] == ["git", "archive"]


def test_demo_refuses_arguments(tmp_path):
  # `demo.sh --help` or `demo.sh /tmp/demo` started the whole demo (install, 10 minutes
  # of training) into work/demo, the argument unread. Run in a stub checkout whose
  # install_package says it was reached.
  (tmp_path / "launch").mkdir()
  (tmp_path / "launch/demo.sh").write_text((ROOT / "launch/demo.sh").read_text())
  (tmp_path / "launch/venv.sh").write_text("install_package() { echo started; exit 9; }\n")
  for args in (["--help"], [str(tmp_path / "work")]):
    out = subprocess.run(["bash", "launch/demo.sh", *args], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == "", (args, out)
    assert "takes no arguments" in out.stderr and "WORK=" in out.stderr, out.stderr
  out = subprocess.run(["bash", "launch/demo.sh"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
  assert (out.returncode, out.stdout) == (9, "started\n")  # no arguments: it runs


def test_tpu_pod_recreates_a_preempted_spot_slice(tmp_path):
  # A preempted spot slice stays listed: `describe` succeeded, so the re-run (the way to
  # resume) skipped `create` and failed on scp to a slice that cannot run.
  log = tmp_path / "calls"
  (tmp_path / "gcloud").write_text(
      "#!/usr/bin/env bash\n"
      f"echo \"$*\" >> {shlex.quote(str(log))}\n"
      "if [ \"$4\" = describe ]; then echo \"$STATE\"; fi\n")
  (tmp_path / "gcloud").chmod(0o755)
  env = dict(TPU_NAME="v", ZONE="z", SPOT="1", TMPDIR=str(tmp_path),
             PATH=f"{tmp_path}:{os.environ['PATH']}")
  for state, expected in (("PREEMPTED", ["describe", "delete", "create", "scp"]),
                          ("TERMINATED", ["describe", "delete", "create", "scp"]),
                          ("STOPPED", ["describe", "start", "scp"]),
                          ("READY", ["describe", "scp"])):
    log.unlink(missing_ok=True)
    subprocess.run(["bash", "launch/tpu_pod.sh", "--", "true"], cwd=ROOT,
                   env=_env({**env, "STATE": state}), capture_output=True, text=True,
                   check=True, timeout=120)
    verbs = [line.split()[3] for line in log.read_text().splitlines()]
    assert verbs[:len(expected)] == expected, (state, verbs)
  assert not list(tmp_path.glob("videoldm-jax-code*"))  # the archive is removed after


def test_tpu_pod_can_clone_instead_of_copy():
  env = dict(TPU_NAME="v", ZONE="z", CODE="clone", REPO_URL="https://example.org/r.git",
             REPO_REF="v1")
  cmds = _dry("launch/tpu_pod.sh", env={**env, "REMOTE_DIR": "~/videoldm-jax"})
  clone = shlex.split(cmds[1][cmds[1].index("--command") + 1])
  # A first run clones, a later one fetches the ref into the same folder.
  assert clone[clone.index("clone"):clone.index("clone") + 5] == [
      "clone", "--branch", "v1", "https://example.org/r.git", "videoldm-jax;"]
  assert "fetch" in clone and "rm" not in clone
  # ... and checks out what it fetched (a fetch alone kept the old tree).
  update = clone[clone.index("then") + 1:clone.index("else")]
  assert update[-3:] == ["checkout", "-f", "FETCH_HEAD;"], update


def test_tpu_pod_rejects_an_unknown_code_mode():
  # CODE=clonee used to copy the local checkout as if it were "copy".
  err = _refused("launch/tpu_pod.sh", env=dict(TPU_NAME="v", ZONE="z", CODE="clonee",
                                                REPO_URL="https://example.org/r.git"))
  assert "CODE" in err and "clonee" in err


def test_tpu_pod_runtime_follows_the_accelerator_type():
  # v5e (v5litepod-*) needs the -lite image; v2-alpha-tpuv5 is v5p's.
  env = dict(TPU_NAME="v", ZONE="z")
  for accelerator, runtime in [("v5litepod-64", "v2-alpha-tpuv5-lite"),
                               ("v5p-128", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e"),
                               ("v4-32", "tpu-ubuntu2204-base")]:
    create = _dry("launch/tpu_pod.sh", env={**env, "ACCELERATOR_TYPE": accelerator})[0]
    assert f"--accelerator-type={accelerator}" in create
    assert f"--version={runtime}" in create, accelerator
  (create, *_) = _dry("launch/tpu_pod.sh", env=env)  # default v5p-8
  assert "--version=v2-alpha-tpuv5" in create
  (create, *_) = _dry("launch/tpu_pod.sh", env={**env, "ACCELERATOR_TYPE": "v5litepod-8",
                                                "RUNTIME_VERSION": "my-image"})
  assert "--version=my-image" in create  # set explicitly: used as it is
  err = _refused("launch/tpu_pod.sh", env={**env, "ACCELERATOR_TYPE": "v9x-8"})
  assert "RUNTIME_VERSION" in err and "v9x-8" in err


def test_tpu_pod_requires_its_variables():
  out = subprocess.run(["bash", "launch/tpu_pod.sh", "--dry_run", "--", "true"], cwd=ROOT,
                       env={k: v for k, v in os.environ.items() if k != "TPU_NAME"},
                       capture_output=True, text=True)
  assert out.returncode != 0 and "TPU_NAME" in out.stderr


def test_slurm_one_process_per_gpu_or_per_node():
  (per_gpu,) = _dry("launch/gpu_slurm.sbatch")
  assert per_gpu[:5] == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=8",
                         "--gpus-per-task=1", "--cpu-bind=none"]
  assert per_gpu[-3:] == USER_CMD  # passed as separate words through `bash -c ... "$@"`
  (per_node,) = _dry("launch/gpu_slurm.sbatch", env=dict(MODE="per_node", GPUS_PER_NODE="4"))
  assert per_node[2:4] == ["--ntasks-per-node=1", "--gpus-per-task=4"]


def test_slurm_gpus_per_node_follows_the_allocation():
  # `#SBATCH --gpus-per-node=8` fixes the allocation unless sbatch is given
  # --gpus-per-node=N: GPUS_PER_NODE defaults to what Slurm allocated, and one that
  # differs from it (GPUS_PER_NODE=4 alone, on 8-GPU allocations) is refused.
  header = (ROOT / "launch/gpu_slurm.sbatch").read_text()
  assert "#SBATCH --gpus-per-node=8" in header.splitlines()
  assert "sbatch --gpus-per-node=N" in header  # documented
  (line,) = _dry("launch/gpu_slurm.sbatch", env=dict(SLURM_GPUS_ON_NODE="4"))
  assert line[2:4] == ["--ntasks-per-node=4", "--gpus-per-task=1"]
  (line,) = _dry("launch/gpu_slurm.sbatch", env=dict(SLURM_GPUS_PER_NODE="h100:2"))
  assert line[2] == "--ntasks-per-node=2"
  (line,) = _dry("launch/gpu_slurm.sbatch", env=dict(SLURM_GPUS_ON_NODE="4",
                                                     GPUS_PER_NODE="4", MODE="per_node"))
  assert line[2:4] == ["--ntasks-per-node=1", "--gpus-per-task=4"]
  err = _refused("launch/gpu_slurm.sbatch", env=dict(SLURM_GPUS_ON_NODE="8",
                                                     GPUS_PER_NODE="4"))
  assert "GPUS_PER_NODE=4" in err and "allocated 8" in err and "--gpus-per-node=4" in err
  for bad in ("0", "four"):
    assert "GPUS_PER_NODE" in _refused("launch/gpu_slurm.sbatch",
                                       env=dict(GPUS_PER_NODE=bad))


def _fake_tools(tmp_path: Path, srun_status: int) -> Path:
  """A bin folder with `srun` (records its argv, exits `srun_status`) and `scontrol`
  (records its argv): the SLURM tools the batch script calls, for the status logic."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, status in (("srun", srun_status), ("scontrol", 0)):
    tool = bin_dir / name
    tool.write_text(f'#!/usr/bin/env bash\necho "$*" >> "{tmp_path}/{name}.calls"\n'
                    f"exit {status}\n")
    tool.chmod(0o755)
  return bin_dir


def test_slurm_requeues_a_run_stopped_at_a_checkpoint(tmp_path):
  # videoldm-train exits 143 after SIGTERM (--signal=TERM@180 before the time limit) has
  # made it save: the script requeues the job, which then resumes. A finished (0) or
  # failed (1) run, REQUEUE=0, or a job requeued MAX_REQUEUES (50) times already is left
  # alone; the status passes through.
  header = (ROOT / "launch/gpu_slurm.sbatch").read_text()
  for line in ("#SBATCH --signal=TERM@180", "#SBATCH --requeue", "#SBATCH --open-mode=append"):
    assert line in header.splitlines(), line
  for i, (status, requeue, restarts, requeued) in enumerate(
      [(143, "1", "0", True), (0, "1", "0", False), (1, "1", "0", False),
       (143, "0", "0", False), (143, "1", "49", True), (143, "1", "50", False)]):
    run_dir = tmp_path / str(i)
    run_dir.mkdir()
    bin_dir = _fake_tools(run_dir, status)
    env = _env({"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77",
                "SLURM_SUBMIT_DIR": str(ROOT), "REQUEUE": requeue,
                "SLURM_RESTART_COUNT": restarts})
    out = subprocess.run(["bash", "launch/gpu_slurm.sbatch", "--", *USER_CMD], cwd=ROOT,
                         env=env, capture_output=True, text=True)
    assert out.returncode == status, out.stderr
    assert (run_dir / "srun.calls").read_text().split()[:2] == ["--kill-on-bad-exit=1",
                                                                 "--ntasks-per-node=8"]
    calls = run_dir / "scontrol.calls"
    assert (calls.read_text() if calls.exists() else "") == ("requeue 77\n" if requeued
                                                             else ""), (status, requeue)
    assert ("requeueing job 77" in out.stderr) == requeued
    assert ("not again" in out.stderr) == (restarts == "50")


def test_local_multiprocess_stops_the_others_when_one_fails(tmp_path):
  # Process 1 records its PID and sleeps, deaf to SIGTERM as a JAX process is (JAX's
  # preemption notifier catches it); process 0 then fails with status 3. The launcher
  # must stop process 1 itself (not only the subshell around it, which left the command
  # running) and exit with the failure's status.
  script = ("import os, pathlib, signal, sys, time\n"
            "pid = pathlib.Path(sys.argv[1])\n"
            "if '--process_id=0' in sys.argv:\n"
            "  while not pid.exists(): time.sleep(0.05)\n"
            "  sys.exit(3)\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "pid.write_text(str(os.getpid()))\n"
            "time.sleep(60)\n")
  t0 = time.monotonic()
  out = subprocess.run(["bash", "launch/local_multiprocess.sh", "--num_processes=2", "--",
                        sys.executable, "-c", script, str(tmp_path / "pid")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 3, out.stderr
  assert "a process failed (exit 3)" in out.stderr
  assert time.monotonic() - t0 < 30  # not the 60 s sleep
  with pytest.raises(ProcessLookupError):
    os.kill(int((tmp_path / "pid").read_text()), 0)


def _two_processes_up(script: str, folder, env=None) -> subprocess.Popen:
  """local_multiprocess.sh running `script` as 2 processes, once each has written its
  file into `folder` (the script's first argument)."""
  proc = subprocess.Popen(["bash", "launch/local_multiprocess.sh", "--num_processes=2",
                           "--", sys.executable, "-c", script, str(folder)],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.monotonic() + 60
  while len(list(folder.iterdir())) < 2 and time.monotonic() < deadline:
    time.sleep(0.05)
  return proc


def test_local_multiprocess_reports_a_failure_during_a_stop(tmp_path):
  # SIGTERM to the launcher: it forwards it; process 0 stops (143), process 1 fails
  # (1) while stopping. The trapped signal must not count as a process ending, and the
  # failure must not be hidden behind the stop.
  script = ("import os, pathlib, signal, sys, time\n"
            "i = int([a for a in sys.argv if a.startswith('--process_id=')][0][13:])\n"
            "def stop(*_):\n"
            "  time.sleep(0.5 * i)\n"
            "  sys.exit(143 if i == 0 else 1)\n"
            "signal.signal(signal.SIGTERM, stop)\n"
            "pathlib.Path(sys.argv[1], str(i)).write_text('up')\n"
            "time.sleep(60)\n")
  proc = _two_processes_up(script, tmp_path)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 1, err
  assert "a process failed (exit 1)" in err


def test_local_multiprocess_kills_what_a_stop_does_not_end(tmp_path):
  # SIGTERM to the launcher goes to the commands; a process that does not end (a JAX
  # process blocked in a collective: it only records the signal) is killed after
  # STOP_GRACE seconds instead of outliving the launcher.
  script = ("import os, pathlib, signal, sys, time\n"
            "i = [a for a in sys.argv if a.startswith('--process_id=')][0][13:]\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "pathlib.Path(sys.argv[1], i).write_text(str(os.getpid()))\n"
            "time.sleep(60)\n")
  proc = _two_processes_up(script, tmp_path, {**os.environ, "STOP_GRACE": "1"})
  t0 = time.monotonic()
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=60)
  assert time.monotonic() - t0 < 30, err  # not the 60 s sleep
  assert proc.returncode == 137, err  # killed: a failure, not a saved stop (143)
  for f in tmp_path.iterdir():
    with pytest.raises(ProcessLookupError):
      os.kill(int(f.read_text()), 0)



def test_local_multiprocess_rejects_process_and_device_counts_below_one():
  # --num_processes=0 used to run nothing and exit 0.
  for args, env in [(["--num_processes=0"], {}), (["--devices_per_process=0"], {}),
                    (["--num_processes=two"], {}), (["--num_processes=-1"], {}),
                    ([], {"NUM_PROCESSES": "0"}), ([], {"DEVICES_PER_PROCESS": "1.5"})]:
    out = subprocess.run(["bash", "launch/local_multiprocess.sh", *args, "--", "echo", "hi"],
                         cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2, (args, env, out.stderr)
    assert "must be a positive integer" in out.stderr and out.stdout == "", (args, env)


def test_local_multiprocess_rejects_a_port_that_is_not_one():
  # Passed on unchecked, JAX's start-up crashed on it (segfault / abort, C++ stacks).
  for args, env in [(["--port=abc"], {}), (["--port=0"], {}), (["--port=65536"], {}),
                    (["--port="], {}), ([], {"PORT": "08080"})]:
    out = subprocess.run(["bash", "launch/local_multiprocess.sh", "--dry_run", *args, "--",
                          "echo", "hi"], cwd=ROOT, env={**os.environ, **env},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, (args, env, out.stderr)
    assert "must be a TCP port, 1-65535" in out.stderr and out.stdout == "", (args, env)
  out = subprocess.run(["bash", "launch/local_multiprocess.sh", "--dry_run", "--port=65535",
                        "--", "echo"], cwd=ROOT, capture_output=True, text=True, check=True)
  assert "--coordinator_address=127.0.0.1:65535" in out.stdout


def test_local_multiprocess_runs_in_the_callers_folder(tmp_path):
  # Relative --config / --workdir paths mean the caller's folder, not the checkout's;
  # the default VENV is still the .venv next to the script's launch/ folder. A copy of
  # the script in a fake checkout, called from another folder with a .venv of its own.
  checkout, caller = tmp_path / "checkout", tmp_path / "caller"
  (checkout / "launch").mkdir(parents=True)
  script = checkout / "launch/local_multiprocess.sh"
  script.write_text((ROOT / "launch/local_multiprocess.sh").read_text())
  for folder in (checkout, caller):
    (folder / ".venv/bin").mkdir(parents=True)
    (folder / ".venv/bin/activate").write_text(f"export WHICH_VENV={folder.name}\n")
  env = {k: v for k, v in os.environ.items() if k not in ("VENV", "WHICH_VENV")}
  # bash -c: the appended --coordinator_address etc. become $1... and are ignored.
  subprocess.run(["bash", str(script), "--num_processes=1", "--", "bash", "-c",
                  'printf "%s\\n%s\\n" "$PWD" "$WHICH_VENV" > "$0"', "where.txt"],
                 cwd=caller, env=env, capture_output=True, text=True, check=True, timeout=60)
  where, venv = (caller / "where.txt").read_text().splitlines()
  assert Path(where).resolve() == caller.resolve()
  assert venv == "checkout"


def test_local_multiprocess_stops_when_wait_names_no_process(tmp_path):
  # bash 5.0 has no `wait -n -p` (rc 2, no job): the launcher spun for ever, deaf to
  # SIGTERM (trapped). bash >= 5.1 is checked at the start; a wait that still names no
  # process (other than a trapped signal's) must kill the commands and exit non-zero.
  # The `wait` below (an exported function wins over the builtin) rejects -p as bash
  # 5.0 does, once both processes are up.
  fake_wait = ('wait() { if [ "$1" = -n ] && [ "$2" = -p ]; then '
               'while [ ! -s "$UP/0" ] || [ ! -s "$UP/1" ]; do sleep 0.05; done; '
               'return 2; fi; builtin wait "$@"; }; export -f wait; '
               'exec bash launch/local_multiprocess.sh --num_processes=2 -- "$@"')
  script = ("import os, pathlib, sys, time\n"
            "i = [a for a in sys.argv if a.startswith('--process_id=')][0][13:]\n"
            "pathlib.Path(sys.argv[1], i).write_text(str(os.getpid()))\n"
            "time.sleep(60)\n")
  t0 = time.monotonic()
  out = subprocess.run(["bash", "-c", fake_wait, "_", sys.executable, "-c", script,
                        str(tmp_path)], cwd=ROOT, env={**os.environ, "UP": str(tmp_path)},
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 2, out.stderr
  assert "without naming a process" in out.stderr
  assert time.monotonic() - t0 < 30  # not the 60 s sleep
  for f in tmp_path.iterdir():
    with pytest.raises(ProcessLookupError):
      os.kill(int(f.read_text()), 0)


def test_a_broken_venv_is_recreated(tmp_path):
  # A venv whose creation failed half-way (Debian without python3-venv leaves one
  # without pip) was reused by every later run of test.sh / demo.sh: "No module named
  # pip" forever.
  (tmp_path / "launch").mkdir()
  (tmp_path / "launch" / "venv.sh").write_text((ROOT / "launch" / "venv.sh").read_text())
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", ".venv"], cwd=tmp_path,
                 check=True, timeout=120)
  script = "set -euo pipefail; . launch/venv.sh; ensure_venv t; python -m pip --version"
  out = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHON": sys.executable})
  assert out.returncode == 0, out.stderr
  assert ".venv is unusable" in out.stderr and str(tmp_path / ".venv") in out.stdout
  again = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
  assert again.returncode == 0 and "unusable" not in again.stderr  # kept, not recreated
  # An exported CDPATH (".:~" is common) made cd print the folder it found: the .venv
  # looked moved and was recreated, everything reinstalled, at every run.
  again = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300,
                         env={**os.environ, "CDPATH": f".:{tmp_path.parent}"})
  assert again.returncode == 0 and "unusable" not in again.stderr, again.stderr


def test_a_moved_venv_is_recreated_and_an_old_python_named(tmp_path):
  # A checkout moved with its .venv: python still ran, but activate put the old path on
  # PATH, so pip installed into (and pytest ran from) whatever python came next.
  # PYTHON naming a Python < 3.11 made a venv every run could only wipe and remake.
  old = tmp_path / "old"
  (old / "launch").mkdir(parents=True)
  (old / "launch" / "venv.sh").write_text((ROOT / "launch" / "venv.sh").read_text())
  # Another venv's bin first on PATH (as under test.sh): its python links the same base
  # interpreter as the moved one's, so comparing the python files could not tell them
  # apart (this test passed from a bare shell and failed from test.sh).
  env = {**os.environ, "PYTHON": sys.executable,
         "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
  script = "set -euo pipefail; . launch/venv.sh; ensure_venv t; command -v python"
  subprocess.run(["bash", "-c", script], cwd=old, check=True, capture_output=True,
                 timeout=300, env=env)
  moved = tmp_path / "moved"
  old.rename(moved)
  out = subprocess.run(["bash", "-c", script], cwd=moved, capture_output=True, text=True,
                       timeout=300, env=env)
  assert out.returncode == 0, out.stderr
  assert "made at another path" in out.stderr
  assert out.stdout.strip() == str(moved / ".venv" / "bin" / "python")
  again = subprocess.run(["bash", "-c", script], cwd=moved, capture_output=True, text=True,
                         timeout=300, env=env)
  assert again.returncode == 0 and "unusable" not in again.stderr  # kept, not recreated
  fake = tmp_path / "python3.9"
  fake.write_text("#!/bin/sh\nexit 1\n")  # what the version check of a 3.9 returns
  fake.chmod(0o755)
  import shutil
  shutil.rmtree(moved / ".venv")
  out = subprocess.run(["bash", "-c", script], cwd=moved, capture_output=True, text=True,
                       timeout=300, env={**env, "PYTHON": str(fake)})
  assert out.returncode == 2 and "is not a Python >= 3.11" in out.stderr, out.stderr
  assert not (moved / ".venv").exists()
