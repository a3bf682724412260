#!/usr/bin/env bash
# Sets up .venv and runs the test suite. Extra arguments go to pytest, e.g.
#   ./scripts/test.sh -m core
#   ./scripts/test.sh tests/test_config.py -q -x
set -euo pipefail
# shellcheck source=scripts/_venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"

# The suite mostly waits on databases and subprocesses: three pytest workers on two cores keep it
# near 8 minutes. RECONCILER_TEST_JOBS=0 runs it in one process.
JOBS="${RECONCILER_TEST_JOBS:-3}"
echo "==> running pytest -n $JOBS $*" >&2
exec "$VENV/bin/python" -m pytest -n "$JOBS" "$@"
