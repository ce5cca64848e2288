#!/usr/bin/env bash
# Create .venv (Python 3.11) and install Loom with its pinned stack; fast no-op when nothing changed.
#
# torch is installed first and on its own so that pip resolves the CPU wheel available on this kind
# of machine (never a CUDA build); then `pip install -e ".[test,cpu-triton]"` adds everything else.
# A stamp file records a hash of pyproject.toml and of this script: the install is skipped while
# both are unchanged and the environment still imports Loom. Last, the example models that
# examples/hf-vlm-cpu.yaml names (examples/models/, not in git) are written when missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.loom-setup-stamp"
TORCH_VERSION="2.13.0"

cd "$ROOT"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"

# The tiny pretrained folders the examples fine-tune (random weights, a tokenizer over examples/data).
example_models() {
    local models="$ROOT/examples/models"
    if [[ ! -f "$models/llama/model.safetensors" || ! -f "$models/clip/model.safetensors" ]]; then
        echo "setup.sh: writing the example models under $models" >&2
        "$PY" examples/make_models.py "$models" >&2
    fi
    if [[ ! -f "$ROOT/recipes/alignment/models/base/model.safetensors" ]]; then  # recipes/alignment/alignment-tiny.yaml's
        echo "setup.sh: writing the alignment recipe's tiny Llama under recipes/alignment/models" >&2
        "$PY" -m recipes.alignment.make --models-only >&2
    fi
    if [[ ! -f "$ROOT/recipes/alignment/models/pas/model.safetensors" ]]; then  # recipes/alignment/pipeline/pas-tiny.yaml's
        echo "setup.sh: writing PAS's tiny Llama under recipes/alignment/models/pas" >&2
        "$PY" -m recipes.alignment.pas_scenes --models-only >&2
    fi
    # recipes/alignment/pipeline/button-*.yaml's; a folder written before it was 128 wide is rewritten
    local button="$ROOT/recipes/alignment/models/button"
    if [[ ! -f "$button/model.safetensors" ]] || ! grep -q '"hidden_size": 128,' "$button/config.json"; then
        echo "setup.sh: writing BUTTON's tiny Llama under recipes/alignment/models/button" >&2
        "$PY" -m recipes.alignment.button_steps >&2
    fi
    if [[ ! -f "$ROOT/recipes/alignment/models/judges/model.safetensors" ]]; then  # pipeline/judges-tiny.yaml's
        echo "setup.sh: writing the SysBench/FB-Bench tiny Llama under recipes/alignment/models/judges" >&2
        "$PY" -m recipes.alignment.judge_data --models-only >&2
    fi
    if [[ ! -f "$ROOT/recipes/alignment/models/supercorrect/model.safetensors" ]]; then  # pipeline/supercorrect-*.yaml's
        echo "setup.sh: writing SuperCorrect's tokenizer and tiny Llama under recipes/alignment/models" >&2
        "$PY" -m recipes.alignment.supercorrect_model >&2
    fi
    # the diffusion recipe's towers are not written here: their vision tower trains for minutes and no test reads them
    # (tests write random towers); docs/recipes/diffusion.md runs `python -m recipes.diffusion.models` once
}

if [[ -x "$PY" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] \
    && [[ -x "$VENV/bin/loom" ]] && "$PY" -c "import orchestrator.cli, planner.api" >/dev/null 2>&1; then
    example_models
    exit 0
fi

if [[ ! -x "$PY" ]]; then
    if command -v python3.11 >/dev/null 2>&1; then
        BASE_PY="python3.11"
    elif command -v python3 >/dev/null 2>&1 && python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
        BASE_PY="python3"
    else
        echo "setup.sh: Python 3.11 is required (python3.11 not found on PATH)." >&2
        exit 1
    fi
    echo "setup.sh: creating $VENV with $BASE_PY" >&2
    "$BASE_PY" -m venv "$VENV"
fi

echo "setup.sh: installing torch==$TORCH_VERSION, then loom[test] (editable)" >&2
"$PY" -m pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[test,cpu-triton]"
"$PY" -c "import orchestrator.cli, planner.api"
echo "$want" > "$STAMP"
example_models
echo "setup.sh: done" >&2
