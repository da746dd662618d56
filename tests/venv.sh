#!/bin/bash
# Create (once) the Python venv the system tests, the SDK compatibility test and the lab use.
# It lives in build/venv of this checkout; nothing is installed system-wide.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=build/venv
REQ=tests/requirements.txt
stamp="$VENV/.requirements.sha256"
want=$(sha256sum "$REQ" | cut -d' ' -f1)
if [[ -x "$VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQ"
echo "$want" > "$stamp"
