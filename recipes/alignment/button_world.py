"""BUTTON's toy world: a small store and a calendar whose tools are real, deterministic Python functions, and the
compact call syntax a word-level tokenizer reads.

Tools (:data:`TOOLS`): ``price(item)`` and ``stock(item)`` look the store's table up, ``multiply(a, b)`` and
``add(a, b)`` compute, ``shift(day, days)`` is the day ``days`` after ``day`` in a 31-day month and ``weekday(day)``
its weekday (day 1 is a monday). A tool raises :class:`ToolError` on a value outside its domain (an unknown item, a
day past the month); the tool agent reports ``error`` for that call and the conversation goes on.

Call syntax (every token space-separated, so that the tokenizer's whitespace split sees each one):

    assistant  call price ( item = apple ) ; price ( item = pear )        one or more calls, ';' between them
    tool       price ( item = apple ) = 3 ; price ( item = pear ) = 4     each call echoed with its result
    assistant  answer 7                                                    the final answer

:func:`parse_turn` reads an assistant turn into calls or an answer and raises :class:`CallError` on anything else (an
unknown function or argument, a missing value, stray tokens): the evaluation scores such a turn 0 and stops the
episode, it never crashes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

# item -> (unit price, count in stock)
STORE = {"apple": (3, 12), "pear": (4, 7), "plum": (2, 15), "bread": (5, 6), "milk": (2, 9), "cheese": (8, 4),
         "rice": (6, 11), "tea": (7, 5), "egg": (1, 18), "fish": (9, 3), "soap": (3, 8), "lamp": (9, 2)}
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
DAYS_IN_MONTH = 31
MAX_NUMBER = 200  # the largest number the tokenizer holds as a word


class ToolError(ValueError):
    """A tool was called with a value outside its domain."""


class CallError(ValueError):
    """An assistant turn that is not a well-formed call or answer."""


def _item(value: str) -> tuple[int, int]:
    if value not in STORE:
        raise ToolError(f"no item {value!r} in the store")
    return STORE[value]


def _day(value: int) -> int:
    if not 1 <= value <= DAYS_IN_MONTH:
        raise ToolError(f"day {value} is not in the month (1..{DAYS_IN_MONTH})")
    return value


def price(item: str) -> int:
    return _item(item)[0]


def stock(item: str) -> int:
    return _item(item)[1]


def multiply(a: int, b: int) -> int:
    return a * b


def add(a: int, b: int) -> int:
    return a + b


def shift(day: int, days: int) -> int:
    return _day(_day(day) + days)


def weekday(day: int) -> str:
    return WEEKDAYS[(_day(day) - 1) % 7]


@dataclass(frozen=True)
class Tool:
    """A function the assistant can call: its name, parameters (name -> type: ``int`` or ``str``), a short
    description (what the system message shows) and the Python function that runs it."""

    name: str
    params: tuple[tuple[str, type], ...]
    description: str
    run: Callable[..., int | str]
    commutative: bool = False  # argument order does not change the result (for argument accuracy)

    def signature(self) -> str:
        """``name ( p1 , p2 ) : description`` as the system message lists it."""
        return f"{self.name} ( {' , '.join(p for p, _ in self.params)} ) : {self.description}"

    def __call__(self, arguments: Mapping[str, str]) -> str:
        """The result as text, from arguments as text; a ToolError when a value does not fit."""
        values = {}
        for param, kind in self.params:
            value = arguments[param]
            if kind is int:
                if not value.isdigit():
                    raise ToolError(f"{param} ({value!r}) is not a number")
                value = int(value)
            values[param] = value
        return str(self.run(**values))


TOOLS = {t.name: t for t in (
    Tool("price", (("item", str),), "the price of one item", price),
    Tool("stock", (("item", str),), "how many of an item are in stock", stock),
    Tool("multiply", (("a", int), ("b", int)), "a times b", multiply, commutative=True),
    Tool("add", (("a", int), ("b", int)), "a plus b", add, commutative=True),
    Tool("shift", (("day", int), ("days", int)), "the day some days after a day", shift),
    Tool("weekday", (("day", int),), "the weekday of a day", weekday),
)}


@dataclass(frozen=True)
class Call:
    """One function call: the tool's name and its arguments as text (in the order written)."""

    name: str
    arguments: tuple[tuple[str, str], ...]

    def text(self) -> str:
        return f"{self.name} ( {' , '.join(f'{k} = {v}' for k, v in self.arguments)} )"

    def matches(self, other: Call) -> bool:
        """The same call: same tool and arguments (any order of the values of a commutative tool)."""
        if self.name != other.name:
            return False
        mine, theirs = dict(self.arguments), dict(other.arguments)
        if mine == theirs:
            return True
        tool = TOOLS.get(self.name)
        return bool(tool and tool.commutative and sorted(mine) == sorted(theirs)
                    and sorted(mine.values()) == sorted(theirs.values()))


def execute(call: Call) -> str:
    """What the tool agent answers for ``call``: its result, or ``error`` when the tool refuses the values."""
    try:
        return TOOLS[call.name](dict(call.arguments))
    except ToolError:
        return "error"


def call_turn(calls: list[Call]) -> str:
    """The assistant's turn making ``calls``."""
    return "call " + " ; ".join(c.text() for c in calls)


def tool_turn(calls: list[Call], results: list[str]) -> str:
    """The tool agent's turn: each call echoed with its result."""
    return " ; ".join(f"{c.text()} = {r}" for c, r in zip(calls, results))


def answer_turn(answer: str) -> str:
    return f"answer {answer}"


def parse_turn(text: str, functions: tuple[str, ...]) -> list[Call] | str:
    """An assistant turn: the calls it makes (each to one of ``functions``, with exactly that tool's parameters and
    a value for each), or its final answer (a str). CallError on anything else."""
    words = text.split()
    if not words:
        raise CallError("an empty turn")
    if words[0] == "answer":
        if len(words) != 2:
            raise CallError(f"an answer is one word, got {words[1:]!r}")
        return words[1]
    if words[0] != "call":
        raise CallError(f"a turn starts with 'call' or 'answer', not {words[0]!r}")
    calls, rest = [], words[1:]
    while True:
        call, rest = _parse_call(rest, functions)
        calls.append(call)
        if not rest:
            return calls
        if rest[0] != ";":
            raise CallError(f"expected ';' between calls, got {rest[0]!r}")
        rest = rest[1:]


def _parse_call(words: list[str], functions: tuple[str, ...]) -> tuple[Call, list[str]]:
    if len(words) < 3 or words[1] != "(":
        raise CallError(f"a call is 'name ( key = value , ... )', got {' '.join(words[:3])!r}")
    name = words[0]
    if name not in functions or name not in TOOLS:
        raise CallError(f"{name!r} is not one of the functions offered ({', '.join(functions)})")
    arguments, i = [], 2
    while words[i:i + 1] != [")"]:
        if arguments:
            if words[i:i + 1] != [","]:
                raise CallError(f"expected ',' or ')' in the call to {name}")
            i += 1
        if len(words) < i + 3 or words[i + 1] != "=" or words[i + 2] in ("(", ")", ",", ";", "="):
            raise CallError(f"expected 'key = value' in the call to {name}")
        arguments.append((words[i], words[i + 2]))
        i += 3
    params = [p for p, _ in TOOLS[name].params]
    if sorted(k for k, _ in arguments) != sorted(params) or len(arguments) != len(params):
        raise CallError(f"{name} takes {', '.join(params)}; got {', '.join(k for k, _ in arguments) or 'nothing'}")
    return Call(name, tuple(arguments)), words[i + 1:]


def vocabulary() -> list[str]:
    """Every word the world's tools, their descriptions, results and the call syntax can write."""
    words = [*STORE, *WEEKDAYS, "call", "answer", "error", "(", ")", "=", ",", ";", ":", "."]
    words += [w for t in TOOLS.values() for w in (t.signature().split())]
    return words + [str(n) for n in range(MAX_NUMBER + 1)]
