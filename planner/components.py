"""Component registry, planner side: how a component kind expands into layer segments with their costs.

A *segment* is a run of identical layers (same type, same input shape). Each carries the per-sample
forward FLOPs, parameters, saved-activation bytes and boundary bytes of one layer, which is all the
cost model needs. The runtime keeps its own registry that builds the torch modules; both are keyed
by the same kind names.

Modelling choices (written down so benchmarks can be read): embeddings, patch projections and
final norms are folded away (under 2% of a layer stack's FLOPs for every workload in bench/);
attention FLOPs count the full s x s score matrix (causal kernels do about half).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from planner.errors import SpecError, did_you_mean
from planner.spec import ComponentSpec, JobSpec, TaskComponentSpec
from planner.unet import Context, block_cost, channel_mults, output_numel, state_numel, unet_blocks, unet_state_numel

BYTES_PER_ACT = 2  # bf16 activations


@dataclass(frozen=True)
class LayerSegment:
    """A run of ``count`` identical layers; every number is per layer and per sample unless named otherwise."""

    key: str  # layer type and input shape; equal keys mean identical workloads
    count: int
    flops_fwd: float  # forward FLOPs per sample
    params: float  # parameters per layer
    act_bytes: float  # activation bytes saved for backward, per sample
    out_bytes: float  # bytes of the layer's output (what crosses a wave boundary), per sample
    tp_comm_bytes: float  # bytes all-reduced per sample in forward under tensor parallelism
    num_kernels: int  # kernel launches in forward (a latency term)


@dataclass(frozen=True)
class UseShape:
    """The shape one task use resolves to."""

    seq_len: int
    image_size: int | None
    cross_len: int | None = None  # decoder, unet2d: length of the upstream output it cross-attends to
    cross_width: int | None = None  # unet2d: width of that output

    @property
    def context(self) -> Context | None:
        """What a unet2d use cross-attends to; None for a root use."""
        return Context(self.cross_len, self.cross_width) if self.cross_width else None


def _transformer_layer(
    tag: str, h: int, f: int, s: int, heads: int, *, gated: bool = False, kv_dim: int | None = None,
    cross_len: int | None = None,
) -> tuple[str, float, float, float, float, float, int]:
    kv = kv_dim if kv_dim is not None else h
    attn_proj = 2 * s * h * (h + 2 * kv) + 2 * s * h * h  # q, k, v and output projections
    attn_core = 4 * s * s * h  # scores and weighted sum
    mlp = (6 if gated else 4) * s * h * f
    params = 2 * h * h + 2 * h * kv + (3 if gated else 2) * h * f
    flops = attn_proj + attn_core + mlp
    # Korthikanti et al. 2022: s*h*(34 + 5*a*s/h) bytes per layer per sample, no recompute.
    act = s * h * (34 + 5 * heads * s / h)
    kernels = 16  # LN x2, QKV, attention (3-4 with softmax), output proj, 2 residual adds, MLP (3), dropouts
    if cross_len is not None:
        flops += 2 * s * h * h * 2 + 4 * cross_len * h * h + 4 * s * cross_len * h
        params += 4 * h * h
        act += s * h * 12 + 5 * heads * s * cross_len
        kernels += 6
    key = f"{tag}[h={h},f={f},s={s},a={heads}" + (f",c={cross_len}" if cross_len else "") + "]"
    return key, float(flops), float(params), float(act), float(s * h * BYTES_PER_ACT), float(2 * s * h * BYTES_PER_ACT), kernels


def _need(comp: ComponentSpec, name: str, *fields: str) -> None:
    for field in fields:
        if getattr(comp, field) is None:
            raise SpecError(
                f"components.{name}.{field}: required for kind '{comp.kind}'. Add `{field}:` to the component."
            )


def _transformer(comp: ComponentSpec, name: str, shape: UseShape, tag: str = "transformer") -> list[LayerSegment]:
    _need(comp, name, "num_heads")
    f = comp.ffn_hidden_size or 4 * comp.hidden_size
    key, *rest = _transformer_layer(tag, comp.hidden_size, f, shape.seq_len, comp.num_heads)
    return [LayerSegment(key, comp.num_layers, *rest)]


def _vit(comp: ComponentSpec, name: str, shape: UseShape) -> list[LayerSegment]:
    _need(comp, name, "num_heads", "patch_size")
    return _transformer(comp, name, shape, tag="vit")


def _llama(comp: ComponentSpec, name: str, shape: UseShape) -> list[LayerSegment]:
    _need(comp, name, "num_heads")
    h = comp.hidden_size
    f = comp.ffn_hidden_size or 256 * ((8 * h // 3 + 255) // 256)
    kv_dim = h * (comp.num_kv_heads or comp.num_heads) // comp.num_heads
    key, *rest = _transformer_layer("llama", h, f, shape.seq_len, comp.num_heads, gated=True, kv_dim=kv_dim)
    return [LayerSegment(key, comp.num_layers, *rest)]


def _decoder(comp: ComponentSpec, name: str, shape: UseShape) -> list[LayerSegment]:
    """Self-attention over the use's stream, cross-attention to the memory, MLP. The memory travels with
    the stream through the layers (the runtime carries both in one tensor), so it counts in the boundary."""
    _need(comp, name, "num_heads")
    cross = shape.cross_len or comp.cross_seq_len
    if cross is None:
        raise SpecError(
            f"components.{name}.cross_seq_len: required for a decoder use with no upstream use to attend to. "
            "Add `cross_seq_len:` or feed the use from another use."
        )
    f = comp.ffn_hidden_size or 4 * comp.hidden_size
    key, flops, params, act, _, tp_bytes, kernels = _transformer_layer(
        "decoder", comp.hidden_size, f, shape.seq_len, comp.num_heads, cross_len=cross
    )
    out = float((shape.seq_len + cross) * comp.hidden_size * BYTES_PER_ACT)
    return [LayerSegment(key, comp.num_layers, flops, params, act, out, tp_bytes, kernels)]


def _mlp(comp: ComponentSpec, name: str, shape: UseShape) -> list[LayerSegment]:
    h, s = comp.hidden_size, shape.seq_len
    flops = 2.0 * h * h * s
    return [LayerSegment(f"mlp[h={h},s={s}]", comp.num_layers, flops, float(h * h), 2.0 * s * h * BYTES_PER_ACT,
                         float(s * h * BYTES_PER_ACT), float(s * h * BYTES_PER_ACT), 3)]


def _unet2d(comp: ComponentSpec, name: str, shape: UseShape) -> list[LayerSegment]:
    """One segment per level and path (planner.unet): down levels, the mid block, then up levels deepest first; each
    priced at the mean of its blocks, its boundary the whole state after its last block (h, time embedding,
    context, skips)."""
    context = shape.context
    blocks = unet_blocks(comp, shape.image_size)
    segments = []
    for segment in range(2 * len(channel_mults(comp)) + 1):
        mine = [b for b in blocks if b.segment == segment]
        costs = [block_cost(comp, name, b, context) for b in mine]
        last = mine[-1]
        out = state_numel(comp, last.h_out, last.skips_out, context) if last.skips_out else output_numel(
            comp, shape.image_size)
        tag = "unet_mid" if last.mid else "unet_block"
        key = f"{tag}[c={last.out_channels},r={last.side}" + (f",ctx={context.length}" if context else "") + "]"
        key += "" if last.mid else "/up" if last.up else "/down"
        segments.append(LayerSegment(
            key, len(mine), *(sum(getattr(c, f) for c in costs) / len(mine) for f in ("flops", "params")),
            BYTES_PER_ACT * sum(c.act for c in costs) / len(mine), float(out * BYTES_PER_ACT), 0.0,
            round(sum(c.kernels for c in costs) / len(mine)),
        ))
    return segments


KINDS: dict[str, Callable[[ComponentSpec, str, UseShape], list[LayerSegment]]] = {
    "transformer": _transformer,
    "vit": _vit,
    "llama": _llama,
    "decoder": _decoder,
    "mlp": _mlp,
    "unet2d": _unet2d,
}


def resolve_shape(comp: ComponentSpec, comp_name: str, use: TaskComponentSpec, where: str) -> UseShape:
    """The shape a task's use of a component sees; raises SpecError naming ``where`` when one is missing."""
    image = use.image_size or comp.image_size
    if comp.kind == "vit":
        _need(comp, comp_name, "patch_size")  # before the divisibility check below uses it
        if image is None:
            raise SpecError(f"{where}.image_size: required for a vit use. Set it on the use or on components.{comp_name}.")
        if image % comp.patch_size:
            raise SpecError(
                f"{where}.image_size ({image}) is not a multiple of components.{comp_name}.patch_size "
                f"({comp.patch_size}). Use a multiple, e.g. {image // comp.patch_size * comp.patch_size or comp.patch_size}."
            )
        return UseShape((image // comp.patch_size) ** 2 + 1, image)
    if comp.kind == "unet2d":
        if image is None:
            raise SpecError(f"{where}.image_size: required for a unet2d use. Set it on the use or on components.{comp_name}.")
        levels = len(channel_mults(comp))
        if image % (2 ** (levels - 1)):
            raise SpecError(
                f"{where}.image_size ({image}) must be divisible by 2^{levels - 1} for {levels} resolution levels. "
                "Change the image size or channel_mults."
            )
        return UseShape(image * image, image)
    seq = use.seq_len or comp.seq_len
    if seq is None:
        if comp.kind == "mlp":
            return UseShape(1, None)
        raise SpecError(f"{where}.seq_len: required for a {comp.kind} use. Set it on the use or on components.{comp_name}.")
    return UseShape(seq, image)


def use_shape(job: JobSpec, task_index: int, use_index: int) -> UseShape:
    """The shape of one use, with what it cross-attends to: a decoder's memory length, a unet2d's context (the
    output of its first upstream use) when it has one."""
    use = job.tasks[task_index].components[use_index]
    comp = job.components[use.component]
    shape = resolve_shape(comp, use.component, use, f"tasks[{task_index}].components[{use_index}]")
    if comp.kind == "decoder":
        shape = replace(shape, cross_len=upstream_seq_len(job, task_index, use_index))
    elif comp.kind == "unet2d" and (width := upstream_width(job, task_index, use_index)) is not None:
        shape = replace(shape, cross_len=upstream_seq_len(job, task_index, use_index), cross_width=width)
    return shape


def expand_use(job: JobSpec, task_index: int, use_index: int) -> list[LayerSegment]:
    """Layer segments of one use of a component in one task."""
    use = job.tasks[task_index].components[use_index]
    comp = job.components[use.component]
    return KINDS[comp.kind](comp, use.component, use_shape(job, task_index, use_index))


def output_shape(job: JobSpec, t: int, u: int) -> tuple[int, int]:
    """(positions, width) of use ``u`` of task ``t`` (not a unet2d): its sequence (a decoder's stream, then its
    memory) and its hidden size."""
    shape = use_shape(job, t, u)
    comp = job.components[job.tasks[t].components[u].component]
    positions = shape.seq_len + (shape.cross_len or 0) if comp.kind == "decoder" else shape.seq_len
    return positions, comp.hidden_size


def out_shapes(job: JobSpec, t: int, u: int, segment: int, num_layers: int) -> tuple[tuple[int, ...], ...]:
    """Per-sample shape of what leaves each of the ``num_layers`` layers of segment ``segment`` of use ``u`` of task
    ``t``: ``(positions, width)`` (:func:`output_shape`), or a unet2d's flat state ``(elements,)``, whose skip stack
    grows and shrinks block by block (:func:`~planner.unet.unet_state_numel`)."""
    comp = job.components[job.tasks[t].components[u].component]
    if comp.kind != "unet2d":
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
        if comp.kind == "decoder":  # a decoder's output carries its memory after its stream
            total += upstream_seq_len(job, task_index, u) or comp.cross_seq_len or 0
    return total


def check_components(job: JobSpec) -> None:
    """Check every component's kind and kind-specific fields, and that every use resolves to a shape."""
    for name, comp in job.components.items():
        if comp.kind not in KINDS:
            raise SpecError(
                f"components.{name}.kind ('{comp.kind}') is not a registered component; {did_you_mean(comp.kind, KINDS)}"
            )
        for degree in comp.tensor_parallel:
            if degree < 1 or degree & (degree - 1):
                raise SpecError(
                    f"components.{name}.tensor_parallel ({degree}) is not a power of two; use degrees like 1, 2, 4, 8."
                )
            if degree > 1 and comp.kind not in ("transformer", "vit", "llama", "decoder"):
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
    for t, task in enumerate(job.tasks):
        for u in range(len(task.components)):
            expand_use(job, t, u)
