"""Varying data: a shapes file (a distribution of per-task shapes, or a sample of batches) and its buckets.

Real batches vary: sequence lengths, image sizes, how many rows each task has in a step. A shapes file
(``loom plan JOB.yaml --shapes FILE``, docs/shapes.md) says how, in the shape fields a job spec has:
per task its ``batch_size`` and, per use, ``seq_len`` and ``image_size``. :func:`load_shapes` validates it
(:class:`ShapesSpec`, one :class:`~planner.errors.SpecError` naming the path and the fix) and resolves it
against the job (:class:`ResolvedShapes`: the dimensions it varies and the probability of every distinct
point). :func:`cluster_points` groups similar shapes (each group's mean and max shapes are planned); :mod:`planner.plan_cache` plans them,
keeps at most ``max_buckets`` plans and buckets the points by the plan that runs them; :func:`pick_bucket`
is the lookup a runtime makes for each step's batch.

Pure: no files written; imports neither torch nor ray.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from planner.errors import LoomError, SpecError, did_you_mean
from planner.spec import (
    MAX_BATCH_SIZE, MAX_IMAGE_SIZE, MAX_SEQ_LEN, JobSpec, StrictModel, _format_error, _path_str,
)
from planner.spec_file import MAX_SPEC_BYTES, YamlKind, load_yaml

MAX_POINTS = 1024  # distinct shapes a file may describe: every candidate plan is priced at each
# entries of `batches:`: 4,096, what a shapes file (read as a job spec: at most MAX_SPEC_BYTES) holds at 64 bytes an
# entry (a task or two and a weight); a longer log gives each distinct batch once, its count as the weight
MAX_BATCHES = MAX_SPEC_BYTES // 64
MAX_BUCKETS = 8  # plans in one cache: 2 candidates per bucket (+2) are planned in full
FIELDS = ("batch_size", "seq_len", "image_size")
SHAPES_FILE = YamlKind("shapes file", "give the --shapes file (YAML or JSON; docs/shapes.md)")
LIMITS = {"batch_size": MAX_BATCH_SIZE, "seq_len": MAX_SEQ_LEN, "image_size": MAX_IMAGE_SIZE}

Count = Annotated[int, Field(ge=1)]
Weight = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class TaskShape(StrictModel):
    """One task's shapes in one batch; a field left out keeps the job's value."""

    batch_size: int | None = Field(None, ge=1, description="Rows of this task in the batch.")
    seq_len: dict[str, Count] = Field(default_factory=dict, description="Tokens per row, by use name (the length "
                                      "rows are padded or packed to).")
    image_size: dict[str, Count] = Field(default_factory=dict, description="Image side in pixels, by use name.")


class BatchSample(StrictModel):
    """One observed batch (e.g. one step of a data loader's log)."""

    weight: Weight = Field(1.0, description="Relative frequency of this batch (normalised over all batches).")
    tasks: dict[str, TaskShape] = Field(description="Shapes by task name; a task left out keeps the job's shapes.")


class TaskDistribution(StrictModel):
    """Independent discrete distributions of one task's shapes: ``{value: weight}``, weights normalised."""

    batch_size: dict[Count, Weight] | None = Field(None, min_length=1, description="Rows of this task per batch.")
    seq_len: dict[str, dict[Count, Weight]] = Field(default_factory=dict, description="Tokens per row, by use name.")
    image_size: dict[str, dict[Count, Weight]] = Field(default_factory=dict, description="Image side, by use name.")


class ShapesSpec(StrictModel):
    """A shapes file: how a job's batches vary (``batches`` or ``distribution``), and how to bucket them."""

    max_buckets: int = Field(4, ge=1, le=MAX_BUCKETS, description="Plans in the cache at most (one per bucket); "
                             "twice as many shapes are planned as candidates.")
    run_length: int = Field(
        1, ge=1, le=1_000_000, description="Steps the runtime serves from one bucket before the next bucket is drawn "
        "(1: every step drawn independently). Switching plans costs moving parameters; it is paid once per run.")
    placement: Literal["priced", "shared"] = Field(
        "priced", description="priced: plans may hold parameters on different devices, the switch priced; shared: "
        "only plans that hold every parameter where the best static plan does (switching moves nothing).")
    batches: list[BatchSample] | None = Field(
        None, min_length=1, description="A sample of batches, each one step's shapes (at most MAX_BATCHES; each "
        "distinct batch once, with its count as its weight, describes any longer log).")
    distribution: dict[str, TaskDistribution] | None = Field(
        None, min_length=1, description="Per task, independent distributions of its shapes.")

    @field_validator("batches", mode="before")
    @classmethod
    def _few_batches(cls, batches: Any) -> Any:
        """At most MAX_BATCHES entries, before each is validated (a dict given to parse_shapes is not size-capped)."""
        if isinstance(batches, list) and len(batches) > MAX_BATCHES:
            raise ValueError(f"{len(batches)} entries, over the limit of {MAX_BATCHES} (what a shapes file of at most "
                             f"{MAX_SPEC_BYTES // 1024} KiB holds). Give each distinct batch once, with how often it "
                             "occurs as its `weight` (docs/shapes.md).")
        return batches

    @model_validator(mode="after")
    def _one_source(self) -> ShapesSpec:
        if (self.batches is None) == (self.distribution is None):
            raise ValueError("give exactly one of `batches` (a sample of batches) and `distribution` (per-task "
                             "distributions); see docs/shapes.md.")
        return self


Dim = tuple[str, str, str]  # (task, field, use): field one of FIELDS; use "" for batch_size
Point = tuple[int, ...]  # a value per dimension, in ResolvedShapes.dims order


@dataclass(frozen=True)
class ResolvedShapes:
    """A shapes file resolved against a job: the dimensions it varies (each with the job's value) and the
    probability of every distinct point (a value per dimension)."""

    dims: tuple[Dim, ...]
    job_values: Point
    points: dict[Point, float]  # probabilities, summing to 1
    max_buckets: int
    run_length: int
    placement: str = "priced"

    def mean(self) -> Point:
        """The probability-weighted mean of each dimension, rounded to a value it takes (:func:`mean_point`)."""
        return mean_point(self.dims, self.points.items())

    def max(self) -> Point:
        return tuple(max(point[d] for point in self.points) for d in range(len(self.dims)))


def mean_point(dims: Sequence[Dim], points: Iterable[tuple[Point, float]]) -> Point:
    """The probability-weighted mean of each dimension over ``(point, probability)`` pairs, rounded to the nearest
    value the points take there (the larger on a tie), so that it is a value the file gives: a valid image size, a
    batch size that splits into micro-batches."""
    points = list(points)
    total = sum(p for _, p in points)
    out = []
    for d in range(len(dims)):
        mean = sum(p * point[d] for point, p in points) / total
        out.append(min({point[d] for point, _ in points}, key=lambda v: (abs(v - mean), -v)))
    return tuple(out)


def dim_name(dim: Dim) -> str:
    """``task.batch_size`` or ``task.seq_len.use``: a dimension as the shapes file writes it."""
    task, field, use = dim
    return f"{task}.{field}" + (f".{use}" if use else "")


def describe_point(dims: Sequence[Dim], point: Point, job_values: Point | None = None) -> str:
    """``caption: batch 16, lm seq 40`` for the dimensions that differ from ``job_values`` (all without it)."""
    parts: dict[str, list[str]] = {}
    short = {"batch_size": "batch", "seq_len": "seq", "image_size": "image"}
    for d, (task, field, use) in enumerate(dims):
        if job_values is None or point[d] != job_values[d]:
            parts.setdefault(task, []).append(f"{use + ' ' if use else ''}{short[field]} {point[d]}")
    return "; ".join(f"{task}: {', '.join(items)}" for task, items in parts.items()) or "the job's shapes"


# --------------------------------------------------------------------------- loading


def parse_shapes(data: Any, job: JobSpec, source: str = "shapes file") -> ResolvedShapes:
    """Validate a parsed shapes document against ``job``; one SpecError naming ``source`` and the path."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the top level must be a mapping with `batches` or `distribution`; "
                        "see docs/shapes.md.")
    try:
        spec = ShapesSpec.model_validate(data)
    except ValidationError as exc:
        more = len(exc.errors()) - 1
        suffix = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
        raise SpecError(f"{source}: {_shapes_error(exc.errors()[0])}{suffix}") from None
    return resolve_shapes(spec, job, source)


def _shapes_error(err: Any) -> str:
    """One pydantic error of a shapes file as ``<path>: <what>; <fix>`` (a bad ``{value: weight}`` key named as
    such, an unknown key with the closest valid one)."""
    loc = tuple(err["loc"])
    if "[key]" in loc:  # a dict key failed: (..., key, "[key]")
        at = loc.index("[key]")
        where = _path_str(loc[:at - 1])
        return f"{where}: key {loc[at - 1]!r}: {err['msg'].lower()}. Keys are values (whole numbers >= 1)."
    if err["type"] == "extra_forbidden":
        owner = _owner(loc)
        return (f"{_path_str(loc)}: unknown key; {did_you_mean(str(loc[-1]), owner.model_fields)} "
                "Remove or rename it.")
    return _format_error(ShapesSpec, err).replace("the spec", "the shapes file")


def _owner(loc: tuple[Any, ...]) -> type[StrictModel]:
    """The model whose unknown key ``loc`` names (the file's nesting: top, distribution.<task>, batches[i],
    batches[i].tasks.<task>)."""
    if len(loc) == 1:
        return ShapesSpec
    if loc[0] == "distribution":
        return TaskDistribution
    return TaskShape if len(loc) > 3 else BatchSample


def load_shapes(path: str | Path, job: JobSpec) -> ResolvedShapes:
    """Read, validate and resolve a shapes file (YAML or JSON) for ``job``."""
    return parse_shapes(load_yaml(path, SHAPES_FILE), job, str(path))


def resolve_shapes(spec: ShapesSpec, job: JobSpec, source: str = "shapes file") -> ResolvedShapes:
    """The dimensions ``spec`` varies, checked against ``job`` (tasks, uses, limits), and its points."""
    if job.micro_batches_auto:  # each bucket's plan would choose its own count: the plans must agree on the step
        raise SpecError(f"{source}: the job's training.grad_accum_steps is auto; a plan set runs every bucket at one "
                        "count of micro-batches. Set grad_accum_steps to a number (e.g. the count `loom plan` chose).")
    if spec.batches is not None:
        mentioned = [(f"batches[{i}].tasks.{t}", t, shape) for i, b in enumerate(spec.batches)
                     for t, shape in b.tasks.items()]
    else:
        mentioned = [(f"distribution.{t}", t, shape) for t, shape in spec.distribution.items()]
    dims: dict[Dim, int] = {}
    for where, task, shape in mentioned:
        for dim, path in _dims_of(task, shape, where):
            dims.setdefault(dim, _job_value(job, dim, path, source))
    ordered = tuple(sorted(dims))
    index = {dim: d for d, dim in enumerate(ordered)}
    base = tuple(dims[dim] for dim in ordered)
    if spec.batches is not None:
        points = _sample_points(spec.batches, index, base)
    else:
        points = _product_points(spec.distribution, index, base, source)
    for point in points:
        for d, dim in enumerate(ordered):
            _check_value(job, dim, point[d], source)
        job_at(job, ordered, point, source)  # the job at every shape is a valid job (component rules)
    return ResolvedShapes(ordered, base, points, spec.max_buckets, spec.run_length, spec.placement)


def _dims_of(task: str, shape: TaskShape | TaskDistribution, where: str) -> list[tuple[Dim, str]]:
    out = [((task, "batch_size", ""), f"{where}.batch_size")] if shape.batch_size is not None else []
    for field in ("seq_len", "image_size"):
        out += [((task, field, use), f"{where}.{field}.{use}") for use in getattr(shape, field)]
    return out


def _job_value(job: JobSpec, dim: Dim, path: str, source: str) -> int:
    """The job's value of ``dim``; a SpecError when the task or use does not exist or has no such value."""
    task_name, field, use_name = dim
    tasks = {t.name: t for t in job.tasks}
    if task_name not in tasks:
        raise SpecError(f"{source}: {path}: '{task_name}' is not a task of job '{job.name}'; "
                        f"{did_you_mean(task_name, tasks)}")
    task = tasks[task_name]
    if field == "batch_size":
        return task.batch_size
    uses = {u.use_name: u for u in task.components}
    if use_name not in uses:
        raise SpecError(f"{source}: {path}: '{use_name}' is not a use of task '{task_name}'; "
                        f"{did_you_mean(use_name, uses)}")
    use = uses[use_name]
    value = getattr(use, field) or getattr(job.components[use.component], field)
    if value is None:
        raise SpecError(f"{source}: {path}: the job gives use '{use_name}' of task '{task_name}' no {field}, so it "
                        f"cannot vary. Remove it, or vary a field the use has.")
    return value


def _check_value(job: JobSpec, dim: Dim, value: int, source: str) -> None:
    name = dim_name(dim)
    if value > LIMITS[dim[1]]:
        raise SpecError(f"{source}: {name} ({value}) is over the limit of {LIMITS[dim[1]]} that keeps planning "
                        "bounded. Use a smaller value (see docs/job-spec.md, Limits).")
    k = job.training.grad_accum_steps
    if dim[1] == "batch_size" and value % k:
        raise SpecError(f"{source}: {name} ({value}) is not divisible by training.grad_accum_steps ({k}); each "
                        "micro-batch needs the same rows. Use multiples of it.")


def _sample_points(batches: Sequence[BatchSample], index: dict[Dim, int], base: Point) -> dict[Point, float]:
    weights: dict[Point, float] = {}
    top = max(batch.weight for batch in batches)  # relative to the largest: a sum of large finite weights stays finite
    for batch in batches:
        point = list(base)
        for task, shape in batch.tasks.items():
            for (dim, _), value in zip(_dims_of(task, shape, ""), _values_of(shape)):
                point[index[dim]] = value
        weights[tuple(point)] = weights.get(tuple(point), 0.0) + batch.weight / top
        if len(weights) > MAX_POINTS:
            raise SpecError(f"batches: more than {MAX_POINTS} distinct shapes; round the lengths (e.g. to multiples "
                            "of 64) so batches share shapes.")
    return _normalised(weights)


def _values_of(shape: TaskShape) -> list[int]:
    values = [shape.batch_size] if shape.batch_size is not None else []
    return values + list(shape.seq_len.values()) + list(shape.image_size.values())


def _product_points(dist: dict[str, TaskDistribution], index: dict[Dim, int], base: Point,
                    source: str) -> dict[Point, float]:
    marginals: list[tuple[int, dict[int, float]]] = []
    for task, shape in dist.items():
        given = [shape.batch_size] if shape.batch_size is not None else []
        given += list(shape.seq_len.values()) + list(shape.image_size.values())
        for (dim, _), values in zip(_dims_of(task, shape, ""), given):
            marginals.append((index[dim], _normalised(values)))
    size = math.prod(len(m) for _, m in marginals)
    if size > MAX_POINTS:
        raise SpecError(f"{source}: distribution: {size} combinations of values is over the limit of {MAX_POINTS} "
                        "distinct shapes; give fewer values per dimension (e.g. round lengths to multiples of 64).")
    points: dict[Point, float] = {}
    for combo in itertools.product(*(sorted(m.items()) for _, m in marginals)):
        point = list(base)
        p = 1.0
        for (d, _), (value, prob) in zip(marginals, combo):
            point[d] = value
            p *= prob
        points[tuple(point)] = points.get(tuple(point), 0.0) + p
    return _normalised(points)


def _normalised(weights: dict[Any, float]) -> dict[Any, float]:
    """Finite positive weights as probabilities summing to 1, by key; scaled by the largest first, so weights near
    the float maximum (1e308) do not sum to inf and tiny ones do not all round to 0."""
    top = max(weights.values())
    total = math.fsum(w / top for w in weights.values())
    return {key: w / top / total for key, w in sorted(weights.items())}


# --------------------------------------------------------------------------- jobs per shape


def job_at(job: JobSpec, dims: Sequence[Dim], point: Point, source: str = "shapes file") -> JobSpec:
    """``job`` with the shapes of ``point``: each dimension's value written into its task (batch_size) or use
    (seq_len, image_size), checked like a spec's (component rules, pretrained positions)."""
    values = dict(zip(dims, point))
    tasks = []
    for task in job.tasks:
        uses = [use.model_copy(update={f: values[(task.name, f, use.use_name)] for f in ("seq_len", "image_size")
                                       if (task.name, f, use.use_name) in values}) for use in task.components]
        update: dict[str, Any] = {"components": uses}
        if (task.name, "batch_size", "") in values:
            update["batch_size"] = values[(task.name, "batch_size", "")]
        tasks.append(task.model_copy(update=update))
    shaped = job.model_copy(update={"tasks": tasks})
    from planner.components import check_components  # local: components imports spec, as in spec.load_job

    try:
        check_components(shaped)
        JobSpec._check_pretrained_uses(shaped)
    except LoomError as exc:
        raise SpecError(f"{source}: the shape ({describe_point(dims, point)}) does not make a valid job: {exc}") \
            from None
    return shaped


# --------------------------------------------------------------------------- candidate shapes and lookup


def cluster_points(shapes: ResolvedShapes, count: int, rounds: int = 50) -> list[list[Point]]:
    """The points in at most ``count`` clusters of similar shapes: weighted k-means in log-space (a 2x longer
    sequence and a 2x larger batch are equally far), seeded deterministically with the most probable point and then
    each time the point farthest from the seeds. Clusters in seed order, none empty."""
    points = sorted(shapes.points, key=lambda p: (-shapes.points[p], p))
    logs = {p: [math.log(v) for v in p] for p in points}
    centres = [logs[points[0]]]
    while len(centres) < min(count, len(points)):
        far = max(points, key=lambda p: (min(_distance(logs[p], c) for c in centres), tuple(-v for v in p)))
        if min(_distance(logs[far], c) for c in centres) == 0:
            break
        centres.append(logs[far])
    groups: list[list[Point]] = []
    for _ in range(rounds):
        groups = [[] for _ in centres]
        for p in points:
            groups[min(range(len(centres)), key=lambda c: _distance(logs[p], centres[c]))].append(p)
        groups = [g for g in groups if g]
        moved = [[sum(shapes.points[p] * logs[p][d] for p in g) / sum(shapes.points[p] for p in g)
                  for d in range(len(shapes.dims))] for g in groups]
        if moved == centres:
            break
        centres = moved
    return groups


def _distance(a: Sequence[float], b: Sequence[float]) -> float:
    return math.fsum((x - y) ** 2 for x, y in zip(a, b))


def pick_bucket(members: Sequence[Sequence[Point]], point: Point) -> int | None:
    """Which bucket runs a batch of shape ``point``: the bucket that lists it; else the first bucket with a member at
    least as large in every dimension (its plan fits the batch's memory, which grows with every shape field); None
    when no bucket has one (the batch is outside the shapes file: re-plan with it)."""
    for i, group in enumerate(members):
        if point in group:
            return i
    for i, group in enumerate(members):
        if any(all(v <= s for v, s in zip(point, member)) for member in group):
            return i
    return None
