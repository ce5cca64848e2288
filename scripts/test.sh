#!/usr/bin/env bash
# Set up the environment (scripts/setup.sh) and run the test suite; arguments go to pytest.
# Exits non-zero only when tests fail or cannot run; "no tests collected" (pytest's 5, e.g. a -k
# that matches nothing) is reported but not a failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
"$ROOT/scripts/setup.sh"

status=0
"$ROOT/.venv/bin/python" -m pytest "$@" || status=$?
if [[ $status -eq 5 ]]; then
    echo "test.sh: pytest collected no tests for: ${*:-<all>}" >&2
    exit 0
fi
exit "$status"
