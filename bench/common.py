"""Shared pieces of the benchmark suites: environment capture, timing, and result files.

Every suite records its config and :func:`environment` next to its records and writes
``bench/results/<name>.json`` plus a markdown report ``bench/results/<name>.md``
(:func:`write_results`). Timings are medians of several runs after warm-up (:func:`median_of`).
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
DEFAULT_PACKAGES = ("numpy", "pulp", "highspy", "pydantic")

T = TypeVar("T")


def _git(*args: str) -> str | None:
    """Output of a read-only git command in the repo, or None when git or the repo is unavailable."""
    try:
        # --no-optional-locks: never take index.lock, so a benchmark cannot disturb a concurrent commit.
        out = subprocess.run(
            ["git", "--no-optional-locks", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(packages: Sequence[str] = DEFAULT_PACKAGES) -> dict[str, Any]:
    """Where a result came from: git SHA and dirty flag, Python and package versions, platform, CPUs, UTC date.

    ``dirty`` is True when tracked files differ from the commit (untracked files are ignored), None
    when git is unavailable. Suites that need more (torch, ray, the GPU) pass extra ``packages`` and
    add their own keys to the returned dict.
    """
    sha = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_sha": sha.strip() if sha else None,
        "git_dirty": bool(status.strip()) if status is not None else None,
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in packages},
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(sys.argv),
    }


@dataclass(frozen=True)
class Timing(Generic[T]):
    """Wall-clock seconds of the timed calls (warm-up excluded), their median, and the last call's result."""

    median_s: float
    samples_s: tuple[float, ...]
    result: T


def median_of(fn: Callable[[], T], repeats: int, warmup: int = 1) -> Timing[T]:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; return the median and samples."""
    if repeats < 1:
        raise ValueError(f"repeats ({repeats}) must be at least 1.")
    result: Any = None
    for _ in range(warmup):
        result = fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        samples.append(time.perf_counter() - start)
    return Timing(statistics.median(samples), tuple(samples), result)


def _jsonable(value: Any) -> Any:
    """Recursively turn ``value`` into strict JSON: non-finite floats become None, tuples lists, paths str."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    return str(value)


def write_results(
    name: str, records: list[dict[str, Any]], markdown: str, config: dict[str, Any],
    results_dir: Path | None = None, env: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``<results_dir>/<name>.json`` (config, environment, records) and ``<name>.md``; return both paths.

    The markdown gets a short footer with the commit and date so a table is never read without its
    provenance. ``env`` defaults to :func:`environment`.
    """
    out_dir = results_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    env = env if env is not None else environment()
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    body = {"name": name, "config": config, "environment": env, "records": records}
    json_path.write_text(json.dumps(_jsonable(body), indent=1, sort_keys=False, allow_nan=False) + "\n")
    dirty = {True: " (dirty)", False: "", None: ""}[env.get("git_dirty")]
    footer = (
        f"\n\n---\nCommit {env.get('git_sha') or 'unknown'}{dirty}, {env.get('date_utc')}, "
        f"Python {env.get('python')}, {env.get('cpu_count')} CPUs, {env.get('platform')}. "
        f"Raw records: `{json_path.name}`.\n"
    )
    md_path.write_text(markdown.rstrip() + footer)
    log.info("wrote %s and %s", json_path, md_path)
    return json_path, md_path
