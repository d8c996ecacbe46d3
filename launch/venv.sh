# Sourced by launch/test.sh and launch/demo.sh: ensure_venv TAG creates .venv with
# $PYTHON (default python3) when it is missing or broken, then activates it. Broken:
# no working `python -m pip` (a creation that failed half-way, e.g. without Debian's
# python3-venv; a base interpreter since removed) or a Python older than 3.11 (the pinned
# jax / flax / orbax / grain need 3.11): such a folder is recreated, not reused.
ensure_venv() {
  local tag=$1
  local python=${PYTHON:-python3}
  if ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
      >/dev/null 2>&1 || ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
    if [ -e .venv ]; then
      echo "[$tag] .venv is unusable (no pip, or Python < 3.11); recreating it with $python" >&2
    else
      echo "[$tag] creating .venv with $python" >&2
    fi
    "$python" -m venv --clear .venv
  fi
  # shellcheck disable=SC1091
  . .venv/bin/activate
}
