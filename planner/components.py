"""Component uses, planner side: the shape each use of a component resolves to (with what it cross-attends to) and
the layer segments it expands into. What a kind is (its fields, shape, costs and properties) is its entry in
planner.kinds; this module asks the entry and compares no kind names.
"""

from __future__ import annotations

from dataclasses import replace

from planner.errors import SpecError, did_you_mean
from planner.kinds import BYTES_PER_ACT, LayerSegment, UseShape, kind_of, need  # noqa: F401  (re-exported)
from planner.memory import ACT_BYTES, saved_mode
from planner.spec import ComponentSpec, JobSpec, TaskComponentSpec
from planner.unet import unet_state_numel



def resolve_shape(comp: ComponentSpec, comp_name: str, use: TaskComponentSpec, where: str) -> UseShape:
    """The shape a task's use of a component sees (its kind's ``shape``); raises SpecError naming ``where`` when one
    is missing."""
    return kind_of(comp, comp_name).shape(comp, comp_name, use, where)


def use_shape(job: JobSpec, task_index: int, use_index: int) -> UseShape:
    """The shape of one use, with what it cross-attends to: a decoder's memory length, a unet2d's context (the
    output of its first upstream use) when it has one."""
    use = job.tasks[task_index].components[use_index]
    comp = job.components[use.component]
    shape = resolve_shape(comp, use.component, use, f"tasks[{task_index}].components[{use_index}]")
    kind = kind_of(comp, use.component)
    if kind.memory:
        shape = replace(shape, cross_len=upstream_seq_len(job, task_index, use_index))
    elif kind.context and (width := upstream_width(job, task_index, use_index)) is not None:
        shape = replace(shape, cross_len=upstream_seq_len(job, task_index, use_index), cross_width=width)
    return shape


def expand_use(job: JobSpec, task_index: int, use_index: int) -> list[LayerSegment]:
    """Layer segments of one use of a component in one task."""
    use = job.tasks[task_index].components[use_index]
    comp = job.components[use.component]
    shape = use_shape(job, task_index, use_index)
    kind = kind_of(comp, use.component)
    need(comp, use.component, *kind.requires)
    segments = kind.segments(comp, use.component, shape, saved_mode(job.training.precision, job.training.kernels))
    # saved activations are priced at the job's precision and kernels (planner.memory); the kinds price what crosses
    # devices in bf16 (BYTES_PER_ACT), and the runtime sends and all-reduces it in the job's precision, so fp32
    # doubles those byte counts (bf16/fp16: factor 1, the same numbers bit for bit)
    scale = ACT_BYTES[job.training.precision] / BYTES_PER_ACT
    if scale == 1:
        return segments
    return [replace(seg, out_bytes=seg.out_bytes * scale, tp_comm_bytes=seg.tp_comm_bytes * scale)
            for seg in segments]


def output_shape(job: JobSpec, t: int, u: int) -> tuple[int, int]:
    """(positions, width) of use ``u`` of task ``t`` (not a unet2d): its sequence (a decoder's stream, then its
    memory) and its hidden size."""
    shape = use_shape(job, t, u)
    comp = job.components[job.tasks[t].components[u].component]
    positions = shape.seq_len + (shape.cross_len or 0) if kind_of(comp).memory else shape.seq_len
    return positions, comp.hidden_size


def out_shapes(job: JobSpec, t: int, u: int, segment: int, num_layers: int) -> tuple[tuple[int, ...], ...]:
    """Per-sample shape of what leaves each of the ``num_layers`` layers of segment ``segment`` of use ``u`` of task
    ``t``: ``(positions, width)`` (:func:`output_shape`), or a unet2d's flat state ``(elements,)``, whose skip stack
    grows and shrinks block by block (:func:`~planner.unet.unet_state_numel`)."""
    comp = job.components[job.tasks[t].components[u].component]
    if not kind_of(comp).flat_state:
        return (output_shape(job, t, u),) * num_layers
    shape = use_shape(job, t, u)
    return tuple((unet_state_numel(comp, shape.image_size, shape.context, segment, b),) for b in range(1, num_layers + 1))


def upstream_indices(job: JobSpec, task_index: int, use_index: int) -> list[int]:
    """Indices of the uses feeding use ``use_index`` of the task, in its ``after:`` order; [] for a root use."""
    task = job.tasks[task_index]
    return [next(i for i, other in enumerate(task.components) if other.use_name == name)
            for name in task.upstream_names(use_index)]


def upstream_width(job: JobSpec, task_index: int, use_index: int) -> int | None:
    """Hidden size of the output feeding use ``use_index`` (its first upstream use's); None for a root use."""
    ups = upstream_indices(job, task_index, use_index)
    return job.components[job.tasks[task_index].components[ups[0]].component].hidden_size if ups else None


def upstream_seq_len(job: JobSpec, task_index: int, use_index: int) -> int | None:
    """Sequence length of what feeds use ``use_index``: its upstream uses' outputs concatenated along the sequence
    (a fusion reads them so); None for a root use."""
    ups = upstream_indices(job, task_index, use_index)
    if not ups:
        return None
    total = 0
    for u in ups:
        producer = job.tasks[task_index].components[u]
        comp = job.components[producer.component]
        shape = resolve_shape(comp, producer.component, producer, f"tasks[{task_index}].components[{u}]")
        total += shape.seq_len
        if kind_of(comp).memory:  # a decoder's output carries its memory after its stream
            total += upstream_seq_len(job, task_index, u) or comp.cross_seq_len or 0
    return total


def check_components(job: JobSpec) -> None:
    """Check every component's kind and kind-specific fields, and that every use resolves to a shape."""
    for name, comp in job.components.items():
        kind = kind_of(comp, name)
        for degree in comp.tensor_parallel:
            if degree < 1 or degree & (degree - 1):
                raise SpecError(
                    f"components.{name}.tensor_parallel ({degree}) is not a power of two; use degrees like 1, 2, 4, 8."
                )
            if degree > 1 and kind.tp_variant is None:
                raise SpecError(
                    f"components.{name}.tensor_parallel ({degree}) is not supported for kind '{comp.kind}' "
                    "(no attention heads to split); use [1]."
                )
            heads = comp.num_heads or 0
            if degree > 1 and heads % degree:
                raise SpecError(
                    f"components.{name}.tensor_parallel ({degree}) does not divide num_heads ({heads}); "
                    "pick a degree that divides the head count."
                )
            if degree > 1 and comp.num_kv_heads is not None and comp.num_kv_heads % degree:
                raise SpecError(
                    f"components.{name}.tensor_parallel ({degree}) does not divide num_kv_heads ({comp.num_kv_heads}); "
                    "each tensor-parallel rank holds whole key/value heads. Pick a degree that divides num_kv_heads."
                )
        if comp.num_kv_heads is not None and (comp.num_heads is None or comp.num_heads % comp.num_kv_heads):
            raise SpecError(
                f"components.{name}.num_kv_heads ({comp.num_kv_heads}) does not divide num_heads ({comp.num_heads}); "
                "grouped-query attention needs num_heads to be a multiple of num_kv_heads."
            )
        if comp.weights_from is not None:
            check_hand_off(job, name)
    for t, task in enumerate(job.tasks):
        for u in range(len(task.components)):
            check_mode(job, t, u)
            expand_use(job, t, u)


SHAPE_FIELDS = ("kind", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "ffn_hidden_size", "vocab_size",
                "patch_size", "in_channels", "channel_mults", "out_features")


def check_hand_off(job: JobSpec, name: str) -> None:
    """``components.<name>.weights_from`` names another component of the same shape (its weights are copied in)."""
    comp = job.components[name]
    source = comp.weights_from
    if source == name or source not in job.components:
        others = [n for n in job.components if n != name]
        raise SpecError(f"components.{name}.weights_from ('{source}') is not another component of this job; "
                        f"{did_you_mean(str(source), others)}")
    for field in SHAPE_FIELDS:
        mine, theirs = getattr(comp, field), getattr(job.components[source], field)
        if mine != theirs:
            raise SpecError(f"components.{name}.weights_from ('{source}'): a weight hand-off needs equal shapes, but "
                            f"{field} is {mine!r} here and {theirs!r} in '{source}'. Make the shapes agree.")


def check_mode(job: JobSpec, t: int, u: int) -> None:
    """A use's mode fits its component (generate: a causal LM with a vocabulary; sample: a denoiser) and its task
    (batch_size a multiple of the use's samples)."""
    task = job.tasks[t]
    use = task.components[u]
    comp = job.components[use.component]
    kind = kind_of(comp, use.component)
    where = f"tasks[{t}].components[{u}]"
    if use.mode == "generate" and (not kind.causal_lm or comp.vocab_size is None):
        raise SpecError(f"{where}.mode ('generate'): component '{use.component}' (kind '{comp.kind}') has no "
                        "vocabulary to decode into; generate needs a causal LM with vocab_size (e.g. kind llama).")
    if use.mode == "sample" and not kind.denoiser:
        raise SpecError(f"{where}.mode ('sample'): component '{use.component}' (kind '{comp.kind}') is not a "
                        "denoiser; sample needs a diffusion model (kind unet2d).")
    if task.batch_size % use.samples:
        raise SpecError(f"{where}.samples ({use.samples}) does not divide tasks[{t}].batch_size "
                        f"({task.batch_size}); the batch counts samples. Make batch_size a multiple of it.")
