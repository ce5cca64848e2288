"""``python -m bench.alignment.grpo OUT [--prompts N] [--no-write]``: the phased pipeline's GRPO policy, scored.

OUT is a finished ``loom run recipes/alignment/pipeline/pipeline-tiny.yaml --out OUT``. On N held-out prompts of
GRPO's domain (recipes.alignment.grpo: the ``heldout`` stream, never trained on), each model answers greedily (each
prompt alone, unpadded, up to the rollout's 48 new tokens, ending at eos) and every answer is scored by the rule
(tasks.rule_score and each check) and by the pipeline's trained reward model (its export and scalar head,
OUT/rm_head/export/rm). Models: the base, the SFT model on both domains (OUT/sft), the domain models (OUT/sft_<domain>),
the merged model (OUT/merge: GRPO's start and its reference), the GRPO policy (OUT/grpo: loss grpo_rule, the rule as
its reward). A model's KL to the reference is the mean over its answers' tokens of the full KL(model || reference)
of the next-token distributions. (PAS has a pipeline and a bench of its own: bench.alignment.pas.)
Writes bench/results/alignment-grpo.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import REPO_ROOT, write_results
from recipes.alignment import grpo, tasks

SPEC = "recipes/alignment/pipeline/pipeline-tiny.yaml"
NEW_TOKENS = 48
ROLLOUT_PROMPT = 20  # the rollout use's seq_len: prompts left-padded to it


def load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return model, AutoTokenizer.from_pretrained(folder)


@torch.no_grad()
def answer(model, tokenizer, prompt: str, pad_to: int = 0) -> list[int]:
    """Greedy answer token ids (eos included when the model ends) to ``prompt`` alone; with ``pad_to``, left-padded
    to that many tokens and the pads attended (what Loom's rollouts saw before their prompts were masked)."""
    ids = tokenizer(prompt)["input_ids"]
    ids = torch.tensor([[tokenizer.pad_token_id] * max(pad_to - len(ids), 0) + ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


class RewardModel:
    """The pipeline's reward model as the grpo_rm loss reads it: the last decoder layer's output at the last token,
    LayerNorm (eps 1e-5) and the trained Linear(H, 1) of :data:`recipes.alignment.grpo.HEAD_FILE`."""

    def __init__(self, folder: Path):
        from safetensors.torch import load_file

        self.model, _ = load(folder)
        self.head = load_file(str(folder / grpo.HEAD_FILE))
        self.hidden: torch.Tensor | None = None
        self.model.model.layers[-1].register_forward_hook(lambda m, i, o: setattr(
            self, "hidden", o[0] if isinstance(o, tuple) else o))

    @torch.no_grad()
    def __call__(self, ids: list[int]) -> float:
        self.model(torch.tensor([ids]))
        h = F.layer_norm(self.hidden[0, -1], self.hidden.shape[-1:], self.head["norm.weight"], self.head["norm.bias"],
                         1e-5)
        return float(F.linear(h, self.head["out.weight"], self.head["out.bias"]))


@torch.no_grad()
def kl_to(policy, reference, prompt_ids: list[int], answer_ids: list[int]) -> tuple[float, int]:
    """(sum over the answer's tokens of KL(policy || reference) of the next-token distributions, token count)."""
    if not answer_ids:
        return 0.0, 0
    ids = torch.tensor([prompt_ids + answer_ids])
    start = len(prompt_ids) - 1
    logp = F.log_softmax(policy(ids).logits[0, start:-1].float(), dim=-1)
    logq = F.log_softmax(reference(ids).logits[0, start:-1].float(), dim=-1)
    return float((logp.exp() * (logp - logq)).sum()), len(answer_ids)


@torch.no_grad()
def rollouts(model, tokenizer, reward: RewardModel, groups: int, seed: int = 0) -> dict[str, float]:
    """GRPO's own view: groups of 4 answers sampled at temperature 1 to ``groups`` train prompts, left-padded to the
    rollout's 20 tokens as recipes.alignment.grpo.prompt_batch pads them and masked as it masks them (the pads never
    attended), scored by the rule and the reward model: what GRPO's advantages follow."""
    torch.manual_seed(seed)
    scores, rewards = [], []
    for g in range(groups):
        p = grpo.problem(seed, "train", g)
        ids = tokenizer(p.prompt)["input_ids"]
        ids = [tokenizer.pad_token_id] * (20 - len(ids)) + ids
        batch = torch.tensor([ids] * 4)
        out = model.generate(batch, attention_mask=(batch != tokenizer.pad_token_id).long(), max_new_tokens=NEW_TOKENS,
                             do_sample=True, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        for row in out[:, len(ids):].tolist():
            row = row[:row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row
            text = tokenizer.decode([i for i in row if i != tokenizer.eos_token_id], skip_special_tokens=True)
            scores.append(tasks.rule_score(p, text))
            rewards.append(reward(ids + row))
    return {"rule_score": sum(scores) / len(scores), "reward": sum(rewards) / len(rewards), "answers": len(scores)}


def evaluate(out: Path, prompts: int, seed: int = 0) -> dict:
    """Every model's rule score, checks, reward-model score and answer length on ``prompts`` held-out prompts, and
    the GRPO policy's KL to the reference."""
    folders = {"base": REPO_ROOT / "recipes/alignment/models/base", "SFT": out / "sft/export/policy",
               "SFT arithmetic": out / "sft_arithmetic/export/policy",
               "SFT constraints": out / "sft_constraints/export/policy", "merged SFT": out / "merge/export/policy",
               "GRPO": out / "grpo/export/policy"}
    models = {name: load(folder) for name, folder in folders.items()}
    reward = RewardModel(out / "rm_head/export/rm")
    problems = [grpo.problem(seed, "heldout", g) for g in range(prompts)]
    rows: dict[str, dict] = {}
    for name, (model, tokenizer) in models.items():
        scores, rewards, lengths, passed, kl, tokens = [], [], [], {}, 0.0, 0
        for p in problems:
            prompt_ids = tokenizer(p.prompt)["input_ids"]
            ids = answer(model, tokenizer, p.prompt)
            text = tokenizer.decode([i for i in ids if i != tokenizer.eos_token_id], skip_special_tokens=True)
            scores.append(tasks.rule_score(p, text))
            for check, ok in tasks.checks(p, text).items():
                passed[check] = passed.get(check, 0) + int(ok)
            rewards.append(reward(prompt_ids + ids))
            lengths.append(len(ids))
            part, count = kl_to(model, models["merged SFT"][0], prompt_ids, ids)
            kl, tokens = kl + part, tokens + count
        rows[name] = {"rule_score": sum(scores) / len(scores), "reward": sum(rewards) / len(rewards),
                      "answer_tokens": sum(lengths) / len(lengths), "kl_to_reference": kl / max(tokens, 1),
                      "checks": {k: v / len(problems) for k, v in passed.items()},
                      "example": {"prompt": problems[0].prompt, "answer": tokenizer.decode(
                          answer(model, tokenizer, problems[0].prompt), skip_special_tokens=True)}}
    for name in ("merged SFT", "GRPO"):  # the rollout's unmasked left padding: what it changes in greedy answers
        model, tokenizer = models[name]
        texts = [tokenizer.decode([i for i in answer(model, tokenizer, p.prompt, ROLLOUT_PROMPT)
                                   if i != tokenizer.eos_token_id], skip_special_tokens=True) for p in problems]
        rows[name]["rule_score_padded"] = sum(map(tasks.rule_score, problems, texts)) / len(problems)
    sampled = {name: rollouts(*models[name], reward, 24, seed) for name in ("merged SFT", "GRPO")}
    return {"prompts": prompts, "domain": grpo.DOMAIN, "models": rows, "rollouts": sampled, "losses": phase_losses(out)}


def phase_losses(out: Path) -> dict[str, dict[str, float]]:
    """Each trained phase's tasks' mean loss over the first and last 10% of the phase's steps (its metrics.jsonl)."""
    result = {}
    for log in sorted(out.glob("*/metrics.jsonl")):
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        for task in records[0]["loss"] if records else ():
            losses = [r["loss"][task] for r in records]
            k = max(1, len(losses) // 10)
            result[f"{log.parent.name}/{task}"] = {"first": sum(losses[:k]) / k, "last": sum(losses[-k:]) / k,
                                                   "steps": len(losses)}
    return result


def markdown(rec: dict) -> str:
    lines = ["# Alignment pipeline: the GRPO policy against the merged SFT model", "",
             f"`{SPEC}` run by `loom run`, then `python -m bench.alignment.grpo OUT`: greedy answers to "
             f"{rec['prompts']} held-out {rec['domain']} prompts, scored by the rule and by the pipeline's reward "
             "model; KL(policy || reference) per answer token, the reference being the merged SFT model.", "",
             "| model | rule score | " + " | ".join(next(iter(rec["models"].values()))["checks"]) +
             " | reward model | answer tokens | KL to reference |",
             "|---|---|" + "---|" * (len(next(iter(rec["models"].values()))["checks"]) + 3)]
    for name, r in rec["models"].items():
        lines.append(f"| {name} | {r['rule_score']:.3f} | " + " | ".join(f"{v:.2f}" for v in r["checks"].values()) +
                     f" | {r['reward']:.3f} | {r['answer_tokens']:.1f} | {r['kl_to_reference']:.4f} |")
    lines += ["", "The same greedy answers with each prompt left-padded to the rollout's 20 tokens, the pads attended "
              "(what Loom's rollouts saw before their prompts were masked): rule score " + ", ".join(
                  f"{name} {r['rule_score_padded']:.3f}" for name, r in rec["models"].items()
                  if "rule_score_padded" in r) + "."]
    lines += ["", "Sampled rollouts as GRPO trains on them (train prompts, left-padded to 20 tokens, 4 samples each at "
              "temperature 1):", "", "| model | answers | rule score | reward model |", "|---|---|---|---|"]
    for name, r in rec["rollouts"].items():
        lines.append(f"| {name} | {r['answers']} | {r['rule_score']:.3f} | {r['reward']:.3f} |")
    lines += ["", "| phase/task | steps | loss, first 10% | loss, last 10% |", "|---|---|---|---|"]
    for phase, v in rec["losses"].items():
        lines.append(f"| {phase} | {v['steps']} | {v['first']:.4f} | {v['last']:.4f} |")
    lines += ["", "First held-out prompt and each model's answer:", "",
              f"- prompt: `{rec['models']['GRPO']['example']['prompt']}`"]
    for name, r in rec["models"].items():
        lines.append(f"- {name}: `{r['example']['answer']}`")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.alignment.grpo", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="a finished run of " + SPEC)
    parser.add_argument("--prompts", type=int, default=64, help="held-out prompts (default 64)")
    parser.add_argument("--no-write", action="store_true", help="print the report; leave bench/results alone")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rec = evaluate(args.out, args.prompts)
    report = markdown(rec)
    print(report)
    if not args.no_write:
        write_results("alignment-grpo", [rec], report, {"spec": SPEC, "prompts": args.prompts})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
