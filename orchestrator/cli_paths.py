"""Checks of the files a CLI command writes, shared by its commands (orchestrator.cli, orchestrator.eval_cli): run as
option callbacks or first in a command, before any work; each failure a ``typer.BadParameter`` (one line, exit 2)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import typer


def check_output_path(path: Path | None) -> Path | None:
    """An output file must not be a directory and its directory must exist (checked before planning)."""
    if path is None:
        return None
    if path.is_dir():
        raise typer.BadParameter(f"'{path}' is a directory; give a file name.")
    if not path.parent.is_dir():
        raise typer.BadParameter(f"directory '{path.parent}' does not exist; create it first.")
    return path


def check_distinct_files(inputs: Sequence[tuple[str, Path | None]], outputs: Sequence[tuple[str, Path | None]]) -> None:
    """A BadParameter, before any work, when an output file (``(option, path)``; None: not given) is one of the
    command's inputs or another of its outputs: the same file once relative paths and symbolic links are resolved
    (or a hard link of it). Writing it would destroy what the command reads, or what it wrote first."""
    seen = [(name, path) for name, path in inputs if path is not None]
    for name, path in outputs:
        if path is None:
            continue
        for other, known in seen:
            if _same_file(path, known):
                raise typer.BadParameter(f"{name} ({path}) is the same file as {other} ({known}), which the command "
                                         f"would overwrite. Give {name} another file name.")
        seen.append((name, path))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return a.resolve() == b.resolve()
