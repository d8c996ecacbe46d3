# Sourced by launch/test.sh and launch/demo.sh.
#
# install_package TAG EXTRA [COVERED_BY...]: `ensure_venv TAG`, then `pip install -e
# .[EXTRA]` into it, both under the lock .venv.lock: two scripts started together
# created one .venv at once (the second cleared the first's half-made folder). An
# editable reinstall removes the package and its console scripts for seconds (a demo
# running beside test.sh lost them), so the stamp .venv/videoldm-jax-installed records
# what was installed from which setup.py: nothing is done when this setup.py was
# installed with EXTRA, or with an extra in COVERED_BY that holds it; only EXTRA's
# requirements when it was installed with another extra; `pip install -e` otherwise.
install_package() {
  local tag=$1 extra=$2 setup stamp=.venv/videoldm-jax-installed name reqs
  shift 2
  if command -v flock >/dev/null 2>&1; then
    exec 9>>.venv.lock
    flock 9
  fi
  ensure_venv "$tag"
  setup=$(python -c 'import hashlib; print(hashlib.sha256(open("setup.py", "rb").read())
    .hexdigest())')
  for name in "$extra" "$@"; do
    if grep -qxF "$setup $name" "$stamp" 2>/dev/null; then
      echo "[$tag] videoldm_jax is installed (.[$name], this setup.py)" >&2
      exec 9>&-
      return 0
    fi
  done
  if grep -q "^$setup " "$stamp" 2>/dev/null; then
    echo "[$tag] installing the requirements of .[$extra]" >&2
    reqs=$(python - "$extra" <<'PY'
import importlib.metadata as md, sys
for r in md.requires("videoldm_jax") or []:
  req, _, marker = r.partition(";")
  if marker.replace("'", '"').split() == ["extra", "==", f'"{sys.argv[1]}"']:
    print(req.strip())
PY
)
    local -a each=()
    [ -z "$reqs" ] || mapfile -t each <<<"$reqs"  # (one per line; unquoted, 1.* globs)
    [ "${#each[@]}" = 0 ] ||
      python -m pip install --quiet --disable-pip-version-check "${each[@]}"
  else
    echo "[$tag] installing .[$extra]" >&2
    python -m pip install --quiet --disable-pip-version-check -e ".[$extra]"
    # Another setup.py's lines no longer hold (a branch switched back and forth).
    : >"$stamp"
  fi
  echo "$setup $extra" >>"$stamp"
  exec 9>&-  # (releases the lock)
}

# ensure_venv TAG creates .venv with
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
  # CDPATH='': with an exported CDPATH (`.:~` is common) cd prints the folder it found,
  # which made `here` two lines: every run took .venv for a moved one, recreated it and
  # reinstalled everything; or cd found another folder's .venv/bin first.
  here=$(CDPATH='' cd -- .venv/bin && pwd -P) || return 1
  # shellcheck disable=SC1091
  (. .venv/bin/activate && found=$(command -v python) \
    && [ "$(CDPATH='' cd -- "$(dirname -- "$found")" && pwd -P)" = "$here" ])
}
