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
from runtime.connect import BRIDGE_KINDS, TEXT_KINDS, op_connection, output_shape, use_index


def feature_shape(job: JobSpec, op: MetaOp, boundary: int | None = None) -> tuple[int, ...]:
    """Per-sample shape of the activation after ``boundary`` layers of MetaOp ``op`` (0: its input; None: its
    output): ``(sequence length, hidden size)`` (a decoder's: stream + memory), the same at every boundary, except
    a unet2d's flat state ``(N,)`` (runtime.unet), whose skip stack grows and shrinks layer by layer."""
    t, u = use_index(job, op)
    comp = job.components[op.component]
    if comp.kind == "unet2d":
        boundary = op.num_layers if boundary is None else boundary
        shape = use_shape(job, t, u)
        return (unet_state_numel(comp, shape.image_size, shape.context, op.segment, boundary),)
    return output_shape(job, t, u)


def check_trainable(job: JobSpec) -> None:
    """What ``loom run`` checks of a job before any worker starts: every task's loss and what its head needs
    (runtime.heads.head_factory, without building it), then :func:`check_runnable`. A ValueError (a SpecError
    among them) names the task or use and the fix."""
    from planner.metagraph import build_metagraph
    from runtime.heads import head_factory

    for t in range(len(job.tasks)):
        head_factory(job, t)
    check_runnable(job, build_metagraph(job))


def check_runnable(job: JobSpec, graph: MetaGraph) -> None:
    """Raise SpecError when a use's inputs cannot become what it is declared to read. A use of a non-bridge kind
    reads its inputs through a connector when their shapes differ from its own (runtime.connect: projection,
    pooling, its own text tokens after them, which only token kinds have); a decoder or unet2d attends to its
    inputs' outputs (concatenated along the sequence, so of one width); a unet2d's output feeds only the loss."""
    for op in graph.metaops:
        _check_unet_edges(job, graph, op)
        if not op.deps or graph.metaops[op.deps[0]].use == op.use:
            continue
        if job.components[op.component].kind in BRIDGE_KINDS:
            _check_bridge_inputs(job, graph, op)
            continue
        c = op_connection(job, graph, op)
        if c is not None and c.text_len and job.components[op.component].kind not in TEXT_KINDS:
            inputs = [graph.metaops[op.deps[i]] for i in input_order(job, graph, op.id)]
            parts = " + ".join(f"'{p.use}' ({s} x {h})" for p, (s, h) in zip(inputs, c.inputs))
            raise SpecError(
                f"{_use_path(job, op)} ('{op.use}') reads {parts}, {c.positions} positions, but is declared with "
                f"{c.seq_len}; only a transformer or llama use adds its own text tokens after its inputs. Set its "
                f"seq_len to {c.positions} or less (longer inputs are average-pooled to it)."
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
    t, u = use_index(job, op)
    return f"tasks[{t}].components[{u}]"


def _check_bridge_inputs(job: JobSpec, graph: MetaGraph, op: MetaOp) -> None:
    """A decoder or unet2d with several inputs attends to their outputs concatenated along the sequence (its
    memory or context), in the order of its ``after:`` list: they need one width."""
    if len(op.deps) < 2:
        return
    inputs = [graph.metaops[op.deps[i]] for i in input_order(job, graph, op.id)]
    widths = [feature_shape(job, p)[1] for p in inputs]
    if len(set(widths)) > 1:
        parts = ", ".join(f"'{p.use}' ({h} wide)" for p, h in zip(inputs, widths))
        raise SpecError(
            f"{_use_path(job, op)} ('{op.use}') attends to {parts} concatenated along the sequence; they need one "
            "width. Give the inputs the same hidden_size, or fuse them in a transformer use first."
        )


TP_KINDS = ("transformer", "vit", "llama", "decoder")  # layer kinds the runtime runs tensor parallel


def check_plan_matches_job(plan: Plan, graph: MetaGraph, source: str = "plan", job_name: str | None = None) -> None:
    """The one check that ``plan`` belongs to the job whose MetaGraph is ``graph`` (``loom run``, ``loom submit``
    and every worker call it): the same MetaOps in the same order (name, layer key, layer count, batch size), and
    only layouts the runtime runs (tensor parallelism on :data:`TP_KINDS` only). The job's name, cluster and
    training settings may differ: a plan is a schedule of these MetaOps. A SpecError naming ``source``."""
    want = [(op.name, op.key, op.num_layers, op.batch_size) for op in graph.metaops]
    have = [(op.name, op.layer_key, op.num_layers, op.batch_size) for op in plan.metaops]
    if want != have:
        diff = next((f"{h[0]} vs {w[0]}" for h, w in zip(have, want) if h != w), f"{len(have)} MetaOps vs {len(want)}")
        job = f"job '{job_name}'" if job_name else "this job"
        raise SpecError(
            f"{source}: the plan was made for job '{plan.job}' (plan {plan.hash}), with other MetaOps than {job} "
            f"(first difference: {diff}). Re-run `loom plan JOB.yaml --save PLAN.json`."
        )
    for wave in plan.waves:
        for s in wave.slices:
            kind = graph.metaops[s.metaop].layer.key.split("[")[0]
            if s.tp_degree != 1 and kind not in TP_KINDS:
                raise SpecError(
                    f"{source}: MetaOp {plan.metaops[s.metaop].name} has tensor_parallel {s.tp_degree}; the runtime "
                    "runs tensor parallelism for transformer, vit, llama and decoder layers only (on megatron-core)."
                )
