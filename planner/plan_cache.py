"""A plan cache for varying data: a few plans, each running the batch shapes it is best on, as a sealed plan set.

:func:`plan_cache`:

1. plans the job (``planner.api.plan_job``) at the mean and the max shape of every cluster of similar shapes
   (:func:`planner.shapes.cluster_points`), and at the file's mean and max shapes (the static plans);
2. renumbers every plan's devices to hold the parameters where the best static plan holds them
   (:func:`planner.align.align_plan`; the renumbered plans join the candidates);
3. prices every plan at every distinct shape exactly as placed (``planner.api.predict_plan``: same slices on
   the same devices, that shape's costs; inf where a device would run out of memory), and the switch between
   every two plans (:func:`switch_seconds`);
4. keeps at most ``max_buckets`` plans and gives every shape one (:func:`planner.cache_choice.choose_plans`:
   never predicted slower than the best static plan; with ``placement: shared`` only among the plans that hold
   every parameter shard where the best static plan does). A bucket is the set of shapes one kept plan runs.

Switching plans between steps moves the parameter shards whose holders differ (``Plan.holdings``): weights,
and for trainable shards the optimizer state (ZeRO-1: re-sharded over the new holders). The runtime serves
``run_length`` steps from one bucket, so a step pays ``1 / run_length`` of the expected switch.

:class:`PlanSet` is the result as data: the buckets (probability, member shapes, plan), the plans, their switch
costs and the comparison with the static plans; versioned and content-hashed like a Plan
(:func:`load_plan_set` verifies it). Pure: no files written except by :meth:`PlanSet.save`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from planner.align import align_plan
from planner.api import plan_job, predict_plan, spec_hash
from planner.costmodel import CostModel
from planner.cache_choice import INF, Priced, choose_plans, draw_buckets, expected_time
from planner.errors import PlanningError, SpecError
from planner.jsonfile import JsonKind, parse_json, read_json
from planner.plan import Plan, Sealed, digest, validated, zero_sharded
from planner.shapes import Point, ResolvedShapes, cluster_points, dim_name, job_at, mean_point, pick_bucket
from planner.spec import JobSpec

log = logging.getLogger(__name__)

PLAN_SET_VERSION = 1
PLAN_SET_FILE = JsonKind("plan set file", "not a Loom plan set", "the JSON `loom plan --shapes FILE --save` writes",
                         "Re-run `loom plan JOB.yaml --shapes SHAPES.yaml --save SET.json`", 1024 * 2**20)
FIT_SLACK = 1 + 1e-9  # peak memory within the device's, up to rounding


class _SetModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShapeDim(_SetModel):
    """A dimension the shapes file varies: ``task.batch_size`` or ``task.seq_len.use`` / ``task.image_size.use``."""

    task: str
    field: str
    use: str = Field(description="The use whose seq_len or image_size varies; '' for batch_size.")
    job_value: int = Field(description="The job spec's value.")


class CacheBucket(_SetModel):
    """The batch shapes ``plans[plan]`` runs; times are means over its members (each at its own shape)."""

    probability: float
    plan: int
    members: list[list[int]] = Field(description="Its shapes, a value per dimension of `dims`.")
    weights: list[float] = Field(description="Each member's probability (summing to `probability`).")
    predicted_s: float = Field(description="Its plan's predicted iteration time.")
    static_mean_s: float | None = Field(description="The mean-shape plan's time on these shapes (none: it does not "
                                        "fit one of them).")
    static_max_s: float | None = Field(description="The max-shape plan's time on these shapes (none: no such plan).")


class Comparison(_SetModel):
    """Predicted mean iteration times (seconds, over the shapes' probabilities) of the cache and static plans."""

    cache_s: float = Field(description="The cache: its plans' times plus the expected switch cost per step.")
    switch_s: float = Field(description="The expected switch cost per step (part of cache_s).")
    static_mean_s: float | None = Field(description="One plan made for the mean shape, run on every shape (none: "
                                        "it does not fit some shape's memory).")
    static_mean_unfit: float = Field(description="Probability of the shapes the mean-shape plan does not fit.")
    static_max_s: float | None = Field(description="One plan made for the max shape (memory for every batch), run "
                                       "on every shape (none: the max shape cannot be planned, e.g. it needs more "
                                       "memory than a device has).")
    padded_max_s: float | None = Field(description="That plan with every batch padded to the max shape.")
    best_static_s: float | None = Field(description="The best single plan among every planned one that fits every shape.")
    mean_shape: list[int]
    max_shape: list[int]


class PlanSet(Sealed, _SetModel):
    """A plan cache: every bucket's shapes, probability and plan. ``loom plan --shapes --save`` writes it."""

    version: int = PLAN_SET_VERSION
    job: str
    spec_hash: str = Field(description="The job spec's hash (planner.api.spec_hash); each plan has its shape's.")
    run_length: int = Field(description="Steps served from one bucket before the next is drawn.")
    placement: str = Field(description="priced: the plans may hold parameters on different devices (switch_s); "
                           "shared: every plan holds every parameter shard on the same devices.")
    dims: list[ShapeDim]
    buckets: list[CacheBucket] = Field(description="Fastest first; buckets[i] runs plans[buckets[i].plan].")
    plans: list[Plan]
    switch_s: list[list[float]] = Field(description="switch_s[i][j]: seconds to go from plans[i] to plans[j].")
    comparison: Comparison
    hash: str = ""

    def bucket_sequence(self, steps: int, seed: int = 0) -> list[int]:
        """The bucket of each step as the runtime draws them (planner.cache_choice.draw_buckets)."""
        return draw_buckets([b.probability for b in self.buckets], self.run_length, steps, seed)

    def bucket_of(self, shape: Sequence[int]) -> int | None:
        """The bucket that runs a batch of ``shape`` (a value per dimension; planner.shapes.pick_bucket)."""
        return pick_bucket([[tuple(m) for m in b.members] for b in self.buckets], tuple(shape))


Progress = Callable[[str], None]


@dataclass(frozen=True)
class Candidates:
    """Every planned plan priced at every shape, which of them are the static mean- and max-shape plans, and the
    max-shape plan's time with every batch padded to the max shape."""

    priced: Priced
    source: str  # the shapes file, for errors
    anchor: int  # the best static plan, whose parameter placement the others are renumbered toward
    mean_plan: int | None  # None: no plan exists for that shape (a device runs out of memory)
    max_plan: int | None
    padded_max_s: float | None


def plan_cache(job: JobSpec, shapes: ResolvedShapes, cost_model: CostModel, *, with_baselines: bool = False,
               progress: Progress | None = None, source: str = "shapes file") -> PlanSet:
    """Plan and price the candidates, keep at most ``shapes.max_buckets`` plans; a sealed PlanSet."""
    found = plan_candidates(job, shapes, cost_model, with_baselines=with_baselines, progress=progress, source=source)
    return cache_from_candidates(job, shapes, found, shapes.run_length)


def plan_candidates(job: JobSpec, shapes: ResolvedShapes, cost_model: CostModel, *, with_baselines: bool = False,
                    progress: Progress | None = None, source: str = "shapes file") -> Candidates:
    """Steps 1-3 of the module docstring: the candidate plans, priced at every shape, with their switch costs."""
    say = progress or (lambda msg: log.info(msg))
    jobs = {p: job_at(job, shapes.dims, p, source) for p in shapes.points}
    targets = _candidate_shapes(job, shapes, jobs, source)
    planned, plans = _plan_shapes(targets, jobs, cost_model, with_baselines, say, source)
    say(f"pricing {len(plans)} plans at {len(shapes.points)} shapes")
    seconds = price_plans(plans, shapes, jobs, cost_model)
    probs = list(shapes.points.values())
    no_switch = [[0.0] * len(plans)] * len(plans)
    anchor = choose_plans(Priced(plans, list(shapes.points), probs, seconds, no_switch), 1, 1)[0]  # best static
    extra = [plan for plan in (align_plan(jobs[p], plan, plans[anchor], cost_model) for p, plan in zip(planned, plans))
             if plan is not None]
    say(f"{len(extra)} plans renumbered to hold parameters where plan {anchor} does; pricing them")
    seconds += price_plans(extra, shapes, jobs, cost_model)
    plans += extra
    switch = [[switch_seconds(a, b, cost_model, zero_sharded(b, job.training)) for b in plans] for a in plans]
    mean_i, max_i = (planned.index(p) if p in planned else None for p in (shapes.mean(), shapes.max()))
    padded = None if max_i is None else predict_plan(jobs[shapes.max()], plans[max_i], cost_model).iteration_time_s
    return Candidates(Priced(plans, list(shapes.points), probs, seconds, switch), source, anchor, mean_i, max_i,
                      padded)


def _candidate_shapes(job: JobSpec, shapes: ResolvedShapes, jobs: dict[Point, JobSpec], source: str) -> list[Point]:
    """Per cluster of similar shapes its mean (a plan fast on its typical batch) and its max (a plan that fits all
    of it); then the file's mean and max shapes (the static plans). Adds the job at each to ``jobs``; drops a shape
    whose job breaks a component rule (a combination of values the file never gives together may)."""
    clusters = cluster_points(shapes, shapes.max_buckets)
    targets = list(dict.fromkeys([p for g in clusters for p in (
        mean_point(shapes.dims, ((q, shapes.points[q]) for q in g)), tuple(map(max, *g)) if len(g) > 1 else g[0])]
        + [shapes.mean(), shapes.max()]))
    for point in targets:
        if point not in jobs:
            try:
                jobs[point] = job_at(job, shapes.dims, point, source)
            except SpecError as exc:
                log.info("no job at shape %s: %s", point, exc)
    return [p for p in targets if p in jobs]


def _plan_shapes(targets: Sequence[Point], jobs: dict[Point, JobSpec], cost_model: CostModel, with_baselines: bool,
                 say: Progress, source: str) -> tuple[list[Point], list[Plan]]:
    """The shapes that could be planned and their plans (planner.api.plan_job); a PlanningError when none could."""
    planned, plans, failure = [], [], None
    for i, point in enumerate(targets, 1):
        say(f"planning shape {i}/{len(targets)}")
        try:
            plans.append(plan_job(jobs[point], cost_model, with_baselines=with_baselines, progress=lambda _: None).plan)
            planned.append(point)
        except PlanningError as exc:  # e.g. the max of independent dimensions may need more memory than exists
            log.info("no plan for shape %s: %s", point, exc)
            failure = failure or exc
    if not plans:
        raise PlanningError(f"{source}: no plan exists for any candidate shape (the first: {failure}). Lower the "
                            "shapes, or give the job more devices or memory.")
    return planned, plans


def cache_from_candidates(job: JobSpec, shapes: ResolvedShapes, found: Candidates, run_length: int,
                          placement: str | None = None) -> PlanSet:
    """Step 4: keep at most ``shapes.max_buckets`` of the candidates for ``run_length`` (and ``placement``, default
    the file's: "shared" keeps only plans that hold every parameter shard where the anchor does); the PlanSet."""
    placement = placement or shapes.placement
    switch, anchor = found.priced.switch, found.anchor
    allowed = None if placement == "priced" else \
        [i for i in range(len(switch)) if switch[anchor][i] == 0.0 and switch[i][anchor] == 0.0]
    choice = choose_plans(found.priced, shapes.max_buckets, run_length, allowed)
    return _plan_set(job, shapes, found, choice, run_length, placement)


def price_plans(plans: Sequence[Plan], shapes: ResolvedShapes, jobs: dict[Point, JobSpec],
                cost_model: CostModel) -> list[list[float]]:
    """``seconds[i][j]``: plan ``i``'s predicted iteration time at shape ``j`` of ``shapes`` (inf where a device
    runs out of memory)."""
    seconds = []
    for plan in plans:
        row = []
        for point in shapes.points:
            try:
                sim = predict_plan(jobs[point], plan, cost_model)
            except PlanningError:  # a layer of the job at this shape fits no device at any count
                row.append(INF)
                continue
            fits = max(sim.peak_memory_bytes, default=0.0) <= cost_model.hw.memory_bytes * FIT_SLACK
            row.append(sim.iteration_time_s if fits else INF)
        seconds.append(row)
    return seconds


def switch_seconds(old: Plan, new: Plan, cost_model: CostModel, shard_optimizer: bool = True) -> float:
    """Seconds to go from ``old``'s parameter placement to ``new``'s: every shard whose holders differ moves to its
    new holders (weights; trainable shards also their optimizer state, ZeRO-1 sharded over the new holders). A
    device receives from an old holder on its own node over the node's link, else over its share of the node's
    network; the busiest device sets the time."""
    hw = cost_model.hw
    held = {(h.name, h.layer, h.shard): set(h.devices) for h in old.holdings}
    intra: dict[int, float] = {}
    inter: dict[int, float] = {}
    for h in new.holdings:
        before = held.get((h.name, h.layer, h.shard), set())
        if set(h.devices) == before or h.params <= 0:
            continue
        weight, state = cost_model.moved_bytes_per_param(h.trainable)
        weights, state = h.params * weight, h.params * state / (len(h.devices) if shard_optimizer else 1)
        nodes = {d // hw.devices_per_node for d in before}
        for d in h.devices:
            into = intra if d // hw.devices_per_node in nodes else inter
            into[d] = into.get(d, 0.0) + state + (0.0 if d in before else weights)
    per_device_network = hw.inter_bandwidth / hw.devices_per_node
    return max((intra.get(d, 0.0) / hw.intra_bandwidth + inter.get(d, 0.0) / per_device_network
                for d in intra.keys() | inter.keys()), default=0.0)


def _plan_set(job: JobSpec, shapes: ResolvedShapes, found: Candidates, choice: list[int], run_length: int,
              placement: str) -> PlanSet:
    priced = found.priced
    for j, i in enumerate(choice):
        if priced.seconds[i][j] == INF:
            shape = ", ".join(f"{dim_name(d)} {v}" for d, v in zip(shapes.dims, priced.points[j]))
            fix = "use placement: priced, lower it" if placement == "shared" else "lower it"
            raise PlanningError(f"{found.source}: no {'shared-placement ' if placement == 'shared' else ''}plan fits "
                                f"the shape ({shape}) in device memory; {fix} in the shapes file, or give the job more "
                                "devices or memory.")
    kept = sorted(set(choice))
    cache_s, switch_s = expected_time(priced, choice, run_length)
    mean_i, max_i = found.mean_plan, found.max_plan

    def mean_of(i: int | None, members: Sequence[int]) -> float | None:  # None: no such plan, or it does not fit
        if i is None:
            return None
        mass = sum(priced.probs[j] for j in members)
        value = sum(priced.probs[j] * priced.seconds[i][j] for j in members) / mass
        return None if value == INF else value

    everything = range(len(priced.points))
    groups = {i: [j for j in everything if choice[j] == i] for i in kept}
    order = sorted(kept, key=lambda i: (mean_of(i, groups[i]), i))
    remap = {old: new for new, old in enumerate(order)}
    buckets = [CacheBucket(probability=sum(priced.probs[j] for j in groups[i]), plan=remap[i],
                           members=[list(priced.points[j]) for j in groups[i]],
                           weights=[priced.probs[j] for j in groups[i]], predicted_s=mean_of(i, groups[i]),
                           static_mean_s=mean_of(mean_i, groups[i]), static_max_s=mean_of(max_i, groups[i]))
               for i in order]
    fit_all = [i for i, row in enumerate(priced.seconds) if INF not in row]
    comparison = Comparison(
        cache_s=cache_s, switch_s=switch_s, static_mean_s=mean_of(mean_i, everything),
        static_mean_unfit=1.0 if mean_i is None else sum(p for p, t in zip(priced.probs, priced.seconds[mean_i])
                                                         if t == INF),
        static_max_s=mean_of(max_i, everything),
        padded_max_s=found.padded_max_s,
        best_static_s=min((mean_of(i, everything) for i in fit_all), default=None),
        mean_shape=list(shapes.mean()), max_shape=list(shapes.max()),
    )
    plan_set = PlanSet(
        job=job.name, spec_hash=spec_hash(job), run_length=run_length, placement=placement,
        dims=[ShapeDim(task=t, field=f, use=u, job_value=v) for (t, f, u), v in zip(shapes.dims, shapes.job_values)],
        buckets=buckets, plans=[priced.plans[i] for i in order],
        switch_s=[[priced.switch[i][j] for j in order] for i in order], comparison=comparison,
    )
    return plan_set.sealed()


# --------------------------------------------------------------------------- reading a plan set


def plan_set_from_json(text: str, source: str = "plan set") -> PlanSet:
    """Parse and verify a plan set (:func:`plan_set_from_data`); a SpecError naming ``source`` for text that is not
    JSON."""
    return plan_set_from_data(parse_json(text, source, PLAN_SET_FILE), source)


def plan_set_from_data(data: object, source: str = "plan set") -> PlanSet:
    """Verify a parsed plan set: its hash, every plan's (planner.plan.plan_from_data), and that buckets, shapes and
    plans agree. A SpecError naming ``source`` otherwise."""
    from planner.plan import plan_from_data

    if not isinstance(data, dict) or data.get("version") != PLAN_SET_VERSION:
        found = data.get("version") if isinstance(data, dict) else None
        raise SpecError(f"{source}: plan set version {found!r} is not supported; expected {PLAN_SET_VERSION}. "
                        "Re-run `loom plan --shapes`.")
    held = digest({key: value for key, value in data.items() if key != "hash"})  # over what the file holds, as plans
    plans = data.get("plans")
    if isinstance(plans, list):  # each plan verified as a plan file is, naming its place in the set
        data = {**data, "plans": [plan_from_data(p, f"{source}: plans[{i}]") for i, p in enumerate(plans)]}
    plan_set = validated(PlanSet, data, source, "loom plan --shapes")
    if plan_set.hash != held:
        raise SpecError(f"{source}: content hash {plan_set.hash or '(none)'} does not match the content; the file was "
                        "edited or not written by `loom plan --shapes`. Re-run it.")
    _check_consistent(plan_set, source)
    return plan_set


def _check_consistent(plan_set: PlanSet, source: str) -> None:
    width = len(plan_set.dims)
    for k, bucket in enumerate(plan_set.buckets):
        if not 0 <= bucket.plan < len(plan_set.plans):
            raise SpecError(f"{source}: buckets[{k}].plan ({bucket.plan}) is not a plan of the set (0-"
                            f"{len(plan_set.plans) - 1}). Re-run `loom plan --shapes`.")
        if len(bucket.weights) != len(bucket.members) or any(len(m) != width for m in bucket.members):
            names = ", ".join(dim_name((d.task, d.field, d.use)) for d in plan_set.dims)
            raise SpecError(f"{source}: buckets[{k}]: members and weights must pair up, each member a value per "
                            f"dimension ({names}). Re-run `loom plan --shapes`.")
    total = sum(b.probability for b in plan_set.buckets)
    if abs(total - 1) > 1e-6:
        raise SpecError(f"{source}: the buckets' probabilities sum to {total:.6g}, not 1. Re-run `loom plan --shapes`.")
    if any(p.job != plan_set.job for p in plan_set.plans):
        raise SpecError(f"{source}: a plan is for another job than '{plan_set.job}'. Re-run `loom plan --shapes`.")


def load_plan_set(path: str | Path) -> PlanSet:
    """The plan set file at ``path``, verified (:func:`plan_set_from_data`); a SpecError naming the file otherwise
    (planner.jsonfile: missing, not UTF-8, not JSON, nested too deeply, too large)."""
    return plan_set_from_data(read_json(path, PLAN_SET_FILE), str(path))
