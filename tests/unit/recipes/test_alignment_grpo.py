"""recipes.alignment.grpo: GRPO's prompts, the grpo_rm head's trained reward head, the reward_head step."""

from __future__ import annotations

import shutil
from pathlib import Path

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


def test_a_grpo_phase_exports_the_lm_head_its_rollouts_decode_with(model):
    """No next-token task trains the policy's LM head in a GRPO phase: its export takes the GRPO head's (``policy.*``,
    trained, what runtime.rollout decodes with), not the source's; the frozen reference keeps its own."""
    from runtime.export import component_tensors
    from runtime.pretrained import read_tensors

    data = grpo_job(model, model).model_dump(exclude_unset=True)
    data["tasks"][0]["loss"] = "grpo"  # the built-in head: its reward head needs no trained file
    job = parse_job(data)
    head = build_head(job, 0)
    with torch.no_grad():
        head.policy.out.weight.add_(1.0)  # as if trained
        head.policy.norm.weight.mul_(2.0)
    params = {f"head:grpo/0/{name}": p.detach() for name, p in head.named_parameters()}
    source = read_tensors(str(model), ["lm_head.weight", "model.norm.weight"])
    policy = component_tensors(job, "policy", params)
    torch.testing.assert_close(policy["lm_head.weight"], source["lm_head.weight"] + 1.0)
    torch.testing.assert_close(policy["model.norm.weight"], source["model.norm.weight"] * 2.0)
    reference = component_tensors(job, "reference", params)
    assert torch.equal(reference["lm_head.weight"], source["lm_head.weight"])


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
        ("rm_head", "reward_head"), ("grpo", None), ("grpo_eval", "rule_eval")]
    job = pipeline.phases[-2].job
    assert job.tasks[0].loss == "grpo_rule" and job.components["reference"].frozen
    assert job.tasks[0].loss_args == {"lm_head": "frozen"}
    evaluation = pipeline.phases[-1].spec  # GRPO must beat its start, the merged model, near the reference
    assert evaluation.args["baseline"] == evaluation.args["reference"] == "@merge/model/policy"
    gate = evaluation.gate
    assert gate["gain"].min == 0.005 and gate["kl_to_reference"].max == 0.5 and set(gate) == {"gain", "kl_to_reference"}


def test_greedy_answers_in_a_padded_batch_are_the_answers_alone(model):
    from recipes.alignment.generation import greedy, load

    policy, tokenizer = load(model)
    prompts = ["what is 12 plus 7", "name three colours", "hi"]
    batched = greedy(policy, tokenizer, prompts, new_tokens=6)
    assert batched == [greedy(policy, tokenizer, [p], new_tokens=6)[0] for p in prompts]
    assert all(0 < len(tokenizer(a)["input_ids"]) <= 6 for a in batched)


def test_generated_prompts_read_back_as_their_problems():
    from recipes.alignment import tasks

    for split in ("grpo", "heldout"):
        for index in range(40):  # both domains, every format
            p = tasks.problem(0, split, index)
            assert tasks.parse_prompt(p.prompt) == p and tasks.parse_prompt(f"  {p.prompt} ") == p
    for text in ("what is 7 plus ?", "write 5 words about the moon , include the word sea , as a numbered list .",
                 "write 5 words about the sea , include the word sea , in any way .", "hello"):
        assert tasks.parse_prompt(text) is None


def rule_job(policy, rm=None):
    uses = [{"component": "policy", "name": "rollout", "mode": "generate", "seq_len": PROMPT, "new_tokens": NEW,
             "samples": SAMPLES}]
    uses += [{"component": "rm", "name": "reward", "mode": "forward", "seq_len": PROMPT + NEW, "after": ["rollout"]}
             ] if rm else []
    uses += [{"component": "reference", "mode": "forward", "seq_len": PROMPT + NEW, "after": ["rollout"]},
             {"component": "policy", "seq_len": PROMPT + NEW, "after": ["rollout"]}]
    return parse_job({
        "name": "grpo", "recipe": "alignment", "cluster": {"num_nodes": 1, "devices_per_node": 1, "device": "cpu"},
        "components": {"policy": {"pretrained": str(policy)}, "reference": {"pretrained": str(policy), "frozen": True}}
        | ({"rm": {"pretrained": str(rm)}} if rm else {}),
        "tasks": [{"name": "grpo", "batch_size": 8, "loss": "grpo_rule", "components": uses}],
        "training": {"precision": "fp32"}})


def test_grpo_rule_scores_each_rollout_by_the_rule_of_its_decoded_prompt(model, tmp_path):
    from recipes.alignment import tasks

    tokenizer = load_tokenizer(str(model), "model")
    job = rule_job(model)
    head = build_head(job, 0)
    assert isinstance(head, grpo.RuleGRPOHead) and head.roles["reference"] == "reference"
    assert head.roles["reward"] is None and head.reward_out is None and head.reference is not None
    prompts = grpo.prompt_batch(job, 0, 0, 0, 2 * SAMPLES, "train").inputs["rollout"]
    answers = ["sea .", "1 . waves", "waves done", "what is done"]  # too short for any NEW-token answer to pass all
    tokens = torch.full((2 * SAMPLES, PROMPT + NEW), tokenizer.eos_token_id)
    generated = torch.zeros(2 * SAMPLES, NEW, dtype=torch.bool)
    expected = []
    for row in range(2 * SAMPLES):
        p = grpo.problem(0, "train", row // SAMPLES)
        ids = tokenizer(answers[row % 4])["input_ids"] + [tokenizer.eos_token_id]
        tokens[row, :PROMPT], tokens[row, PROMPT:PROMPT + len(ids)] = prompts[row], torch.tensor(ids)
        generated[row, :len(ids)] = True
        tokens[row, PROMPT + len(ids):] = tokenizer("done")["input_ids"][0]  # after eos: not counted
        expected.append(tasks.rule_score(p, answers[row % 4]))
    assert len(set(expected)) > 1
    torch.testing.assert_close(head.rule_scores(tokens, generated), torch.tensor(expected))
    torch.testing.assert_close(head.scores({}, tokens, generated), torch.tensor(expected))
    bad = tokens.clone()
    bad[0, :PROMPT] = torch.tensor(tokenizer("what is 7 plus 5 ?")["input_ids"][:1] * PROMPT)
    assert expected[0] > 0  # an unreadable prompt scores 0 (loom profile times the head on random tokens)
    torch.testing.assert_close(head.rule_scores(bad, generated), torch.tensor([0.0] + expected[1:]))
    rm = tmp_path / "rm"  # with a reward-model leaf: rule + RM_WEIGHT * the trained reward head's score
    shutil.copytree(model, rm)
    head_weights = {"norm.weight": torch.ones(32), "norm.bias": torch.zeros(32),
                    "out.weight": torch.linspace(-1, 1, 32)[None], "out.bias": torch.tensor([0.5])}
    save_file(head_weights, str(rm / grpo.HEAD_FILE))
    mixed = build_head(rule_job(model, rm), 0)
    assert mixed.roles["reward"] == "reward" and not mixed.reward_out.weight.requires_grad
    hidden = torch.randn(2 * SAMPLES, PROMPT + NEW, 32)
    torch.testing.assert_close(mixed.scores({"reward": hidden}, tokens, generated),
                               torch.tensor(expected) + grpo.RM_WEIGHT * mixed.rewards(hidden, generated))


def test_rule_eval_on_a_tiny_model_and_the_eval_steps_arguments(model, tmp_path):
    from recipes.alignment import evaluate, generation, pas, tasks

    metrics = evaluate.rule_eval(model, model, prompts=3, new_tokens=4)
    assert set(metrics) == set(evaluate.RULE_METRICS)
    assert set(STEPS["rule_eval"].metrics) == set(evaluate.RULE_METRICS + evaluate.BASELINE_METRICS)
    assert abs(metrics["kl_to_reference"]) < 1e-6 and 0 <= metrics["rule_score"] <= 1
    policy, tokenizer = generation.load(model)
    problems = [tasks.problem(0, "grpo-heldout", g, "constraints") for g in range(3)]
    answers = generation.greedy(policy, tokenizer, [p.prompt for p in problems], 4)
    assert metrics["rule_score"] == pytest.approx(sum(map(tasks.rule_score, problems, answers)) / 3)
    assert metrics["answer_words"] == pytest.approx(sum(len(a.split()) for a in answers) / 3)
    assert set(STEPS["pas_eval"].metrics) == set(pas.METRICS)
    good = {"pas": "@pas/model/pas", "model": str(model)}
    check_step_args("pas_eval", good, "phases[2].args", tmp_path)
    check_step_args("rule_eval", {"model": "@grpo/model/policy", "split": "train"}, "phases[9].args", tmp_path)
    for step, bad, match in [
            ("pas_eval", good | {"model": "nowhere"}, r"args\.model \('nowhere'\): no such folder"),
            ("pas_eval", {"model": str(model)}, r"args\.pas \(None\): required"),
            ("pas_eval", good | {"prompts": 0}, r"args\.prompts \(0\): expected a whole number in 1\.\.1024"),
            ("rule_eval", {"model": str(model), "split": "test"}, r"args\.split \('test'\): expected heldout or train"),
            ("rule_eval", {"model": str(model), "temperature": 1}, r"args\.temperature: unknown argument"),
            ("rule_eval", {"model": str(model), "baseline": "nowhere"}, r"args\.baseline \('nowhere'\): no such")]:
        with pytest.raises(SpecError, match=match):
            check_step_args(step, bad, "phases[2].args", tmp_path)


def test_rule_eval_step_reports_the_gain_over_its_baseline(model, tmp_path, monkeypatch):
    """Step ``rule_eval`` with ``baseline``: the baseline's rule score on the same prompts (rule_eval of that folder,
    with the step's prompt arguments) and the model's gain over it (what the pipeline's gate reads); without one,
    rule_eval's metrics alone. rule_eval itself is tested above; here it returns a score per folder."""
    from recipes.alignment import evaluate

    shutil.copytree(model, tmp_path / "grpo")
    calls = []

    def scored(folder, reference, *prompts):
        calls.append((Path(folder).name, reference, prompts))
        return {key: 0.0 for key in evaluate.RULE_METRICS} | {"rule_score": {"grpo": 0.5}.get(Path(folder).name, 0.25)}

    monkeypatch.setattr(evaluate, "rule_eval", scored)
    args = {"model": str(tmp_path / "grpo"), "baseline": str(model), "prompts": 6, "new_tokens": 12}
    check_step_args("rule_eval", args, "phases[9].args", tmp_path)
    metrics = STEPS["rule_eval"].run(StepContext("grpo_eval", args, tmp_path / "out" / "grpo_eval"))
    assert set(metrics) == set(STEPS["rule_eval"].metrics)
    assert (metrics["rule_score"], metrics["baseline_rule_score"], metrics["gain"]) == (0.5, 0.25, 0.25)
    assert calls == [("grpo", None, (6, 12, "heldout", 0)), (model.name, None, (6, 12, "heldout", 0))]
    alone = STEPS["rule_eval"].run(StepContext("grpo_eval", {"model": args["model"]}, tmp_path / "out" / "e"))
    assert set(alone) == set(evaluate.RULE_METRICS)


def test_grpo_rule_with_a_frozen_lm_head_trains_the_layers_alone(model, monkeypatch):
    """``loss_args: {lm_head: frozen}``: one GRPO step moves the policy's layers and leaves its final norm and LM head
    (the GRPO head's ``policy.*``) as loaded, which the export then writes; the default trains them; a bad value and
    the built-in options are checked as runtime.grpo checks its own. (The tiny random model's answers all score 0 by
    the rule, so each row is rewarded by its index here: every group has advantages.)"""
    from runtime.heads import check_recipe_loss
    from runtime.reference import ReferenceTrainer

    data = rule_job(model).model_dump(exclude_unset=True)
    data["tasks"][0]["loss_args"] = {"lm_head": "frozen", "beta": 0.1}
    job = parse_job(data)
    head = build_head(job, 0)
    assert head.lm_head == "frozen" and head.beta == 0.1
    assert not any(p.requires_grad for p in head.policy.parameters()) and head.kernel_weights() == []
    monkeypatch.setattr(grpo.RuleGRPOHead, "scores", lambda self, outputs, tokens, generated: torch.arange(
        tokens.shape[0], dtype=torch.float32))
    moved = {}
    for frozen in (True, False):
        trainer = ReferenceTrainer(job if frozen else rule_job(model))
        before = {k: v.clone() for k, v in trainer.named_parameters().items()}
        trainer.train_step(0)
        after = trainer.named_parameters()
        moved[frozen] = {k for k in before if not torch.equal(before[k], after[k])}
    heads = {k for k in moved[False] if k.startswith("head:grpo/0/policy.")}
    assert heads and not heads & moved[True]  # the default trains the head; frozen keeps it
    layers = {k for k in moved[False] if k.startswith("policy/")}
    assert layers and {k for k in moved[True] if k.startswith("policy/")} == layers  # the layers train either way
    for args, message in (({"lm_head": "fixed"}, "lm_head ('fixed'): expected trained"),
                          ({"lm_head": "frozen", "kl": "k2"}, "kl ('k2') is not a KL estimator"),
                          ({"lm_head": "frozen", "topk": 5}, "is read only with kl: topk")):
        data["tasks"][0]["loss_args"] = args
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            check_recipe_loss(parse_job(data), 0)
