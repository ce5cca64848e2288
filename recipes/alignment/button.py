"""BUTTON (arXiv 2410.12952) on the toy world of recipes.alignment.button_world: compositional tasks, the functions
generated from them, and multi-agent trajectories (user, assistant, tool) as chat conversations.

- **Atomic tasks** make one call (``how much is one apple ?`` -> ``price``). **Compositions** build on them:
  *sequential* (an atomic task's result feeds the next call: ``how much do 4 apple cost ?`` -> ``price``, then
  ``multiply`` of its result by 4) and *parallel* (independent calls, then one that combines their results:
  ``how much do one apple and one pear cost together ?`` -> two ``price`` calls, then ``add``). A
  :class:`Composition` holds the question and its plan: steps of calls whose arguments may name an earlier call's
  result (``$1`` is the first call's).
- **Functions from the composition**: the system message lists the functions the composition's calls use (plus one
  distractor from the world, so that the assistant must choose), with the signatures and descriptions of the world's
  tools, and BUTTON's parallel slot: ``call one function at a time .`` or ``you may call independent functions
  together .``.
- **Trajectories** come from three simulated agents: the user poses the question, the assistant follows the plan
  (one turn per step when parallel calls are allowed, one per call otherwise, then ``answer X``), and the tool agent
  runs the world's real functions (button_world.execute) and echoes each call with its result.

Tasks split into train and held-out by a stable hash of the question (one in five held out), so no held-out question
is ever trained on. Real tasks load from a JSONL file (:func:`load_tasks`, format in docs/recipes/alignment.md,
BUTTON): the same :class:`Composition` the generator makes, so the data and evaluation steps read either.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from recipes.alignment.button_world import STORE, TOOLS, Call, answer_turn, call_turn, execute, tool_turn

KINDS = ("atomic", "sequential", "parallel")
SERIAL = "call one function at a time ."
PARALLEL = "you may call independent functions together ."
HELDOUT_ONE_IN = 5


@dataclass(frozen=True)
class Composition:
    """A task: the user's question, the functions offered, whether parallel calls are allowed, and the plan: steps
    of calls (the calls of a step are independent) whose argument values are text or ``$k``, the k-th call's result
    (1-based over the whole plan, from an earlier step)."""

    kind: str
    question: str
    functions: tuple[str, ...]
    parallel: bool
    steps: tuple[tuple[Call, ...], ...]

    def run(self) -> tuple[list[list[Call]], list[list[str]], str]:
        """The plan executed against the tools: each step's calls with the references replaced by the results, the
        results, and the final answer (the last call's result)."""
        results: list[str] = []
        calls, outputs = [], []
        for step in self.steps:
            resolved = [Call(c.name, tuple((k, _resolve(v, results)) for k, v in c.arguments)) for c in step]
            out = [execute(c) for c in resolved]
            calls.append(resolved)
            outputs.append(out)
            results += out
        return calls, outputs, results[-1]

    def gold_calls(self) -> list[Call]:
        """Every call of the executed plan, in order (what argument accuracy compares with)."""
        return [c for step in self.run()[0] for c in step]

    def answer(self) -> str:
        return self.run()[2]

    def system(self) -> str:
        """The system message: the functions offered, then the parallel slot."""
        listed = " ; ".join(TOOLS[f].signature() for f in self.functions)
        return f"functions : {listed} . {PARALLEL if self.parallel else SERIAL}"

    def messages(self) -> list[dict[str, str]]:
        """The three agents' trajectory: system, user question, then assistant calls and tool results, and the
        assistant's answer."""
        messages = [{"role": "system", "content": self.system()}, {"role": "user", "content": self.question}]
        calls, outputs, answer = self.run()
        for step, results in zip(calls, outputs):
            turns = [(step, results)] if self.parallel else [([c], [r]) for c, r in zip(step, results)]
            for turn_calls, turn_results in turns:
                messages.append({"role": "assistant", "content": call_turn(turn_calls)})
                messages.append({"role": "tool", "content": tool_turn(turn_calls, turn_results)})
        messages.append({"role": "assistant", "content": answer_turn(answer)})
        return messages

    def to_json(self) -> dict:
        """The documented task line (:func:`load_tasks` reads it back)."""
        return {"kind": self.kind, "question": self.question, "functions": list(self.functions),
                "parallel": self.parallel, "answer": self.answer(),
                "calls": [[{"name": c.name, "arguments": dict(c.arguments)} for c in step] for step in self.steps]}


def _resolve(value: str, results: list[str]) -> str:
    return results[int(value[1:]) - 1] if value.startswith("$") else value


def _c(name: str, **arguments) -> Call:
    return Call(name, tuple((k, str(v)) for k, v in arguments.items()))


ITEMS = tuple(STORE)


def templates() -> dict[str, list[tuple[str, tuple[tuple[Call, ...], ...]]]]:
    """Every (question, plan) of each kind the generator knows, in a fixed order."""
    atomic = [(f"how much is one {i} ?", ((_c("price", item=i),),)) for i in ITEMS]
    atomic += [(f"how many {i} are in stock ?", ((_c("stock", item=i),),)) for i in ITEMS]
    atomic += [(f"what is {a} times {b} ?", ((_c("multiply", a=a, b=b),),)) for a in range(2, 10) for b in range(2, 13)]
    atomic += [(f"what is {a} plus {b} ?", ((_c("add", a=a, b=b),),)) for a in range(1, 21) for b in range(1, 21)]
    atomic += [(f"which day is {n} days after day {d} ?", ((_c("shift", day=d, days=n),),))
               for d in range(1, 21) for n in range(1, 10)]
    atomic += [(f"what weekday is day {d} ?", ((_c("weekday", day=d),),)) for d in range(1, 32)]
    sequential = [(f"how much do {n} {i} cost ?", ((_c("price", item=i),), (_c("multiply", a="$1", b=n),)))
                  for i in ITEMS for n in range(2, 10)]
    sequential += [(f"what weekday is {n} days after day {d} ?", ((_c("shift", day=d, days=n),),
                                                                   (_c("weekday", day="$1"),)))
                   for d in range(1, 21) for n in range(1, 10)]
    sequential += [(f"how many {i} are in stock after {n} more arrive ?", ((_c("stock", item=i),),
                                                                         (_c("add", a="$1", b=n),)))
                   for i in ITEMS for n in range(1, 10)]
    parallel = [(f"how much do one {x} and one {y} cost together ?",
                 ((_c("price", item=x), _c("price", item=y)), (_c("add", a="$1", b="$2"),)))
                for x in ITEMS for y in ITEMS if x != y]
    parallel += [(f"how many {x} and {y} are in stock together ?",
                  ((_c("stock", item=x), _c("stock", item=y)), (_c("add", a="$1", b="$2"),)))
                 for x in ITEMS for y in ITEMS if x != y]
    parallel += [(f"how much are all the {i} in stock worth ?",
                  ((_c("stock", item=i), _c("price", item=i)), (_c("multiply", a="$1", b="$2"),))) for i in ITEMS]
    return {"atomic": atomic, "sequential": sequential, "parallel": parallel}


def heldout(question: str) -> bool:
    """Whether ``question`` is held out (never trained on): one in :data:`HELDOUT_ONE_IN` by a stable hash."""
    return zlib.crc32(question.encode()) % HELDOUT_ONE_IN == 0


def _present(kind: str, question: str, steps, rng: random.Random) -> Composition:
    """The composition with the functions generated from it: its tools plus one distractor, in a drawn order, and
    a drawn parallel slot."""
    used = list(dict.fromkeys(c.name for step in steps for c in step))
    functions = used + [rng.choice([t for t in TOOLS if t not in used])]
    rng.shuffle(functions)
    return Composition(kind, question, tuple(functions), rng.random() < 0.5, steps)


def generate(kinds: tuple[str, ...], split: str, seed: int, rows: int | None = None) -> list[Composition]:
    """Tasks of ``kinds`` from ``split``: for ``train``, ``rows`` draws (each kind equally often, then a question
    uniformly), each presented afresh; for ``heldout``, every held-out question of those kinds once (the first
    ``rows`` of them when given), presented by a generator seeded from the question."""
    pools_by_kind = templates()
    pools = {k: [(q, s) for q, s in pools_by_kind[k] if heldout(q) == (split == "heldout")] for k in kinds}
    if split == "heldout":
        tasks = [_present(k, q, s, random.Random(f"{seed}/{q}")) for k in kinds for q, s in pools[k]]
        return tasks[:rows] if rows is not None else tasks
    rng = random.Random(f"{seed}/train")
    out = []
    for i in range(rows or 0):
        kind = kinds[i % len(kinds)]
        question, steps = rng.choice(pools[kind])
        out.append(_present(kind, question, steps, rng))
    return out


def chat_rows(tasks: list[Composition]) -> Iterator[dict]:
    """The ``chat`` format lines (docs/data.md) of the tasks' trajectories."""
    for task in tasks:
        yield {"messages": task.messages(), "kind": task.kind}


# --------------------------------------------------------------------------- the documented task file


def load_tasks(path: str | Path) -> list[Composition]:
    """Tasks from a JSONL file, one :meth:`Composition.to_json` object a line (``kind``, ``parallel`` and
    ``answer`` optional). A ValueError naming the file and line when a line does not describe a task the world's
    tools can run."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"({path}): no such file. Point it at a JSONL file of tasks (docs/recipes/alignment.md, "
                         "BUTTON).")
    tasks = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            tasks.append(_task(json.loads(line)))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"({path}): line {n}: {exc}. Fix or remove the line.") from None
    if not tasks:
        raise ValueError(f"({path}): no tasks in the file. Give one JSON object a line.")
    return tasks


def _task(row: dict) -> Composition:
    if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].split():
        raise ValueError("expected an object with a non-empty 'question'")
    functions = row.get("functions")
    if not isinstance(functions, list) or not functions or any(f not in TOOLS for f in functions):
        raise ValueError(f"'functions' ({functions!r}) must list tools of the world ({', '.join(TOOLS)})")
    plan = row.get("calls")
    if not isinstance(plan, list) or not plan or not all(isinstance(s, list) and s for s in plan):
        raise ValueError("'calls' must be a list of steps, each a non-empty list of calls")
    steps, made = [], 0
    for step in plan:
        calls = []
        for call in step:
            name, arguments = call["name"], call["arguments"]
            if name not in functions:
                raise ValueError(f"call to {name!r}, which 'functions' does not offer")
            params = [p for p, _ in TOOLS[name].params]
            if not isinstance(arguments, dict) or sorted(arguments) != sorted(params):
                raise ValueError(f"{name} takes {', '.join(params)}; got {arguments!r}")
            for value in map(str, arguments.values()):
                if value.startswith("$") and not (value[1:].isdigit() and 1 <= int(value[1:]) <= made):
                    raise ValueError(f"{value!r} is not the result of a call of an earlier step (1..{made})")
            calls.append(Call(name, tuple((k, str(v)) for k, v in arguments.items())))
        steps.append(tuple(calls))
        made += len(calls)
    parallel = row.get("parallel", True)
    if not isinstance(parallel, bool):
        raise ValueError(f"'parallel' ({parallel!r}) must be true or false")
    task = Composition(str(row.get("kind", "sequential" if len(steps) > 1 else "atomic")), row["question"],
                       tuple(functions), parallel, tuple(steps))
    answer = task.answer()
    if "error" in [r for outs in task.run()[1] for r in outs]:
        raise ValueError("a call's values are outside its tool's domain (the tool answers 'error')")
    if "answer" in row and str(row["answer"]) != answer:
        raise ValueError(f"'answer' ({row['answer']!r}) is not what the calls give ({answer!r})")
    return task
