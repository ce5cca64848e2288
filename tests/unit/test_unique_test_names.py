"""Every test module has a basename of its own: the suite runs as one pytest session over folders without
``__init__.py`` (rootdir-relative imports), where two ``test_x.py`` in different folders stop collection of the whole
suite with "import file mismatch" (it happened once: tests/unit/{planner,orchestrator}/test_pipeline.py)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_no_two_test_modules_share_a_basename():
    where: dict[str, list[str]] = defaultdict(list)
    for path in TESTS.rglob("*.py"):
        if path.name not in ("conftest.py", "__init__.py") and "__pycache__" not in path.parts:
            where[path.name].append(str(path.relative_to(TESTS)))
    clashes = {name: paths for name, paths in where.items() if len(paths) > 1}
    assert not clashes, f"rename one of each: {clashes}"
