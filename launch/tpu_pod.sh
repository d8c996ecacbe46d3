#!/usr/bin/env bash
# Runs one videoldm-jax command on every worker of a Cloud TPU VM slice (v4 / v5e / v5p
# pods): creates the slice or reuses it, puts the code on every worker, installs the
# package in a venv there, runs the same command on all workers at once (JAX finds
# its peers from the TPU metadata) and streams their output here.
#
#   TPU_NAME=vldm ZONE=us-east5-a ACCELERATOR_TYPE=v5p-128 \
#     bash launch/tpu_pod.sh [--dry_run] -- videoldm-train \
#       --config=configs/keyframe_sd15_v5p128.py --config.image_model=/ckpt/sd15 \
#       --workdir=/mnt/shared/runs/kf      # /ckpt/sd15: a videoldm-convert folder
#
# The workdir must be one filesystem all workers see (e.g. a Filestore/NFS mount):
# checkpoints are written collectively by all of them.
#
# Variables (all may be set in the environment; no secrets belong here: gcloud uses
# the credentials of `gcloud auth login` / the VM's service account):
#   TPU_NAME          name of the TPU VM slice (required)
#   ZONE              Cloud zone of the slice (required)
#   PROJECT           Cloud project; default: gcloud's configured project
#   ACCELERATOR_TYPE  e.g. v5litepod-64, v5p-128; used only when creating (default v5p-8)
#   RUNTIME_VERSION   TPU VM image used when creating; default by ACCELERATOR_TYPE:
#                     v5litepod-* (v5e) v2-alpha-tpuv5-lite, v5p-* v2-alpha-tpuv5,
#                     v6e-* v2-alpha-tpuv6e, v2-* / v3-* / v4-* tpu-ubuntu2204-base
#                     (another type: set it)
#   SPOT              1 = create a spot (preemptible) slice; the trainer checkpoints on
#                     SIGTERM, exits 143, and resumes when the same command is re-run
#                     (a slice left PREEMPTED or TERMINATED is deleted and created anew)
#   CODE              "copy" (default): scp this checkout's committed files (HEAD;
#                     uncommitted edits are not copied, with a warning);
#                     "clone": git clone REPO_URL at REPO_REF on every worker (a later
#                     run fetches and checks out REPO_REF there); anything else is an
#                     error
#   REPO_URL, REPO_REF  for CODE=clone (default ref: main)
#   REMOTE_DIR        where the code lives on the workers, relative to the home folder
#                     (default videoldm-jax). Updating the code there never deletes
#                     the folder: its .venv and a relative --workdir survive re-runs.
#   EXTRAS            pip extras installed on the workers (default "tpu")
#   REMOTE_PYTHON     the workers' interpreter for their venv (default python3); it must
#                     be Python >= 3.11 (the pinned jax / flax need it): on Ubuntu 22.04
#                     images (v2-v4, python3 is 3.10) install python3.11 first and set
#                     REMOTE_PYTHON=python3.11
#   DRY_RUN           1 = print the commands instead of running them (same as --dry_run)
set -euo pipefail
# (CDPATH='': an exported CDPATH naming a folder with a launch/ made cd go there, and
# `git archive` pack that folder's repository)
CDPATH='' cd -- "$(dirname -- "$0")/.."
DRY_RUN=${DRY_RUN:-0}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry_run) DRY_RUN=1 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option $1 (the command follows --)" >&2; exit 2 ;;
  esac
  shift
done
if [ $# -eq 0 ]; then
  echo "tpu_pod.sh: no command given after --" >&2
  exit 2
fi
: "${TPU_NAME:?set TPU_NAME (the TPU VM slice name)}"
: "${ZONE:?set ZONE (e.g. us-east5-a)}"
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5p-8}
if [ -z "${RUNTIME_VERSION:-}" ]; then
  case "$ACCELERATOR_TYPE" in
    v5litepod-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;  # v5e
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    v2-* | v3-* | v4-*) RUNTIME_VERSION="tpu-ubuntu2204-base" ;;
    *) echo "tpu_pod.sh: no default RUNTIME_VERSION for" \
         "ACCELERATOR_TYPE=$ACCELERATOR_TYPE; set RUNTIME_VERSION" >&2; exit 2 ;;
  esac
fi
SPOT=${SPOT:-0}
CODE=${CODE:-copy}
case "$CODE" in
  copy | clone) ;;
  *) echo "tpu_pod.sh: CODE must be copy or clone, got '$CODE'" >&2; exit 2 ;;
esac
REPO_REF=${REPO_REF:-main}
REMOTE_DIR=${REMOTE_DIR:-videoldm-jax}
REMOTE_DIR=${REMOTE_DIR#\~/}  # ssh starts in the home folder; "~" would be quoted away
EXTRAS=${EXTRAS:-tpu}
REMOTE_PYTHON=${REMOTE_PYTHON:-python3}
project=()
[ -n "${PROJECT:-}" ] && project=("--project=$PROJECT")
tpu=(gcloud compute tpus tpu-vm)
where=("--zone=$ZONE" ${project[@]+"${project[@]}"})  # bash < 4.4: empty arrays

run() {  # prints (dry run) or runs a command, quoted so it can be pasted back
  if [ "$DRY_RUN" = 1 ]; then
    printf '%q ' "$@" | sed 's/ $//'
    printf '\n'
  else
    "$@"
  fi
}

# The remote shell line: quoted once here, so user arguments with spaces survive ssh.
remote_cmd=$(printf '%q ' "$@")
remote_cmd=${remote_cmd% }
q_dir=$(printf '%q' "$REMOTE_DIR")
q_python=$(printf '%q' "$REMOTE_PYTHON")

# 1. The slice: reuse it when it exists and can run; a preempted spot slice stays listed
# (PREEMPTED) and cannot be restarted, so it is deleted and created again.
state=""
if [ "$DRY_RUN" != 1 ]; then
  state=$("${tpu[@]}" describe "$TPU_NAME" "${where[@]}" --format='value(state)' \
          2>/dev/null || true)
  case "$state" in
    PREEMPTED | TERMINATED)
      echo "tpu_pod.sh: $TPU_NAME is $state; deleting it to create it again" >&2
      run "${tpu[@]}" delete "$TPU_NAME" "${where[@]}" --quiet
      state="" ;;
    STOPPED)  # (`tpu-vm stop`: kept, with its disks; the copy and ssh need it running)
      echo "tpu_pod.sh: $TPU_NAME is STOPPED; starting it" >&2
      run "${tpu[@]}" start "$TPU_NAME" "${where[@]}" ;;
  esac
fi
if [ -z "$state" ]; then
  create=("${tpu[@]}" create "$TPU_NAME" "${where[@]}" "--accelerator-type=$ACCELERATOR_TYPE"
          "--version=$RUNTIME_VERSION")
  [ "$SPOT" = 1 ] && create+=(--spot)
  if [ "$DRY_RUN" = 1 ]; then
    echo "# if the slice does not exist yet:"
  fi
  run "${create[@]}"
fi

# 2. The code on every worker.
if [ "$CODE" = clone ]; then
  : "${REPO_URL:?set REPO_URL for CODE=clone}"
  q_ref=$(printf '%q' "$REPO_REF")
  update="git -C $q_dir fetch origin $q_ref && git -C $q_dir checkout -f FETCH_HEAD"
  clone="git clone --branch $q_ref $(printf '%q' "$REPO_URL") $q_dir"
  run "${tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command \
    "if [ -d $q_dir/.git ]; then $update; else $clone; fi"
else
  if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    echo "tpu_pod.sh: warning: uncommitted changes are not copied (git archive HEAD)" >&2
  fi
  # New files never committed (a config just written, say) are not copied either.
  untracked=$(git ls-files --others --exclude-standard 2>/dev/null | awk 'NR <= 5' |
               tr '\n' ' ' || true)
  if [ -n "$untracked" ]; then
    echo "tpu_pod.sh: warning: files not in git are not copied (git archive HEAD):" \
         "$untracked" >&2
  fi
  archive=${TMPDIR:-/tmp}/videoldm-jax-code-$$.tar.gz  # per launch: two may run at once
  trap 'rm -f "$archive"' EXIT
  run git archive --format=tar.gz -o "$archive" HEAD
  run "${tpu[@]}" scp "$archive" "$TPU_NAME:videoldm-jax-code.tar.gz" "${where[@]}" --worker=all
  # Unpacked over the folder, not into a fresh one: its .venv and any run data stay.
  run "${tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command \
    "mkdir -p $q_dir && tar -xzf videoldm-jax-code.tar.gz -C $q_dir"
fi

# 3. Install (a venv per worker) and 4. run everywhere; --worker=all streams every
# worker's output, prefixed by gcloud with the worker's address.
run "${tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command \
  "cd $q_dir && if ! $q_python -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then echo \"\$(hostname): $q_python is not Python >= 3.11; set REMOTE_PYTHON\" >&2; exit 1; fi && if ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || ! .venv/bin/python -m pip --version >/dev/null 2>&1 || [ ! -f .venv/bin/activate ]; then $q_python -m venv --clear .venv; fi && . .venv/bin/activate && python -m pip install -q -e '.[$EXTRAS]'"
run "${tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command \
  "cd $q_dir && . .venv/bin/activate && $remote_cmd"
