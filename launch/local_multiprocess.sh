#!/usr/bin/env bash
# Runs one command as N JAX processes on this machine (loopback coordinator, fake CPU
# devices per process): the way to exercise multi-host code paths without a cluster.
# Each process gets --coordinator_address, --num_processes, --process_id and
# --cpu_devices appended; output lines are prefixed with [pI]. If one process fails the
# others are killed (SIGKILL: a JAX process catches SIGTERM, and one waiting in a
# collective for the failed one would never see it) and the script exits with its
# status. Status 143 (videoldm-train stopped by SIGTERM, saved) is not a failure: the
# others stop at the same step. SIGTERM / SIGINT to this script go to the commands,
# followed by SIGKILL after STOP_GRACE seconds (60) for any still running; it exits
# 143 when they all stopped, or with the first failure's status. Needs bash >= 5.1
# (wait -n -p; checked at the start, exit 2). The command runs in the caller's working
# directory: relative --config / --workdir paths mean what they mean there.
#
#   bash launch/local_multiprocess.sh [--num_processes=2] [--devices_per_process=2] \
#       [--port=PORT] [--dry_run] -- videoldm-train --config=configs/keyframe_tiny.py \
#       --workdir="work/mp run"
#
# Variables (flags override): NUM_PROCESSES (2), DEVICES_PER_PROCESS (2), PORT (a random
# port from 20000-29999, not checked: set it if that one is taken), VENV (activated when
# it exists; default: .venv of the checkout this script is in, wherever it is called
# from).
set -euo pipefail
if ((BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1))); then
  echo "local_multiprocess.sh: needs bash >= 5.1 (wait -n -p); this is bash" \
    "$BASH_VERSION" >&2
  exit 2
fi
# The checkout, for the default VENV. No `cd`: the commands run in the caller's folder.
checkout=$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)
NUM_PROCESSES=${NUM_PROCESSES:-2}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-2}
PORT=${PORT:-$((20000 + RANDOM % 10000))}
VENV=${VENV:-$checkout/.venv}
STOP_GRACE=${STOP_GRACE:-60}
DRY_RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --num_processes=*) NUM_PROCESSES=${1#*=} ;;
    --devices_per_process=*) DEVICES_PER_PROCESS=${1#*=} ;;
    --port=*) PORT=${1#*=} ;;
    --dry_run) DRY_RUN=1 ;;
    --) shift; break ;;
    *) echo "local_multiprocess.sh: unknown option $1 (the command follows --)" >&2; exit 2 ;;
  esac
  shift
done
if [ $# -eq 0 ]; then
  echo "local_multiprocess.sh: no command given after --" >&2
  exit 2
fi
for var in NUM_PROCESSES DEVICES_PER_PROCESS; do
  case "${!var}" in
    '' | *[!0-9]* | 0*)
      echo "local_multiprocess.sh: --${var,,} / $var must be a positive integer," \
        "got '${!var}'" >&2
      exit 2 ;;
  esac
done
# (Unchecked, a bad port crashed the processes in JAX's start-up with C++ stack traces.)
case "$PORT" in
  '' | *[!0-9]* | 0*) port_ok=0 ;;
  *) port_ok=$((${#PORT} <= 5 && PORT <= 65535)) ;;
esac
if [ "$port_ok" = 0 ]; then
  echo "local_multiprocess.sh: --port / PORT must be a TCP port, 1-65535, got '$PORT'" >&2
  exit 2
fi
if [ -f "$VENV/bin/activate" ] && [ "$DRY_RUN" = 0 ]; then
  # shellcheck disable=SC1090,SC1091
  . "$VENV/bin/activate"
fi
export JAX_PLATFORMS=cpu

# The commands' own PIDs (pid.I files), for `cleanup`: killing a job's subshell would
# leave its command running.
pid_dir=$(mktemp -d)
for ((i = 0; i < NUM_PROCESSES; i++)); do
  cmd=("$@" "--coordinator_address=127.0.0.1:$PORT" "--num_processes=$NUM_PROCESSES"
       "--process_id=$i" "--cpu_devices=$DEVICES_PER_PROCESS")
  if [ "$DRY_RUN" = 1 ]; then
    printf 'JAX_PLATFORMS=cpu'
    printf ' %q' "${cmd[@]}"
    printf '\n'
    continue
  fi
  ( ( "${cmd[@]}" 2>&1 & echo "$!" > "$pid_dir/pid.$i"; wait "$!" ) |
    sed -u "s/^/[p$i] /"; exit "${PIPESTATUS[0]}" ) &
done
if [ "$DRY_RUN" = 1 ]; then
  rm -rf "$pid_dir"
  exit 0
fi

status=0
stopping=0
killer=""
# Signals to the commands, not to the `sed`s that print them.
signal_all() { kill -s "$1" $(cat "$pid_dir"/pid.* 2>/dev/null) 2>/dev/null || true; }
on_signal() {
  stopping=1
  signal_all TERM  # a trainer saves and stops
  if [ -z "$killer" ]; then
    # Without our stdout / stderr: a caller reading them would wait for its `sleep`.
    ( sleep "$STOP_GRACE"; signal_all KILL ) </dev/null >/dev/null 2>&1 &
    killer=$!
  fi
}
trap on_signal INT TERM
# wait -n: a process that fails early stops the rest at once (they would otherwise sit
# in a collective until its timeout). -p names the job that ended: a trapped signal
# also ends the wait, with no job and a status above 128. No job otherwise (wait -n -p
# unsupported, or no children left) would make this loop spin: fatal. Every status is
# collected; the first failure wins over stops (143).
fatal() {  # stops everything for good: SIGKILL to the commands, then exit 2
  echo "local_multiprocess.sh: $1; killing the processes" >&2
  [ -z "$killer" ] || kill "$killer" 2>/dev/null || true
  # A command started just now may not have its pid file yet: give them a moment.
  for ((t = 0; t < 50; t++)); do
    n=0
    for f in "$pid_dir"/pid.*; do if [ -s "$f" ]; then n=$((n + 1)); fi; done
    [ "$n" -lt "$NUM_PROCESSES" ] || break
    sleep 0.1
  done
  signal_all KILL
  builtin wait 2>/dev/null || true
  rm -rf "$pid_dir"
  exit 2
}
left=$NUM_PROCESSES
while [ "$left" -gt 0 ]; do
  rc=0
  job=""
  wait -n -p job || rc=$?
  if [ -z "${job:-}" ]; then
    if [ "$rc" -gt 128 ]; then continue; fi  # a trapped signal (on_signal has run)
    fatal "wait -n -p ended (exit $rc) without naming a process (bash $BASH_VERSION)"
  fi
  [ "$job" != "$killer" ] || continue
  left=$((left - 1))
  if [ "$rc" = 143 ]; then
    [ "$status" != 0 ] || status=143
  elif [ "$rc" != 0 ]; then
    if [ "$status" = 0 ] || [ "$status" = 143 ]; then
      status=$rc
      echo "local_multiprocess.sh: a process failed (exit $rc); stopping the others" >&2
      signal_all KILL
    fi
  fi
done
[ -z "$killer" ] || kill "$killer" 2>/dev/null || true
rm -rf "$pid_dir"
exit "$status"
