"""The alignment recipe's GRPO (loss grpo_rule, left-padded prompts with their mask) on a gloo world equals the same
iteration in one process: the workers decode and read the rollouts with the prompts' pads masked exactly as
runtime.reference does (tests/unit/recipes/test_grpo_prompt_mask.py checks that against transformers)."""

from __future__ import annotations

import pytest
import torch

from orchestrator.recipes import load_recipe
from planner.spec import parse_job
from recipes.alignment import make
from runtime.local_world import run_world
from runtime.reference import ReferenceTrainer

from _equivalence import RTOL, _compare_modules, placed_plan  # tests/integration/_equivalence.py

PROMPT, NEW = 22, 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make.write_model(tmp_path_factory.mktemp("maskworld") / "base", num_hidden_layers=1, hidden_size=32,
                            intermediate_size=64)


@pytest.mark.parametrize("tp", [1, 2])
def test_masked_grpo_rule_split_over_workers_equals_one_process(folder, tmp_path, tp):
    """tp 1: the rollout on worker 0, the policy data parallel on both. tp 2: the pretrained policy decodes at
    tensor_parallel 2 on workers 0-1 (runtime.megatron_pretrained's blocks; RoPE at each row's positions, the left
    padding masked: runtime.tp_decode) and trains on worker 2, which hands each decoder its shard; the same rollouts
    and loss. (Training a pretrained policy tensor-parallel on left-padded rows is not run: megatron's block takes no
    per-row positions or mask.)"""
    job = parse_job({
        "name": "maskworld", "recipe": "alignment",
        "cluster": {"num_nodes": 1, "devices_per_node": 1 + tp, "device": "cpu"},
        "components": {"policy": {"pretrained": str(folder), "tensor_parallel": [1, 2]},
                       "reference": {"pretrained": str(folder), "frozen": True}},
        "tasks": [{"name": "grpo", "batch_size": 4, "loss": "grpo_rule", "components": [
            {"component": "policy", "name": "rollout", "mode": "generate", "seq_len": PROMPT, "new_tokens": NEW,
             "samples": 2, "temperature": 1.0},
            {"component": "reference", "mode": "forward", "seq_len": PROMPT + NEW, "after": ["rollout"]},
            {"component": "policy", "seq_len": PROMPT + NEW, "after": ["rollout"]}]}],
        "training": {"steps": 1, "lr": 1e-2, "precision": "fp32"}})
    if tp == 1:
        plan = placed_plan(job, [[("rollout", [0])], [("reference", [0, 1])], [("policy", [0, 1])]])  # rows in two
    else:
        plan = placed_plan(job, [[("rollout", [0, 1], 2)], [("reference", [2])], [("policy", [2])]])
    load_recipe(job)
    world = run_world(job, plan, 2, tmp_path, setup=load_recipe)  # step 1 decodes with handed-off weights
    reference = ReferenceTrainer(job)
    for step in range(2):
        want = reference.train_step(step)["grpo"]
        got = world.losses[step]["grpo"]
        assert abs(got - want) <= RTOL * max(abs(want), 1e-3), (step, got, want)
    rollout = next(op.id for op in plan.metaops if op.use == "rollout")
    first, rows = world.rollouts[0][rollout]
    assert first == 0 and torch.equal(rows, reference.last_rollouts[rollout])
    assert (rows[:, 0] == 0).all()  # every prompt is left-padded (the tokenizer's <pad> is id 0)
    ref_params = reference.named_parameters()
    for rank, params in world.parameters.items():
        _compare_modules(params, ref_params, f"rank {rank}")
