"""BUTTON's phase steps, their argument checks, and the tokenizer and tiny Llama its pipelines train.

    python -m recipes.alignment.button_steps [--models DIR]      # writes DIR/button (default recipes/alignment/models)

- step ``button_data`` (writes ``data``): ``OUT/<phase>/data/train.jsonl``, the trajectories of ``rows`` train tasks
  of ``kinds`` in the ``chat`` format (docs/data.md), or of every task of the JSONL file ``tasks``; and
  ``tasks.jsonl``, the same tasks in the documented task format. Args: ``kinds`` (default all three), ``rows``
  (default 2000), ``seed`` (0), ``tasks`` (a file; instead of generating).
- step ``button_eval`` (writes nothing, reports metrics): a model folder plays the held-out tasks of ``kinds``
  (default sequential and parallel), or the tasks of the JSONL file ``tasks``, its calls executed
  (recipes.alignment.button_eval). Args: ``model`` (a from_pretrained folder or ``@<phase>/model``), ``component``
  (the component of a phase's export: ``@<phase>/model`` resolves to its folder, as does an
  export folder holding it), ``kinds``, ``tasks``, ``limit`` (at most
  this many tasks), ``seed``, ``max_turns`` (6), ``new_tokens`` (24).

The model's tokenizer is word-level over every word the world and the generator write (button_world.vocabulary and
the questions), with the chat template of examples/make_tokenizer.py and its end-of-turn marker ``<|im_end|>`` as the
eos, so that greedy decoding stops at the end of the assistant's turn.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from recipes.alignment.button import KINDS, SERIAL, PARALLEL, templates, chat_rows, generate, load_tasks
from recipes.alignment.button_world import vocabulary

HERE = Path(__file__).resolve().parent
# 128 wide (the pipelines train it 2100 steps): at 64 wide (2 kv heads) whether the model learnt to copy items and
# days from the question by the end of training depended on the seed (task success 0.33-0.95 over seeds at 700 steps)
LLAMA = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=256)
DATA_ARGS = ("kinds", "rows", "seed", "tasks")
EVAL_ARGS = ("model", "component", "kinds", "tasks", "limit", "seed", "max_turns", "new_tokens")
METRICS = ("task_success", "argument_accuracy", "malformed_rate", *(f"task_success_{k}" for k in KINDS))


# --------------------------------------------------------------------------- argument checks (torch-free)


def _kinds(args: dict, default: tuple[str, ...]) -> tuple[str, ...]:
    kinds = args.get("kinds", list(default))
    if not isinstance(kinds, list) or not kinds or any(k not in KINDS for k in kinds) or len(set(kinds)) < len(kinds):
        raise ValueError(f"kinds ({kinds!r}): expected a list of distinct kinds from {', '.join(KINDS)}. Fix the "
                         "value.")
    return tuple(kinds)


def _tasks_file(args: dict, base: Path | None) -> None:
    value = args.get("tasks")
    if value is None or (isinstance(value, str) and value.startswith("@")):
        return
    if not isinstance(value, str):
        raise ValueError(f"tasks ({value!r}): expected the path of a JSONL task file. Fix the value.")
    path = Path(value) if Path(value).is_absolute() else (base or Path.cwd()) / value
    try:
        load_tasks(path)
    except ValueError as exc:
        raise ValueError(f"tasks {exc}") from None


def check_data_args(args: dict, base: Path | None) -> None:
    """Step ``button_data``'s args (module docstring); a ValueError naming the argument."""
    from planner.pipeline import check_known_args, check_whole_args

    check_known_args(args, DATA_ARGS, "button_data")
    _kinds(args, KINDS)
    check_whole_args(args, (("rows", 1, 1_000_000), ("seed", 0, 2**31 - 1)))
    _tasks_file(args, base)


def check_eval_args(args: dict, base: Path | None) -> None:
    """Step ``button_eval``'s args (module docstring); a ValueError naming the argument."""
    from planner.pipeline import check_known_args, check_model_arg, check_whole_args

    check_known_args(args, EVAL_ARGS, "button_eval")
    check_model_arg("model", args.get("model"), base, "the model whose calls are executed")
    if "component" in args and not isinstance(args["component"], str):
        raise ValueError(f"component ({args['component']!r}): expected the component name of the model's export "
                         "(e.g. policy). Fix the value.")
    _kinds(args, ("sequential", "parallel"))
    check_whole_args(args, (("limit", 1, 1_000_000), ("seed", 0, 2**31 - 1), ("max_turns", 1, 32),
                            ("new_tokens", 4, 256)))
    _tasks_file(args, base)


# --------------------------------------------------------------------------- the steps


def data_step(ctx) -> None:
    """Step ``button_data`` (a planner.pipeline.StepContext): the train trajectories and their tasks."""
    args = ctx.args
    if "tasks" in args:
        tasks = load_tasks(ctx.path(args["tasks"]))
    else:
        tasks = generate(_kinds(args, KINDS), "train", args.get("seed", 0), args.get("rows", 2000))
    out = ctx.artifact("data")
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in chat_rows(tasks)))
    (out / "tasks.jsonl").write_text("".join(json.dumps(t.to_json()) + "\n" for t in tasks))


def eval_step(ctx) -> dict[str, float]:
    """Step ``button_eval``: the model plays the tasks; their metrics (recipes.alignment.button_eval)."""
    from recipes.alignment.button_eval import model_responder, play, score

    args = ctx.args
    folder = ctx.path(args["model"])
    if "component" in args and (folder / args["component"]).is_dir():  # a plain export folder, not a reference
        folder = folder / args["component"]
    if "tasks" in args:
        tasks = load_tasks(ctx.path(args["tasks"]))
    else:
        tasks = generate(_kinds(args, ("sequential", "parallel")), "heldout", args.get("seed", 0))
    tasks = tasks[:args["limit"]] if "limit" in args else tasks
    respond = model_responder(folder, args.get("new_tokens", 24))
    return score(play(tasks, respond, args.get("max_turns", 6)))


# --------------------------------------------------------------------------- tokenizer and model


def vocabulary_texts() -> list[str]:
    """Every text the generator can write: the world's words, every question, the system message's slots and the
    chat roles (the tool's included)."""
    return [*vocabulary(), *(q for pool in templates().values() for q, _ in pool), SERIAL, PARALLEL,
            "functions", "tool"]


def write_tokenizer(folder: str | Path) -> Path:
    """The word-level tokenizer (module docstring) saved in ``folder``."""
    from transformers import AutoTokenizer

    from recipes.alignment.make import _example

    _example("make_tokenizer").build_tokenizer(folder, vocabulary_texts())
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.eos_token = "<|im_end|>"  # the assistant's turn ends with it: greedy decoding stops there
    tokenizer.save_pretrained(folder)
    return Path(folder)


def write_model(folder: str | Path = HERE / "models" / "button", seed: int = 0, **config) -> Path:
    """A tiny Llama (:data:`LLAMA`, ``config`` overriding) over the tokenizer's vocabulary, saved with it."""
    from transformers import AutoTokenizer

    from recipes.alignment.make import _example

    write_tokenizer(folder)
    vocab = len(AutoTokenizer.from_pretrained(folder, local_files_only=True))
    return _example("make_models").save_llama(folder, seed=seed, vocab_size=vocab, **(LLAMA | config))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.alignment.button_steps",
                                     description="write BUTTON's tiny Llama and its tokenizer")
    parser.add_argument("--models", default=str(HERE / "models"), help="the folder button/ is written under")
    args = parser.parse_args(argv)
    print(f"wrote {write_model(Path(args.models) / 'button')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
