#!/usr/bin/env bash
# Runs the test suite: creates .venv when missing or unusable (launch/venv.sh), installs
# the package with its test extras (PyTorch CPU + diffusers + transformers as numerical
# references), runs pytest.
#   bash launch/test.sh                 # everything
#   bash launch/test.sh -k parity -x    # extra arguments go to pytest
#   bash launch/test.sh tests/test_eval.py  # only the tests named (paths from the checkout)
#   TEST_WORKERS=1 bash launch/test.sh  # one process (default: 2 pytest-xdist workers)
set -euo pipefail
# (CDPATH='': an exported CDPATH naming a folder with a launch/ made cd go there)
CDPATH='' cd -- "$(dirname -- "$0")/.."
WORKERS=${TEST_WORKERS:-2}
case $WORKERS in
  auto | [1-9] | [1-9][0-9]) ;;
  *) echo "[test.sh] TEST_WORKERS=$WORKERS: expected a positive number or auto" >&2; exit 2 ;;
esac
# shellcheck source=launch/venv.sh
. launch/venv.sh
install_package test.sh test
export JAX_PLATFORMS=cpu
# Two workers, one test file each at a time (module fixtures are built once): most of a
# test's time is XLA compiling on one thread, so two of them fill two cores; 22 instead
# of 29 minutes on the 2-core machine.
# --durations: the slowest tests, for keeping the suite inside its 25-minute budget.
# The whole suite unless the arguments name tests (a file, folder or file::test).
WHAT=(tests)  # (expanded as ${WHAT[@]+...}: bash < 4.4 calls an empty array unbound)
for arg in "$@"; do
  if [ -e "${arg%%::*}" ]; then WHAT=(); fi
done
if [ "$WORKERS" != 1 ]; then
  exec python -m pytest -q ${WHAT[@]+"${WHAT[@]}"} -n "$WORKERS" --dist loadfile --durations=20 "$@"
fi
exec python -m pytest -q ${WHAT[@]+"${WHAT[@]}"} --durations=20 "$@"
