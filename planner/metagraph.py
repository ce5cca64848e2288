"""MetaGraph: tasks expanded into per-layer operator chains, contracted into MetaOps.

Each task's use of a component becomes a chain of layer operators; a run of identical operators
(same layer type, same input shape, consecutive in the chain) contracts into one MetaOp with a
layer count. Contraction stays inside one component use: operators of different components hold
different parameters, and keeping them apart keeps parameter-sharing groups exact. MetaOps of
different tasks that use the same layers of the same component share parameters
(``param_group``). Levels are BFS depths: MetaOps of one level have no dependency between them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from planner.components import LayerSegment, expand_use, out_shapes
from planner.generation import Generation, whole_use
from planner.kinds import KINDS
from planner.spec import JobSpec
from planner.usegraph import input_modules


@dataclass(frozen=True)
class MetaOp:
    """A chain of ``num_layers`` identical layers of one task; times and costs come from ``layer``."""

    id: int
    name: str  # "<task>.<use>" (+ "#<segment>" when a use has several segments)
    task: str
    component: str
    layer: LayerSegment
    num_layers: int
    batch_size: int  # rows of one micro-batch: the task's batch_size / training.grad_accum_steps
    deps: tuple[int, ...]
    param_group: str  # MetaOps with the same group hold the same parameters
    frozen: bool
    backward_factor: float  # backward cost as a multiple of forward: 2 (weights+inputs), 1 (inputs only), 0
    level: int = 0
    allowed_tp: tuple[int, ...] = (1,)
    recompute: bool = False  # activation checkpointing: one more forward in backward, only inputs saved
    use: str = ""  # the name of the task's use of the component this MetaOp belongs to
    segment: int = 0  # index of this MetaOp's segment within its use (0: the use's first MetaOp)
    # per-sample shape of the activation after each of its layers (planner.components.out_shapes); () for MetaOps
    # built without a job (tests), whose boundaries are priced at ``layer.out_bytes``
    out_shapes: tuple[tuple[int, ...], ...] = ()
    # the modules its first layer runs before it: "embed:<component>" (a root's input, a bridge, a connector's text),
    # "adapt:<component>" (a connector's projection); see runtime.embeddings
    input_modules: tuple[str, ...] = ()
    kind: str = ""  # its component's kind (a key of planner.kinds.KINDS); "" for MetaOps built without a job (tests)
    mode: str = "train"  # its use's mode (planner.spec.TaskComponentSpec.mode)
    gen: Generation | None = None  # a generate or sample use: the whole use as one MetaOp of one layer

    @property
    def key(self) -> str:
        return self.layer.key


@dataclass(frozen=True)
class MetaGraph:
    """The contracted graph: MetaOps in topological order (ids are indices), levels and sharing groups."""

    metaops: tuple[MetaOp, ...]
    levels: tuple[tuple[int, ...], ...]
    param_groups: dict[str, tuple[int, ...]] = field(default_factory=dict)
    num_micro_batches: int = 1  # training.grad_accum_steps: passes of the MetaOps (each of one micro-batch) per step
    # components.<name>.weights_from: receiving component -> the component whose trained weights it receives
    weights_from: dict[str, str] = field(default_factory=dict)
    rollout_lag: int = 0  # training.rollout_lag: 1 lets a root generate MetaOp run beside the previous step
    # component -> parameters of one of its layers every TP rank keeps whole (planner.kinds.KindSpec.tp_whole_per_hidden
    # x hidden_size): what a hand-off's all-gather of a tensor-parallel layer leaves out (planner.handoff)
    tp_whole_params: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.metaops)

    def successors(self) -> list[list[int]]:
        succ: list[list[int]] = [[] for _ in self.metaops]
        for op in self.metaops:
            for d in op.deps:
                succ[d].append(op.id)
        return succ

    def ops_of_task(self, task: str) -> list[MetaOp]:
        return [op for op in self.metaops if op.task == task]


def contract_segments(segments: Sequence[LayerSegment]) -> list[LayerSegment]:
    """Merge consecutive segments with equal keys (identical operators) into one, adding their counts."""
    out: list[LayerSegment] = []
    for seg in segments:
        if out and out[-1].key == seg.key:
            prev = out[-1]
            out[-1] = LayerSegment(prev.key, prev.count + seg.count, *_costs(prev))
        else:
            out.append(seg)
    return out


def _costs(seg: LayerSegment) -> tuple:
    return (seg.flops_fwd, seg.params, seg.act_bytes, seg.out_bytes, seg.tp_comm_bytes, seg.num_kernels)


def build_metagraph(job: JobSpec) -> MetaGraph:
    """Expand every task of ``job`` into MetaOps with dependencies, levels and parameter groups.

    Modes (docs/planner.md, Modes): a ``train`` use trains its component's weights unless it is frozen; a ``forward``
    use computes no weight gradient but passes input gradients back when a trained use feeds it; a ``generate`` or
    ``sample`` use is one MetaOp of one layer (the whole use, :func:`planner.generation.whole_use`) with its own
    parameter group ``<component>@<mode>`` (its copy of the weights), and its output is detached: no gradient flows
    back into it, so nothing upstream of it trains through it. A sample use with ``grad_last_step`` on a trained
    component trains that component (the last step's backward) and keeps its group."""
    ops: list[MetaOp] = []
    for t, task in enumerate(job.tasks):
        last_of_use: dict[str, int] = {}
        trainable_of_use: dict[str, bool] = {}
        for u, use in enumerate(task.components):
            comp = job.components[use.component]
            upstream = task.upstream_names(u)
            deps = tuple(sorted(last_of_use[name] for name in upstream))
            trainable_upstream = any(trainable_of_use[name] for name in upstream)
            segments = contract_segments(expand_use(job, t, u))
            gen, shapes = None, None
            trains = use.mode == "train" or (use.mode == "sample" and use.grad_last_step)
            frozen = comp.frozen or not trains
            if use.mode in ("generate", "sample"):
                seg, gen, shape = whole_use(job, t, u, segments)
                segments, shapes = [seg], ((shape,),)
            for s, seg in enumerate(segments):
                if use.detached:
                    backward = 0.0
                elif not frozen:
                    backward = 2.0
                else:
                    backward = 1.0 if trainable_upstream else 0.0
                suffix = f"#{s}" if len(segments) > 1 else ""
                group = f"{use.component}#{s}" if len(segments) > 1 else use.component
                if gen is not None and frozen:
                    group = f"{use.component}@{use.mode}"
                op = MetaOp(
                    id=len(ops),
                    name=f"{task.name}.{use.use_name}{suffix}",
                    task=task.name,
                    component=use.component,
                    layer=seg,
                    num_layers=seg.count,
                    # the planner plans one micro-batch (training.grad_accum_steps of them make a step); the
                    # spec checks that they divide the batch
                    batch_size=task.batch_size // job.training.micro_batches,
                    deps=deps,
                    param_group=group,
                    frozen=frozen,
                    backward_factor=backward,
                    allowed_tp=tuple(sorted(set(comp.tensor_parallel))),
                    recompute=comp.recompute and backward > 0,
                    use=use.use_name,
                    segment=s,
                    out_shapes=shapes[s] if shapes else out_shapes(job, t, u, s, seg.count),
                    kind=comp.kind,
                    mode=use.mode,
                    gen=gen,
                )
                ops.append(op)
                deps = (op.id,)
            last_of_use[use.use_name] = ops[-1].id
            trainable_of_use[use.use_name] = not use.detached and (trainable_upstream or not frozen)
    graph = finalize_graph(ops)
    return replace(graph, metaops=tuple(replace(op, input_modules=tuple(input_modules(job, graph, op)))
                                        for op in graph.metaops), num_micro_batches=job.training.micro_batches,
                   weights_from={n: c.weights_from for n, c in job.components.items() if c.weights_from},
                   rollout_lag=job.training.rollout_lag,
                   tp_whole_params={n: float(KINDS[c.kind].tp_whole_per_hidden * (c.hidden_size or 0))
                                    for n, c in job.components.items() if c.kind in KINDS})


def finalize_graph(ops: Sequence[MetaOp]) -> MetaGraph:
    """Assign BFS levels and collect parameter groups; ``ops`` must be in topological order (deps < id)."""
    levels_of: list[int] = []
    for op in ops:
        assert all(d < op.id for d in op.deps), f"MetaOp {op.name} depends on a later MetaOp"
        levels_of.append(1 + max((levels_of[d] for d in op.deps), default=-1))
    final = tuple(_with_level(op, levels_of[op.id]) for op in ops)
    num_levels = 1 + max(levels_of, default=-1)
    levels = tuple(tuple(op.id for op in final if op.level == lv) for lv in range(num_levels))
    groups: dict[str, list[int]] = {}
    for op in final:
        groups.setdefault(op.param_group, []).append(op.id)
    return MetaGraph(final, levels, {g: tuple(ids) for g, ids in sorted(groups.items())})


def _with_level(op: MetaOp, level: int) -> MetaOp:
    from dataclasses import replace

    return replace(op, level=level)
