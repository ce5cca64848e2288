"""Regenerate the console samples in README.md and docs/**/*.md from the commands' real output.

    .venv/bin/python scripts/docs_samples.py            # every sample (runs `loom profile` + `loom run`: ~2 min)
    .venv/bin/python scripts/docs_samples.py --cheap    # only the quick, deterministic ones (validate, plan, schema)
    .venv/bin/python scripts/docs_samples.py --check    # change nothing; exit 1 when a cheap sample differs

A sample is a fenced ``console`` block right after a marker naming the commands that produce it,
one per line (a single command may sit on the marker's first line)::

    <!-- sample: loom plan examples/medical-unimed.yaml | stdout | cut "Wave 1:" "predicted iteration" -->
    ```console
    $ loom plan examples/medical-unimed.yaml
    ...
    ```

Each command runs from the repository root (``loom`` is this interpreter's ``python -m
orchestrator``) with stdout and stderr in one pipe, as a terminal shows them when they are not
terminals themselves (plain log lines, tables at the piped width). After ``|``, filters shorten
what is shown:

- ``stdout``: stdout only (leave out the progress and log lines on stderr);
- ``cut START END``: the lines from the first one containing START up to the next one containing
  END (not included) become one ``...`` line;
- ``keep REGEX``: only the lines that match REGEX (``re.search``).

``<!-- sample-by-hand: REASON -->`` marks a block this script leaves alone (it needs a Ray cluster
or a trained model); every console block carries one marker or the other
(``tests/unit/test_docs_samples.py`` checks it, re-runs the deterministic commands and checks the
lines of the others against the format strings of the code that prints them).

Commands other than validate, schema and plan (``loom run``, ``loom profile``) take minutes; each
distinct command runs once per invocation, so README.md and docs/run.md show the same run.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC_GLOBS = ("README.md", "docs/*.md", "docs/**/*.md")
# subcommands whose output is a pure function of the repository: the test re-runs them and wants the same text
DETERMINISTIC = frozenset({"validate", "schema", "plan"})

MARKER = re.compile(r"<!-- sample(?P<by_hand>-by-hand)?:(?P<body>.*?)-->", re.DOTALL)
FENCE_OPEN, FENCE_CLOSE = "```console", "```"
ELISION = "..."
# parts of a deterministic command's output that vary between runs: masked before comparing
VOLATILE = (
    (re.compile(r"^\d\d:\d\d:\d\d "), "HH:MM:SS "),  # a plain log line's time
    (re.compile(r"^(planning time\s+)\S+ \S+"), r"\1<time>"),  # `loom plan`'s wall time
)


@dataclass(frozen=True)
class Command:
    """One marked command: what runs, and the filters that shorten its output."""

    argv: tuple[str, ...]  # starts with "loom"
    filters: tuple[tuple[str, ...], ...]

    @property
    def text(self) -> str:
        return shlex.join(self.argv)

    @property
    def subcommand(self) -> str:
        return self.argv[1] if len(self.argv) > 1 else ""

    @property
    def stdout_only(self) -> bool:
        return any(f[0] == "stdout" for f in self.filters)

    @property
    def deterministic(self) -> bool:
        return self.subcommand in DETERMINISTIC


@dataclass(frozen=True)
class Sample:
    """A marked console block of one file: where it is and what it holds."""

    path: Path
    commands: tuple[Command, ...]  # empty for a by-hand sample
    reason: str  # a by-hand sample's reason
    start: int  # index in the file's lines of the ```console line
    end: int  # index of the closing ``` line
    lines: tuple[str, ...]  # the block's lines between the fences

    @property
    def by_hand(self) -> bool:
        return not self.commands

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.start + 1}"


def parse_command(text: str, where: str) -> Command:
    """``loom ARGS [| FILTER ARGS]...`` -> Command; a ValueError naming ``where`` for anything else."""
    parts = [shlex.split(part) for part in text.split(" | ")]
    argv, filters = parts[0], tuple(tuple(p) for p in parts[1:])
    if not argv or argv[0] != "loom":
        raise ValueError(f"{where}: sample command {text!r} does not start with 'loom'")
    arity = {"stdout": 0, "cut": 2, "keep": 1}
    for f in filters:
        if not f or f[0] not in arity or len(f) - 1 != arity[f[0]]:
            raise ValueError(f"{where}: filter {shlex.join(f)!r} is not one of: stdout, cut START END, keep REGEX")
    return Command(tuple(argv), filters)


def find_samples(path: Path) -> list[Sample]:
    """Every ```console block of ``path`` with its marker; a ValueError for a block without one."""
    text = path.read_text()
    lines = text.split("\n")
    samples, i = [], 0
    marker_end = {}  # line index where a marker closes -> the marker
    for match in MARKER.finditer(text):
        marker_end[text.count("\n", 0, match.end())] = match
    while i < len(lines):
        if lines[i].strip() != FENCE_OPEN:
            i += 1
            continue
        start = i
        end = next((j for j in range(start + 1, len(lines)) if lines[j].strip() == FENCE_CLOSE), None)
        where = f"{path.relative_to(ROOT)}:{start + 1}"
        if end is None:
            raise ValueError(f"{where}: console block without a closing fence")
        match = marker_end.get(start - 1)
        if match is None:
            raise ValueError(f"{where}: console block without a `<!-- sample: COMMAND -->` or "
                             "`<!-- sample-by-hand: REASON -->` marker on the line above it")
        body = match["body"].strip()
        if match["by_hand"]:
            commands, reason = (), body
        else:
            reason = ""
            commands = tuple(parse_command(line.strip(), where) for line in body.splitlines() if line.strip())
        samples.append(Sample(path, commands, reason, start, end, tuple(lines[start + 1:end])))
        i = end + 1
    return samples


def all_samples(root: Path = ROOT) -> list[Sample]:
    paths = sorted({p for pattern in DOC_GLOBS for p in root.glob(pattern)})
    return [s for p in paths for s in find_samples(p)]


# --------------------------------------------------------------------------- output -> block


def apply_filters(output: str, filters: tuple[tuple[str, ...], ...]) -> list[str]:
    """The lines of ``output`` to show (trailing spaces dropped) after ``filters`` in order."""
    lines = [line.rstrip() for line in output.rstrip("\n").split("\n")] if output.strip() else []
    for f in filters:
        if f[0] == "keep":
            lines = [line for line in lines if re.search(f[1], line)]
        elif f[0] == "cut":
            first = next((k for k, line in enumerate(lines) if f[1] in line), None)
            if first is None:
                continue
            stop = next((k for k in range(first + 1, len(lines)) if f[2] in lines[k]), len(lines))
            lines = lines[:first] + [ELISION] + lines[stop:]
    return lines


def render_block(commands: tuple[Command, ...], outputs: list[str]) -> list[str]:
    """The console block's lines: ``$ COMMAND`` then its shown output, a blank line between commands."""
    block: list[str] = []
    for k, (command, output) in enumerate(zip(commands, outputs)):
        if k:
            block.append("")
        block.append(f"$ {command.text}")
        block.extend(apply_filters(output, command.filters))
    return block


def mask(lines: list[str] | tuple[str, ...]) -> list[str]:
    """``lines`` with the parts that vary between runs of the same command replaced by placeholders."""
    out = []
    for line in lines:
        for pattern, replacement in VOLATILE:
            line = pattern.sub(replacement, line)
        out.append(line)
    return out


# --------------------------------------------------------------------------- running commands


def run_command(command: Command, cache: dict) -> str:
    """What ``command`` prints (stdout only, or stdout and stderr as they interleave), run once per invocation."""
    key = (command.argv, command.stdout_only)
    if key not in cache:
        print(f"docs_samples: running {command.text}", file=sys.stderr, flush=True)
        argv = [sys.executable, "-m", "orchestrator", *command.argv[1:]]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
        (ROOT / "out").mkdir(exist_ok=True)  # the samples write their files under out/, as main-job.sh does
        proc = subprocess.run(argv, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE if command.stdout_only else subprocess.STDOUT)
        if proc.returncode and not command.deterministic:  # an error line is a fine validate sample, not a run's
            sys.exit(f"docs_samples: `{command.text}` failed (exit {proc.returncode}):\n"
                     f"{(proc.stderr or '')[-2000:]}{proc.stdout[-2000:]}")
        cache[key] = proc.stdout
    return cache[key]


def earlier_runs(samples: list[Sample]) -> list[str]:
    """Why the ``loom run`` samples would stop before training: the default output folder of each (``out/<job>``, as
    ``loom run`` picks it without ``--out``) that holds an earlier run's checkpoints, which a fresh run refuses to
    replace (orchestrator.outdir.check_fresh_run)."""
    from orchestrator.outdir import earlier_run
    from planner.spec import load_job

    out = {}
    for command in {c.argv: c for s in samples if not s.by_hand for c in s.commands if c.subcommand == "run"}.values():
        if any(flag in command.argv for flag in ("--out", "--resume", "--overwrite")):
            continue
        folder = (ROOT / "out" / load_job(ROOT / command.argv[2]).name).relative_to(ROOT)
        found = earlier_run(ROOT / folder)
        if found:
            out[folder] = (f"{folder} holds an earlier run ({found}), which `{command.text}` refuses to replace; "
                           f"move it aside (mv {folder} {folder}.prev) and run this again")
    return [out[folder] for folder in sorted(out)]


def regenerate(samples: list[Sample], cheap_only: bool, check: bool) -> int:
    """Rewrite the blocks of ``samples`` (bottom up, per file); the number of blocks that changed."""
    cache: dict = {}
    changed, new_blocks = 0, {}
    for sample in samples:
        if sample.by_hand or (cheap_only and not all(c.deterministic for c in sample.commands)):
            continue
        block = render_block(sample.commands, [run_command(c, cache) for c in sample.commands])
        if mask(block) != mask(sample.lines):
            changed += 1
            print(f"docs_samples: {sample.where}: {'differs' if check else 'rewritten'}", file=sys.stderr)
        new_blocks[sample] = block
    if check:
        return changed
    for path in sorted({s.path for s in new_blocks}):
        lines = path.read_text().split("\n")  # re-read: the edit touches only this file's sample blocks
        fresh = find_samples(path)
        old = [s for s in samples if s.path == path]
        for sample in sorted((s for s in new_blocks if s.path == path), key=lambda s: -s.start):
            k = old.index(sample)  # the k-th console block of the file, wherever other edits moved it
            current = fresh[k] if k < len(fresh) and len(fresh) == len(old) else None
            if current is None or current.lines != sample.lines:
                raise RuntimeError(f"{sample.where}: the file changed while the samples ran; run the script again")
            lines[current.start + 1:current.end] = new_blocks[sample]
        path.write_text("\n".join(lines))
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cheap", action="store_true", help="only validate/schema/plan samples (seconds)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when a sample differs")
    args = parser.parse_args(argv)
    samples = all_samples()
    blocked = [] if args.cheap or args.check else earlier_runs(samples)
    if blocked:  # said before anything runs, not after the cheap samples and the profile
        sys.exit("docs_samples: " + "\ndocs_samples: ".join(blocked))
    changed = regenerate(samples, cheap_only=args.cheap or args.check, check=args.check)
    print(f"docs_samples: {len(samples)} console samples, {changed} {'differ' if args.check else 'rewritten'}",
          file=sys.stderr)
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
