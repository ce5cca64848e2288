"""HiGHS prints a banner ("Running HiGHS ...") when the first solver of a process is created, on fd 1 below Python:
the planner swallows it, so `loom plan` and `loom run` print nothing of HiGHS on stdout or stderr."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SOLVE = """
import pulp
from planner.milp import make_solver
from planner.patterns import quiet_highs
quiet_highs()  # the pattern LP's own Highs
x = pulp.LpVariable("x", 0, 3, cat="Integer")
model = pulp.LpProblem("tiny", pulp.LpMaximize)
model += x
model += x <= 2.5
model.solve(make_solver("highs", 5.0, 0.0, 100))
print("x =", x.value())
"""


def test_highs_solve_prints_no_banner() -> None:
    result = subprocess.run([sys.executable, "-c", SOLVE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "x = 2.0\n"  # the model was solved, and only our own line reached stdout
    assert "HiGHS" not in result.stderr and "Copyright" not in result.stderr, result.stderr
