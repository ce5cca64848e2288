"""Loss sft_kl: GRPO's KL penalty on SFT data (recipes.alignment.losses.SFTKLHead), its checks and its rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from orchestrator.recipes import load_recipe
from planner.spec import parse_job
from recipes.alignment import make
from recipes.alignment.data import generated_pair, job_batch
from runtime.tokenizer import IGNORE_INDEX, encode_completion, labels_key, load_tokenizer

SEQ = 64


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(the policy's folder, the reference's): two tiny Llamas of one vocabulary, different weights."""
    root = tmp_path_factory.mktemp("sft_kl")
    small = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    return make.write_model(root / "policy", seed=1, **small), make.write_model(root / "reference", seed=2, **small)


def sft_kl_job(policy, reference, frozen: bool = True, loss_args: dict | None = None, extra: dict | None = None):
    task = {"name": "sft_kl", "batch_size": 4, "loss": "sft_kl", "components": [
        {"component": "policy", "seq_len": SEQ, "after": []},
        {"component": "reference", "mode": "forward", "seq_len": SEQ, "after": []}]}
    return parse_job({
        "name": "sft-kl", "recipe": "alignment", "cluster": {"num_nodes": 1, "devices_per_node": 1, "device": "cpu"},
        "components": {"policy": {"pretrained": str(policy)},
                       "reference": {"pretrained": str(reference), "frozen": frozen}},
        "tasks": [task | {"loss_args": loss_args or {}} | (extra or {})],
        "training": {"precision": "fp32", "lr": 3e-3, "kernels": "off"},
    })


def lm(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def test_the_penalty_by_hand_top_k_and_full(models):
    """The head on hand-made hidden states: the mean over the learned positions of KL(reference || policy), with
    k = vocabulary the full KL, with k = 3 over the reference's renormalised top 3, each through the models' own
    final norms and LM heads."""
    from runtime.heads import build_head

    policy, reference = (lm(folder) for folder in models)
    vocab = policy.config.vocab_size
    torch.manual_seed(0)
    hidden_p, hidden_r = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[0, 2:4] = 7  # row 0 learns tokens 2 and 3 (predicted at positions 1 and 2)
    labels[1, 1:] = 9  # row 1 learns tokens 1 to 4
    with torch.no_grad():
        logp = policy.lm_head(policy.model.norm(hidden_p)).log_softmax(-1)
        ref = reference.lm_head(reference.model.norm(hidden_r))
    for k in (vocab, 3):
        job = sft_kl_job(*models, loss_args={"topk": k})
        load_recipe(job)
        head = build_head(job, 0)
        assert not list(head.parameters())  # both LM heads frozen, outside the parameters
        batch = job_batch(job, 0, 0, 0, 2, "train")
        batch.targets[labels_key("policy")] = labels
        penalty = head({"policy": hidden_p.clone().requires_grad_(True), "reference": hidden_r}, batch)
        top, index = ref.topk(k, dim=-1)
        q = top.softmax(-1)
        kl = (q * (q.log() - logp.gather(-1, index))).sum(-1)  # (2, 5): position j predicts token j + 1
        if k == vocab:
            torch.testing.assert_close(kl, F.kl_div(logp, ref.log_softmax(-1), log_target=True,
                                                    reduction="none").sum(-1), rtol=1e-5, atol=1e-6)
        expected = torch.stack([kl[0, 1:3].mean(), kl[1, 0:4].mean()])
        torch.testing.assert_close(penalty.detach(), expected, rtol=1e-5, atol=1e-6)


def test_the_rows_are_the_pairs_prompts_and_chosen_answers_through_both_uses(models):
    job = sft_kl_job(*models)
    batch = job_batch(job, 0, 2, 1, 4, "train")
    tokenizer = load_tokenizer(str(models[0]), "policy")
    assert torch.equal(batch.inputs["policy"], batch.inputs["reference"])
    for i, row in enumerate(range(2 * 4 + 1, 2 * 4 + 4)):
        pair = generated_pair(0, "train", row)
        doc = encode_completion(tokenizer, pair["prompt"], pair["chosen"])
        assert batch.inputs["policy"][i, :len(doc.ids)].tolist() == list(doc.ids)
        learned = batch.targets[labels_key("policy")][i]
        assert learned[learned != IGNORE_INDEX].tolist() == [t for t in doc.labels if t != IGNORE_INDEX]


def test_training_on_the_penalty_pulls_the_policy_towards_the_reference(models):
    from runtime.reference import ReferenceTrainer

    job = sft_kl_job(*models)
    load_recipe(job)
    trainer = ReferenceTrainer(job)
    losses = [trainer.train_step(step)["sft_kl"] for step in range(6)]
    assert losses[0] > 0.005 and losses[-1] < 0.85 * losses[0], losses  # random tiny models: near-uniform, close
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    frozen = [p for (name, _), m in trainer.modules.items() if name == "reference" for p in m.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)
    same = sft_kl_job(models[1], models[1])  # the policy is the reference: nothing to penalise
    load_recipe(same)
    assert ReferenceTrainer(same).train_step(0)["sft_kl"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize(("change", "match"), [
    ({"loss_args": {"topk": 0}}, r"tasks\[0\] \('sft_kl'\)\.loss_args\.topk \(0\): .* integer >= 1"),
    ({"loss_args": {"beta": 0.1}}, r"loss_args\.beta: not an option of loss 'sft_kl'; it takes topk .*loss_weight"),
    ({"frozen": False}, r"loss sft_kl needs two uses.*frozen pretrained reference"),
    ({"extra": {"components": [{"component": "policy", "seq_len": SEQ},
                               {"component": "reference", "mode": "forward", "seq_len": SEQ}]}},
     r"loss sft_kl needs two uses, each `after: \[\]`"),
])
def test_loom_run_refuses_a_bad_sft_kl_task_before_any_worker(models, change, match):
    from orchestrator.run_inputs import RunInputError, check_runnable_job

    job = sft_kl_job(*models, **change)
    with pytest.raises(RunInputError, match=match):
        check_runnable_job(job, None)


def test_loom_run_checks_grpo_rule_loss_args_before_any_worker(models):
    from orchestrator.pipeline import read_pipeline
    from orchestrator.run_inputs import RunInputError, check_runnable_job

    job = read_pipeline(make.HERE / "pipeline" / "pipeline-tiny.yaml").phases[6].job
    data = job.model_dump(exclude_unset=True)
    data["tasks"][0]["loss_args"] = {"kl": "k2"}
    with pytest.raises(RunInputError, match=r"tasks\[0\] \('grpo'\)\.loss_args\.kl \('k2'\) is not a KL estimator"):
        check_runnable_job(parse_job(data), None)
