"""Job-level phases (``phases:``): a job as an ordered pipeline of phases, and the artifacts they hand each other.

Not planner.phases (the plan's *waves*, another concept). A phased job declares its components, training and planner
settings once at the top and a list of phases; each phase either trains (its own ``tasks``, and optional overrides
of ``training`` and ``components`` fields) or runs a Python step registered under a name (``step`` with ``args``).
Phases read earlier phases' artifacts by reference, ``@<phase>/<artifact>[/<sub path>]``, wherever a path is
accepted: a component's ``pretrained:``, a task's data paths, a step's ``args``. A trained phase writes ``model``
(``OUT/<phase>/export/``: one from_pretrained folder per pretrained component, runtime.export) and ``checkpoint``
(its last checkpoint folder); a step writes what its registry entry declares. A job without ``phases:`` is one
phase, as before (:func:`load_pipeline` is only for documents with ``phases:``).

Each trained phase becomes a plain :class:`~planner.spec.JobSpec` named ``<job>.<phase>`` (:func:`phase_job`).
At plan time no artifact exists yet: a component whose ``pretrained:`` names an earlier phase's ``model`` is
planned with the shape of its own top-level declaration (phases never resize a component; no artifact is read).
At run time (a ``locate`` function given) the reference becomes the artifact's folder, read as any pretrained folder.

Torch-free and registry-free: the step names and what each writes are passed in (orchestrator.pipeline owns the
registry). Every problem is one :class:`~planner.errors.SpecError` line naming ``phases[i]``.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from planner.errors import SpecError, did_you_mean
from planner.spec import JobSpec, StrictModel, _format_error, job_schema, parse_job
from planner.spec_file import read_job_document

MODEL = "model"  # artifact: the exported from_pretrained folders, OUT/<phase>/export/<component>/
CHECKPOINT = "checkpoint"  # artifact: the phase's last complete checkpoint folder
TRAINED_WRITES = (MODEL, CHECKPOINT)
EXPORT_DIR = "export"  # runtime.export.EXPORT_DIR (torch-free copy; tests/unit/orchestrator compares them)
REFERENCE = re.compile(r"^@([^/]+)/([^/]+)(?:/(.+))?$")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
RESERVED = ("logs",)  # OUT/logs holds the shared Ray cluster's worker logs (orchestrator.pipeline)


class GateBound(StrictModel):
    """The bounds a gated metric must meet: ``min <= value <= max`` (either may be left out, not both)."""

    min: float | None = Field(None, description="The smallest value that passes.")
    max: float | None = Field(None, description="The largest value that passes.")

    @model_validator(mode="after")
    def _some_bound(self) -> GateBound:
        if self.min is None and self.max is None:
            raise ValueError("a gate needs `min`, `max` or both. Add one, or remove the metric from `gate`.")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min:g}) is above max ({self.max:g}); no value passes. Fix one of them.")
        return self

    def failure(self, metric: str, value: float) -> str | None:
        """Why ``value`` of ``metric`` fails this gate, or None when it passes."""
        if self.min is not None and not value >= self.min:
            return f"{metric} = {value:.4g} is below the gate's min {self.min:g}"
        if self.max is not None and not value <= self.max:
            return f"{metric} = {value:.4g} is above the gate's max {self.max:g}"
        return None


class PhaseSpec(StrictModel):
    """One phase: train ``tasks`` (with overrides) or run the Python step ``step`` with ``args``."""

    name: str = Field(description="Phase name, unique in the job; its artifacts are written under OUT/<name>/.")
    tasks: list[dict[str, Any]] | None = Field(
        None, description="The tasks this phase trains (each a task as under a job's `tasks:`); none for a step."
    )
    training: dict[str, Any] = Field(
        default_factory=dict, description="Fields of the job's `training:` this phase overrides (steps, lr, ...)."
    )
    components: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per component, fields this phase overrides (e.g. `pretrained: "
        "\"@sft/model\"`: initialise from an earlier phase's exported model)."
    )
    data_dir: str | None = Field(
        None, description="The job's `data_dir` for this phase (a recipe's data folder), e.g. `\"@data/data\"`: the "
        "folder an earlier step wrote. Trained phases only."
    )
    step: str | None = Field(None, description="A registered Python step to run instead of training (e.g. average).")
    args: dict[str, Any] = Field(default_factory=dict, description="The step's arguments (paths may be references).")
    gate: dict[str, GateBound] = Field(
        default_factory=dict, description="Per metric the step reports, the bound it must meet or the run fails "
        "after this phase: a number (the minimum) or {min: x, max: y} (e.g. `csr: 0.5`).",
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        if not _SAFE_NAME.fullmatch(name) or name in RESERVED or name.startswith("previous-"):
            raise ValueError(f"({name!r}) is not a safe phase name; expected 1-32 characters from A-Z a-z 0-9 _ -, "
                             f"starting with a letter or digit, not {' or '.join(RESERVED)} or previous-* (it becomes "
                             "a folder of OUT). Rename the phase.")
        return name

    @field_validator("gate", mode="before")
    @classmethod
    def _bare_minimum(cls, gate: Any) -> Any:
        """A bare number is the minimum."""
        if isinstance(gate, dict):
            return {k: {"min": v} if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                    for k, v in gate.items()}
        return gate

    @model_validator(mode="after")
    def _tasks_or_step(self) -> PhaseSpec:
        if (self.tasks is None) == (self.step is None):
            both = "both `tasks` and `step`" if self.tasks is not None else "neither `tasks` nor `step`"
            raise ValueError(f"phase '{self.name}' has {both}; a phase either trains tasks or runs one step. Give "
                             "exactly one of them.")
        if self.step is not None and (self.training or self.components or self.data_dir is not None):
            raise ValueError(f"phase '{self.name}' runs step '{self.step}' but overrides `training`/`components`/"
                             "`data_dir`, "
                             "which only trained phases use. Remove them.")
        if self.step is None and self.args:
            raise ValueError(f"phase '{self.name}' trains tasks but has `args`, which only steps take. Remove them.")
        if self.step is None and self.gate:
            raise ValueError(f"phase '{self.name}' trains tasks but has `gate`, which only steps (evaluations) "
                             "report metrics for. Gate a step phase that evaluates the trained model.")
        return self


@dataclass(frozen=True)
class Reference:
    """``@phase/artifact[/sub]`` found at ``where`` (a spec path)."""

    phase: str
    artifact: str
    sub: str | None
    where: str


@dataclass(frozen=True)
class Phase:
    """A checked phase: its spec, index, the artifacts it writes, and for a trained phase its plan-time job."""

    spec: PhaseSpec
    index: int
    writes: tuple[str, ...]
    job: JobSpec | None  # planned shapes (references not yet on disk); None for a step

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def is_step(self) -> bool:
        return self.spec.step is not None


@dataclass(frozen=True)
class Pipeline:
    """A phased job: the document it came from, the folder relative paths are read from, its checked phases."""

    name: str
    doc: dict[str, Any]  # the top-level document without `phases`
    base: Path | None
    phases: tuple[Phase, ...]

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)


def is_phased(data: Any) -> bool:
    """Whether a parsed job document declares ``phases:``."""
    return isinstance(data, dict) and "phases" in data


def parse_reference(value: Any, where: str) -> Reference | None:
    """The reference ``value`` spells (a string starting with ``@``), else None; a SpecError for a malformed one."""
    if not (isinstance(value, str) and value.startswith("@")):
        return None
    match = REFERENCE.match(value)
    if match is None:
        raise SpecError(f"{where} ({value!r}) is not a reference; expected '@<phase>/<artifact>[/<path>]', e.g. "
                        "'@sft/model'. Fix the value.")
    inner = match.group(3)
    if inner is not None and (Path(inner).is_absolute() or ".." in Path(inner).parts):
        raise SpecError(f"{where} ({value!r}) leads out of the artifact: its path may not be absolute or contain "
                        "'..'. Name a file or folder inside '@<phase>/<artifact>'.")
    return Reference(*match.groups(), where=where)


def references(value: Any, where: str) -> list[Reference]:
    """Every reference inside ``value`` (strings in nested lists and mappings), with its spec path."""
    if isinstance(value, dict):
        return [r for k, v in value.items() for r in references(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [r for i, v in enumerate(value) for r in references(v, f"{where}[{i}]")]
    ref = parse_reference(value, where)
    return [ref] if ref else []


def load_pipeline(path: str | Path, steps: Mapping[str, tuple[str, ...]],
                  cluster: str | Path | None = None) -> Pipeline:
    """Load a phased job file and check it (:func:`parse_pipeline`)."""
    return parse_pipeline(read_job_document(path, cluster), steps, base=Path(path).resolve().parent)


def parse_pipeline(data: dict[str, Any], steps: Mapping[str, tuple[str, ...]], base: Path | None = None) -> Pipeline:
    """Check a phased job document: phase names, tasks-or-step, step names (``steps``: name -> artifacts it writes),
    every reference (to an earlier phase, and an artifact it writes), then each trained phase as a JobSpec with its
    planned shapes. One SpecError naming ``phases[i]`` for the first problem."""
    raw = data.get("phases")
    if not isinstance(raw, list) or not raw:
        raise SpecError("phases: expected a non-empty list of phases (each with a name and tasks or a step). "
                        "Fix the value, or remove `phases:` for a one-phase job.")
    if "tasks" in data:
        raise SpecError("tasks: a phased job lists its tasks under each phase (phases[i].tasks). Move them there.")
    doc = {k: v for k, v in data.items() if k != "phases"}
    for section, what in (("components", "component"), ("data_dir", "data_dir")):  # what every phase reads
        for ref in references(doc.get(section), section):
            raise SpecError(f"{ref.where} ('@{ref.phase}/{ref.artifact}'): a top-level {what} is shared by every "
                            "phase and cannot read a phase's artifact (references are resolved per phase only). "
                            f"Override it in the phase that reads it (phases[i].{section}).")
    specs = [_phase_spec(item, i) for i, item in enumerate(raw)]
    names = [s.name for s in specs]
    written: dict[str, tuple[str, ...]] = {}
    phases = []
    for i, spec in enumerate(specs):
        where = f"phases[{i}]"
        if spec.name in names[:i]:
            raise SpecError(f"{where}.name ('{spec.name}') is not unique (also phases[{names.index(spec.name)}]."
                            "name); each phase writes its own folder. Rename one of them.")
        if spec.step is not None and spec.step not in steps:
            raise SpecError(f"{where}.step ('{spec.step}') is not a registered step; {did_you_mean(spec.step, steps)}")
        for component in spec.components:
            if component not in doc.get("components", {}):
                raise SpecError(f"{where}.components.{component}: not a component of the job (declare components "
                                f"once at the top); {did_you_mean(component, doc.get('components') or {})}")
        for ref in _phase_references(spec, where):
            _check_reference(ref, spec.name, names, i, written)
        writes = tuple(steps[spec.step]) if spec.step is not None else TRAINED_WRITES
        written[spec.name] = writes
        job = None if spec.step is not None else _planned_job(doc, spec, where, base)
        phases.append(Phase(spec, i, writes, job))
    return Pipeline(str(data.get("name")), doc, base, tuple(phases))


def _phase_spec(item: Any, i: int) -> PhaseSpec:
    try:
        return PhaseSpec.model_validate(item)
    except ValidationError as exc:
        first = exc.errors()[0]
        message = _format_error(PhaseSpec, first)
        raise SpecError(f"phases[{i}]{'.' if first['loc'] else ': '}{message}") from None


def _phase_references(spec: PhaseSpec, where: str) -> list[Reference]:
    """The references a phase reads: its components' overrides, its tasks (data paths), its step's args."""
    return (references(spec.components, f"{where}.components") + references(spec.tasks or [], f"{where}.tasks")
            + references(spec.args, f"{where}.args") + references(spec.data_dir, f"{where}.data_dir"))


def _check_reference(ref: Reference, phase: str, names: list[str], index: int,
                     written: Mapping[str, tuple[str, ...]]) -> None:
    """A reference must name an earlier phase and an artifact it writes."""
    shown = f"{ref.where} ('@{ref.phase}/{ref.artifact}')"
    if ref.phase not in names:
        raise SpecError(f"{shown}: no phase is named '{ref.phase}'; {did_you_mean(ref.phase, names)}")
    if ref.phase not in written:
        order = "its own" if ref.phase == phase else f"a later phase's (phases[{names.index(ref.phase)}])"
        raise SpecError(f"{shown} reads {order} artifact: a cycle in the phase order; phases run in the order "
                        f"listed and read only earlier phases. Move phase '{ref.phase}' before phases[{index}].")
    if ref.artifact not in written[ref.phase]:
        raise SpecError(f"{shown}: phase '{ref.phase}' writes no artifact '{ref.artifact}'; it writes "
                        f"{', '.join(repr(a) for a in written[ref.phase]) or 'nothing'}. Name one of them.")


def phase_document(pipeline_doc: dict[str, Any], spec: PhaseSpec) -> dict[str, Any]:
    """The job document of trained phase ``spec``: the top-level sections with its overrides, its tasks, the
    components its tasks use (and those they take weights from), named ``<job>.<phase>``."""
    doc = copy.deepcopy({k: v for k, v in pipeline_doc.items() if k != "components"})
    doc["name"] = f"{pipeline_doc.get('name')}.{spec.name}"
    doc["tasks"] = copy.deepcopy(spec.tasks)
    doc["training"] = {**(pipeline_doc.get("training") or {}), **spec.training}
    if spec.data_dir is not None:
        doc["data_dir"] = spec.data_dir
    declared = pipeline_doc.get("components") or {}
    used = {use.get("component") for task in spec.tasks or [] if isinstance(task, dict)
            for use in task.get("components") or [] if isinstance(use, dict)}
    while True:  # weights_from targets are components of the job too
        more = {(declared.get(c) or {}).get("weights_from") for c in used} - used - {None}
        if not more:
            break
        used |= more
    doc["components"] = {name: {**copy.deepcopy(comp), **copy.deepcopy(spec.components.get(name, {}))}
                         for name, comp in declared.items() if name in used or name in spec.components}
    return doc


Locate = Callable[[Reference, "str | None"], Path]  # (reference, the reading component) -> the artifact's path


def resolve_references(doc: dict[str, Any], locate: Locate | None, top: Mapping[str, Any]) -> dict[str, Any]:
    """``doc`` (a phase document) with every reference replaced: at run time by ``locate``'s path (the artifacts
    exist); at plan time (None) a component's ``pretrained:`` reference by its top-level declaration's folder (the
    shape the artifact will have) and a data path or a component's ``init_from:`` by where the artifact will be under
    ``out/<job>``."""
    doc = copy.deepcopy(doc)
    if locate is None:
        root = Path("out") / str(top.get("name"))
        locate = lambda ref, sub: artifact_path(root, ref, sub)  # noqa: E731
        planning = True
    else:
        planning = False
    for name, comp in doc.get("components", {}).items():
        init = parse_reference(comp.get("init_from"), f"components.{name}.init_from")
        if init is not None:  # a model file, read when the phase's modules are built (where it will be, planning)
            comp["init_from"] = str(Path(locate(init, None)).resolve())
        ref = parse_reference(comp.get("pretrained"), f"components.{name}.pretrained")
        if ref is None:
            continue
        if not planning:
            comp["pretrained"] = str(locate(ref, name))
            continue
        declared = (top.get("components") or {}).get(name) or {}
        if not declared.get("pretrained"):
            raise SpecError(f"{ref.where} ('@{ref.phase}/{ref.artifact}'): component '{name}' is declared without "
                            "`pretrained:` at the top, so Loom has no shape to plan it with before the artifact "
                            "exists, and a phase exports only pretrained components. Declare it from a pretrained "
                            "folder.")
        comp["pretrained"] = declared["pretrained"]
    ref = parse_reference(doc.get("data_dir"), "data_dir")
    if ref is not None:
        doc["data_dir"] = str(Path(locate(ref, None)).resolve())
    if doc.get("tasks"):
        doc["tasks"] = [_resolved(task, f"tasks[{t}]", locate) for t, task in enumerate(doc["tasks"])]
    return doc


def _resolved(value: Any, where: str, locate: Locate) -> Any:
    """``value`` (a task or a part of it) with every reference replaced by ``locate``'s path of the artifact: a data
    file or folder, a scorer's weights."""
    if isinstance(value, dict):
        return {k: _resolved(v, f"{where}.{k}", locate) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolved(v, f"{where}[{i}]", locate) for i, v in enumerate(value)]
    ref = parse_reference(value, where)
    return value if ref is None else str(Path(locate(ref, None)).resolve())


def artifact_path(out_dir: Path, ref: Reference, default_sub: str | None = None, checkpoint: str = "ckpt") -> Path:
    """Where ``ref``'s artifact is under the pipeline's ``out_dir``: ``model`` -> ``<phase>/export[/<sub>]``
    (``default_sub``: the component reading it), ``checkpoint`` -> ``<phase>/<checkpoint>`` (the folder its phase's
    marker names, e.g. ``ckpt/step_6``), anything else -> ``<phase>/<artifact>[/<sub>]``."""
    sub = ref.sub or (default_sub if ref.artifact == MODEL else None)
    folder = {MODEL: EXPORT_DIR, CHECKPOINT: checkpoint}.get(ref.artifact, ref.artifact)
    path = Path(out_dir) / ref.phase / folder
    return path / sub if sub else path


def _planned_job(doc: dict[str, Any], spec: PhaseSpec, where: str, base: Path | None) -> JobSpec:
    """Trained phase ``spec`` as a JobSpec with plan-time shapes; its errors prefixed with ``where``."""
    try:
        return phase_job(doc, spec, base)
    except SpecError as exc:
        raise SpecError(f"{where} ('{spec.name}'): {exc}") from None


def phase_job(doc: dict[str, Any], spec: PhaseSpec, base: Path | None, locate: Locate | None = None) -> JobSpec:
    """Trained phase ``spec`` of the pipeline document ``doc`` as a checked JobSpec: plan-time shapes, or with
    ``locate`` the artifacts of earlier phases read where it says (planner.spec.parse_job, then the components'
    checks)."""
    from planner.components import check_components  # local: components imports spec

    phase_doc = resolve_references(phase_document(doc, spec), locate, doc)
    job = parse_job(phase_doc, source=f"phase '{spec.name}'", base=base)
    try:
        check_components(job)
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    return job


def document_schema() -> dict[str, Any]:
    """The JSON schema of a job file, for editors (``loom schema``): a one-phase job (planner.spec.JobSpec) or a
    phased one (the same top level with ``phases:`` instead of ``tasks:``)."""
    one = job_schema()
    phase = PhaseSpec.model_json_schema(ref_template="#/$defs/{model}")
    gate = phase["properties"]["gate"]  # a bare number is the minimum (PhaseSpec._bare_minimum)
    gate["additionalProperties"] = {"anyOf": [{"type": "number"}, gate["additionalProperties"]]}
    defs = {**one.pop("$defs"), **phase.pop("$defs", {}), "PhaseSpec": phase}
    phased = copy.deepcopy(one)
    del phased["properties"]["tasks"]
    phased["properties"]["phases"] = {
        "type": "array", "minItems": 1, "items": {"$ref": "#/$defs/PhaseSpec"},
        "description": "The job's phases, run in order (docs/job-spec.md, Phases); each trains tasks or runs a step."}
    phased["required"] = [r for r in one["required"] if r != "tasks"] + ["phases"]
    phased["title"] = "PhasedJob"
    defs["JobSpec"], defs["PhasedJob"] = one, phased
    return {"title": "Loom job", "description": "A Loom job file: one phase (tasks:) or several (phases:).",
            "anyOf": [{"$ref": "#/$defs/JobSpec"}, {"$ref": "#/$defs/PhasedJob"}], "$defs": defs}


# --------------------------------------------------------------------------- what a step gets (orchestrator.steps runs it)


@dataclass(frozen=True)
class StepContext:
    """What a step gets: its phase, its ``args`` (references already replaced by the artifacts' absolute paths),
    the folder it writes its artifacts into and the spec file's folder (relative paths in ``args``)."""

    phase: str
    args: dict[str, Any]
    out_dir: Path  # OUT/<phase>
    base: Path | None = None

    def path(self, value: str | Path) -> Path:
        """``value`` as an absolute path: relative paths are read from the spec file's folder."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.base or Path.cwd()) / path

    def artifact(self, name: str) -> Path:
        """Where this step writes artifact ``name`` (``model``: the export folder)."""
        return self.out_dir / (EXPORT_DIR if name == MODEL else name)


def check_known_args(args: dict[str, Any], known, step: str) -> None:
    """A ValueError for the first key of ``args`` not in ``known`` (a step's argument check)."""
    for key in args:
        if key not in known:
            raise ValueError(f"{key}: unknown argument of step '{step}'; it takes {', '.join(known)}.")


def check_whole_args(args: dict[str, Any], ranges) -> None:
    """Each ``(key, low, high)`` of ``ranges``: ``args[key]`` (default ``low``) a whole number in ``low..high``."""
    for key, low, high in ranges:
        value = args.get(key, low)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(f"{key} ({value!r}): expected a whole number in {low}..{high}. Fix the value.")


def check_model_arg(key: str, value: Any, base: Path | None, what: str) -> None:
    """``value`` (argument ``key``, ``what`` it is) a reference or an existing from_pretrained folder."""
    if not isinstance(value, str):
        raise ValueError(f"{key} ({value!r}): required, {what}: a reference '@<phase>/model/<component>' or a "
                         "from_pretrained folder. Add it.")
    if not value.startswith("@") and not StepContext("", {}, Path(), base).path(value).is_dir():
        raise ValueError(f"{key} ({value!r}): no such folder. Point it at a from_pretrained folder.")


def check_average(args: dict[str, Any], base: Path | None) -> None:
    """``component`` (a name), ``models`` (2+ folders or references), optional ``weights`` (one number >= 0 per
    model, not all 0); no other key. Plain folders must exist now; references are checked by planner.pipeline."""
    known = {"component", "models", "weights"}
    for key in args:
        if key not in known:
            raise ValueError(f"{key}: unknown argument of step 'average'; it takes {', '.join(sorted(known))}.")
    if not isinstance(args.get("component"), str):
        raise ValueError("component: required, the component name the averaged model is written as "
                         "(OUT/<phase>/export/<component>/). Add it.")
    models = args.get("models")
    if not isinstance(models, list) or len(models) < 2 or not all(isinstance(m, str) for m in models):
        raise ValueError(f"models ({models!r}): expected a list of 2 or more model folders or references "
                         "('@<phase>/model'). Fix the value.")
    for i, model in enumerate(models):
        if not model.startswith("@") and not StepContext("", {}, Path(), base).path(model).is_dir():
            raise ValueError(f"models[{i}] ({model!r}): no such folder. Point it at a from_pretrained folder.")
    weights = args.get("weights")
    if weights is not None and (not isinstance(weights, list) or len(weights) != len(models)
                                or not all(is_finite_number(w) and w >= 0 for w in weights)
                                or not 0 < sum(weights) < math.inf):
        raise ValueError(f"weights ({weights!r}): expected {len(models)} finite numbers >= 0 (one per model), not "
                         "all 0. Fix the value or leave it out (equal weights).")


def is_finite_number(value: Any) -> bool:
    """Whether a step argument is a finite int or float (not a bool, not inf or NaN: a merge with one writes NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
