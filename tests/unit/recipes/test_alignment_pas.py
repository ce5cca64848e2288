"""recipes.alignment.pas: what each of step pas_eval's metrics scores (the rule_eval step and both steps' arguments:
test_alignment_grpo.py, which has a tiny model)."""

from __future__ import annotations

import random

from recipes.alignment import generation, pas, tasks


def test_pas_eval_scores_each_way_on_its_own_prompts(monkeypatch):
    """With stand-in models: the answer model answers correctly only when the generator's complement follows the
    prompt; the PAS model gets the complement right on even problems. Each metric counts what it says."""
    problems = [tasks.problem(0, pas.SPLIT, i) for i in range(8)]
    by_prompt = {p.prompt: p for p in problems}

    def complements(model, tokenizer, prompts):
        return [tasks.pas_complement(by_prompt[p]) if i % 2 == 0 else "the user wants a text ."
                for i, p in enumerate(prompts)]

    def greedy(model, tokenizer, prompts, new_tokens):
        out = []
        for text in prompts:
            p = next(q for q in problems if text.startswith(q.prompt))
            right = text == f"{p.prompt} {tasks.pas_complement(p)}"
            out.append(tasks.answer(p, random.Random(0)) if right else "")
        return out

    monkeypatch.setattr(pas, "complements", complements)
    monkeypatch.setattr(generation, "greedy", greedy)
    monkeypatch.setattr(generation, "load", lambda folder: (None, None))
    metrics, rows = pas.measure("pas", "model", prompts=8)
    assert set(metrics) == set(pas.METRICS)
    assert metrics["rule_score"] == 0 and metrics["rule_score_oracle"] == 1 and metrics["rule_score_pas"] == 0.5
    assert metrics["complement_exact"] == 0.5
    domains = [p.domain for p in problems]
    for domain in tasks.DOMAINS:
        right = [i % 2 == 0 for i, d in enumerate(domains) if d == domain]
        assert metrics[f"rule_score_pas_{domain}"] == sum(right) / len(right)
    assert rows[0]["prompt"] == problems[0].prompt and rows[0]["complement"] == rows[0]["oracle"]
