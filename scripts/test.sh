#!/usr/bin/env bash
# Sets up .venv and runs the test suite. Extra arguments go to pytest, e.g.
#   ./scripts/test.sh -m core
#   ./scripts/test.sh tests/test_config.py -q -x
set -euo pipefail
# shellcheck source=scripts/_venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"

echo "==> running pytest $*" >&2
exec "$VENV/bin/python" -m pytest "$@"
