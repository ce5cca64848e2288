"""Does SuperCorrect's tiny student learn the check's verdict? A diagnostic of the template review's ``ok``/``wrong``
token, outside Loom (plain torch, one thread, so that a variant costs minutes): the tiny Llama of
recipes/alignment/models/supercorrect's config, freshly initialised under ``--seed``, trained on the template SFT rows
of recipes.alignment.supercorrect_data (loss as Loom's ``lm``: the mean over each row's learned tokens, then over the
batch; AdamW, constant lr, batch 16), and every 300 steps the verdicts scored teacher-forced on the 128 held-out check
rows: at each ``ok``/``wrong`` of the teacher's review, is ``wrong`` or ``ok`` the likelier token. At the end the
model answers the held-out problems greedily (recipes.alignment.supercorrect.evaluate) and each ``<step k> a op b = c
, v verdict`` unit it writes is read: is its recomputation ``a op b = c`` right, and does its verdict agree with its
own two values (``ok`` exactly when c = v).

Variants: ``--style plain`` (the baseline's rows: no verdicts to score teacher-forced), ``--checkrep N`` (each check row N times: more verdicts per step), ``--unitrows`` (beside the rows, one
short row per verdict unit of the review: prompt = the check prompt and the review before it, completion = the unit;
a verdict weighs 1/13 of such a row against about 1/40 of a whole review), ``--layers``/``--hidden``.

    python -m bench.alignment.supercorrect_verdict --steps 1200 --checkrep 3 --save DIR   # prints the log lines

Session 12 ran it by hand under load 25-40 (bench/results/supercorrect-verdict/*.log and README.md there).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time

import torch
import torch.nn.functional as F

from recipes.alignment import supercorrect as scs
from recipes.alignment import supercorrect_data as sc
from recipes.alignment.supercorrect_errors import units
from recipes.alignment.supercorrect_model import MODEL_DIR

UNIT = re.compile(r"< step (\d+) > (\d+ (?:plus|minus|times|divided by) \d+ = -?\d+) , (-?\d+) (ok|wrong)")


def rows_of(records: list[dict], checkrep: int, unitrows: bool, style: str = "template") -> list[dict]:
    rows = []
    for r in records:
        solve, check = sc.sft_rows(r, style)
        rows += [solve] + [check] * checkrep
        if unitrows:
            parts = units(check["chosen"])
            rows += [{"prompt": sc.normalise(check["prompt"]) + " " + " ".join(parts[:i]), "chosen": parts[i]}
                     for i in range(1, len(parts)) if parts[i].endswith((" ok", " wrong"))]
    return rows


def own_units(answers: list[dict]) -> dict[str, int]:
    """The units of the greedy check answers: how many, recomputed right, verdict agreeing with the unit's own values,
    ``ok`` under differing values and ``wrong`` under equal ones."""
    out = {"units": 0, "recomputed_right": 0, "verdict_consistent": 0, "ok_when_values_differ": 0,
           "wrong_when_values_equal": 0}
    for row in answers:
        for m in UNIT.finditer(row["checked"]):
            a, op, b, c = sc.EQUATION.match(m.group(2)).groups()
            same, verdict = c == m.group(3), m.group(4)
            out["units"] += 1
            out["recomputed_right"] += sc.OPS[op](int(a), int(b)) == int(c)
            out["verdict_consistent"] += (verdict == "ok") == same
            out["ok_when_values_differ"] += verdict == "ok" and not same
            out["wrong_when_values_equal"] += verdict == "wrong" and same
    return out


def encode(tok, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Token ids and labels as Loom's ``preference`` rows under loss ``lm``: the completion and an eos learned."""
    head = tok(prompt)["input_ids"]
    tail = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return head + tail, [-100] * len(head) + tail


def teacher_forced(model, tok, held: list[dict]) -> dict[str, list[int]]:
    """[right, all] of the teacher's ``ok`` and ``wrong`` verdicts in the held-out template reviews: is the right word
    the likelier of the two, the review before it given."""
    ok_id, wrong_id = tok.convert_tokens_to_ids("ok"), tok.convert_tokens_to_ids("wrong")
    stats = {"ok": [0, 0], "wrong": [0, 0]}
    model.eval()
    with torch.no_grad():
        for r in held:
            check = sc.sft_rows(r, "template")[1]
            ids, lab = encode(tok, check["prompt"], check["chosen"])
            logits = model(torch.tensor([ids])).logits[0]
            for i in range(1, len(ids)):
                if lab[i] in (ok_id, wrong_id):
                    pred = wrong_id if logits[i - 1, wrong_id] > logits[i - 1, ok_id] else ok_id
                    kind = "ok" if lab[i] == ok_id else "wrong"
                    stats[kind][0] += pred == lab[i]
                    stats[kind][1] += 1
    model.train()
    return stats


def train(model, data: list[tuple[list[int], list[int]]], a: argparse.Namespace, pad: int, checkpoint) -> None:
    """``a.steps`` AdamW steps on batches of ``a.batch`` rows (each epoch a seeded shuffle), loss the mean over each
    row's learned tokens then over the batch; ``checkpoint()`` every 300 steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    rng, order, t0 = random.Random(a.seed), [], time.time()
    for step in range(a.steps):
        if len(order) < a.batch:
            idx = list(range(len(data)))
            rng.shuffle(idx)
            order += idx
        batch = [data[order.pop()] for _ in range(a.batch)]
        w = max(len(x[0]) for x in batch)
        ids = torch.tensor([x[0] + [pad] * (w - len(x[0])) for x in batch])
        lab = torch.tensor([x[1] + [-100] * (w - len(x[1])) for x in batch])
        logits, target = model(ids).logits[:, :-1], lab[:, 1:]
        per_token = F.cross_entropy(logits.transpose(1, 2), target, reduction="none", ignore_index=-100)
        learned = (target != -100).float()
        loss = (per_token.sum(1) / learned.sum(1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == a.steps - 1:
            print(step, round(loss.item(), 4), round(time.time() - t0, 1), flush=True)
        if (step + 1) % 300 == 0:
            checkpoint()


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.alignment.supercorrect_verdict", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--checkrep", type=int, default=1)
    p.add_argument("--unitrows", action="store_true")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--style", choices=sc.STYLES, default="template", help="plain: the baseline's rows (no verdict units)")
    p.add_argument("--save", default="", help="a folder for the model and its greedy answers")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    a = parse(argv)
    torch.manual_seed(a.seed)
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    cfg = LlamaConfig.from_pretrained(MODEL_DIR)
    cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size = a.layers, a.hidden, 2 * a.hidden
    cfg.head_dim = a.hidden // cfg.num_attention_heads
    model = LlamaForCausalLM(cfg)
    train_records = sc.generated(a.seed, "train", a.train)
    held = sc.generated(a.seed, "heldout", 128, {r["problem"] for r in train_records})
    data = [encode(tok, r["prompt"], r["chosen"]) for r in rows_of(train_records, a.checkrep, a.unitrows, a.style)]
    print("rows", len(data), "maxlen", max(len(d[0]) for d in data), flush=True)

    def checkpoint() -> None:
        if a.style == "template":  # plain rows have no per-step verdicts (and ``no wrong step`` holds a ``wrong``)
            stats = teacher_forced(model, tok, held)
            print("teacher-forced verdict acc: ok %d/%d wrong %d/%d" % (*stats["ok"], *stats["wrong"]), flush=True)

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    train(model, data, a, pad, checkpoint)
    checkpoint()
    model.eval()
    metrics, answers = scs.evaluate(model, tok, held)
    print("EVAL", json.dumps({k: round(v, 3) for k, v in metrics.items()}), flush=True)
    print("OWN UNITS", json.dumps(own_units(answers)), flush=True)
    if a.save:
        model.save_pretrained(a.save)
        tok.save_pretrained(a.save)
        with open(f"{a.save}/answers.json", "w") as f:
            json.dump(answers, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
