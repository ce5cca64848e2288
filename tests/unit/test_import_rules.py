"""DESIGN.md §3 import rules, checked in fresh interpreters: importing a package's modules must not pull
in the heavy or forbidden libraries (planner: never torch or ray; runtime: never ray or pulp)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RULES = {
    "planner": ("torch", "ray"),
    "runtime": ("ray", "pulp"),
}
PROBE = """
import importlib, json, sys
forbidden, modules = {forbidden!r}, {modules!r}
found = {{}}
for name in modules:
    importlib.import_module(name)
    leaked = sorted(f for f in forbidden if f in sys.modules and f not in found)
    for f in leaked:
        found[f] = name  # the first module whose import brought it in
print(json.dumps(found))
"""


def package_modules(package: str) -> list[str]:
    """The package and every module under it, found on disk (new modules are checked too, nothing is imported here)."""
    modules = set()
    for file in (ROOT / package).rglob("*.py"):
        parts = file.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules.add(".".join(parts))
    return sorted(modules)


def test_planner_modules_are_found() -> None:
    modules = package_modules("planner")
    assert {"planner.api", "planner.spec", "planner.plan"} <= set(modules)


@pytest.mark.parametrize("package", sorted(RULES))
def test_package_imports_leave_forbidden_modules_out(package: str) -> None:
    forbidden = RULES[package]
    modules = [m for m in package_modules(package) if not m.endswith("__main__")]
    probe = PROBE.format(forbidden=forbidden, modules=modules)
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    leaked = json.loads(result.stdout.strip().splitlines()[-1])
    assert leaked == {}, f"importing these {package} modules loaded forbidden packages: {leaked}"


def test_planner_api_alone() -> None:
    """The exact check DESIGN.md names: `import planner, planner.api` keeps torch and ray out."""
    code = "import sys, planner, planner.api; print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
