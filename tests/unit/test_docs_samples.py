"""The console samples in README.md and docs/ are what the commands print (scripts/docs_samples.py writes them).

Every ```console block carries a marker. A generated sample of a deterministic command (validate, schema, plan)
must equal what the command prints now, re-run in-process, except its time stamps and planning time. A sample of
a command that trains or profiles (minutes, Ray) is checked for its format: each line must fit a format string of
the code that prints it (a log line: its logger's module; a result line: the orchestrator's), so a changed
message or summary line fails here until `.venv/bin/python scripts/docs_samples.py` regenerates the samples.
Fast: no Ray, no training.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import shlex
import sys
from functools import cache
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
REGENERATE = "run `.venv/bin/python scripts/docs_samples.py` (or `--cheap` for validate/plan/schema only)"
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (?:DEBUG|INFO|WARNING|ERROR) (?P<logger>[\w.]+): (?P<message>.*)$")
MIN_LITERAL_CHARS = 8  # a format string with fewer literal characters would match almost any line


def _load_script():
    spec = importlib.util.spec_from_file_location("docs_samples", ROOT / "scripts" / "docs_samples.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


docs_samples = _load_script()
try:
    SAMPLES, MARKER_ERROR = docs_samples.all_samples(ROOT), None
except ValueError as exc:  # an unmarked block or a bad marker: one failing test below, not a collection error
    SAMPLES, MARKER_ERROR = [], str(exc)
GENERATED = [s for s in SAMPLES if not s.by_hand]


def _id(sample) -> str:
    return f"{sample.where}:{sample.commands[0].subcommand}"


# --------------------------------------------------------------------------- format strings of the code


def _pattern(node: ast.AST) -> tuple[str, int] | None:
    """A regex for the strings ``node`` can produce, and its count of literal characters; None when it is no string.

    str constants (with printf fields), f-strings and ``+`` chains of them; any other part is a wildcard."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        parts = re.split(r"%%|%[-+ #0]*\d*(?:\.\d+)?[sdifgexr]", node.value)
        return ".*?".join(re.escape(p) for p in parts), sum(len(p) for p in parts)
    if isinstance(node, ast.JoinedStr):
        regex, literal = "", 0
        for value in node.values:
            if isinstance(value, ast.Constant):
                regex, literal = regex + re.escape(value.value), literal + len(value.value)
            else:
                regex += ".*?"
        return regex, literal
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _pattern(node.left), _pattern(node.right)
        if left is None and right is None:
            return None
        left, right = left or (".*", 0), right or (".*", 0)
        return left[0] + right[0], left[1] + right[1]
    return None


@cache
def _formats(module_path: Path) -> tuple[re.Pattern, ...]:
    """The format strings of one source file, as full-line regexes (outermost string expressions only)."""
    tree = ast.parse(module_path.read_text())
    found, inner = [], set()
    for node in ast.walk(tree):
        if id(node) in inner:
            continue
        pattern = _pattern(node)
        if pattern is None:
            continue
        inner.update(id(child) for child in ast.walk(node) if child is not node)
        regex, literal = pattern
        if literal >= MIN_LITERAL_CHARS:
            found.append(re.compile(regex + r"\s*", re.DOTALL))
    return tuple(found)


def _module_file(logger: str) -> Path:
    path = ROOT / Path(*logger.split(".")).with_suffix(".py")
    assert path.is_file(), f"logger {logger!r} names no module of this repository ({path})"
    return path


def _unmatched_lines(lines: list[str]) -> list[str]:
    """The sample's output lines that fit no format string of the code that prints them."""
    result_formats = [f for p in sorted((ROOT / "orchestrator").glob("*.py")) for f in _formats(p)]
    bad = []
    for line in lines:
        if not line or line == docs_samples.ELISION or line.startswith("$ "):
            continue
        log_line = LOG_LINE.match(line)
        if log_line:
            formats, text = _formats(_module_file(log_line["logger"])), log_line["message"]
        else:
            formats, text = result_formats, line
        if not any(f.fullmatch(text) for f in formats):
            bad.append(line)
    return bad


# --------------------------------------------------------------------------- tests


def test_every_console_block_is_marked_and_some_are_generated() -> None:
    assert MARKER_ERROR is None, MARKER_ERROR
    assert SAMPLES, "no console samples found in README.md or docs/"
    assert any(s.commands and s.commands[0].deterministic for s in GENERATED)
    assert any(s.commands and not s.commands[0].deterministic for s in GENERATED)
    for sample in SAMPLES:
        assert sample.by_hand or sample.commands, f"{sample.where}: a sample marker without a command"
        assert not sample.by_hand or sample.reason, f"{sample.where}: a by-hand sample says why it is not generated"


@pytest.mark.parametrize("sample", [s for s in GENERATED if all(c.deterministic for c in s.commands)], ids=_id)
def test_deterministic_sample_is_what_the_command_prints(sample) -> None:
    from orchestrator.cli import app

    outputs = []
    for command in sample.commands:
        result = CliRunner().invoke(app, list(command.argv[1:]))
        outputs.append(result.stdout if command.stdout_only else result.output)
    expected = docs_samples.render_block(sample.commands, outputs)
    assert docs_samples.mask(sample.lines) == docs_samples.mask(expected), (
        f"{sample.where}: the sample is not what `{sample.commands[0].text}` prints now; {REGENERATE}")


@pytest.mark.parametrize("sample", [s for s in GENERATED if not all(c.deterministic for c in s.commands)], ids=_id)
def test_run_sample_has_the_commands_format(sample) -> None:
    shown = [f"$ {c.text}" for c in sample.commands]
    assert [line for line in sample.lines if line.startswith("$ ")] == shown, (
        f"{sample.where}: the block's commands are not its marker's ({shown}); {REGENERATE}")
    bad = _unmatched_lines(list(sample.lines))
    assert not bad, f"{sample.where}: lines no code prints any more: {bad}; {REGENERATE}"


def test_the_format_check_fails_on_a_changed_line() -> None:
    """The check above can fail: a reworded summary line or log message fits no format string."""
    good = ["step time: 0.52 s measured (mean after the first step), 0.5 s predicted (1.0x the prediction)",
            "12:00:01 INFO orchestrator.metrics: step 2/60  caption 2.0  align 0.7  rating 1.1  (0.868 s)"]
    assert _unmatched_lines(good) == []
    bad = ["iteration time: 0.52 s measured, 0.5 s predicted",
           "12:00:01 INFO orchestrator.metrics: iteration 2 of 60 done"]
    assert _unmatched_lines(bad) == bad


def test_filters_and_masks() -> None:
    output = "a\nWave 0: x\nWave 1: y\nrow\npredicted iteration 1 ms\nz  \n"
    command = docs_samples.parse_command('loom plan j.yaml | cut "Wave 1:" "predicted iteration"', "here")
    assert docs_samples.render_block((command,), [output]) == [
        "$ loom plan j.yaml", "a", "Wave 0: x", "...", "predicted iteration 1 ms", "z"]
    keep = docs_samples.parse_command("loom run j.yaml | keep '^(z|a)'", "here")
    assert docs_samples.apply_filters(output, keep.filters) == ["a", "z"]
    assert docs_samples.mask(["12:00:01 INFO x: y", "planning time  2.11 s"]) == [
        "HH:MM:SS INFO x: y", "planning time  <time>"]
    with pytest.raises(ValueError, match="filter"):
        docs_samples.parse_command("loom plan j.yaml | head 3", "here")
    assert shlex.split(command.text) == ["loom", "plan", "j.yaml"]
