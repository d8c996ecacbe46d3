#!/usr/bin/env bash
# Runs the test suite: creates .venv when missing, installs the package with its test
# extras (PyTorch CPU + diffusers + transformers as numerical references), runs pytest.
#   bash launch/test.sh                 # everything
#   bash launch/test.sh -k parity -x    # extra arguments go to pytest
#   TEST_WORKERS=1 bash launch/test.sh  # one process (default: 2 pytest-xdist workers)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[test.sh] creating .venv" >&2
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
echo "[test.sh] installing .[test]" >&2
python -m pip install --quiet --disable-pip-version-check -e ".[test]"
export JAX_PLATFORMS=cpu
# Two workers, one test file each at a time (module fixtures are built once): most of a
# test's time is XLA compiling on one thread, so two of them fill two cores; 22 instead
# of 29 minutes on the 2-core machine.
# --durations: the slowest tests, for keeping the suite inside its 25-minute budget.
WORKERS=${TEST_WORKERS:-2}
if [ "$WORKERS" -gt 1 ]; then
  exec python -m pytest -q tests -n "$WORKERS" --dist loadfile --durations=20 "$@"
fi
exec python -m pytest -q tests --durations=20 "$@"
