"""recipes.alignment.grpo: GRPO's prompts, the grpo_rm head's trained reward head, the reward_head step."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import recipes.alignment as recipe  # registers grpo_rm
from orchestrator.recipes import import_recipe
from orchestrator.steps import STEPS, StepContext, check_step_args
from planner.errors import SpecError
from planner.spec import parse_job
from recipes.alignment import grpo, make
from runtime.heads import build_head
from runtime.reference import MODEL_FILE
from runtime.tokenizer import load_tokenizer

import_recipe("alignment")  # its phase steps (PHASE_STEPS), as loom registers them for a job naming the recipe

PROMPT, NEW, SAMPLES = 20, 6, 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make.write_model(tmp_path_factory.mktemp("grpo") / "base", num_hidden_layers=1, hidden_size=32,
                            intermediate_size=64)


def grpo_job(policy, rm, prompt: int = PROMPT):
    return parse_job({
        "name": "grpo", "recipe": "alignment", "cluster": {"num_nodes": 1, "devices_per_node": 1, "device": "cpu"},
        "components": {"policy": {"pretrained": str(policy)}, "reference": {"pretrained": str(policy), "frozen": True},
                       "rm": {"pretrained": str(rm)}},
        "tasks": [{"name": "grpo", "batch_size": 8, "loss": "grpo_rm", "components": [
            {"component": "policy", "name": "rollout", "mode": "generate", "seq_len": prompt, "new_tokens": NEW,
             "samples": SAMPLES},
            {"component": "rm", "name": "reward", "mode": "forward", "seq_len": prompt + NEW, "after": ["rollout"]},
            {"component": "reference", "mode": "forward", "seq_len": prompt + NEW, "after": ["rollout"]},
            {"component": "policy", "seq_len": prompt + NEW, "after": ["rollout"]}]}],
        "training": {"precision": "fp32"},
    })


def test_prompts_are_left_padded_one_per_group_and_shard_exactly(model):
    job = grpo_job(model, model)
    tokenizer = load_tokenizer(str(model), "model")
    whole = grpo.prompt_batch(job, 0, 3, 0, 8, "train").inputs["rollout"]
    assert whole.shape == (8, PROMPT)
    for row in range(8):
        p = grpo.problem(0, "train", (3 * 8 + row) // SAMPLES)
        ids = tokenizer(p.prompt)["input_ids"]
        assert p.domain == grpo.DOMAIN and whole[row, PROMPT - len(ids):].tolist() == ids
        assert (whole[row, :PROMPT - len(ids)] == tokenizer.pad_token_id).all()
    assert torch.equal(whole[0], whole[3]) and not torch.equal(whole[3], whole[4])  # groups of 4 share a prompt
    torch.testing.assert_close(grpo.prompt_batch(job, 0, 3, 2, 6, "train").inputs["rollout"], whole[2:6])
    assert not torch.equal(grpo.prompt_batch(job, 0, 3, 0, 8, "heldout").inputs["rollout"], whole)
    short = grpo_job(model, model, prompt=8)
    with pytest.raises(ValueError, match=r"tasks\[0\]\.components\[0\]\.seq_len \(8\): a constraints prompt has"):
        grpo.prompt_batch(short, 0, 0, 0, 8, "train")
    assert recipe.data.job_batch(job, 0, 3, 0, 8, "train").inputs["rollout"].equal(whole)  # the recipe's dataset


def test_grpo_rm_scores_with_the_trained_reward_head(model, tmp_path):
    rm = tmp_path / "rm"
    shutil.copytree(model, rm)
    trained = {"norm.weight": torch.linspace(0.5, 1.5, 32), "norm.bias": torch.linspace(-1, 1, 32),
               "out.weight": torch.linspace(-2, 2, 32)[None], "out.bias": torch.tensor([0.25])}
    save_file(trained, str(rm / grpo.HEAD_FILE))
    head = build_head(grpo_job(model, rm), 0)
    assert isinstance(head, grpo.RewardModelGRPOHead)
    for module, prefix in ((head.reward_norm, "norm"), (head.reward_out, "out")):
        for key, param in module.named_parameters():
            torch.testing.assert_close(param.detach(), trained[f"{prefix}.{key}"])
            assert not param.requires_grad
    assert head.policy.out.weight.requires_grad and head.reference is not None  # the built-in grpo head's LM heads
    hidden = torch.randn(2, PROMPT + NEW, 32)
    generated = torch.tensor([[True] * NEW, [True, True] + [False] * (NEW - 2)])
    last = hidden[[0, 1], [PROMPT + NEW - 1, PROMPT + 1]]
    expected = torch.nn.functional.layer_norm(last, (32,), trained["norm.weight"], trained["norm.bias"], 1e-5)
    torch.testing.assert_close(head.rewards(hidden, generated), expected @ trained["out.weight"][0] + 0.25)
    with pytest.raises(ValueError, match=r"components\.rm\.pretrained .*no reward_head\.safetensors"):
        build_head(grpo_job(model, model), 0)


def test_the_reward_head_step_writes_the_phase_heads_beside_its_export(model, tmp_path):
    export = tmp_path / "out" / "rm" / "export" / "rm"
    shutil.copytree(model, export)
    head = {"norm.weight": torch.ones(32), "norm.bias": torch.zeros(32), "out.weight": torch.full((1, 32), 0.5),
            "out.bias": torch.tensor([1.0])}
    torch.save({"parameters": {f"head:reward/0/{k}": v for k, v in head.items()} | {"rm/0/x": torch.zeros(2)}},
               tmp_path / "out" / "rm" / MODEL_FILE)
    args = {"component": "rm", "model": "@rm/model", "task": "reward"}
    check_step_args("reward_head", args, "phases[4].args", tmp_path)
    STEPS["reward_head"].run(StepContext("rm_head", args | {"model": str(export)}, tmp_path / "out" / "rm_head"))
    target = tmp_path / "out" / "rm_head" / "export" / "rm"
    written = load_file(str(target / grpo.HEAD_FILE))
    assert sorted(written) == sorted(head) and all(torch.equal(written[k], v) for k, v in head.items())
    assert (target / "config.json").read_text() == (model / "config.json").read_text()
    with pytest.raises(SpecError, match=r"rm_head: step 'reward_head': .* holds no reward_bt head of task 'dpo'"):
        STEPS["reward_head"].run(StepContext("rm_head", args | {"model": str(export), "task": "dpo"},
                                             tmp_path / "out" / "rm_head"))
    for bad, match in [({"model": "models/rm"}, r"args\.model \('models/rm'\): expected a reference"),
                       ({"task": None}, r"args\.task \(None\): required"),
                       ({"seed": 1}, r"args\.seed: unknown argument of step 'reward_head'")]:
        with pytest.raises(SpecError, match=match):
            check_step_args("reward_head", args | bad, "phases[4].args", tmp_path)


def test_the_pipeline_is_checked_whole():
    from orchestrator.pipeline import read_pipeline

    pipeline = read_pipeline(make.HERE / "pipeline" / "pipeline-tiny.yaml")
    assert [(p.name, p.spec.step) for p in pipeline.phases] == [
        ("sft", None), ("sft_arithmetic", None), ("sft_constraints", None), ("merge", "merge"), ("rm", None),
        ("rm_head", "reward_head"), ("grpo", None)]
    job = pipeline.phases[-1].job
    assert job.tasks[0].loss == "grpo_rm" and job.components["reference"].frozen


def test_greedy_answers_in_a_padded_batch_are_the_answers_alone(model):
    from recipes.alignment.generation import greedy, load

    policy, tokenizer = load(model)
    prompts = ["what is 12 plus 7", "name three colours", "hi"]
    batched = greedy(policy, tokenizer, prompts, new_tokens=6)
    assert batched == [greedy(policy, tokenizer, [p], new_tokens=6)[0] for p in prompts]
    assert all(0 < len(tokenizer(a)["input_ids"]) <= 6 for a in batched)
