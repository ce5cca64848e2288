"""BUTTON's evaluation by execution: a model plays the assistant on held-out tasks, its calls run against the world's
tools, and it is scored on the final answer and on its arguments.

An episode starts from the task's system message and question. Each turn the model writes one assistant turn;
button_world.parse_turn reads it: calls are executed (the tool agent answers with each call echoed and its result,
``error`` for values a tool refuses) and the conversation goes on; an answer ends the episode. A malformed turn (not
a call to an offered function with exactly its parameters, nor ``answer X``) ends it as a failure, as does running
out of turns. Metrics (each in [0, 1]):

- ``task_success``: the fraction of episodes whose answer equals the task's answer (the plan executed);
- ``argument_accuracy``: the fraction of the tasks' gold calls (name and resolved arguments; either order of a
  commutative tool's values) the model made, each made call matching at most one gold call;
- ``malformed_rate``: the fraction of episodes ended by a malformed turn;
- ``task_success_<kind>`` for each kind of task present (atomic, sequential, parallel).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from recipes.alignment.button import KINDS, Composition
from recipes.alignment.button_world import Call, CallError, answer_turn, call_turn, execute, parse_turn, tool_turn

Respond = Callable[[list[list[dict[str, str]]]], list[str]]  # conversations so far -> each one's next assistant turn


@dataclass
class Episode:
    """One task played by the model: the conversation, the calls it made, its answer (None if it gave none) and
    whether a malformed turn ended it."""

    task: Composition
    messages: list[dict[str, str]]
    calls: list[Call] = field(default_factory=list)
    answer: str | None = None
    malformed: bool = False
    done: bool = False

    @property
    def success(self) -> bool:
        return self.answer is not None and self.answer == self.task.answer()

    def matched_calls(self) -> int:
        """How many gold calls the model made (each made call counts for one gold call at most)."""
        free, matched = list(self.calls), 0
        for gold in self.task.gold_calls():
            hit = next((i for i, c in enumerate(free) if c.matches(gold)), None)
            if hit is not None:
                free.pop(hit)
                matched += 1
        return matched


def play(tasks: list[Composition], respond: Respond, max_turns: int = 6) -> list[Episode]:
    """Every task played to its end: at most ``max_turns`` assistant turns each, all open episodes answered together
    by one ``respond`` call per turn."""
    episodes = [Episode(t, [{"role": "system", "content": t.system()}, {"role": "user", "content": t.question}])
                for t in tasks]
    for _ in range(max_turns):
        open_ = [e for e in episodes if not e.done]
        if not open_:
            break
        for episode, text in zip(open_, respond([e.messages for e in open_])):
            step(episode, text)
    for episode in episodes:
        episode.done = True
    return episodes


def step(episode: Episode, text: str) -> None:
    """Apply one assistant turn to ``episode``: run its calls, take its answer, or end it as malformed."""
    try:
        parsed = parse_turn(text, episode.task.functions)
    except CallError:
        episode.malformed = episode.done = True
        episode.messages.append({"role": "assistant", "content": text})
        return
    if isinstance(parsed, str):
        episode.answer, episode.done = parsed, True
        episode.messages.append({"role": "assistant", "content": answer_turn(parsed)})
        return
    results = [execute(c) for c in parsed]
    episode.calls += parsed
    episode.messages += [{"role": "assistant", "content": call_turn(parsed)},
                         {"role": "tool", "content": tool_turn(parsed, results)}]


def score(episodes: list[Episode]) -> dict[str, float]:
    """The metrics of the module docstring over ``episodes``."""
    if not episodes:
        return {"task_success": 0.0, "argument_accuracy": 0.0, "malformed_rate": 0.0}
    gold = sum(len(e.task.gold_calls()) for e in episodes)
    metrics = {"task_success": sum(e.success for e in episodes) / len(episodes),
               "argument_accuracy": sum(e.matched_calls() for e in episodes) / gold,
               "malformed_rate": sum(e.malformed for e in episodes) / len(episodes)}
    for kind in KINDS:
        mine = [e for e in episodes if e.task.kind == kind]
        if mine:
            metrics[f"task_success_{kind}"] = sum(e.success for e in mine) / len(mine)
    return metrics


def model_responder(folder, new_tokens: int = 24, batch_size: int = 64) -> Respond:
    """A :data:`Respond` from an exported model folder: each conversation rendered by the tokenizer's chat template
    with the assistant's generation prompt, answered greedily (recipes.alignment.generation) up to the end of the
    turn (the tokenizer's eos, the end-of-turn marker) or ``new_tokens``."""
    from recipes.alignment.generation import greedy, load

    model, tokenizer = load(folder)

    def respond(conversations: list[list[dict[str, str]]]) -> list[str]:
        prompts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in conversations]
        return greedy(model, tokenizer, prompts, new_tokens, batch_size)

    return respond
