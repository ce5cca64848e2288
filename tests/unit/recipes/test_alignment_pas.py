"""recipes.alignment.pas and pas_data: what each of step pas_eval's metrics scores (its arguments and rule_eval's:
test_alignment_grpo.py), PAS's rules for a complement, step pas_data on a tiny model, and pipeline/pas-tiny.yaml."""

from __future__ import annotations

import json
import random

import pytest

from orchestrator.recipes import import_recipe
from orchestrator.steps import STEPS, StepContext, check_step_args
from planner.errors import SpecError
from recipes.alignment import generation, make, pas, pas_data, pas_scenes, tasks

import_recipe("alignment")  # its phase steps, as loom registers them for a job naming the recipe


def test_pas_eval_scores_each_way_on_its_own_prompts(monkeypatch):
    """With stand-in models: the answer model answers correctly only when the generator's complement follows the
    prompt; the PAS model gets the complement right on even problems. Each metric counts what it says."""
    problems = [pas_scenes.problem(0, pas.SPLIT, i) for i in range(9)]
    by_prompt = {p.prompt: p for p in problems}

    def complements(model, tokenizer, prompts, batch_size=16):
        return [pas_scenes.complement(by_prompt[p]) if i % 2 == 0 else "the user wants a text ."
                for i, p in enumerate(prompts)]

    def greedy(model, tokenizer, prompts, new_tokens, batch_size=16):
        out = []
        for text in prompts:
            p = next(q for q in problems if text.startswith(q.prompt))
            right = text == f"{p.prompt} {pas_scenes.complement(p)}"
            out.append(tasks.answer(p, random.Random(0)) if right else "")
        return out

    monkeypatch.setattr(pas, "complements", complements)
    monkeypatch.setattr(generation, "greedy", greedy)
    monkeypatch.setattr(generation, "load", lambda folder: (None, None))
    metrics, rows = pas.measure("pas", "model", prompts=9)
    assert set(metrics) == set(pas.METRICS)
    assert metrics["rule_score"] == 0 and metrics["rule_score_oracle"] == 1 and metrics["rule_score_pas"] == 5 / 9
    assert metrics["complement_exact"] == 5 / 9 and metrics["pas_gain"] == 5 / 9
    kinds = [pas_scenes.kind(p) for p in problems]
    assert kinds == list(pas_scenes.KINDS) * 3
    for kind in pas_scenes.KINDS:
        right = [i % 2 == 0 for i, k in enumerate(kinds) if k == kind]
        assert metrics[f"rule_score_pas_{kind}"] == sum(right) / len(right)
    assert metrics["pas_gain_scene"] == metrics["rule_score_pas_scene"] == 2 / 3
    assert rows[0]["prompt"] == problems[0].prompt and rows[0]["complement"] == rows[0]["oracle"]


def test_pas_rules_pass_the_generators_complements_and_catch_answers():
    for index in range(40):
        p = pas_scenes.problem(0, pas.SPLIT, index)
        assert pas.complement_rules(p, pas_scenes.complement(p)) == {"length": True, "no_answer": True}
        right = tasks.answer(p, random.Random(index))
        padded = f"{pas_scenes.complement(p)} {right}"  # long enough, but it answers
        leaks = p.domain == "constraints" or str(abs(p.answer)) not in pas.NUMBER.findall(p.prompt)
        assert pas.complement_rules(p, padded)["no_answer"] is not leaks, padded  # a result equal to an operand hides
        assert pas.complement_rules(p, "the user wants a text .")["length"] is False
        assert pas.complement_rules(p, " ".join(["word"] * 46))["length"] is False
    arithmetic = tasks.problem(0, pas.SPLIT, 0, "arithmetic")  # its operands may be restated, nothing else
    a, b = (int(n) for n in pas.NUMBER.findall(arithmetic.prompt))
    assert pas.complement_rules(arithmetic, f"restate {a} and {b} , then answer")["no_answer"]


def test_scene_prompts_leave_length_and_format_to_the_scene_and_the_complement_states_them(tmp_path):
    """A scene prompt names no length or format; its complement states the scene's, the rule checks those, and an
    answer that follows the complement passes. Every word of every kind, prompt and complement, is in PAS's tokenizer;
    data/pas/ (pairs and tokenizer) is as a fresh generation writes it."""
    from transformers import AutoTokenizer

    shipped = make.HERE / "data" / "pas"
    for path in [*pas_scenes.write_data(tmp_path), *pas_scenes.write_tokenizer(tmp_path / "tokenizer").iterdir()]:
        assert (shipped / path.relative_to(tmp_path)).read_text() == path.read_text(), (
            f"{path.relative_to(tmp_path)} is stale: run python -m recipes.alignment.pas_scenes")
    recipe = AutoTokenizer.from_pretrained(make.HERE / "data" / "tokenizer").get_vocab()
    vocab = AutoTokenizer.from_pretrained(shipped / "tokenizer").get_vocab()
    assert set(recipe) < set(vocab)
    scenes = set()
    for index in range(45):
        p = pas_scenes.problem(3, "pas-train", index)
        assert pas_scenes.parse_prompt(f" {p.prompt}  ") == p and pas_scenes.kind(p) == pas_scenes.KINDS[index % 3]
        complement = pas_scenes.complement(p)
        assert all(w in vocab for w in tasks.WORD.findall(f"{p.prompt} {complement}")), p.prompt
        if pas_scenes.kind(p) != "scene":
            continue
        scene = p.extra["scene"]
        scenes.add(scene)
        assert (p.form, p.words) == pas_scenes.SCENES[scene]
        assert not any(w.isdigit() for w in p.prompt.split()) and not any(
            phrase in p.prompt for phrase in tasks.FORMAT_WORDS.values())
        assert f"exactly {p.words} counted words" in complement and pas_scenes.FORMS[p.form] in complement
        assert tasks.rule_score(p, tasks.answer(p, random.Random(index))) == 1
        assert pas.complement_rules(p, complement) == {"length": True, "no_answer": True}
    assert scenes == set(pas_scenes.SCENES)
    assert pas_scenes.parse_prompt("write about the sea for a poem , include the word fish .") is None


def test_pas_data_augments_a_seeded_share_of_the_prompts():
    rows = [tasks.pair(0, "train", i) for i in range(20)]
    made = []

    def complement_of(prompts):
        made.append(prompts)
        return [pas_scenes.complement(tasks.parse_prompt(t)) if i % 2 else "short" for i, t in enumerate(prompts)]

    out, metrics = pas_data.augment(rows, complement_of, 0.5, seed=3)
    changed = [i for i, (old, new) in enumerate(zip(rows, out)) if old != new]
    assert len(changed) == 10 and metrics == {"augmented": 10.0, "complement_valid": 0.5}
    assert made == [[rows[i]["prompt"] for i in changed]]  # one call, the chosen prompts in order
    for i in changed:
        assert out[i]["prompt"] == f"{rows[i]['prompt']} {out[i]['pas_complement']}"
        assert {k: v for k, v in out[i].items() if k not in ("prompt", "pas_complement")} == {
            k: v for k, v in rows[i].items() if k != "prompt"}
    again, _ = pas_data.augment(rows, complement_of, 0.5, seed=3)
    other, _ = pas_data.augment(rows, complement_of, 0.5, seed=4)
    assert again == out and other != out
    assert pas_data.augment(rows, complement_of, 0, seed=3) == (rows, {"augmented": 0.0})


def test_pas_data_step_on_a_tiny_model_its_arguments_and_the_pipeline(tmp_path, monkeypatch):
    from orchestrator.pipeline import read_pipeline

    made = []
    real = pas.complements
    monkeypatch.setattr(pas, "complements", lambda *a, **k: made.append((a[2], real(*a, **k))) or made[-1][1])

    model = make.write_model(tmp_path / "pas", num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    source = tmp_path / "preference.jsonl"
    rows = [tasks.pair(0, "train", i) for i in range(6)]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = {"pas": str(model), "source": str(source), "share": 0.5, "seed": 1}
    check_step_args("pas_data", args, "phases[1].args", tmp_path)
    metrics = STEPS["pas_data"].run(StepContext("pas_data", args, tmp_path / "out" / "pas_data"))
    assert set(metrics) == set(STEPS["pas_data"].metrics) == set(pas_data.METRICS) and metrics["augmented"] == 3
    written = [json.loads(line) for line in (tmp_path / "out/pas_data/data" / pas_data.FILE).read_text().splitlines()]
    augmented = [(old, new) for old, new in zip(rows, written) if old != new]
    assert made == [([old["prompt"] for old, _ in augmented], [new["pas_complement"] for _, new in augmented])]
    assert all(new["prompt"] == f"{old['prompt']} {new['pas_complement']}" for old, new in augmented)
    for bad, match in [({"share": 1.5}, r"args\.share \(1\.5\): expected the fraction"),
                       ({"source": "nowhere.jsonl"}, r"args\.source \('nowhere\.jsonl'\): required, a preference"),
                       ({"pas": None}, r"args\.pas \(None\): required"),
                       ({"prompts": 4}, r"args\.prompts: unknown argument of step 'pas_data'")]:
        with pytest.raises(SpecError, match=match):
            check_step_args("pas_data", args | bad, "phases[1].args", tmp_path)
    pipeline = read_pipeline(make.HERE / "pipeline" / "pas-tiny.yaml")
    assert [(p.name, p.spec.step) for p in pipeline.phases] == [
        ("pas", None), ("pas_data", "pas_data"), ("sft", None), ("pas_eval", "pas_eval")]
    assert set(pipeline.phases[-1].spec.gate) == {"pas_gain", "rule_score_pas"}
