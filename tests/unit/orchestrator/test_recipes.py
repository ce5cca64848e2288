"""The recipe registry the orchestrator owns (orchestrator.recipes): names are checked without importing anything,
loading a recipe registers its losses, dataset and evaluator, and the runtime never loads one itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.recipes import RECIPES, check_recipe, load_recipe
from planner.errors import SpecError
from planner.spec import parse_job

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "recipes" / "medical" / "unimed-tiny.yaml"


def _medical(**changes):
    return parse_job({**yaml.safe_load(TINY.read_text()), **changes})


def test_every_recipe_package_is_registered() -> None:
    """A package under recipes/ that is not in RECIPES cannot be used; an entry without a package cannot load."""
    packages = {p.name for p in (ROOT / "recipes").iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(RECIPES)
    assert all(module == f"recipes.{name}" for name, module in RECIPES.items())


def test_unknown_recipe_is_one_line_with_a_suggestion(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"^recipe \('medicl'\) is not a recipe Loom knows; did you mean 'medical'\?$"):
        check_recipe(_medical(recipe="medicl"))
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(TINY.read_text()), "recipe": "medicl"}))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.splitlines() == ["error: recipe ('medicl') is not a recipe Loom knows; did you mean 'medical'?"]


def test_loading_registers_the_recipes_losses_dataset_and_evaluator() -> None:
    job = _medical()
    load_recipe(job)
    from runtime.data import _RECIPE_DATA
    from runtime.evaluate import _RECIPE_EVALUATORS
    from runtime.heads import _RECIPE_LOSSES, check_loss

    assert "medical" in _RECIPE_DATA and "medical" in _RECIPE_EVALUATORS
    assert {task.loss for task in job.tasks} <= set(_RECIPE_LOSSES)
    assert [check_loss(job, t) for t in range(len(job.tasks))] == [task.loss for task in job.tasks]


PROBE = """
import sys
from planner.spec import load_job
from runtime.heads import check_loss
job = load_job({path!r})
try:
    check_loss(job, 0)
except ValueError as exc:
    print("refused:", exc)
print("recipes imported:", sorted(m for m in sys.modules if m == "recipes" or m.startswith("recipes.")))
from orchestrator.recipes import load_recipe
load_recipe(job)
print("after load_recipe:", check_loss(job, 0))
"""


def test_the_runtime_never_loads_a_recipe_itself() -> None:
    """In a fresh process the runtime refuses a recipe's loss until the orchestrator loads the recipe (it used to
    import recipes.<name> itself)."""
    result = subprocess.run([sys.executable, "-c", PROBE.format(path=str(TINY))], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("refused: tasks[0]") and "orchestrator.recipes.load_recipe loads it" in lines[0]
    assert lines[1] == "recipes imported: []"
    assert lines[2] == f"after load_recipe: {_medical().tasks[0].loss}"
