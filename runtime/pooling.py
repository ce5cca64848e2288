"""Which leaves a pooled loss pools with its pretrained model's own pooling (``tasks[].pooling``): torch-free, so
``loom validate`` checks it without importing torch. The pooling modules themselves: runtime.pretrained_pooling.
"""

from __future__ import annotations

from pathlib import Path

from planner.pretrained import resolve_pretrained, tensor_files
from planner.spec import ComponentSpec, JobSpec
from planner.usegraph import leaf_uses, use_component

POOLED_LOSSES = ("cross_entropy", "mse", "contrastive", "infonce")  # the built-in heads that pool (runtime.heads)
# model_type -> the checkpoint modules its pooler_output reads (CLIP text's reads none: it picks a position)
POOLER_MODULES: dict[str, tuple[str, ...]] = {
    "clip_vision_model": ("post_layernorm",),
    "clip_text_model": (),
    "siglip_vision_model": ("head",),
    "siglip_text_model": ("head",),
    "bert": ("pooler",),
}


def model_pooler(comp: ComponentSpec) -> str | None:
    """The model_type whose ``pooler_output`` pretrained ``comp`` computes; None for a component without one (Loom's
    kinds, causal LMs, a SigLIP vision tower without ``vision_use_head``, a BERT saved without its pooler)."""
    if not comp.pretrained:
        return None
    info = resolve_pretrained(comp.pretrained)
    modules = POOLER_MODULES.get(info.model_type)
    if modules is None:
        return None
    if info.model_type == "siglip_vision_model" and not info.config.get("vision_use_head", True):
        return None
    names = tensor_files(Path(comp.pretrained))
    if not all(any(n.startswith(m + ".") for n in names) for m in modules):
        return None
    return info.model_type


def pooled_width(comp: ComponentSpec) -> int:
    """The width of ``comp``'s pooled vector: SigLIP text's head projects to ``projection_size``, others keep H."""
    cfg = resolve_pretrained(comp.pretrained).config
    if model_pooler(comp) == "siglip_text_model":
        return int(cfg.get("projection_size") or cfg["hidden_size"])
    return comp.hidden_size


def model_pooled_leaves(job: JobSpec, t: int) -> dict[int, str]:
    """Leaf index -> component name of task ``t``'s leaves its head pools with the model's own pooling (none for a
    loss that does not pool or ``pooling: mean``; with ``pooling`` unset, a leaf without a model pooler is mean-pooled).
    Raises ValueError for a ``pooling`` the task cannot have: set on a
    loss that does not pool, ``model`` with a leaf whose model has no pooling, or a CLIP text leaf that reads other
    uses' outputs (its end-of-text position is in its own token ids only)."""
    task = job.tasks[t]
    where = f"tasks[{t}] ('{task.name}').pooling ('{task.pooling}')"
    if task.loss not in POOLED_LOSSES:
        if task.pooling is not None:
            raise ValueError(f"{where} applies to the pooled losses {', '.join(POOLED_LOSSES)}; loss '{task.loss}' "
                             "does not pool. Remove pooling:.")
        return {}
    if task.pooling == "mean":
        return {}
    out = {}
    for i, leaf in enumerate(leaf_uses(job, t)):
        name, comp = use_component(job, t, leaf)
        kind = model_pooler(comp)
        if kind is None:
            if task.pooling == "model":
                raise ValueError(f"{where}: leaf '{leaf}' runs components.{name}, whose model has no pooled output "
                                 "(only CLIP, SigLIP and BERT towers do). Use pooling: mean, or leave it unset.")
            continue
        u = next(j for j, use in enumerate(task.components) if use.use_name == leaf)
        if kind == "clip_text_model" and task.upstream_names(u):  # unset: this leaf is mean-pooled
            if task.pooling == "model":
                raise ValueError(f"{where}: leaf '{leaf}' (a CLIP text tower) reads other uses' outputs, so its "
                                 "end-of-text token is not in its own ids. Use pooling: mean, or give it `after: []`.")
            continue
        out[i] = name
    return out


def pooler_export_name(param: str, leaf: int) -> str | None:
    """The checkpoint name of head parameter ``poolers.<leaf>.parts.<module>.<rest>``; None for others."""
    prefix = f"poolers.{leaf}.parts."
    return param.removeprefix(prefix) if param.startswith(prefix) else None


def pooling_task(job: JobSpec, component: str) -> tuple[str, int] | None:
    """(task, leaf index) of the first task whose head pools a leaf on ``component`` with the model's pooling: its
    pooler's trained tensors are the ones exported; None when no task does."""
    for t, task in enumerate(job.tasks):
        for leaf, name in model_pooled_leaves(job, t).items():
            if name == component:
                return task.name, leaf
    return None
