#!/usr/bin/env bash
# Set up the environment (scripts/setup.sh) and run the test suite; arguments go to pytest.
#
# Without arguments (the whole suite, as CI runs it) the unit tests run first in two pytest-xdist workers, one per
# core: each of them is one process doing single-threaded work. The integration tests then run one at a time: each
# starts Ray clusters, gloo worlds or `loom` subprocesses that already use both cores, and several time a frozen
# worker or a killed process, which a second test beside them would slow past its limits.
# Exits non-zero only when tests fail or cannot run; "no tests collected" (pytest's 5, e.g. a -k
# that matches nothing) is reported but not a failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
"$ROOT/scripts/setup.sh"

run_pytest() {
    local status=0
    "$ROOT/.venv/bin/python" -m pytest "$@" || status=$?
    if [[ $status -eq 5 ]]; then
        echo "test.sh: pytest collected no tests for: ${*:-<all>}" >&2
        return 0
    fi
    return "$status"
}

if [[ $# -gt 0 ]]; then
    run_pytest "$@"
    exit $?
fi
unit=0
run_pytest tests/unit -n 2 || unit=$?
integration=0
run_pytest tests/integration || integration=$?
echo "test.sh: tests/unit exit $unit, tests/integration exit $integration" >&2
[[ $unit -eq 0 && $integration -eq 0 ]]
