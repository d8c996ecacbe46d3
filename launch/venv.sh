# Sourced by launch/test.sh and launch/demo.sh: ensure_venv TAG creates .venv with
# $PYTHON (default python3) when it is missing or broken, then activates it. Broken:
# no working `python -m pip` (a creation that failed half-way, e.g. without Debian's
# python3-venv; a base interpreter since removed), a Python older than 3.11 (the pinned
# jax / flax / orbax / grain need 3.11), or a folder made at another path (a moved or
# copied checkout: its activate script and console scripts name the old path, so pip
# and pytest ran outside it): such a folder is recreated, not reused.
ensure_venv() {
  local tag=$1
  local python=${PYTHON:-python3}
  if ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
      >/dev/null 2>&1 || ! .venv/bin/python -m pip --version >/dev/null 2>&1 \
      || ! _venv_is_here; then
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then
      echo "[$tag] $python is not a Python >= 3.11 (or does not run): set PYTHON to one," \
        "e.g. PYTHON=python3.11 bash $0" >&2
      exit 2
    fi
    if [ -e .venv ]; then
      echo "[$tag] .venv is unusable (no pip, Python < 3.11, or made at another path);" \
        "recreating it with $python" >&2
    else
      echo "[$tag] creating .venv with $python" >&2
    fi
    "$python" -m venv --clear .venv
  fi
  # shellcheck disable=SC1091
  . .venv/bin/activate
}

# Whether .venv/bin/activate puts this folder's .venv/bin first on PATH. Folders are
# compared, not the python files: every venv's python links the same base interpreter.
_venv_is_here() {
  [ -f .venv/bin/activate ] || return 1
  local here
  here=$(cd .venv/bin && pwd -P) || return 1
  # shellcheck disable=SC1091
  (. .venv/bin/activate && found=$(command -v python) \
    && [ "$(cd "$(dirname "$found")" && pwd -P)" = "$here" ])
}
