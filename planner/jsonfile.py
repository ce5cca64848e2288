"""Reading a JSON file a user hands Loom (a plan, a plan set, a cost file, a trace, a tokenizer file): every way the
file can fail to be JSON -- missing, a directory, unreadable, larger than its kind ever is, not UTF-8, not JSON,
nested deeper than the parser recurses -- is one SpecError line naming the file, what it should hold and the command
that writes one. What the JSON must contain is each reader's own check (planner.plan, planner.plan_cache,
planner.costfile, orchestrator.trace, runtime.source_files).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from planner.errors import SpecError


@dataclass(frozen=True)
class JsonKind:
    """One kind of JSON file Loom reads, for its messages and its size limit."""

    name: str  # "cost file": "no such cost file"
    shape: str  # "not a profiled cost file": the start of every message about the file's structure
    expected: str  # what the file should hold: "expected <expected>"
    fix: str  # the command that writes one, as a sentence without its full stop
    max_bytes: int  # no file of this kind is larger; a larger one would only exhaust memory


def read_json(path: str | Path, kind: JsonKind, source: str | None = None) -> object:
    """The parsed JSON of the file at ``path``; a SpecError otherwise (module docstring) that starts with ``source``,
    how the user named the file (``--plan PATH``; default the path)."""
    path = Path(path)
    source = str(path) if source is None else source
    try:
        if path.is_file() and path.stat().st_size > kind.max_bytes:
            raise SpecError(f"{source}: {kind.shape}: {path.stat().st_size} bytes, more than {kind.max_bytes}; "
                            f"expected {kind.expected}. {kind.fix}.")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{source}: no such {kind.name}. Check the path; {kind.fix[0].lower()}{kind.fix[1:]} to make "
                        "one.") from None
    except IsADirectoryError:
        raise SpecError(f"{source}: is a directory, not a {kind.name}. Give the file itself.") from None
    except UnicodeDecodeError:
        raise SpecError(f"{source}: {kind.shape} (not UTF-8 text); expected {kind.expected}. {kind.fix}.") from None
    except OSError as exc:
        raise SpecError(f"{source}: cannot read the {kind.name} ({exc.strerror or exc}). Check the path.") from None
    return parse_json(text, source, kind)


def parse_json(text: str, source: str, kind: JsonKind) -> object:
    """``json.loads(text)``; a SpecError naming ``source`` for text that is not JSON or is nested too deeply."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else "not JSON"
        raise SpecError(f"{source}: {kind.shape} ({reason}); expected {kind.expected}. {kind.fix}.") from None
