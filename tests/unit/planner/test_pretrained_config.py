"""planner.pretrained reads a pretrained folder's config.json as input: bounded (size, nesting), each size a whole
number within the spec's limits, named `DIR/config.json: <key>` in one SpecError line, never a traceback or a hang."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from planner.errors import SpecError
from planner.spec import MAX_LAYERS_PER_COMPONENT, MAX_LEVELS, parse_job

LLAMA = Path(__file__).resolve().parents[3] / "examples" / "models" / "llama"


def job(pretrained: str | Path) -> dict:
    return {"name": "pre", "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "cpu"},
            "components": {"lm": {"pretrained": str(pretrained), "seq_len": 8}},
            "tasks": [{"name": "chat", "batch_size": 2, "loss": "lm", "components": [{"component": "lm"}]}]}


def llama_with(tmp_path: Path, config_text: str | None = None, **changes) -> Path:
    folder = tmp_path / "llama"
    shutil.copytree(LLAMA, folder)
    config = json.loads((LLAMA / "config.json").read_text()) | changes
    (folder / "config.json").write_text(config_text if config_text is not None else json.dumps(config))
    return folder


def refusal(data: dict) -> str:
    start = time.perf_counter()
    with pytest.raises(SpecError) as info:
        parse_job(data)
    assert time.perf_counter() - start < 10  # nothing iterates over a size before it is checked
    message = str(info.value)
    assert "\n" not in message
    return message


def test_the_example_folder_is_valid() -> None:
    assert parse_job(job(LLAMA)).components["lm"].num_layers == 3


@pytest.mark.parametrize("key, value", [
    ("num_hidden_layers", "3"), ("num_hidden_layers", -1), ("num_hidden_layers", 0), ("num_hidden_layers", 3.0),
    ("num_hidden_layers", True), ("num_hidden_layers", 10**9), ("hidden_size", float("nan")),
    ("hidden_size", float("inf")), ("vocab_size", 10**12), ("num_key_value_heads", 0), ("head_dim", "16"),
    ("max_position_embeddings", -5),
])
def test_a_bad_config_size_names_the_file_and_key(tmp_path: Path, key: str, value) -> None:
    folder = llama_with(tmp_path, **{key: value})
    message = refusal(job(folder))
    assert f"{folder.resolve() / 'config.json'}: {key} ({value!r}) is not a whole number in 1.." in message, message
    assert "components.lm.num_layers" not in message  # a field the user never wrote


def test_config_layers_meet_the_spec_limit(tmp_path: Path) -> None:
    message = refusal(job(llama_with(tmp_path, num_hidden_layers=MAX_LAYERS_PER_COMPONENT + 1)))
    assert f"in 1..{MAX_LAYERS_PER_COMPONENT}" in message


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000,
                                  '{"model_type": "llama", "x": ' + "[" * 50 + "]" * 50 + "}"])
def test_a_deeply_nested_config_is_one_line(tmp_path: Path, text: str) -> None:
    folder = llama_with(tmp_path, config_text=text)
    assert f"{folder.resolve() / 'config.json'}: not a model config (nested deeper than 32 levels)" \
        in refusal(job(folder))


@pytest.mark.parametrize("raw, expected", [(b"\xff\xfe{}", "(not UTF-8 text)"), (b"{", "(not JSON)"),
                                           (b"[1]", "(not a JSON object)")])
def test_an_unreadable_config_is_one_line(tmp_path: Path, raw: bytes, expected: str) -> None:
    folder = llama_with(tmp_path)
    (folder / "config.json").write_bytes(raw)
    message = refusal(job(folder))
    assert f"{folder.resolve() / 'config.json'}: not a model config {expected}; expected the config.json " \
           "save_pretrained writes. Re-save the model with save_pretrained." in message, message


def test_a_config_is_read_by_planner_jsonfile_with_its_limits(tmp_path: Path, monkeypatch) -> None:
    """One bounded JSON reader (planner.jsonfile.read_json) for plans, cost files and pretrained folders: a config.json
    that is a directory or a pipe was said to be missing, and one over the size limit is refused unread."""
    import dataclasses
    import os

    import planner.pretrained

    folder = llama_with(tmp_path)
    config = folder / "config.json"
    config.unlink()
    config.mkdir()
    assert f"{config.resolve()}: is a directory, not a model config. Give the file itself." in refusal(job(folder))
    config.rmdir()
    os.mkfifo(config)  # read, it would block
    assert f"{config.resolve()}: not a regular file (a device, pipe or socket), not a model config." \
        in refusal(job(folder))
    config.unlink()
    assert f"{config.resolve()}: no such model config. Check the path; re-save the model with save_pretrained to " \
        "make one." in refusal(job(folder))
    config.write_text(json.dumps(json.loads((LLAMA / "config.json").read_text())))
    monkeypatch.setattr(planner.pretrained, "CONFIG_JSON", dataclasses.replace(planner.pretrained.CONFIG_JSON,
                                                                                 max_bytes=100))
    assert f"{config.resolve()}: not a model config: {config.stat().st_size} bytes, more than 100; expected " \
        in refusal(job(folder))


def test_a_file_is_not_a_pretrained_folder(tmp_path: Path) -> None:
    file = tmp_path / "passwd"
    file.write_text("root:x:0:0\n")
    assert f"{file.resolve()}: a file, not a folder" in refusal(job(file))


def test_a_unet_config_with_more_levels_than_the_limit_names_its_block_out_channels(tmp_path: Path) -> None:
    """A diffusers UNet of 18 levels was refused as `channel_mults (18 levels)`, a field the user never wrote (after its
    tensors were listed and checked); the line names config.json's block_out_channels, before any tensor is read."""
    from planner.unet_config import WEIGHTS_FILE, config_tensors

    folder = tmp_path / "unet"
    folder.mkdir()
    levels = MAX_LEVELS + 1
    config = {"_class_name": "UNet2DConditionModel", "block_out_channels": [32] * levels, "layers_per_block": 1,
              "down_block_types": ["DownBlock2D"] * levels, "up_block_types": ["UpBlock2D"] * levels,
              "sample_size": 8, "attention_head_dim": 8, "cross_attention_dim": 32, "transformer_layers_per_block": 1}
    (folder / "config.json").write_text(json.dumps(config))
    header = json.dumps({name: {"dtype": "F32", "shape": list(shape), "data_offsets": [0, 0]}
                         for name, shape in config_tensors(config).items()}).encode()
    (folder / WEIGHTS_FILE).write_bytes(len(header).to_bytes(8, "little") + header)  # the tensors match the config
    message = refusal(job(folder) | {"components": {"lm": {"pretrained": str(folder)}}})
    assert f"{folder.resolve() / 'config.json'}: block_out_channels has {levels} levels, more than {MAX_LEVELS}" \
        in message, message
    assert "channel_mults" not in message, message
