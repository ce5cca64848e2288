#!/usr/bin/env bash
# The project's main job. For now: plan every example job and write its plan and Gantt charts
# under out/ (the runtime issue turns this into a real training run).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
"$ROOT/scripts/setup.sh"

OUT="${LOOM_OUT:-$ROOT/out}"
mkdir -p "$OUT"
LOOM="$ROOT/.venv/bin/loom"

for job in examples/*.yaml; do
    name="$(basename "$job" .yaml)"
    echo "== $name" >&2
    "$LOOM" validate "$job"
    "$LOOM" plan "$job" \
        --save "$OUT/$name.plan.json" \
        --gantt "$OUT/$name.png" \
        --gantt "$OUT/$name.html" \
        | tee "$OUT/$name.txt"
done
echo "main-job.sh: plans, tables and Gantt charts are in $OUT" >&2
