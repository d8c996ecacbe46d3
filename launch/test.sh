#!/usr/bin/env bash
# Runs the test suite: creates .venv when missing, installs the package with its test
# extras (PyTorch CPU + diffusers + transformers as numerical references), runs pytest.
#   bash launch/test.sh                 # everything
#   bash launch/test.sh -k parity -x    # extra arguments go to pytest
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
exec python -m pytest -q tests "$@"
