"""The cells of the planner benchmark: Spindle's evaluation grid, a sweep and the scale section.

Grid (Spindle §5, Fig.8 axes): clip-4/7/10 and ofasys-4/7 on 8, 16 and 32 devices; qwen-val-3 on
32 and 64. Sweep: a synthetic workload of many CLIP-like tasks (100 MetaOps) on 128 to 512 devices.
Scale: that workload on 1,024 devices, 200 CLIP-like MetaOps on 1,024, a 70B-class vision-audio-language
job (30 MetaOps) on 4,096 and 500 CLIP-like MetaOps on 10,240 (bench/workloads/README.md says how each is
made). Devices come in nodes of 8 (A800, as in Spindle's cluster); a cell overrides only the workload's
``cluster.num_nodes``. Recipes: full-size recipe job specs planned on the cluster their
file names (``unimed-base``: a shared ViT-L encoder feeding decoders, 64 H100s), kept out of the
targets that compare with Spindle's evaluation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from planner.components import check_components
from planner.errors import did_you_mean
from planner.spec import JobSpec, parse_job
from planner.spec_file import load_yaml

from bench.workloads.generate import WORKLOAD_DIR, clip_like_data, clip_like_name, vlm_like_data

GRID_WORKLOADS: dict[str, tuple[int, ...]] = {
    "clip-4": (8, 16, 32),
    "clip-7": (8, 16, 32),
    "clip-10": (8, 16, 32),
    "ofasys-4": (8, 16, 32),
    "ofasys-7": (8, 16, 32),
    "qwen-val-3": (32, 64),
}
SCALE_NUM_TASKS = 50  # two MetaOps per task: 100 MetaOps
SCALE_WORKLOAD = f"synth-clip-{SCALE_NUM_TASKS}"
SWEEP_DEVICES = (128, 256, 512)
# The scale section (issue 13): workload -> (generator arguments, devices). synth-clip-50 is the sweep's workload
# (100 MetaOps); x4 gives each task four encoder uses (200 MetaOps); x10 ten (six modalities, then repeats: 500
# MetaOps); synth-vlm-15 is 15 encoder -> 70B-class LLM tasks (30 MetaOps) where memory binds.
SCALE_CELLS: dict[str, tuple[tuple[str, int, int], int]] = {
    SCALE_WORKLOAD: (("clip", SCALE_NUM_TASKS, 2), 1024),
    clip_like_name(50, 4): (("clip", 50, 4), 1024),
    "synth-vlm-15": (("vlm", 15, 2), 4096),
    clip_like_name(50, 10): (("clip", 50, 10), 10240),
}
DEVICES_PER_NODE = 8
REPO_ROOT = WORKLOAD_DIR.parent.parent
RECIPE_WORKLOADS: dict[str, tuple[Path, int]] = {  # workload -> (job spec, its number of devices)
    "unimed-base": (REPO_ROOT / "recipes" / "medical" / "unimed-base-64xH100.yaml", 64),
}


@dataclass(frozen=True)
class Cell:
    """One benchmark cell: ``workload`` planned on ``num_devices`` devices; ``group`` is "grid", "sweep", "scale" or
    "recipe"."""

    workload: str
    num_devices: int
    group: str
    shard_optimizer: bool | str | None = None  # training.shard_optimizer for the cell's job (None: the workload's)

    @property
    def name(self) -> str:
        return f"{self.workload}@{self.num_devices}"


def all_cells() -> list[Cell]:
    """Every cell of the full suite, grid first, in a stable order."""
    cells = [Cell(w, n, "grid") for w, sizes in GRID_WORKLOADS.items() for n in sizes]
    cells += [Cell(SCALE_WORKLOAD, n, "sweep") for n in SWEEP_DEVICES]
    cells += [Cell(w, n, "scale") for w, (_, n) in SCALE_CELLS.items()]
    return cells + [Cell(w, n, "recipe") for w, (_, n) in RECIPE_WORKLOADS.items()]


def quick_cells() -> list[Cell]:
    """The smallest cell of each grid workload (what ``--quick`` runs when no cell is named)."""
    return [Cell(w, sizes[0], "grid") for w, sizes in GRID_WORKLOADS.items()]


def select_cells(cells: Sequence[Cell], only: Iterable[str]) -> list[Cell]:
    """The cells matching any selector: a cell name (``clip-10@32``), a workload name, or a group name.

    An unknown selector is a ValueError that names the closest cell.
    """
    selectors = [s.strip() for s in only if s.strip()]
    chosen: list[Cell] = []
    for sel in selectors:
        matched = [c for c in cells if sel in (c.name, c.workload, c.group)]
        if not matched:
            names = [c.name for c in cells] + sorted({c.workload for c in cells})
            raise ValueError(f"--only ({sel!r}) matches no cell; {did_you_mean(sel, names)}")
        chosen.extend(c for c in matched if c not in chosen)
    order = {c: i for i, c in enumerate(cells)}
    return sorted(chosen, key=order.__getitem__)


def workload_data(workload: str) -> dict:
    """The spec of a workload as a plain dict: a YAML file under bench/workloads or the synthetic sweep."""
    if workload in SCALE_CELLS:
        kind, num_tasks, uses = SCALE_CELLS[workload][0]
        return clip_like_data(num_tasks, uses_per_task=uses) if kind == "clip" else vlm_like_data(num_tasks)
    if workload in RECIPE_WORKLOADS:
        return load_yaml(RECIPE_WORKLOADS[workload][0])
    return load_yaml(WORKLOAD_DIR / f"{workload}.yaml")


def load_cell_job(cell: Cell) -> JobSpec:
    """The validated job of ``cell``: its workload with ``num_nodes`` set to fit ``num_devices``."""
    data = workload_data(cell.workload)
    per_node = data["cluster"].get("devices_per_node", DEVICES_PER_NODE)
    if cell.num_devices % per_node:
        raise ValueError(f"{cell.name}: {cell.num_devices} devices is not a multiple of {per_node} per node.")
    data = {**data, "cluster": {**data["cluster"], "num_nodes": cell.num_devices // per_node}}
    if cell.shard_optimizer is not None:
        data["training"] = {**data.get("training", {}), "shard_optimizer": cell.shard_optimizer}
    job = parse_job(data, source=cell.name)
    check_components(job)
    return job
