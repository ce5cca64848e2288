"""What the runtime checks before it runs a job or a plan: activation shapes between uses, and what a plan asks
of the layers. User errors are one-line SpecErrors naming the use and the fix."""

from __future__ import annotations

from planner.components import use_shape
from planner.errors import SpecError
from planner.metagraph import MetaGraph, MetaOp
from planner.plan import Plan
from planner.spec import JobSpec
from planner.unet import unet_state_numel
from runtime.assignment import input_order
from runtime.embeddings import BRIDGE_KINDS


def feature_shape(job: JobSpec, op: MetaOp, boundary: int | None = None) -> tuple[int, ...]:
    """Per-sample shape of the activation after ``boundary`` layers of MetaOp ``op`` (0: its input; None: its
    output): ``(sequence length, hidden size)`` (a decoder's: stream + memory), the same at every boundary, except
    a unet2d's flat state ``(N,)`` (runtime.unet), whose skip stack grows and shrinks layer by layer."""
    t = next(i for i, task in enumerate(job.tasks) if task.name == op.task)
    u = next(i for i, use in enumerate(job.tasks[t].components) if use.use_name == op.use)
    comp = job.components[op.component]
    shape = use_shape(job, t, u)
    if comp.kind == "unet2d":
        boundary = op.num_layers if boundary is None else boundary
        return (unet_state_numel(comp, shape.image_size, shape.context, op.segment, boundary),)
    if comp.kind == "decoder":
        return shape.seq_len + (shape.cross_len or 0), comp.hidden_size
    return shape.seq_len, comp.hidden_size


def check_runnable(job: JobSpec, graph: MetaGraph) -> None:
    """Raise SpecError when a chain passes activations of one shape to a use declared with another: the
    runtime feeds a use the previous use's output as is (no adapter between components), except a decoder or
    unet2d, whose input module takes any upstream output as what it attends to. A use with several inputs reads
    their outputs concatenated along the sequence axis (see :func:`_check_fusion`)."""
    for op in graph.metaops:
        _check_unet_edges(job, graph, op)
        if len(op.deps) > 1:
            _check_fusion(job, graph, op)
            continue
        if job.components[op.component].kind in BRIDGE_KINDS and op.deps and graph.metaops[op.deps[0]].use != op.use:
            continue  # its input module takes any upstream output
        for dep in op.deps:
            producer = graph.metaops[dep]
            got, want = feature_shape(job, producer), feature_shape(job, op)
            if got != want and producer.use != op.use:
                raise SpecError(
                    f"{_use_path(job, op)} ('{op.use}') reads the output of '{producer.use}', which is "
                    f"{got[0]} tokens x {got[1]}, but is declared as {want[0]} tokens x {want[1]}; the runtime "
                    f"passes activations between components unchanged. Set its seq_len to {got[0]} and use the "
                    "same hidden_size."
                )


def _check_unet_edges(job: JobSpec, graph: MetaGraph, op: MetaOp) -> None:
    """A unet2d use's own output (a feature map) feeds only its task's loss head: the runtime has no adapter from a
    feature map to another component."""
    for dep in op.deps:
        producer = graph.metaops[dep]
        if producer.use != op.use and job.components[producer.component].kind == "unet2d":
            raise SpecError(
                f"{_use_path(job, op)} ('{op.use}') reads the output of unet2d use '{producer.use}'; the runtime feeds "
                "a unet2d's output only to its task's loss head. Make the unet2d use a leaf of its task."
            )


def _use_path(job: JobSpec, op: MetaOp) -> str:
    t = next(i for i, task in enumerate(job.tasks) if task.name == op.task)
    u = next(i for i, use in enumerate(job.tasks[t].components) if use.use_name == op.use)
    return f"tasks[{t}].components[{u}]"


def _check_fusion(job: JobSpec, graph: MetaGraph, op: MetaOp) -> None:
    """A use with several inputs (a fusion) reads their outputs concatenated along the sequence axis, in the
    order of its ``after:`` list: each input must have the use's hidden size and the use's seq_len must be the
    sum of theirs. A decoder or unet2d attends to the concatenation (its memory or context), which only needs
    one width."""
    inputs = [graph.metaops[op.deps[i]] for i in input_order(job, graph, op.id)]
    shapes = [feature_shape(job, p) for p in inputs]
    if job.components[op.component].kind in BRIDGE_KINDS:
        if len({h for _, h in shapes}) > 1:
            parts = ", ".join(f"'{p.use}' ({h} wide)" for p, (_, h) in zip(inputs, shapes))
            raise SpecError(
                f"{_use_path(job, op)} ('{op.use}') attends to {parts} concatenated along the sequence; they need one "
                "width. Give the inputs the same hidden_size, or fuse them in a transformer use first."
            )
        return
    seq_len, width = feature_shape(job, op)
    total = sum(s for s, _ in shapes)
    if total != seq_len or any(h != width for _, h in shapes):
        parts = " + ".join(f"'{p.use}' ({s} tokens x {h})" for p, (s, h) in zip(inputs, shapes))
        raise SpecError(
            f"{_use_path(job, op)} ('{op.use}') reads {parts} concatenated along the sequence, but is declared "
            f"as {seq_len} tokens x {width}; expected every input {width} wide and {total} tokens in all. Set its "
            f"seq_len to {total} and give its inputs the hidden_size of '{op.component}'."
        )


def check_plan_matches_job(plan: Plan, graph: MetaGraph) -> None:
    names = [op.name for op in graph.metaops]
    if names != [op.name for op in plan.metaops]:
        raise ValueError("the plan's MetaOps do not match the job's; was the plan made for another job? Re-run `loom plan`.")
    for wave in plan.waves:
        for s in wave.slices:
            kind = graph.metaops[s.metaop].layer.key.split("[")[0]
            if s.tp_degree != 1 and kind not in ("transformer", "vit", "llama", "decoder"):
                raise NotImplementedError(
                    f"MetaOp {plan.metaops[s.metaop].name} has tensor_parallel {s.tp_degree}; the runtime runs "
                    "tensor parallelism for transformer, vit, llama and decoder layers only (on megatron-core)."
                )
