#!/usr/bin/env bash
# Regenerates docs/screenshots/*.png, the README's pictures of the status page: the page tests
# (tests/runtime/test_status_page_browser.py: a real daemon in each state, Debian's headless
# Chromium) keep their screenshots there. Needs the packages chromium and tesseract-ocr.
set -euo pipefail
# shellcheck source=scripts/_venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"

export RECONCILER_SCREENSHOTS="$REPO_ROOT/docs/screenshots"
# a neutral temporary root: the pictures show the projects' paths in their error messages
BASE="${TMPDIR:-/tmp}/reconciler-screenshots"
exec "$VENV/bin/python" -m pytest -q -n 3 -p no:cacheprovider --basetemp="$BASE" \
    tests/runtime/test_status_page_browser.py "$@"
