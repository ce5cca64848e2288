"""The alignment recipe at test size on a gloo world: SFT on packed chat, the reward model and DPO (whose rows come
from the recipe's pair dataset, split over data-parallel ranks) train exactly as in one process."""

from __future__ import annotations

from pathlib import Path

import yaml

from planner.api import plan_job
from planner.spec import parse_job
from recipes.alignment import make

from _equivalence import check_equivalence  # tests/integration/_equivalence.py

TINY = Path(make.__file__).resolve().parent / "alignment-tiny.yaml"


def test_distributed_alignment_steps_equal_single_process(tmp_path):
    data = yaml.safe_load(TINY.read_text())
    model = str(make.write_model(tmp_path / "base", num_hidden_layers=1))
    for comp in data["components"].values():
        comp["pretrained"] = model
    data["tasks"][0]["data"]["path"] = str(TINY.parent / data["tasks"][0]["data"]["path"])
    for task in data["tasks"]:
        task["batch_size"] = 4
        for use in task["components"]:
            use["seq_len"] = 64  # the longer answers are cut: their last kept token is read, their kept labels learned
    job = parse_job(data)
    plan = plan_job(job, with_baselines=False).plan
    assert any(len(s.devices) == 2 for w in plan.waves for s in w.slices) or len(plan.waves) > 1
    check_equivalence(job, plan, tmp_path, steps=2)
