"""What one worker receives: its :class:`WorkerPayload`, not the whole job.

The driver builds one payload per rank from the job and the plan (runtime.prepare.build_payloads) and hands it over
as JSON; the worker (runtime.executor.WaveWorker) is built from it alone and derives nothing from the job. A payload
holds:

- ``assignment``: the rank's Assignment (planner.program.assignment: every slice and MetaOp, the pieces the rank sends
  and receives, the module shards it holds and the gradient buckets it takes part in), kept whole as the Plan model,
  so what other parts of the contract add to the Assignment reaches the worker unchanged;
- ``components`` and ``tasks``: the specs the rank builds and runs from. ``tasks`` are the tasks the rank runs a slice
  or a loss of, or that use a component whose modules it holds (a module's shape can depend on every use of its
  component, e.g. an input adapter's widths); ``components`` are those tasks' components. Components and tasks the
  rank has no part in are left out, so a pruned job of them would not validate as a JobSpec: this is its own type;
- ``training``, ``cluster``, ``name``, ``recipe``, ``data_dir``: the job's settings, as the job has them;
- ``loss_weights``: every task's name and loss weight in the job's order (the step's losses are all-reduced as one
  vector, the same on every rank);
- ``roles``: what use modes add to the execution (runtime.rollout.Roles), decided once in the driver from the whole
  plan; None for a job of train uses only; ``twins``: the layers a generate or sample MetaOp runs (its component's
  train MetaOps, runtime.sampleop.twin_ops), so that no worker rebuilds the MetaGraph.

The payload offers the JobSpec surface the runtime's builders read (``name``, ``recipe``, ``data_dir``,
``components``, ``tasks``, ``training``, ``cluster``), so the module builders, data sources and losses take it where
they take a job. Pure data: no torch, no planner builders.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from planner.errors import SpecError
from planner.plan import Plan, PlanMetaOp
from planner.spec import ClusterSpec, ComponentSpec, TaskSpec, TrainingSpec

Key = tuple[str, int]  # (module name, layer), as runtime.rollout's


class RolesData(BaseModel):
    """runtime.rollout.Roles as JSON: the same fields, keyed mappings as lists of pairs (JSON keys are strings)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    generate: list[int]
    readers: dict[int, int]
    extra: list[tuple[Key, tuple[int, ...]]]
    synced: list[tuple[Key, tuple[int, ...]]]
    hand_offs: list[tuple[Key, Key, int, int]]
    rollout_moves: dict[str, tuple[int, int, list[tuple[int, int, int, int]]]]
    widths: dict[int, int]
    sample: dict[int, bool]
    tp_decode: dict[int, tuple[int, ...]] = {}
    shards: list[tuple[Key, int, tuple[int, int]]] = []
    decode_copies: list[tuple[Key, tuple[int, ...]]] = []

    @classmethod
    def of(cls, roles) -> RolesData:
        """The JSON form of a runtime.rollout.Roles."""
        return cls(generate=sorted(roles.generate), readers=roles.readers, extra=sorted(roles.extra.items()),
                   synced=sorted(roles.synced.items()), hand_offs=roles.hand_offs, rollout_moves=roles.rollout_moves,
                   widths=roles.widths, sample=roles.sample, tp_decode=roles.tp_decode,
                   shards=sorted((k, d, shard) for (k, d), shard in roles.shards.items()),
                   decode_copies=sorted(roles.decode_copies.items()))

    def fields(self) -> dict:
        """Keyword arguments of runtime.rollout.Roles (sets and tuple-keyed dicts again)."""
        return {"generate": set(self.generate), "readers": dict(self.readers), "extra": dict(self.extra),
                "synced": dict(self.synced), "hand_offs": list(self.hand_offs),
                "rollout_moves": {t: (g, w, list(m)) for t, (g, w, m) in self.rollout_moves.items()},
                "widths": dict(self.widths), "sample": dict(self.sample), "tp_decode": dict(self.tp_decode),
                "shards": {(k, d): shard for k, d, shard in self.shards},
                "decode_copies": dict(self.decode_copies)}


class WorkerPayload(BaseModel):
    """One rank's part of a run (module docstring): its Assignment, the specs it builds and runs, the training
    settings. Built by the driver (runtime.prepare), read by runtime.executor.WaveWorker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(ge=0, description="The rank this payload is for.")
    assignment: Plan = Field(description="The rank's Assignment (planner.program.assignment), sealed.")
    name: str = Field(description="The job's name.")
    recipe: str | None = Field(None, description="The job's recipe (its losses and dataset are loaded by name).")
    data_dir: str | None = Field(None, description="The job's data folder, resolved by the driver.")
    components: dict[str, ComponentSpec] = Field(description="The components of the tasks below, by name.")
    tasks: list[TaskSpec] = Field(description="The tasks this rank runs or whose components' modules it holds, in "
                                              "the job's order.")
    training: TrainingSpec = Field(description="The job's training settings.")
    cluster: ClusterSpec = Field(description="The job's cluster (where the worker computes: cpu or a GPU).")
    loss_weights: dict[str, float] = Field(description="Every task of the job: name -> loss weight, job order.")
    roles: RolesData | None = Field(None, description="What use modes add (runtime.rollout.Roles); None: train only.")
    twins: dict[int, list[PlanMetaOp]] = Field(
        default_factory=dict, description="Per generate or sample MetaOp of the tasks above: the MetaOps a train use of "
        "its component would be (runtime.sampleop.twin_ops), whose layers it runs.")

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str, source: str = "worker payload") -> WorkerPayload:
        """Parse a payload; its Assignment must still match its content hash (nothing edited it on the way)."""
        payload = cls.model_validate_json(text)
        plan = payload.assignment
        if plan.rank != payload.rank or plan.hash != plan.content_hash():
            raise SpecError(f"{source}: the assignment is not rank {payload.rank}'s sealed Assignment "
                            f"(rank {plan.rank}); rebuild the payload with runtime.prepare.build_payload.")
        return payload
