"""The evaluation steps ``sysbench`` and ``fbbench`` (registered by recipes/alignment/__init__.py's PHASE_STEPS):
an exported model answers the benchmark's prompts greedily (recipes.alignment.generation), judges score the answers,
the step returns the benchmark's metrics (the orchestrator writes OUT/<phase>/metrics.json and checks the phase's
``gate:``) and writes the artifact ``report`` (OUT/<phase>/report/answers.jsonl: every prompt's answer and verdicts).

Args (checked before anything runs by :func:`check_sysbench_args` / :func:`check_fbbench_args`):

- ``model``: a from_pretrained folder (with its tokenizer), or an export folder holding one (``@<phase>/model``:
  the component ``component`` names, else its only one, else ``policy``);
- ``data``: a JSONL file of real sessions / items (docs/recipes/alignment.md); without it, synthetic ones from
  ``seed`` (split heldout): ``sessions`` and ``turns`` (sysbench), ``items`` (fbbench);
- ``judge``: an OpenAI-compatible endpoint ``{url, model, api_key_env, timeout_s, retries}``; without it, the rule
  judges (every criterion then needs a rule);
- ``new_tokens`` (32), ``batch_size`` (16).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from recipes.alignment import fbbench, sysbench
from recipes.alignment.judge import check_judge, endpoint_judge

REPORT = "report"
COMMON = ("model", "component", "data", "judge", "seed", "new_tokens", "batch_size")
ARGS = {"sysbench": (*COMMON, "sessions", "turns"), "fbbench": (*COMMON, "items")}
LIMITS = {"sessions": (1, 100_000), "turns": (1, 20), "items": (1, 100_000), "new_tokens": (1, 4096),
          "batch_size": (1, 4096), "seed": (0, 2**31)}


def _path(value: str, base: Path | None) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base or Path.cwd()) / path


def _check(step: str, args: dict[str, Any], base: Path | None) -> None:
    from planner.pipeline import check_known_args, check_model_arg, check_whole_args

    check_known_args(args, ARGS[step], step)
    check_model_arg("model", args.get("model"), base, "the model answering, with its tokenizer")
    if "component" in args and not isinstance(args["component"], str):
        raise ValueError(f"component ({args['component']!r}): expected a component name. Fix the value.")
    check_whole_args(args, [(key, low, high) for key, (low, high) in LIMITS.items()])
    if args.get("judge") is not None:
        check_judge(args["judge"])
    data = args.get("data")
    if data is not None:
        if not isinstance(data, str):
            raise ValueError(f"data ({data!r}): expected a JSONL file. Fix the value.")
        if not data.startswith("@"):
            path = _path(data, base)
            if not path.is_file():
                raise ValueError(f"data ({data!r}): no such file. Point it at a JSONL file of the documented format.")
            loader = sysbench.load_sessions if step == "sysbench" else fbbench.load_items
            try:
                loader(path, need_rules=args.get("judge") is None)
            except ValueError as exc:
                raise ValueError(f"data ({path}): {exc}") from None


def check_sysbench_args(args: dict[str, Any], base: Path | None) -> None:
    """Step ``sysbench``'s args (module docstring); a ValueError naming the argument."""
    _check("sysbench", args, base)


def check_fbbench_args(args: dict[str, Any], base: Path | None) -> None:
    """Step ``fbbench``'s args (module docstring); a ValueError naming the argument."""
    _check("fbbench", args, base)


def model_folder(folder: Path, component: str | None) -> Path:
    """The from_pretrained folder ``folder`` is (a reference ``@<phase>/model`` arrives as the export's ``component``
    folder already) or holds: its ``component`` subfolder, else its only one, else its ``policy`` (the recipe's name
    of the model being aligned)."""
    if (folder / "config.json").is_file():
        return folder
    if component is not None and (folder / component / "config.json").is_file():
        return folder / component
    inner = sorted(p for p in folder.iterdir() if (p / "config.json").is_file()) if folder.is_dir() else []
    if len(inner) > 1 and (folder / "policy" / "config.json").is_file():  # a DPO export holds its reference too
        return folder / "policy"
    if len(inner) != 1:
        from planner.errors import SpecError

        raise SpecError(f"model ({folder}): not a from_pretrained folder, and it holds {len(inner)} of them; name "
                        "one with `component`.")
    return inner[0]


def _generator(ctx):
    """``generate(prompts) -> answers`` of the step's model, greedy."""
    from recipes.alignment.generation import greedy, load

    model, tokenizer = load(model_folder(ctx.path(ctx.args["model"]), ctx.args.get("component")))
    new_tokens, batch = int(ctx.args.get("new_tokens", 32)), int(ctx.args.get("batch_size", 16))
    return lambda prompts: greedy(model, tokenizer, prompts, new_tokens, batch)


def _report(ctx, rows: list[dict], found: dict[str, float]) -> dict[str, float]:
    folder = ctx.artifact(REPORT)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "answers.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return found


def sysbench_step(ctx) -> dict[str, float]:
    """Step ``sysbench``: CSR, ISR, SSR (recipes.alignment.sysbench) of the model."""
    args, judge = ctx.args, endpoint_judge(ctx.args.get("judge"))
    sessions = (sysbench.load_sessions(ctx.path(args["data"]), judge is None) if args.get("data")
                else sysbench.synthetic(args))
    found, rows = sysbench.evaluate(sessions, _generator(ctx), judge)
    return _report(ctx, rows, found)


def fbbench_step(ctx) -> dict[str, float]:
    """Step ``fbbench``: the weighted-checklist scores (recipes.alignment.fbbench) of the model."""
    args, judge = ctx.args, endpoint_judge(ctx.args.get("judge"))
    items = fbbench.load_items(ctx.path(args["data"]), judge is None) if args.get("data") else fbbench.synthetic(args)
    found, rows = fbbench.evaluate(items, _generator(ctx), judge)
    return _report(ctx, rows, found)


PHASE_STEPS = {
    "sysbench": dict(run=sysbench_step, writes=(REPORT,), check=check_sysbench_args, metrics=sysbench.METRICS,
                     doc="SysBench CSR/ISR/SSR of a model folder (args: model, data, sessions, turns, judge)"),
    "fbbench": dict(run=fbbench_step, writes=(REPORT,), check=check_fbbench_args, metrics=fbbench.METRICS,
                    doc="FB-Bench weighted-checklist scores of a model folder (args: model, data, items, judge)"),
}
