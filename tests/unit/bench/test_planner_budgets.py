"""bench.planner.budgets: the budget settings apply inside their block only, and the report's summary is the
median time and Spindle-over-Loom geometric mean of each setting's cells."""

from __future__ import annotations

import math

import pytest

import planner.api as api
from bench.planner.budgets import SETTINGS, budgets, main, render, summary


def test_a_setting_replaces_the_constants_inside_its_block_only() -> None:
    before = api.SPLIT_BUDGET, api.COMPUTE_BUDGET
    with budgets(SETTINGS["split1500-compute1500"]):
        assert (api.SPLIT_BUDGET, api.LEAST_SPLIT_BUDGET, api.COMPUTE_BUDGET) == (1500, 500, 1500)
        assert isinstance(api.SPLIT_BUDGET, int)
    assert (api.SPLIT_BUDGET, api.COMPUTE_BUDGET) == before
    with pytest.raises(KeyError, match="NO_SUCH_BUDGET"), budgets({"NO_SUCH_BUDGET": 1}):
        pass


def test_the_summary_and_report_per_setting() -> None:
    records = [{"setting": s, "cell": c, "cpu_s": t, "loom_s": loom, "spindle_s": 1.0}
               for s, c, t, loom in [("default", "a@8", 4.0, 0.5), ("default", "b@8", 2.0, 0.8),
                                     ("default", "c@8", 3.0, 1.0), ("split1500", "a@8", 1.0, 0.5),
                                     ("split1500", "b@8", 1.0, 1.0), ("split1500", "c@8", 1.0, 1.0)]]
    got = summary([r for r in records if r["setting"] == "default"])
    assert got["median_cpu_s"] == 3.0 and got["min_vs_spindle"] == 1.0
    assert got["geomean_vs_spindle"] == pytest.approx(math.exp((math.log(2) + math.log(1.25)) / 3))
    report = render(records, ["default", "split1500"])
    assert "| split1500 | SPLIT_BUDGET 1500, LEAST_SPLIT_BUDGET 500 | 1.00 | 1.2599 | 1.0000 |" in report
    assert "| b@8 | 800.0 | 1000.0 |" in report


def test_an_unknown_setting_is_one_error_line(capsys) -> None:
    assert main(["--settings", "defualt"]) == 2
    assert capsys.readouterr().err.startswith("error: --settings: defualt; expected names of default,")
