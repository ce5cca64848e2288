"""SFT data whose prompts may carry a PAS complement: the answer model learns to read augmented prompts.

Baichuan Alignment (arXiv 2410.14940, §2.1) appends the PAS model's complement to the user prompt at inference. An
answer model fine-tuned on plain prompts only has never seen a prompt followed by such a text and, at this scale,
ends its answer at once (docs/recipes/alignment.md, PAS). So the chat model is trained on data where a share of the
prompts are augmented the way inference augments them. Step ``pas_data`` (:func:`data_step`) runs the trained PAS
model over the prompts of a preference file (docs/data.md, format preference: only ``prompt`` is read and changed,
every other field is kept), replaces a seeded ``share`` of them by ``prompt + " " + complement`` (the PAS model's
greedy complement: recipes.alignment.pas.complements, as step ``pas_eval`` appends it) and writes the file as the
artifact ``data`` (``OUT/<phase>/data/sft.jsonl``). An augmented row also carries ``pas_complement``. The step
reports ``augmented`` (rows) and ``complement_valid``: the fraction of the complements written that obey PAS's rules
(recipes.alignment.pas.complement_rules), over the prompts the recipe's generator can read back.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from recipes.alignment import pas, pas_scenes

STEP_ARGS = ("pas", "source", "share", "seed")
METRICS = ("augmented", "complement_valid")
FILE = "sft.jsonl"


def check_data_args(args: dict[str, Any], base: Path | None) -> None:
    """``pas`` (a reference ``@<phase>/model[/component]`` or a folder), ``source`` (a preference JSONL file or a
    reference), optional ``share`` (a number in 0..1, default 0.5), ``seed`` (default 0); torch-free, a ValueError
    naming the argument."""
    from planner.pipeline import StepContext, check_known_args, check_model_arg, check_whole_args

    check_known_args(args, STEP_ARGS, "pas_data")
    check_model_arg("pas", args.get("pas"), base, "the trained PAS model")
    source = args.get("source")
    if not isinstance(source, str) or not (source.startswith("@") or StepContext("", {}, Path(), base).path(
            source).is_file()):
        raise ValueError(f"source ({source!r}): required, a preference JSONL file (docs/data.md; a 'prompt' field on "
                         "every line) or a reference '@<phase>/<artifact>/<file>'. Point it at an existing file.")
    share = args.get("share", 0.5)
    if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0 <= share <= 1:
        raise ValueError(f"share ({share!r}): expected the fraction of prompts to augment, a number in 0..1. "
                         "Fix the value.")
    check_whole_args(args, (("seed", 0, 2**31 - 1),))


def read_rows(path: Path) -> list[dict]:
    """The rows of preference file ``path``; a ValueError naming the file and line of a row without a text
    ``prompt``."""
    from runtime.source_files import read_jsonl

    rows = []
    for number, row in read_jsonl(path, "source"):
        if not isinstance(row.get("prompt"), str):
            raise ValueError(f"source ({path}): line {number} has no text 'prompt' field; each line is a preference "
                             "row (docs/data.md). Fix the file.")
        rows.append(row)
    return rows


def augment(rows: list[dict], complement_of, share: float, seed: int) -> tuple[list[dict], dict[str, float]]:
    """(rows, metrics): a seeded ``share`` of ``rows`` (rounded down) with ``complement_of(prompts)``'s complement
    appended to the prompt, the rest unchanged, in order; the metrics of the module docstring."""
    chosen = sorted(random.Random(seed).sample(range(len(rows)), int(share * len(rows))))
    made = complement_of([rows[i]["prompt"] for i in chosen]) if chosen else []
    out = [dict(row) for row in rows]
    valid = []
    for i, complement in zip(chosen, made):
        out[i] |= {"prompt": f"{rows[i]['prompt']} {complement}", "pas_complement": complement}
        if (problem := pas_scenes.parse_prompt(rows[i]["prompt"])) is not None:
            valid.append(all(pas.complement_rules(problem, complement).values()))
    metrics = {"augmented": float(len(chosen))}
    if valid:
        metrics["complement_valid"] = sum(valid) / len(valid)
    return out, metrics


def data_step(ctx) -> dict[str, float]:
    """Step ``pas_data``: :func:`augment` of ``source`` by the PAS model ``pas``, written to the artifact ``data``."""
    from recipes.alignment.generation import load

    args = ctx.args
    model, tokenizer = load(ctx.path(args["pas"]))
    rows, metrics = augment(read_rows(ctx.path(args["source"])),
                            lambda prompts: pas.complements(model, tokenizer, prompts, batch_size=128),
                            args.get("share", 0.5), args.get("seed", 0))
    out = ctx.artifact("data")
    out.mkdir(parents=True, exist_ok=True)
    (out / FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return metrics
