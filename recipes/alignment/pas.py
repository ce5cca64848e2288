"""PAS, Baichuan Alignment's prompt augmentation (arXiv 2410.14940, §2.1), measured: does appending a trained PAS
model's complement to a prompt raise the rule score of the SFT model's answers?

The PAS model is a trained phase of its own (``pipeline/pas-tiny.yaml``, phase ``pas``: loss ``lm`` on
``data/pas/train/pas.jsonl``, chat conversations prompt -> complement, recipes.alignment.pas_scenes.complement). Step
``pas_eval`` (:func:`pas_eval_step`) then scores the answer model on held-out prompts of three kinds
(recipes.alignment.pas_scenes: arithmetic, explicit constraints, and scene prompts that leave length and format to
the scene; the ``pas-heldout`` stream, ``data/pas/heldout/pas.jsonl``'s prompts, never trained on), greedily, three
ways:

- ``rule_score``: the prompt alone;
- ``rule_score_pas``: the prompt, a space, and the PAS model's greedy complement (its chat template's answer, up to
  the end-of-turn marker);
- ``rule_score_oracle``: the prompt and the generator's own complement (pas_scenes.complement: what a perfect PAS
  model would append);

each also per kind (``rule_score_pas_arithmetic``, ``rule_score_pas_scene``, ...); ``pas_gain``:
``rule_score_pas - rule_score`` (what PAS adds, or takes away, on these prompts: a gate's ``min``), and
``pas_gain_scene``, the same on scene prompts; ``complement_exact``: the fraction of the PAS model's complements
equal to the generator's (word for word); ``complement_valid``: the fraction that obey PAS's rules
(:func:`complement_rules`: about 30 words, never the answer). The step writes nothing; its metrics go to
``OUT/<phase>/metrics.json`` (docs/job-spec.md, Evaluation steps and gates). The answer model should have seen
augmented prompts in training (recipes.alignment.pas_data); one that never did stops at once after a complement.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from recipes.alignment import pas_scenes, tasks

SPLIT = "pas-heldout"  # the generator stream of data/heldout/pas.jsonl (recipes.alignment.make)
WAYS = ("rule_score", "rule_score_pas", "rule_score_oracle")
METRICS = (*WAYS, *(f"{w}_{k}" for w in WAYS for k in pas_scenes.KINDS), "pas_gain", "pas_gain_scene",
           "complement_exact", "complement_valid")
MIN_WORDS, MAX_WORDS = 20, 45  # "about 30 words" (the generator's complements: 26-36)
NUMBER = re.compile(r"\d+")
BATCH = 96  # prompts decoded together: fewer, larger forward passes (the driver shares a loaded CPU)
STEP_ARGS = ("pas", "model", "prompts", "new_tokens", "seed")


def check_pas_eval_args(args: dict[str, Any], base: Path | None) -> None:
    """``pas`` and ``model`` (references ``@<phase>/model[/component]`` or folders), optional ``prompts`` (1..1024,
    default 96), ``new_tokens`` (1..256, default 48), ``seed`` (default 0); torch-free, a ValueError naming the
    argument."""
    from planner.pipeline import check_known_args, check_model_arg, check_whole_args

    check_known_args(args, STEP_ARGS, "pas_eval")
    for key, what in (("pas", "the trained PAS model"), ("model", "the model whose answers are scored")):
        check_model_arg(key, args.get(key), base, what)
    check_whole_args(args, (("prompts", 1, 1024), ("new_tokens", 1, 256), ("seed", 0, 2**31 - 1)))


def complement_rules(p: tasks.Problem, complement: str) -> dict[str, bool]:
    """PAS's rules for a complement of ``p``'s prompt: ``length``, :data:`MIN_WORDS`..:data:`MAX_WORDS` words (the
    report's "about 30"); ``no_answer``, it does not answer: arithmetic, no number in it but the prompt's operands (so
    no result is stated); constraints, no run of its words that ends where a clause ends (at ``;`` or the end) passes
    the rule as an answer."""
    words = complement.split()
    if p.domain == "arithmetic":
        operands = set(NUMBER.findall(p.prompt))
        no_answer = all(n in operands for n in NUMBER.findall(complement))
    else:
        ends = [i for i, w in enumerate(words) if w == ";"] + [len(words)]
        no_answer = not any(tasks.rule_score(p, " ".join(words[start:end])) == 1
                            for end in ends for start in range(end))
    return {"length": MIN_WORDS <= len(words) <= MAX_WORDS, "no_answer": no_answer}


def complements(model, tokenizer, prompts: list[str], new_tokens: int = 64, batch_size: int = 16) -> list[str]:
    """The PAS model's greedy complement of each prompt: its chat template's user turn and generation prompt in,
    the assistant turn out, up to the end-of-turn marker (``<|im_end|>``) or eos, which are not part of it."""
    import torch

    end = [i for i in (tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id)
           if i is not None and i != tokenizer.unk_token_id]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for start in range(0, len(prompts), batch_size):
        rows = [list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=True)["input_ids"])
                for p in prompts[start:start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        with torch.no_grad():
            generated = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                       eos_token_id=end, pad_token_id=pad)
        for row in generated[:, width:].tolist():
            cut = min([row.index(i) for i in end if i in row], default=len(row))
            out.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return out


def measure(pas_folder: str | Path, model_folder: str | Path, prompts: int = 96, new_tokens: int = 48,
            seed: int = 0) -> tuple[dict[str, float], list[dict]]:
    """(metrics, rows) of the module docstring on ``prompts`` held-out problems; a row per problem: its prompt,
    both complements and the three answers."""
    from recipes.alignment.generation import greedy, load

    problems = [pas_scenes.problem(seed, SPLIT, i) for i in range(prompts)]
    texts = [p.prompt for p in problems]
    pas_model, pas_tokenizer = load(pas_folder)
    made = complements(pas_model, pas_tokenizer, texts, batch_size=BATCH)
    oracle = [pas_scenes.complement(p) for p in problems]
    model, tokenizer = load(model_folder)
    answers = {way: greedy(model, tokenizer, inputs, new_tokens, BATCH) for way, inputs in (
        ("rule_score", texts), ("rule_score_pas", [f"{t} {c}" for t, c in zip(texts, made)]),
        ("rule_score_oracle", [f"{t} {c}" for t, c in zip(texts, oracle)]))}
    metrics = {"complement_exact": sum(" ".join(m.split()) == o for m, o in zip(made, oracle)) / len(problems),
               "complement_valid": sum(all(complement_rules(p, m).values()) for p, m in zip(problems, made))
               / len(problems)}
    for way, said in answers.items():
        scores = [tasks.rule_score(p, a) for p, a in zip(problems, said)]
        metrics[way] = sum(scores) / len(scores)
        for kind in pas_scenes.KINDS:
            mine = [s for p, s in zip(problems, scores) if pas_scenes.kind(p) == kind]
            metrics[f"{way}_{kind}"] = sum(mine) / max(len(mine), 1)
    metrics["pas_gain"] = metrics["rule_score_pas"] - metrics["rule_score"]
    metrics["pas_gain_scene"] = metrics["rule_score_pas_scene"] - metrics["rule_score_scene"]
    rows = [{"prompt": t, "complement": m, "oracle": o, **{way: said[i] for way, said in answers.items()}}
            for i, (t, m, o) in enumerate(zip(texts, made, oracle))]
    return metrics, rows


def pas_eval_step(ctx) -> dict[str, float]:
    """Step ``pas_eval``: :func:`measure` of ``args.pas`` and ``args.model``; returns the metrics."""
    args = ctx.args
    metrics, _ = measure(ctx.path(args["pas"]), ctx.path(args["model"]), args.get("prompts", 96),
                         args.get("new_tokens", 48), args.get("seed", 0))
    return metrics
