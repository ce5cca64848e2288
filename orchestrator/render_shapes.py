"""Text rendering of a plan cache (:class:`~planner.plan_cache.PlanSet`, ``loom plan --shapes``).

One table of buckets (probability, the shapes it runs, its plan, the predicted mean iteration time of its plan
and of the two static plans on those shapes), then the comparison: the cache's predicted mean iteration time
(with the switching it pays) against one plan made for the mean shape and one made for the max shape. Pure
formatting, like :mod:`orchestrator.render`.
"""

from __future__ import annotations

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from orchestrator.render import format_seconds
from planner.plan_cache import CacheBucket, PlanSet

SHORT = {"batch_size": "batch", "seq_len": "seq", "image_size": "image"}


def _dim_label(plan_set: PlanSet, d: int) -> str:
    dim = plan_set.dims[d]
    return f"{dim.task}.{dim.use + '.' if dim.use else ''}{SHORT.get(dim.field, dim.field)}"


def describe_shape(plan_set: PlanSet, shape: list[int]) -> str:
    """``vision_text.batch 144, text_only.llm.seq 1587``: one shape, every dimension."""
    return ", ".join(f"{_dim_label(plan_set, d)} {v}" for d, v in enumerate(shape))


def describe_members(plan_set: PlanSet, bucket: CacheBucket) -> str:
    """The range of each dimension over a bucket's shapes (dimensions that never vary in it shown once)."""
    parts = []
    for d in range(len(plan_set.dims)):
        values = [m[d] for m in bucket.members]
        low, high = min(values), max(values)
        parts.append(f"{_dim_label(plan_set, d)} {low}" + (f"-{high}" if high != low else ""))
    return f"{len(bucket.members)} shape{'s' if len(bucket.members) > 1 else ''}: " + ", ".join(parts)


def _seconds(value: float | None) -> str:
    return "does not fit" if value is None else format_seconds(value)


def _ratio(other_s: float | None, cache_s: float) -> str:
    if other_s is None:
        return "no plan fits every batch"
    return f"{format_seconds(other_s)} ({other_s / cache_s:.2f}x the cache)" if cache_s > 0 else format_seconds(other_s)


def bucket_table(plan_set: PlanSet) -> Table:
    table = Table(title=f"plan cache for {plan_set.job}: {len(plan_set.buckets)} buckets, {len(plan_set.plans)} plans",
                  title_justify="left")
    for name, justify in (("bucket", "right"), ("prob.", "right"), ("shapes", "left"), ("plan", "left"),
                          ("predicted", "right"), ("mean-shape plan", "right"), ("max-shape plan", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for k, bucket in enumerate(plan_set.buckets):
        plan = plan_set.plans[bucket.plan]
        table.add_row(str(k), f"{bucket.probability:.3f}", describe_members(plan_set, bucket),
                      f"{bucket.plan}: {plan.solver.method}", format_seconds(bucket.predicted_s),
                      _seconds(bucket.static_mean_s), _seconds(bucket.static_max_s))
    return table


def comparison_lines(plan_set: PlanSet) -> list[str]:
    c = plan_set.comparison
    if plan_set.placement == "shared":
        switching = "shared placement: every plan holds every parameter where the others do, switching moves nothing"
    else:
        switching = (f"switching {format_seconds(c.switch_s)} per step, one bucket served {plan_set.run_length} "
                     f"step{'s' if plan_set.run_length > 1 else ''} at a time")
    lines = [f"plan cache: predicted mean iteration {format_seconds(c.cache_s)} ({switching})"]
    mean = _ratio(c.static_mean_s, c.cache_s) if not c.static_mean_unfit else \
        f"does not fit the device memory of {c.static_mean_unfit:.1%} of batches"
    lines.append(f"one plan for the mean shape ({describe_shape(plan_set, c.mean_shape)}): {mean}")
    if c.static_max_s is None:
        lines.append(f"one plan for the max shape ({describe_shape(plan_set, c.max_shape)}): none exists (a device "
                     "would run out of memory)")
    else:
        lines.append(f"one plan for the max shape ({describe_shape(plan_set, c.max_shape)}): "
                     f"{_ratio(c.static_max_s, c.cache_s)}; every batch padded to the max shape: "
                     f"{_ratio(c.padded_max_s, c.cache_s)}")
    lines.append(f"best single plan among those planned: {_ratio(c.best_static_s, c.cache_s)}")
    return lines


def plan_set_renderables(plan_set: PlanSet, planning_time_s: float | None = None) -> list[RenderableType]:
    header = Text(f"{plan_set.job}: {len(plan_set.dims)} varying dimensions, "
                  f"{sum(len(b.members) for b in plan_set.buckets)} distinct shapes")
    lines = comparison_lines(plan_set)
    if planning_time_s is not None:
        lines.append(f"planning time  {planning_time_s:.2f} s")
    return [header, bucket_table(plan_set), Group(*(Text(line) for line in lines))]


def print_plan_set(plan_set: PlanSet, console: Console, planning_time_s: float | None = None) -> None:
    for item in plan_set_renderables(plan_set, planning_time_s):
        console.print(item)
