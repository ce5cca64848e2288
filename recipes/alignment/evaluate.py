"""``loom eval`` for recipe `alignment`: held-out reward accuracy, DPO margin, SFT loss and packing utilisation.

- a ``reward_bt`` task: on held-out pairs (split ``heldout``: prompts and answers the train stream does not hold, or
  ``<data_dir>/heldout/preference.jsonl``), pairwise accuracy (reward of chosen > reward of rejected), overall, per
  domain and per kind of failure of the rejected answer, the mean reward margin and the squared error to the
  absolute scores; baseline: the better length rule on the same pairs (the longer, or the shorter, answer preferred,
  whichever is right more often; a coin on ties): what a reward model that learned nothing but length would score;
- a ``dpo`` task: on the same held-out pairs, the mean implicit reward margin ``beta [(log pi - log ref)(y_w) -
  (log pi - log ref)(y_l)]`` and the fraction of pairs where it is positive; baseline: the policy at its start (the
  reference itself: margin 0, no pair positive);
- a task with a ``data:`` source: its mean loss over its first rows (as runtime.evaluate does), and for a chat or
  text source its token utilisation: real tokens over row slots, packed (``pack: true``: documents concatenated
  into full rows) against padded (one document per row); the baseline is the padded figure.

Step ``rule_eval`` (:func:`rule_eval_step`, a phase of the pipeline): a policy's greedy answers to GRPO's held-out
prompts scored by the rule, and its KL to a reference, as the step's metrics (gateable); with a ``baseline`` model
(GRPO's start) also that model's rule score on the same prompts and the policy's gain over it.
"""

from __future__ import annotations

import math

import torch

from planner.components import resolve_shape
from planner.spec import JobSpec
from planner.usegraph import use_component
from recipes.alignment.data import job_batch, pairs
from recipes.alignment.losses import DPOHead, RewardHead, dpo_loss, last_key
from runtime.data import task_batch
from runtime.evaluate import EvalReport
from runtime.reference import ReferenceTrainer
from runtime.source_files import load_records, tokenizer_folder
from runtime.sources import ENCODERS
from runtime.tokenizer import load_tokenizer


def evaluate(job: JobSpec, model: ReferenceTrainer, split: str, num_samples: int) -> EvalReport:
    """Metrics per task (module docstring) on ``num_samples`` rows of ``split``."""
    report = EvalReport(job.name, split, num_samples, {})
    for t, task in enumerate(job.tasks):
        if isinstance(model.head(t), RewardHead):
            report.metrics[task.name], report.baselines[task.name] = reward_metrics(job, model, t, split, num_samples)
            report.notes[task.name] = (f"{num_samples} {split} pairs; baseline: a length rule (the longer, or the "
                                           "shorter, answer preferred, whichever is right more often; a coin on ties)")
        elif isinstance(model.head(t), DPOHead):
            report.metrics[task.name] = dpo_metrics(job, model, t, split, num_samples)
            report.baselines[task.name] = {"reward_margin": 0.0, "margin_positive": 0.0}
            report.notes[task.name] = f"{num_samples} {split} pairs; baseline: the reference (the policy's start)"
        elif task.data is not None:
            report.metrics[task.name] = {"loss": source_loss(job, model, t, num_samples)}
            if task.data.format in ("chat", "text"):
                packed, padded = token_utilisation(job, t)
                report.metrics[task.name]["token_utilisation"] = packed if task.data.pack else padded
                report.baselines[task.name] = {"token_utilisation": padded}
                report.notes[task.name] = ("token_utilisation: real tokens / row slots of one epoch "
                                           f"({'packed' if task.data.pack else 'padded'}); baseline: padded rows")
    return report


def reward_metrics(job: JobSpec, model: ReferenceTrainer, t: int, split: str,
                   num_samples: int) -> tuple[dict[str, float], dict[str, float]]:
    """(metrics, baselines) of reward task ``t`` over pairs ``0 .. num_samples - 1`` of ``split``."""
    head, size = model.head(t), job.tasks[t].batch_size
    chosen, rejected, longer = [], [], []
    for step in range(math.ceil(num_samples / size)):
        rows = min(size, num_samples - step * size)
        batch = job_batch(job, t, step, 0, rows, split)
        c, r = head.rewards(model.forward(t, batch), batch)
        chosen.append(c)
        rejected.append(r)
        use_c, use_r = head.leaves
        longer.append(torch.sign(batch.targets[last_key(use_c)] - batch.targets[last_key(use_r)]).float())
    c, r, longer_t = torch.cat(chosen), torch.cat(rejected), torch.cat(longer)
    if longer_t.sum() < 0:  # shorter chosen answers: the length rule prefers the shorter answer
        longer_t = -longer_t
    longer_t = (longer_t + 1) / 2  # 1 where the rule is right, 0.5 on a tie (a coin), 0 where it is wrong
    rows = pairs(job, t, split, range(num_samples))
    scores = torch.tensor([[row.get("score_chosen", math.nan), row.get("score_rejected", math.nan)] for row in rows])
    scored = ~scores.isnan().any(dim=1)
    metrics = {"pairwise_accuracy": float((c > r).float().mean()), "reward_margin": float((c - r).mean()),
               "score_mse": float(((torch.stack([c, r], 1) - scores)[scored] ** 2).mean()) if scored.any() else 0.0}
    baselines = {"pairwise_accuracy": float(longer_t.mean())}
    for field in ("domain", "failure"):  # the generator's rows name them; a data_dir's may not
        for value in sorted({row[field] for row in rows if field in row}):
            mine = torch.tensor([row.get(field) == value for row in rows])
            metrics[f"pairwise_accuracy_{value}"] = float((c > r)[mine].float().mean())
            baselines[f"pairwise_accuracy_{value}"] = float(longer_t[mine].mean())
    return metrics, baselines


def dpo_metrics(job: JobSpec, model: ReferenceTrainer, t: int, split: str, num_samples: int) -> dict[str, float]:
    """Implicit reward margin of dpo task ``t`` over pairs ``0 .. num_samples - 1`` of ``split``."""
    head, size, margins = model.head(t), job.tasks[t].batch_size, []
    for step in range(math.ceil(num_samples / size)):
        batch = job_batch(job, t, step, 0, min(size, num_samples - step * size), split)
        margins.append(dpo_loss(*head.logprobs(model.forward(t, batch), batch), beta=head.beta)[1])
    margin = torch.cat(margins)
    return {"reward_margin": float(margin.mean()), "margin_positive": float((margin > 0).float().mean())}


def source_loss(job: JobSpec, model: ReferenceTrainer, t: int, num_samples: int) -> float:
    """Mean loss of task ``t`` over the first ``num_samples`` rows of its source's stream."""
    size, total, seen, step = job.tasks[t].batch_size, 0.0, 0, 0
    while seen < num_samples:
        rows = min(size, num_samples - seen)
        batch = task_batch(job, t, step, 0, rows)
        total += float(model.head(t)(model.forward(t, batch), batch).sum())
        seen, step = seen + rows, step + 1
    return total / seen


def token_utilisation(job: JobSpec, t: int) -> tuple[float, float]:
    """(packed, padded) token utilisation of task ``t``'s text or chat source over one epoch: its documents' tokens
    (each truncated to the use's seq_len) over the slots of the packed rows, and over one padded row per document."""
    task = job.tasks[t]
    name, comp = use_component(job, t, task.components[0].use_name)  # a text source feeds one token use
    seq_len = resolve_shape(comp, name, task.components[0], f"tasks[{t}].components[0]").seq_len
    folder, where = tokenizer_folder(job, t, name)
    tokenizer = load_tokenizer(folder, where)
    encode = ENCODERS[task.data.format]
    rows = load_records(task.data, t, None, False).rows
    tokens = [min(len(encode(tokenizer, task.data, row, where)[0].ids), seq_len) for row in rows]
    packed_rows = max(1, math.ceil(sum(tokens) / seq_len))
    return sum(tokens) / (packed_rows * seq_len), sum(tokens) / (len(tokens) * seq_len)


# --------------------------------------------------------------------------- step rule_eval

RULE_EVAL_ARGS = ("model", "reference", "baseline", "prompts", "new_tokens", "split", "seed")
CHECKS = ("length", "keyword", "format")  # the constraints domain's checks (recipes.alignment.tasks.checks)
RULE_METRICS = ("rule_score", *CHECKS, "answer_words", "kl_to_reference")  # rule_eval's
BASELINE_METRICS = ("baseline_rule_score", "gain")  # step rule_eval's with a baseline: its score, rule_score - it


def check_rule_eval_args(args: dict, base) -> None:
    """``model`` (a reference ``@<phase>/model/<component>`` or a folder), optional ``reference`` (the same; KL is
    reported against it) and ``baseline`` (the same; its rule score and the model's gain over it), ``prompts``
    (1..1024, default 64), ``new_tokens`` (1..256, default 48), ``split`` (``heldout`` or ``train``, default
    heldout), ``seed``; torch-free, a ValueError naming the argument."""
    from planner.pipeline import check_known_args, check_model_arg, check_whole_args

    check_known_args(args, RULE_EVAL_ARGS, "rule_eval")
    check_model_arg("model", args.get("model"), base, "the policy whose answers are scored")
    if args.get("reference") is not None:
        check_model_arg("reference", args["reference"], base, "the model the KL is measured to")
    if args.get("baseline") is not None:
        check_model_arg("baseline", args["baseline"], base, "the model whose rule score the gain is measured over")
    check_whole_args(args, (("prompts", 1, 1024), ("new_tokens", 1, 256), ("seed", 0, 2**31 - 1)))
    if args.get("split", "heldout") not in ("heldout", "train"):
        raise ValueError(f"split ({args['split']!r}): expected heldout or train (GRPO's prompt streams). Fix it.")


@torch.no_grad()
def answer_kl(model, reference, tokenizer, prompts: list[str], answers: list[str]) -> float:
    """Mean over the answers' tokens (eos included) of KL(model || reference) of the next-token distributions, each
    prompt and answer alone."""
    import torch.nn.functional as F

    total, count = 0.0, 0
    for prompt, answer in zip(prompts, answers):
        head = tokenizer(prompt)["input_ids"]
        tail = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([head + tail])
        logp = F.log_softmax(model(ids).logits[0, len(head) - 1:-1].float(), dim=-1)
        logq = F.log_softmax(reference(ids).logits[0, len(head) - 1:-1].float(), dim=-1)
        total, count = total + float((logp.exp() * (logp - logq)).sum()), count + len(tail)
    return total / max(count, 1)


def rule_eval(model_folder, reference_folder=None, prompts: int = 64, new_tokens: int = 48, split: str = "heldout",
              seed: int = 0) -> dict[str, float]:
    """Greedy answers of the model in ``model_folder`` to ``prompts`` prompts of GRPO's ``split``
    (recipes.alignment.grpo.problem), batched and left-padded with a mask (recipes.alignment.generation): the mean
    rule score, each check's pass rate, the mean answer length in words and the KL per answer token to the model in
    ``reference_folder`` (0 without one)."""
    from recipes.alignment import grpo, tasks
    from recipes.alignment.generation import greedy, load

    model, tokenizer = load(model_folder)
    problems = [grpo.problem(seed, split, g) for g in range(prompts)]
    texts = [p.prompt for p in problems]
    answers = greedy(model, tokenizer, texts, new_tokens)
    metrics = {"rule_score": sum(tasks.rule_score(p, a) for p, a in zip(problems, answers)) / prompts}
    for check in CHECKS:
        metrics[check] = sum(tasks.checks(p, a)[check] for p, a in zip(problems, answers)) / prompts
    metrics["answer_words"] = sum(len(a.split()) for a in answers) / prompts
    reference = load(reference_folder)[0] if reference_folder is not None else None
    metrics["kl_to_reference"] = answer_kl(model, reference, tokenizer, texts, answers) if reference else 0.0
    return metrics


def rule_eval_step(ctx) -> dict[str, float]:
    """Step ``rule_eval``: :func:`rule_eval` of ``args.model`` (against ``args.reference``); with ``args.baseline``,
    also :data:`BASELINE_METRICS`: the baseline's rule score on the same prompts and ``gain`` = the model's minus it
    (so a gate can ask that GRPO beat its start). Returns the metrics."""
    a = ctx.args
    prompts = (a.get("prompts", 64), a.get("new_tokens", 48), a.get("split", "heldout"), a.get("seed", 0))
    metrics = rule_eval(ctx.path(a["model"]), ctx.path(a["reference"]) if a.get("reference") else None, *prompts)
    if a.get("baseline"):
        base = rule_eval(ctx.path(a["baseline"]), None, *prompts)["rule_score"]
        metrics |= {"baseline_rule_score": base, "gain": metrics["rule_score"] - base}
    return metrics
