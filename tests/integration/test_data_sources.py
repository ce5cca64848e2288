"""A task trained on its ``data:`` (packed chat rows, assistant-only labels) by 2 gloo workers, under a plan that runs
the llama's first layer data-parallel over both and its second on one, equals single-process training: each rank
reads only its rows of the step's batch (runtime.sources), and the losses, parameters and gradients agree."""

from __future__ import annotations

from pathlib import Path

from planner.spec import parse_job
from _equivalence import check_equivalence, plan_from_waves  # tests/integration/_equivalence.py

ROOT = Path(__file__).resolve().parents[2]


def test_packed_chat_task_trains_the_same_on_two_workers(tmp_path) -> None:
    job = parse_job({
        "name": "chat-dp",
        "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "cpu"},
        "components": {"llm": {"kind": "llama", "num_layers": 2, "hidden_size": 32, "num_heads": 4,
                               "num_kv_heads": 2, "seq_len": 32, "vocab_size": 64}},
        "tasks": [{"name": "sft", "batch_size": 4, "loss": "lm", "components": [{"component": "llm"}],
                   "data": {"format": "chat", "path": str(ROOT / "examples/data/chat.jsonl"),
                            "tokenizer": str(ROOT / "examples/data/tokenizer"), "pack": True}}],
        "training": {"steps": 3, "lr": 0.003, "precision": "fp32", "seed": 5},
    })
    plan = plan_from_waves(job, [[("sft.llm", 1, 2)], [("sft.llm", 1, 1)]])
    world = check_equivalence(job, plan, tmp_path)
    assert world.losses[2]["sft"] < world.losses[0]["sft"]
