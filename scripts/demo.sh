#!/usr/bin/env bash
# Sets up .venv and runs the main job on SQLite with the bundled example (examples/flask_app):
# starts the reconciler daemon (`reconciler run`, prod mode), waits until it has brought the
# database to the repository's heads, shows /status, then stops it with SIGTERM as Kubernetes
# would. DEMO_KEEP_RUNNING=1 leaves it running in the foreground instead (Ctrl-C stops it).
set -euo pipefail
# shellcheck source=scripts/_venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"

EXAMPLE="$REPO_ROOT/examples/flask_app"
RECONCILER="$VENV/bin/reconciler"
CONFIG="reconciler.toml"
HTTP="${DEMO_HTTP:-127.0.0.1:8089}"

cd "$EXAMPLE"
if [ "${DEMO_KEEP_RUNNING:-0}" = "1" ]; then
    exec "$RECONCILER" --config "$CONFIG" run --http "$HTTP"
fi

echo "==> reconciler --config $CONFIG run --http $HTTP   (in examples/flask_app, background)" >&2
"$RECONCILER" --config "$CONFIG" run --http "$HTTP" &
DAEMON=$!
trap 'kill -TERM "$DAEMON" 2>/dev/null || true' EXIT

echo "==> reconciler wait --exact --timeout 60   (until the daemon has reached head)" >&2
"$RECONCILER" --config "$CONFIG" wait --exact --timeout 60

echo "==> GET http://$HTTP/status" >&2
"$VENV/bin/python" - "$HTTP" <<'PY'
import json, sys, time, urllib.request
url = f"http://{sys.argv[1]}/status"
deadline = time.monotonic() + 30
while True:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            status = json.load(response)
        if status.get("runs"):
            break
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit("the daemon's /status did not answer within 30 s")
    time.sleep(0.2)
print(json.dumps({k: status[k] for k in ("target", "state", "db_heads", "repo_heads", "pending",
                                         "last_outcome", "runs")}, indent=2))
PY

echo "==> stopping the daemon (SIGTERM)" >&2
kill -TERM "$DAEMON"
wait "$DAEMON"
trap - EXIT
echo "==> daemon stopped cleanly" >&2
