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
# End-to-end tests run real daemons, databases and signals on a loaded 2-core machine; a test
# that fails is run once more and reported as "rerun" in the summary, so a flake stays visible
# without discarding a whole run. RECONCILER_TEST_RERUNS=0 turns that off.
RERUNS="${RECONCILER_TEST_RERUNS:-1}"
echo "==> running pytest -n $JOBS --reruns $RERUNS $*" >&2
exec "$VENV/bin/python" -m pytest -n "$JOBS" --reruns "$RERUNS" -rR "$@"
