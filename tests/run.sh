#!/bin/sh
# Runs the test suite: creates or reuses .venv at the repository root, installs what the tests need, runs pytest.
# Extra arguments go to pytest (e.g. `sh tests/run.sh -k metrics`).
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
. "$ROOT/scripts/venv.sh"
ensure_venv requirements-test.txt
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$VENV_PY" -m pytest -q tests "$@"
