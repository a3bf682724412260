#!/usr/bin/env bash
# Sets up .venv and runs the main job on SQLite with the bundled example
# (examples/flask_app): apply its migrations, then show the state.
set -euo pipefail
# shellcheck source=scripts/_venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"

EXAMPLE="$REPO_ROOT/examples/flask_app"
RECONCILER="$VENV/bin/reconciler"
CONFIG="reconciler.toml"

cd "$EXAMPLE"
echo "==> reconciler --config $CONFIG apply   (in examples/flask_app)" >&2
"$RECONCILER" --config "$CONFIG" apply
echo "==> reconciler --config $CONFIG status" >&2
"$RECONCILER" --config "$CONFIG" status
