"""recipes.alignment: the generator (rule rewards, pairs, PAS), the shipped files, the reward model's dataset."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from orchestrator.recipes import RECIPES
from planner.data_spec import DataSpec
from planner.spec import parse_job
from recipes.alignment import make, tasks
from recipes.alignment.data import generated_pair, job_batch
from recipes.alignment.losses import last_key
from runtime.source_files import load_records
from runtime.tokenizer import load_tokenizer

DATA = Path(make.__file__).resolve().parent / "data"


def test_correct_answers_score_one_and_rejected_answers_score_less():
    for index in range(300):
        p = tasks.problem(0, "t", index)
        rng = random.Random(index)
        assert tasks.rule_score(p, tasks.answer(p, rng)) == 1.0, p
        for failure in tasks.REJECTIONS[p.domain]:
            score = tasks.rule_score(p, tasks.answer(p, rng, failure))
            assert 0.0 <= score < 1.0, (p, failure)
            check = {"wrong": "exact", "refuse": "exact"}.get(failure, failure)
            assert not tasks.checks(p, tasks.answer(p, rng, failure))[check], (p, failure)


def test_rule_score_by_hand():
    p = tasks.Problem("arithmetic", "what is 3 minus 8 ?", answer=-5)
    assert tasks.rule_score(p, "the answer is minus 5 .") == 1.0
    assert tasks.rule_score(p, "the answer is minus 3 .") == pytest.approx(0.25 / 3)
    assert tasks.rule_score(p, "i am not sure .") == 0.0
    q = tasks.Problem("constraints", "", words=3, keyword="snow", form="list", topic="winter")
    assert tasks.rule_score(q, "1 . snow 2 . ice 3 . cold") == 1.0
    assert tasks.rule_score(q, "snow ice cold .") == pytest.approx(2 / 3)  # not a list
    assert tasks.rule_score(q, "1 . ice 2 . cold") == pytest.approx(1 / 3)  # too short, no keyword
    r = tasks.Problem("constraints", "", words=2, keyword="ice", form="done", topic="winter")
    assert tasks.checks(r, "ice cold done") == {"length": True, "keyword": True, "format": True}


def test_domains_have_different_length_distributions():
    words = {domain: [] for domain in tasks.DOMAINS}
    for index in range(200):
        row = tasks.chat(0, "t", index)
        words[row["domain"]].append(sum(len(m["content"].split()) for m in row["messages"]))
    short, long = (sum(v) / len(v) for v in (words["arithmetic"], words["constraints"]))
    assert long > 2.5 * short and max(words["arithmetic"]) < min(words["constraints"])


def test_pairs_are_deterministic_and_scored_in_four_of_five():
    rows = [generated_pair(0, "train", i) for i in range(50)]
    assert rows == [generated_pair(0, "train", i) for i in range(50)]
    assert generated_pair(0, "train", 3) == generated_pair(0, "train", 3 + 2048)  # the training pool cycles
    assert generated_pair(0, "heldout", 3) != generated_pair(0, "train", 3)
    scored = [r for r in rows if "score_chosen" in r]
    assert len(scored) == 40
    assert all(r["score_chosen"] == 1.0 > r["score_rejected"] >= 0.0 for r in scored)


def test_pas_complements_carry_the_constraints_never_the_answer():
    for index in range(100):
        p = tasks.problem(0, "pas", index)
        complement = tasks.pas_complement(p)
        assert 20 <= len(complement.split()) <= 45  # about 30 words
        if p.domain == "arithmetic":
            assert not any(w.lstrip("-").isdigit() for w in complement.split())  # no number at all, so no answer
        else:
            assert p.keyword in complement.split() and str(p.words) in complement.split()
            assert tasks.answer(p, random.Random(index)) not in complement


def test_shipped_files_are_what_the_generator_writes_and_the_runtime_reads(tmp_path):
    written = make.write_data(tmp_path)
    for path in written:
        shipped = DATA / path.relative_to(tmp_path)
        assert shipped.read_text() == path.read_text(), f"{shipped} is stale: run python -m recipes.alignment.make"
        fmt = "preference" if path.name.startswith("preference") else "chat"
        assert len(load_records(DataSpec(format=fmt, path=str(path)), 0, None, False).rows) > 0
    tokenizer = load_tokenizer(str(DATA / "tokenizer"), "tokenizer")
    for path in written:
        for line in path.read_text().splitlines()[:100]:
            row = json.loads(line)
            texts = [m["content"] for m in row["messages"]] if "messages" in row else [row["prompt"], row["chosen"],
                                                                                       row["rejected"]]
            for text in texts:
                assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"], text


def reward_job(tmp_path: Path, data_dir: str | None = None):
    model = make.write_model(tmp_path / "base", num_hidden_layers=1)
    return parse_job({
        "name": "rm", "recipe": "alignment", "data_dir": data_dir,
        "cluster": {"num_nodes": 1, "devices_per_node": 1, "device": "cpu"},
        "components": {"rm": {"pretrained": str(model)}},
        "tasks": [{"name": "reward", "batch_size": 6, "loss": "reward_bt", "components": [
            {"component": "rm", "name": "chosen", "seq_len": 96, "after": []},
            {"component": "rm", "name": "rejected", "seq_len": 96, "after": []}]}],
        "training": {"precision": "fp32"},
    })


def test_reward_batch_puts_both_answers_through_the_model_and_shards_exactly(tmp_path):
    assert RECIPES["alignment"] == "recipes.alignment"
    job = reward_job(tmp_path)
    whole = job_batch(job, 0, 2, 0, 6, "train")
    halves = [job_batch(job, 0, 2, a, b, "train") for a, b in ((0, 4), (4, 6))]
    for key in ("chosen", "rejected"):
        torch.testing.assert_close(whole.inputs[key], torch.cat([h.inputs[key] for h in halves]))
    tokenizer = load_tokenizer(job.components["rm"].pretrained, "rm")
    rows = [generated_pair(0, "train", 12 + i) for i in range(6)]
    for i, row in enumerate(rows):
        for side in ("chosen", "rejected"):
            last = int(whole.targets[last_key(side)][i])
            ids = whole.inputs[side][i, : last + 1].tolist()
            assert ids[-1] == tokenizer.eos_token_id
            assert tokenizer.decode(ids[:-1]) == f"{row['prompt']} {row[side]}"
        scores = whole.targets["score_chosen"][i].item(), whole.targets["score_rejected"][i].item()
        assert (math.isnan(scores[0]) and math.isnan(scores[1])) if "score_chosen" not in row else \
            scores == pytest.approx((row["score_chosen"], row["score_rejected"]))


def test_reward_batch_reads_a_data_dir_of_preference_files(tmp_path):
    rows = [{"prompt": "what is 1 plus 1 ?", "chosen": "the answer is 2 .", "rejected": "i am not sure .",
             "score_chosen": 1.0, "score_rejected": 0.0}] * 3
    (tmp_path / "data" / "heldout").mkdir(parents=True)
    (tmp_path / "data" / "heldout" / "preference.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = reward_job(tmp_path, str(tmp_path / "data"))
    batch = job_batch(job, 0, 0, 0, 4, "heldout")  # 4 rows cycle over the file's 3 lines
    assert batch.inputs["chosen"].shape == (4, 96) and torch.equal(batch.inputs["chosen"][0], batch.inputs["chosen"][3])
    assert batch.targets["score_rejected"].tolist() == [0.0] * 4


def dpo_job(tmp_path: Path, frozen: bool = True):
    model = str(make.write_model(tmp_path / "base", num_hidden_layers=1))
    uses = [{"component": comp, "name": name, "seq_len": 96, "after": []}
            for comp, name in (("policy", "pc"), ("policy", "pr"), ("reference", "rc"), ("reference", "rr"))]
    return parse_job({
        "name": "dpo", "recipe": "alignment", "cluster": {"num_nodes": 1, "devices_per_node": 1, "device": "cpu"},
        "components": {"policy": {"pretrained": model}, "reference": {"pretrained": model, "frozen": frozen}},
        "tasks": [{"name": "dpo", "batch_size": 4, "loss": "dpo", "components": uses}],
        "training": {"precision": "fp32", "lr": 1e-3},
    })


def test_dpo_starts_at_log_two_and_trains_the_policy_only(tmp_path):
    from orchestrator.recipes import load_recipe
    from runtime.reference import ReferenceTrainer
    from transformers import AutoModelForCausalLM

    job = dpo_job(tmp_path)
    load_recipe(job)
    trainer = ReferenceTrainer(job)
    head = trainer.head(0)
    lm = AutoModelForCausalLM.from_pretrained(job.components["policy"].pretrained)
    torch.testing.assert_close(head.out.weight, lm.lm_head.weight)  # the policy's pretrained LM head, trained here
    assert sorted(n for n, _ in head.named_parameters()) == ["norm.weight", "out.weight"]  # the reference's: none
    losses = trainer.train_step(0)
    assert losses["dpo"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference: margin 0 on every pair
    batch = job_batch(job, 0, 0, 0, 4, "train")
    with torch.no_grad():
        pc, pr, rc, rr = head.logprobs(trainer.forward(0, batch), batch)
    assert not torch.equal(pc, rc)  # one step later the policy has moved, the reference has not
    torch.testing.assert_close(head.reference[0].out.weight, lm.lm_head.weight)
    frozen = [p for (name, _), m in trainer.modules.items() if name == "reference" for p in m.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)


def test_dpo_refuses_a_reference_that_is_not_frozen(tmp_path):
    from orchestrator.recipes import load_recipe
    from runtime.heads import build_head

    job = dpo_job(tmp_path, frozen=False)
    load_recipe(job)
    with pytest.raises(ValueError, match=r"loss dpo needs four leaf uses.*frozen"):
        build_head(job, 0)


def test_reward_bt_refuses_a_task_without_two_leaves_of_one_model(tmp_path):
    from orchestrator.recipes import load_recipe
    from runtime.heads import build_head

    job = reward_job(tmp_path)
    data = job.model_dump(exclude_unset=True)
    data["tasks"][0]["components"][1].pop("after")  # rejected now reads chosen: one leaf
    bad = parse_job(data)
    load_recipe(bad)
    with pytest.raises(ValueError, match=r"loss reward_bt needs two leaf uses of one reward model.*\['rejected'\]"):
        build_head(bad, 0)
