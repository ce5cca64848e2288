"""The driver's side of the worker contract: one :class:`runtime.payload.WorkerPayload` per rank from a job and its plan.

Runs in the driver only (it derives what use modes add from the job's MetaGraph, runtime.rollout.Roles); workers read
the payloads it builds and never import this module.
"""

from __future__ import annotations

from planner.plan import Plan
from planner.program import assignment
from planner.spec import JobSpec
from planner.validate import metaop_record
from runtime.optim import module_component
from runtime.payload import RolesData, WorkerPayload
from runtime.sampleop import WHOLE_USE_MODES, twin_ops


def build_payloads(job: JobSpec, plan: Plan) -> list[WorkerPayload]:
    """Every rank's payload, in rank order (the ranks of the plan's cluster)."""
    roles = _roles(job, plan)  # once for every rank: they are the same on all
    return [_payload(job, plan, rank, roles) for rank in range(plan.cluster.num_nodes * plan.cluster.devices_per_node)]


def build_payload(job: JobSpec, plan: Plan, rank: int) -> WorkerPayload:
    """Rank ``rank``'s payload of ``plan`` (a whole plan of ``job``, checked against it by the caller)."""
    return _payload(job, plan, rank, _roles(job, plan))


def _payload(job: JobSpec, plan: Plan, rank: int, roles: RolesData | None) -> WorkerPayload:
    part = assignment(plan, rank)
    built = held_components(part, roles, rank)
    runs = {plan.metaops[s.metaop].task for wave in part.waves for s in wave.slices if rank in s.devices}
    heads = {h.name.removeprefix("head:") for h in part.holdings if h.name.startswith("head:")}
    tasks = [t for t in job.tasks if t.name in runs | heads or any(u.component in built for u in t.components)]
    names = built | {u.component for t in tasks for u in t.components}
    kept = {t.name for t in tasks}
    twins = {op.id: [metaop_record(twin) for twin in twin_ops(job, op)] for op in plan.metaops
             if op.mode in WHOLE_USE_MODES and op.task in kept}
    return WorkerPayload(
        rank=rank, assignment=part, name=job.name, recipe=job.recipe, data_dir=job.data_dir,
        components={n: c for n, c in job.components.items() if n in names}, tasks=tasks, training=job.training,
        cluster=job.cluster, loss_weights={t.name: t.loss_weight for t in job.tasks}, roles=roles, twins=twins)


def held_components(part: Plan, roles: RolesData | None, rank: int) -> set[str]:
    """The components whose modules rank ``rank`` holds under its Assignment ``part``: the plan's holdings and the
    extra copies use modes add (runtime.rollout.Roles.mine)."""
    names = {h.name for h in part.holdings if rank in h.devices}
    if roles is not None:
        names |= {key[0] for key, devices in roles.extra if rank in devices}
    return {c for c in (module_component(part.metaops, n) for n in names) if c is not None}


def _roles(job: JobSpec, plan: Plan) -> RolesData | None:
    from runtime.rollout import Roles, has_modes

    return RolesData.of(Roles.build(job, plan)) if has_modes(job) else None
