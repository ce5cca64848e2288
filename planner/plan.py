"""Plan: the planner's decision as versioned, content-hashed JSON.

A Plan holds everything a run needs (MetaOps, waves with device ids and layouts, transfers,
shared-parameter sync groups) plus everything a person needs to judge it (predicted times, peak
memory, solver status and gap, bounds, baselines). It carries no timestamps or timings of the
planner itself, so the same inputs give byte-identical JSON. ``loom run --plan`` replays it without
the solver.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from planner.errors import SpecError
from planner.jsonfile import JsonKind, parse_json, read_json

PLAN_VERSION = 10  # 2: predicted.gather_s; 3: pieces (the program every worker executes); 4: bounds.iteration_s;
# 5: phases; 6: use modes (metaops[].mode) and weight hand-offs (handoffs, predicted.handoff_s); 7: predicted.reduce_s;
# 8: grad_buckets[].shards (ZeRO-1's optimizer shards); 9: slices[].rows (uneven row shares, planner.rows);
# 10: handoff_gathers (the TP all-gathers before a hand-off, priced in predicted.handoff_s)
MAX_PLAN_BYTES = 256 * 2**20  # quickstart-cpu's plan is 20 KiB; one of thousands of devices tens of MiB
PLAN_FILE = JsonKind("plan file", "not a Loom plan", "the JSON `loom plan --save` writes",
                     "Re-run `loom plan JOB.yaml --save PLAN.json`", MAX_PLAN_BYTES)


class _PlanModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Sealed:
    """A content-hashed JSON document (a Plan, a plan set): its ``hash`` field holds the hash of everything else."""

    def content_hash(self) -> str:
        return digest(self.model_dump(mode="json", exclude={"hash"}))

    def sealed(self):
        """This document with its content hash filled in."""
        return self.model_copy(update={"hash": self.content_hash()})

    def to_json(self) -> str:
        return _canonical(self.model_dump(mode="json"), indent=1) + "\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())


class PlanCluster(_PlanModel):
    num_nodes: int
    devices_per_node: int
    device: str
    memory_bytes: float


class PlanMetaOp(_PlanModel):
    id: int
    name: str
    task: str
    component: str
    layer_key: str
    num_layers: int
    batch_size: int
    deps: list[int]
    level: int
    param_group: str
    frozen: bool
    params_per_layer: float
    out_bytes_per_sample: float
    use: str = Field("", description="The name of the task's use of the component it belongs to.")
    segment: int = Field(0, description="Index of its segment within its use (0: the use's first MetaOp).")
    recompute: bool = Field(False, description="Activation checkpointing: its layers run forward again in backward.")
    input_modules: list[str] = Field(default_factory=list, description="Modules its first layer runs before it "
                                     "(embed:<component>, adapt:<component>).")
    mode: str = Field("train", description="Its use's mode: train, forward, generate or sample (a generate or sample "
                      "use is one MetaOp of one layer: the whole use).")


class PlanHandoff(_PlanModel):
    """Updated weights ``device`` receives after the optimizer step to run MetaOp ``metaop`` (planner.handoff: the
    trained layers of ``source`` it runs and does not train itself)."""

    component: str
    source: str
    metaop: int
    device: int
    bytes: float
    cross_node: bool
    network_bytes: float = 0.0


class PlanHandoffGather(_PlanModel):
    """The all-gather TP group ``devices`` runs after the optimizer step to rebuild layer ``layer`` of
    ``param_group`` whole before a hand-off is cut from it (planner.handoff.hand_off_gathers): each device gathers
    ``bytes`` in all."""

    param_group: str
    layer: int
    devices: list[int]
    bytes: float


class PlanSlice(_PlanModel):
    metaop: int
    first_layer: int = Field(description="Index of the first layer of the MetaOp this slice runs.")
    num_layers: int
    devices: list[int]
    dp_degree: int
    tp_degree: int
    time_s: float = Field(description="Predicted forward+backward time of the slice (a MetaOp's first slice: with "
                          "its input modules).")
    forward_s: float = Field(description="The forward part of time_s (1 / passes of it; the rest is backward).")
    memory_bytes: float = Field(description="Predicted bytes per device for this slice's layers.")
    rows: list[int] = Field(default_factory=list, description="Rows of the MetaOp's batch each data-parallel rank owns, "
                            "in rank order (planner.rows: uneven by one row where dp_degree does not divide the "
                            "batch); empty in a hand-written plan: the same shares.")


class PlanWave(_PlanModel):
    """One wave: forward runs the waves in order, each after its transfers in; backward runs them in reverse, each
    followed by its gradients sent back. ``duration_s`` is its compute (slowest slice), split into ``forward_s`` and
    the backward rest by the slowest slice's passes; ``start_s`` is the sum of the earlier waves' durations, and the
    transfers are the boundary's pieces priced together. These describe the waves as if each ended at a barrier; the
    prediction itself comes from the per-device timeline (planner.timeline), which has none."""

    index: int
    start_s: float
    duration_s: float
    forward_s: float
    transfer_in_s: float = Field(description="Activations crossing the boundary before its forward.")
    transfer_back_s: float = Field(description="Gradients crossing that boundary back after its backward.")
    slices: list[PlanSlice]


class PlanTransfer(_PlanModel):
    """Activations moving between two consecutive slices of one task across a wave boundary."""

    after_wave: int
    src_metaop: int
    dst_metaop: int
    src_devices: list[int]
    dst_devices: list[int]
    bytes: float
    time_s: float


class PlanPiece(_PlanModel):
    """Rows ``[start, stop)`` of a producer slice's output (or, ``backward``, of its gradient) moving from device
    ``src`` to device ``dst`` at one wave boundary; ``src == dst`` is taken locally (0 bytes). The rules that
    decide them are :mod:`planner.program`'s; the simulator prices exactly these and the runtime executes them."""

    wave: int = Field(description="The boundary before this wave's forward (after its backward); -1: the loss stage's.")
    backward: bool
    src: int
    dst: int
    producer: tuple[int, int] = Field(description="(wave, index in the wave) of the producing slice.")
    consumer: tuple[int, int] | None = Field(description="(wave, index) of the consuming slice; None: the loss stage.")
    target: tuple[int, int] = Field(description="(wave, index) of the slice whose devices receive: the consumer or "
                                    "the task's loss host.")
    task: str
    input: int = Field(description="Which input of the consumer (its position in the MetaOp's deps).")
    start: int
    stop: int
    shape: tuple[int, ...] = Field(description="Per-sample shape of the rows (the tensor is (stop - start, *shape)).")
    bytes: float = Field(description="Bytes crossing devices: rows x elements x the compute precision; 0 when local.")


class PlanHolding(_PlanModel):
    """A module shard and the devices that hold it (planner.program.Holding): a layer ``(param group, layer, TP
    rank)``, an input module ``(embed:|adapt:<component>, 0, 0)`` or a loss head ``(head:<task>, 0, 0)``."""

    name: str
    layer: int
    shard: int
    devices: list[int]
    trainable: bool
    ready_wave: int = Field(description="Its gradient is final after this wave's backward (len(waves) + p: the loss "
                            "stage of phase p; planner.phases).")
    params: float = Field(description="Parameters the planner models (0 for input modules and heads).")


class PlanBucket(_PlanModel):
    """Trainable shards held by exactly ``devices``, final after ``ready_wave``: one gradient all-reduce (several
    devices) and one ZeRO-1 optimizer state sharded over ``devices``; in launch order in the plan."""

    ready_wave: int
    devices: list[int]
    members: list[tuple[str, int, int]]
    params: float
    shards: list[int] = Field(description="ZeRO-1's optimizer shards: ``shards[i]`` is the device that steps share i "
                              "of the bucket's flattened parameters (members in order), elements "
                              "shard_range(elements, len(shards), i), and gathers it to the others; one share per "
                              "device of ``devices``.")


def shard_range(elements: int, num_shards: int, index: int) -> tuple[int, int]:
    """Elements ``[lo, hi)`` of share ``index`` of a bucket of ``elements`` flattened parameter elements cut into
    ``num_shards`` shares of ``ceil(elements / num_shards)`` (the last ones short, or empty when the bucket has fewer
    elements than shares): the optimizer shard a :attr:`PlanBucket.shards` device steps (runtime.zero; the simulator
    prices the all-gather of the padded shares, planner.sync.gather_bytes). The element count is the runtime's: the
    planner models parameters (``params``) and knows them exactly only from ``loom profile``'s module sizes."""
    per = -(-elements // num_shards)
    return min(index * per, elements), min((index + 1) * per, elements)


class SyncGroup(_PlanModel):
    """Parameters (of one sharing group) whose gradients are all-reduced over ``devices`` once the backward of
    the layers they cover is done (overlapping the rest of backward)."""

    param_group: str
    metaops: list[int]
    devices: list[int]
    bytes: float
    time_s: float


class Prediction(_PlanModel):
    """The simulator's iteration time and its parts along the critical path (planner.simulator): ``iteration_time_s =
    compute_s + transfer_s + sync_s + optimizer_s + gather_s + handoff_s + reduce_s - lag_hidden_s`` (seconds; sync
    and gather are the parts not hidden behind other work)."""

    iteration_time_s: float
    compute_s: float
    transfer_s: float
    sync_s: float
    optimizer_s: float
    gather_s: float = Field(0.0, description="Exposed ZeRO-1 all-gather of the updated parameters after the optimizer "
                            "step (0 without training.shard_optimizer).")
    loss_s: float = Field(0.0, description="The loss stage between the last forward and the first backward (part of "
                          "compute_s).")
    loss_transfer_in_s: float = Field(0.0, description="The leaves' outputs moving to the loss hosts (part of "
                                      "transfer_s).")
    loss_transfer_back_s: float = Field(0.0, description="Their gradients moving back (part of transfer_s).")
    handoff_s: float = Field(0.0, description="Weight hand-offs after the step (planner.handoff), on the critical "
                             "path: the next iteration's generation waits for them.")
    reduce_s: float = Field(0.0, description="The step's closing all-reduces over every worker (the task losses; the "
                            "gradient norm when clipping or scaling): a few bytes each, their latency.")
    lag_hidden_s: float = Field(0.0, description="With training.rollout_lag 1, the generation hidden behind the "
                                "previous step (planner.rolloutlag): the iteration is the pipeline's period, the other "
                                "parts less this.")


class SolverReport(_PlanModel):
    name: str
    status: str = Field(description="optimal, feasible (stopped at a limit with a gap), or heuristic.")
    objective_s: float
    bound_s: float = Field(description="A lower bound on the compute time valid for every schedule.")
    gap: float = Field(description="(objective - bound) / objective.")
    method: str = Field(description="Which candidate the plan comes from (lp-diving, two-wave, packing-ilp, "
                        "exact-milp, spindle, sequential; '+polish' after local search, 'reversed' wave order).")


class Bounds(_PlanModel):
    """Lower bounds (planner.bound): two on the compute, one on the whole predicted iteration."""

    per_level_s: float = Field(description="Sum over MetaLevels of the relaxed malleable optimum C* (concave-hull "
                               "speed-ups): a bound on the compute of schedules with level barriers.")
    dag_s: float = Field(description="A lower bound on the compute valid without level barriers.")
    iteration_s: float = Field(0.0, description="A lower bound on the predicted iteration time of every schedule: "
                               "the compute bound plus the optimizer step and gradient sync no schedule hides.")


class Plan(Sealed, _PlanModel):
    version: int = PLAN_VERSION
    job: str
    spec_hash: str
    cost_model: str
    cluster: PlanCluster
    metaops: list[PlanMetaOp]
    waves: list[PlanWave]
    phases: list[int] = Field(default_factory=lambda: [0], description="The first wave of each phase (planner.phases): "
                              "every device runs a phase's forward, its tasks' losses and its backward before the "
                              "next phase; [0] is one phase (all waves forward, all losses, all backward).")
    transfers: list[PlanTransfer]
    pieces: list[PlanPiece] = Field(description="Every move of every boundary, forward in execution order, then "
                                    "backward in the same order (planner.program).")
    sync_groups: list[SyncGroup]
    handoffs: list[PlanHandoff] = Field(default_factory=list, description="Weight hand-offs after every step "
                                        "(planner.handoff), by MetaOp and device.")
    handoff_gathers: list[PlanHandoffGather] = Field(
        default_factory=list, description="The all-gathers of tensor-parallel layers that the hand-offs' senders run "
        "first (planner.handoff), by layer and TP group.")
    holdings: list[PlanHolding] = Field(description="Every module shard and its holders (planner.program).")
    grad_buckets: list[PlanBucket] = Field(description="The gradient buckets every holder all-reduces, in launch order.")
    process_groups: list[list[int]] = Field(default_factory=list, description="Every device set with several members "
                                            "that runs a collective (holders, TP groups, loss shards), sorted: every "
                                            "rank creates these groups in this order.")
    rank: int | None = Field(None, description="Set on a worker's Assignment (planner.program.assignment): the rank "
                             "whose pieces, holdings and buckets it keeps.")
    shard_optimizer: bool | None = Field(
        None, description="ZeRO-1 chosen by the planner for a job with training.shard_optimizer: auto (priced and run "
        "so); None: as the job's training.shard_optimizer says (:func:`zero_sharded`).")
    # added with a default of None after the format settled: left out of every dump (the JSON, the hash, a plan set's
    # plans) while None, so a plan that does not use it reads and hashes as it did before it existed
    pipelined: bool | None = Field(
        None, exclude_if=lambda value: value is None,
        description="Micro-batches pipelined (planner.phases.step_walk), chosen by the planner for a job with "
        "training.pipeline_micro_batches: auto and grad_accum_steps > 1 (priced and run so); None: as the job says "
        "(:func:`micro_batches_pipelined`).")
    grad_accum_steps: int | None = Field(
        None, exclude_if=lambda value: value is None,
        description="Micro-batches per step, chosen by the planner for a job with training.grad_accum_steps: auto "
        "(priced and run so: :func:`job_for_plan`); None: the job's own count.")
    one_f_one_b: bool | None = Field(
        None, exclude_if=lambda value: value is None,
        description="Pipelined micro-batches walked one forward then one backward (1F1B, planner.phases."
        "one_forward_one_backward) instead of GPipe's fill and drain: chosen by the planner where it is no slower, "
        "each wave then holding fewer micro-batches' activations; None: GPipe's (:func:`micro_batch_walk`).")
    predicted: Prediction
    peak_memory_bytes: list[float]
    solver: SolverReport
    bounds: Bounds
    baselines: dict[str, float] = Field(description="Predicted iteration time of each baseline, same simulator.")
    baseline_notes: dict[str, str] = Field(
        default_factory=dict, description="Why a baseline's time needs care, e.g. its plan exceeds device memory."
    )
    hash: str = ""


def zero_sharded(plan: Plan, training) -> bool:
    """Whether ``plan`` runs ZeRO-1 (``training``: its job's TrainingSpec): the planner's choice for
    ``shard_optimizer: auto``, else the job's setting (a plan of an earlier release records no choice)."""
    if plan.shard_optimizer is not None:
        return plan.shard_optimizer
    return training.shard_optimizer is not False


def job_for_plan(job, plan: Plan):
    """``job`` (a planner.spec.JobSpec) as ``plan`` runs it: with ``training.grad_accum_steps: auto``, at the count
    the planner chose (the plan records it; a plan made without that search, e.g. ``loom profile``'s calibration
    plan, is of one micro-batch, as the unresolved job's MetaGraph); any other job as it is. Every reader of a job
    beside its plan (the runtime, the plan checks) takes this, so an ``auto`` job never runs unresolved."""
    if job.micro_batches_auto:
        return job.with_micro_batches(plan.grad_accum_steps or 1)
    return job


def micro_batches_pipelined(plan: Plan, training) -> bool:
    """Whether ``plan`` runs its micro-batches pipelined (``training``: its job's TrainingSpec): the planner's choice
    for ``pipeline_micro_batches: auto``, else the job's setting; never with one micro-batch."""
    if training.grad_accum_steps < 2:
        return False
    if plan.pipelined is not None:
        return plan.pipelined
    return training.pipeline_micro_batches is True


def micro_batch_walk(plan: Plan, training) -> tuple[bool, bool]:
    """(pipelined, 1F1B) of ``plan``'s micro-batches (``training``: its job's TrainingSpec): what
    planner.phases.step_walk takes, on the workers and in the simulator alike."""
    pipelined = micro_batches_pipelined(plan, training)
    return pipelined, pipelined and plan.one_f_one_b is True


def validated(model: type[BaseModel], data: dict, source: str, rerun: str):
    """``model.model_validate(data)``; its first error as one SpecError line naming the field and ``rerun``, the command
    that writes such a file."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise SpecError(f"{source}: {where}: {err['msg'].lower()}. Re-run `{rerun}`.") from None


def _canonical(obj: object, indent: int | None = None) -> str:
    return json.dumps(obj, sort_keys=True, indent=indent, separators=(",", ": ") if indent else (",", ":"))


def digest(body: dict) -> str:
    """The content hash of a sealed document's JSON ``body`` (everything but its ``hash``)."""
    return hashlib.sha256(_canonical(body).encode()).hexdigest()[:16]


def plan_from_json(text: str, source: str = "plan") -> Plan:
    """Parse and verify a Plan (:func:`plan_from_data`); a SpecError naming ``source`` for text that is not JSON."""
    return plan_from_data(parse_json(text, source, PLAN_FILE), source)


def plan_from_data(data: object, source: str = "plan") -> Plan:
    """Verify parsed plan JSON: a SpecError naming ``source`` for data that is not a sealed plan of this version (the
    hash does not match the content) or one that makes no sense (:func:`planner.validate.check_plan`: layers missing,
    devices outside the cluster, ...).

    The hash is checked over what the file holds, not over the model's dump: a plan written before a field with a
    default was added (``shard_optimizer``, PLAN_VERSION 10) lacks its key and was hashed without it; it reads as the
    default, which for such a field means what the plan did then (None: the job's own setting)."""
    if isinstance(data, dict) and "buckets" in data and "plans" in data:  # planner.plan_cache.PlanSet
        raise SpecError(f"{source}: a plan set (from `loom plan --shapes`), not a plan; a run takes one plan. "
                        "Save one with `loom plan` without --shapes.")
    if not isinstance(data, dict) or data.get("version") != PLAN_VERSION:
        found = data.get("version") if isinstance(data, dict) else None
        raise SpecError(f"{source}: plan version {found!r} is not supported; expected {PLAN_VERSION}. Re-run `loom plan`.")
    plan = validated(Plan, data, source, "loom plan")
    if not plan.hash:
        raise SpecError(f"{source}: the plan has no content hash; it was not written by `loom plan`. Re-run `loom plan`.")
    if plan.hash != digest({key: value for key, value in data.items() if key != "hash"}):
        raise SpecError(f"{source}: content hash {plan.hash} does not match the content; the file was edited. Re-run `loom plan`.")
    from planner.validate import check_plan  # planner.validate imports planner.program, which imports this module

    check_plan(plan, source)
    return plan


def load_plan(path: str | Path, source: str | None = None) -> Plan:
    """The plan file at ``path``, verified (:func:`plan_from_data`); a SpecError otherwise that starts with ``source``,
    how the user named the file (default its path; orchestrator.run_inputs.plan_option for ``--plan``)."""
    source = str(path) if source is None else source
    return plan_from_data(read_json(path, PLAN_FILE, source), source)
