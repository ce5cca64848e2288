"""Reading a JSON file a user hands Loom (a plan, a plan set, a cost file, a trace, a tokenizer file, a pretrained
folder's config or shard index): every way the file can fail to be JSON -- missing, a directory, a device or pipe,
unreadable, larger than its kind ever is, not UTF-8, not JSON, nested deeper than its kind's limit or than the parser
recurses -- is one line naming the file, what it should hold and the command that writes one (a SpecError, or the
kind's own error type: planner.pretrained's PretrainedError). What the JSON must contain is each reader's own check
(planner.plan, planner.plan_cache, planner.costfile, planner.pretrained, orchestrator.trace, runtime.source_files).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.errors import SpecError


@dataclass(frozen=True)
class JsonKind:
    """One kind of JSON file Loom reads, for its messages and its limits."""

    name: str  # "cost file": "no such cost file"
    shape: str  # "not a profiled cost file": the start of every message about the file's structure
    expected: str  # what the file should hold: "expected <expected>"
    fix: str  # the command that writes one, as a sentence without its full stop
    max_bytes: int  # no file of this kind is larger; a larger one would only exhaust memory
    max_depth: int | None = None  # no file of this kind nests deeper (None: as deep as the parser recurses)
    error: type[ValueError] = SpecError  # what its readers catch: a SpecError, or planner.pretrained's PretrainedError


def read_json(path: str | Path, kind: JsonKind, source: str | None = None) -> object:
    """The parsed JSON of the file at ``path``; a ``kind.error`` otherwise (module docstring) that starts with
    ``source``, how the user named the file (``--plan PATH``; default the path)."""
    path = Path(path)
    source = str(path) if source is None else source
    fail = kind.error
    try:
        if path.exists() and not path.is_file() and not path.is_dir():  # /dev/zero never ends, a pipe may block
            raise fail(f"{source}: not a regular file (a device, pipe or socket), not a {kind.name}. Give the file "
                       "itself.")
        if path.is_file() and path.stat().st_size > kind.max_bytes:
            raise fail(f"{source}: {kind.shape}: {path.stat().st_size} bytes, more than {kind.max_bytes}; "
                       f"expected {kind.expected}. {kind.fix}.")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise fail(f"{source}: no such {kind.name}. Check the path; {kind.fix[0].lower()}{kind.fix[1:]} to make "
                   "one.") from None
    except IsADirectoryError:
        raise fail(f"{source}: is a directory, not a {kind.name}. Give the file itself.") from None
    except UnicodeDecodeError:
        raise fail(f"{source}: {kind.shape} (not UTF-8 text); expected {kind.expected}. {kind.fix}.") from None
    except OSError as exc:
        raise fail(f"{source}: cannot read the {kind.name} ({exc.strerror or exc}). Check the path.") from None
    return parse_json(text, source, kind)


def parse_json(text: str, source: str, kind: JsonKind) -> object:
    """``json.loads(text)``; a ``kind.error`` naming ``source`` for text that is not JSON or is nested too deeply."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        reason = _too_deep(kind) if isinstance(exc, RecursionError) else "not JSON"
        raise kind.error(f"{source}: {kind.shape} ({reason}); expected {kind.expected}. {kind.fix}.") from None
    if kind.max_depth is not None and _depth(data) > kind.max_depth:
        raise kind.error(f"{source}: {kind.shape} ({_too_deep(kind)}); expected {kind.expected}. {kind.fix}.")
    return data


def _too_deep(kind: JsonKind) -> str:
    return "nested too deeply" if kind.max_depth is None else f"nested deeper than {kind.max_depth} levels"


def _depth(value: Any) -> int:
    """How deep JSON ``value`` nests (0 for a scalar), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level + 1)
            stack += [(v, level + 1) for v in (item.values() if isinstance(item, dict) else item)]
    return deepest
