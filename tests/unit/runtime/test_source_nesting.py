"""A data file line nested deeper than the JSON parser recurses (tasks[].data, runtime.source_files.read_jsonl) is one
DataError naming the file and the line, and `loom validate` one `error:` line with exit 2, not a RecursionError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app
from planner.spec import parse_job
from runtime.source_files import DataError, check_data_files

ROOT = Path(__file__).resolve().parents[3]
TOKENIZER = ROOT / "examples" / "data" / "tokenizer"
GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the cat"}]}
DEEP = '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"


def chat_doc(path: Path) -> dict:
    return {"name": "nested", "cluster": {"device": "cpu", "devices_per_node": 1},
            "components": {"lm": {"kind": "llama", "num_layers": 1, "hidden_size": 32, "num_heads": 4, "seq_len": 24,
                                  "vocab_size": 128}},
            "tasks": [{"name": "t", "batch_size": 2, "loss": "lm", "components": [{"component": "lm"}],
                       "data": {"format": "chat", "path": str(path), "tokenizer": str(TOKENIZER)}}]}


@pytest.fixture
def nested_chat(tmp_path: Path) -> Path:
    path = tmp_path / "chat.jsonl"
    path.write_text(f"{json.dumps(GOOD)}\n{json.dumps(GOOD)}\n{DEEP}\n")
    return path


def test_a_deeply_nested_line_names_the_file_and_line(nested_chat: Path) -> None:
    with pytest.raises(DataError) as info:
        check_data_files(parse_job(chat_doc(nested_chat)))
    assert str(info.value).startswith(f"tasks[0].data.path ({nested_chat}): line 3 is nested too deeply"), info.value


def test_loom_validate_gives_one_error_line(nested_chat: Path, tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(chat_doc(nested_chat)))
    result = CliRunner().invoke(app, ["validate", str(job)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "line 3 is nested too deeply" in lines[0], lines
    assert "Traceback" not in result.stderr
