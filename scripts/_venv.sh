# Sourced by scripts/test.sh and scripts/demo.sh: cd to the repository root and make sure
# .venv exists with the package (editable) and its test extras installed.
# Set RECONCILER_PYTHON to choose the interpreter that creates the virtualenv (default: python3).

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

VENV="$REPO_ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating virtualenv .venv" >&2
    "${RECONCILER_PYTHON:-python3}" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
echo "==> installing schema-reconciler[test] into .venv" >&2
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
