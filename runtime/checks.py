"""What the runtime checks before it runs a job or a plan: each task's loss and what its head needs, activation
shapes between uses, and what a plan asks of the layers. User errors are one-line ValueErrors (SpecErrors among
them) naming the task or use and the fix.

Torch-free, so that ``loom validate`` says what ``loom run`` would refuse without loading torch (a test checks
it): the heads themselves (runtime.heads) build only what these checks let through.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from typing import TYPE_CHECKING

from planner.components import output_shape, upstream_indices, use_shape
from planner.errors import SpecError
from planner.kinds import KINDS, kind_of, tensor_parallel_kinds
from planner.plan import Plan, PlanCluster
from planner.spec import ClusterSpec, JobSpec
from planner.unet import unet_state_numel
from planner.usegraph import connection, leaf_uses, op_connection, root_uses, use_component, use_index

if TYPE_CHECKING:
    from planner.metagraph import MetaGraph, MetaOp

BUILTIN_LOSSES = ("cross_entropy", "mse", "contrastive", "infonce", "lm", "next_token", "grpo", "feedback")  # runtime.heads builds them
# Worker processes `loom run` starts per CPU core of this machine at most (one per device of the plan). Each imports
# torch and builds its modules; at 4 per core a step already takes 4x its prediction, and far beyond it the start-up
# (Ray worker processes, the gloo rendezvous) outlasts its timeouts or the machine's memory: 64 on 2 cores hung.
WORKERS_PER_CORE = 4


def feature_shape(job: JobSpec, op: MetaOp, boundary: int | None = None) -> tuple[int, ...]:
    """Per-sample shape of the activation after ``boundary`` layers of MetaOp ``op`` (0: its input; None: its
    output): ``(sequence length, hidden size)`` (a decoder's: stream + memory), the same at every boundary, except
    a unet2d's flat state ``(N,)`` (runtime.unet), whose skip stack grows and shrinks layer by layer, and the output
    of a sample use's MetaOp: its x0 (or final latents), ``(C * h * w,)``."""
    if op.mode == "sample" and boundary is None:  # one MetaOp of the whole use: it hands on x0, flattened
        return tuple(op.out_shapes[-1])  # planner.generation.whole_use
    t, u = use_index(job, op)
    comp = job.components[op.component]
    if kind_of(comp).flat_state:
        boundary = op.num_layers if boundary is None else boundary
        shape = use_shape(job, t, u)
        return (unet_state_numel(comp, shape.image_size, shape.context, op.segment, boundary),)
    return output_shape(job, t, u)


def check_trainable(job: JobSpec, recipe_losses: Collection[str] | None = None) -> None:
    """What ``loom run`` checks of a job before any worker starts: every task's loss and what its head needs
    (:func:`check_head`), then :func:`check_runnable`. A ValueError (a SpecError among them) names the task or use
    and the fix. ``recipe_losses``: the losses registered in this process (``runtime.heads.registered_losses()``,
    after the orchestrator loaded the job's recipe); None where the recipe is not loaded (``loom validate``), which
    leaves a loss that is not built in to the job's recipe."""
    from planner.metagraph import build_metagraph  # the driver's checks: workers import this module for its head checks

    for t in range(len(job.tasks)):
        check_head(job, t, recipe_losses)
    check_init_from(job)
    check_runnable(job, build_metagraph(job))


def check_init_from(job: JobSpec) -> None:
    """Every component's ``init_from`` names a Loom model file (runtime.init_from.model_file_of); a ValueError, one
    line, otherwise. Its parameters' names and shapes are checked when the modules are built."""
    from runtime.init_from import model_file_of  # torch-free

    for name, comp in job.components.items():
        if comp.init_from is not None:
            try:
                model_file_of(comp.init_from)
            except FileNotFoundError as exc:
                raise ValueError(f"components.{name}.init_from: {exc}") from None


def check_loss_name(job: JobSpec, t: int, recipe_losses: Collection[str] | None = ()) -> str:
    """Task ``t``'s loss name; a ValueError naming the task and the supported names unless it is built in or in
    ``recipe_losses`` (None: not known here, so a job with a recipe may use any other name)."""
    task = job.tasks[t]
    if task.loss in BUILTIN_LOSSES or (recipe_losses is None and job.recipe is not None):
        return task.loss
    if task.loss not in (recipe_losses or ()):
        loaded = "" if recipe_losses or job.recipe is None else (
            f" (recipe '{job.recipe}' is not loaded in this process: orchestrator.recipes.load_recipe loads it)")
        raise ValueError(
            f"tasks[{t}] ('{task.name}').loss ('{task.loss}') is not run by the runtime; "
            f"supported: {', '.join(BUILTIN_LOSSES + tuple(sorted(recipe_losses or ())))}.{loaded}"
        )
    return task.loss


def check_head(job: JobSpec, t: int, recipe_losses: Collection[str] | None = ()) -> str:
    """Task ``t``'s loss (:func:`check_loss_name`) and, for a built-in one, what its head needs of the task's
    leaves (a recipe's head factory checks its own): a unet2d leaf trains only with mse as the only leaf; lm and
    next_token need :func:`next_token_source`; contrastive and infonce need exactly two leaves. A ValueError names
    the task and the fix."""
    task, loss = job.tasks[t], check_loss_name(job, t, recipe_losses)
    from runtime.pooling import model_pooled_leaves  # tasks[].pooling

    model_pooled_leaves(job, t)
    sampling = {u.component for u in task.components if u.mode == "sample"}
    unet_uses = {u.component for u in task.components if kind_of(job.components[u.component]).denoiser}
    if sampling and len(unet_uses) > 1:
        raise ValueError(f"tasks[{t}] ('{task.name}') samples {sorted(sampling)} and uses unet2d components "
                         f"{sorted(unet_uses)}; the task's head holds one UNet's output layer. Use one unet2d "
                         "component per task that samples.")
    if loss not in BUILTIN_LOSSES:
        if recipe_losses and loss in recipe_losses:  # the recipe is loaded here: its own check of the task
            from runtime.heads import check_recipe_loss  # heads imports this module

            check_recipe_loss(job, t)
        return loss
    if task.loss_args and loss != "grpo":
        raise ValueError(f"tasks[{t}] ('{task.name}').loss_args: loss '{loss}' takes no options (grpo does). Remove "
                         "loss_args.")
    leaves = leaf_uses(job, t)
    if loss == "feedback":
        feedback_leaf(job, t)
        return loss
    sampled = [u.use_name for u in task.components if u.mode == "sample" and u.use_name in leaves]
    if sampled:
        raise ValueError(f"tasks[{t}] ('{task.name}'): sample use '{sampled[0]}' is a leaf and loss '{loss}' does not "
                         "read samples; only loss feedback (with its feedback: fields) scores a sample leaf. Read the "
                         f"samples in an image use (after: [{sampled[0]}]) whose output the loss reads, or use loss: "
                         "feedback.")
    unets = [leaf for leaf in leaves if kind_of(use_component(job, t, leaf)[1]).denoiser]
    if unets and (loss != "mse" or len(leaves) != 1):
        raise ValueError(
            f"tasks[{t}] ('{task.name}'): a unet2d leaf ('{unets[0]}') trains with loss 'mse' (noise "
            f"prediction) as the task's only leaf; got loss '{loss}' and leaves {leaves}."
        )
    if not unets and loss in ("lm", "next_token"):
        next_token_source(job, t)
    if loss == "grpo":
        from runtime.grpo import grpo_options, grpo_roles

        grpo_roles(job, t)
        grpo_options(job, t)
    if not unets and loss in ("contrastive", "infonce") and len(leaves) != 2:
        raise ValueError(
            f"tasks[{t}] ('{task.name}').loss ('{loss}') needs exactly two leaf uses "
            f"(two branches, e.g. `after: []` on the second); got {leaves}."
        )
    return loss


def feedback_leaf(job: JobSpec, t: int) -> str:
    """The sample use a ``loss: feedback`` task scores (runtime.feedback.FeedbackHead): its one leaf that is a unet2d
    ``mode: sample`` use with ``grad_last_step`` (unconditional, or conditioned on its upstream uses' outputs with one
    sample per row), whose latent channels are the VAE's (``tasks[t].feedback.vae``, checked as a folder; none: an
    image's 3), scored by known scorer kinds (runtime.feedback.check_scorers). Other leaves are allowed (not read). A
    ValueError otherwise."""
    from planner.vae_config import resolve_vae

    task = job.tasks[t]
    uses = {u.use_name: (i, u) for i, u in enumerate(task.components)}
    found = [leaf for leaf in leaf_uses(job, t) if uses[leaf][1].mode == "sample" and uses[leaf][1].grad_last_step]
    if len(found) != 1:
        raise ValueError(f"tasks[{t}] ('{task.name}').loss ('feedback') scores one leaf use of mode sample with "
                         f"grad_last_step: true; it has {len(found)} ({found}). Add or keep exactly one.")
    i, use = uses[found[0]]
    comp = job.components[use.component]
    if task.upstream_names(i) and use.samples != 1:
        raise ValueError(f"tasks[{t}].components[{i}] ('{use.use_name}'): a sample use that reads "
                         f"{task.upstream_names(i)} (its context) draws one sample per row (sample r is conditioned "
                         f"on its upstream's row r); it has samples: {use.samples}. Set samples: 1 and give the "
                         "prompts more rows.")
    channels = comp.in_channels or kind_of(comp).in_channels
    if task.feedback.vae is None and channels != 3:
        raise ValueError(f"tasks[{t}].feedback.vae is null (x0 is the image), but component '{use.component}' denoises "
                         f"{channels} channels, not an image's 3. Name the VAE of its latents.")
    if task.feedback.vae is not None:
        info = resolve_vae(task.feedback.vae, f"tasks[{t}].feedback.vae")
        if info.latent_channels != channels:
            raise ValueError(f"tasks[{t}].feedback.vae ({task.feedback.vae}) has {info.latent_channels} latent "
                             f"channels; component '{use.component}' denoises {channels}. Use a VAE of the UNet's "
                             "latents.")
    from runtime.feedback import check_scorers

    check_scorers(job, t)
    return found[0]


def next_token_source(job: JobSpec, t: int) -> tuple[str, int]:
    """(use whose token ids a next-token task predicts, their offset in its leaf's sequence): a llama leaf's own
    text after T positions of other inputs (offset T; runtime.connect), or the root of a chain of llama uses
    (offset 0). A ValueError otherwise: a non-causal layer would see the tokens it predicts."""
    task = job.tasks[t]
    roots, leaves = root_uses(job, t), leaf_uses(job, t)
    kinds = {use.use_name: job.components[use.component].kind for use in task.components}
    causal = {name for name, kind in kinds.items() if KINDS[kind].causal_lm}
    if len(leaves) == 1 and leaves[0] in causal:
        u = next(i for i, use in enumerate(task.components) if use.use_name == leaves[0])
        c = connection(job, t, u)
        if c is not None and c.text_len:
            return leaves[0], c.positions
    if len(roots) != 1 or len(leaves) != 1 or len(causal) != len(kinds):
        raise ValueError(
            f"tasks[{t}] ('{task.name}').loss ('{task.loss}') needs a chain of llama uses with one root and "
            "one leaf, or a llama leaf with text of its own after its inputs (a non-causal layer would see the "
            f"tokens it predicts); got uses {kinds}."
        )
    return roots[0], 0


def check_runnable(job: JobSpec, graph: MetaGraph) -> None:
    """Raise SpecError when a use's inputs cannot become what it is declared to read. A use of a non-bridge kind
    reads its inputs through a connector when their shapes differ from its own (runtime.connect: projection,
    pooling, its own text tokens after them, which only token kinds have); a decoder or unet2d attends to its
    inputs' outputs (concatenated along the sequence, so of one width); a unet2d's output feeds only the loss."""
    if any(u.mode != "train" for task in job.tasks for u in task.components):
        from runtime.rollout import check_modes  # rollout readers: alone, at the rollout's length

        check_modes(job, graph)
    for op in graph.metaops:
        _check_unet_edges(job, graph, op)
        if not op.deps or graph.metaops[op.deps[0]].use == op.use:
            continue
        kind = kind_of(job.components[op.component])
        if kind.bridge:
            _check_bridge_inputs(job, graph, op)
            continue
        c = op_connection(job, graph, op)
        if c is not None and c.text_len and not kind.text_tokens:
            parts = " + ".join(f"'{name}' ({s} x {h})" for (name, _), (s, h) in zip(_input_uses(job, op), c.inputs))
            raise SpecError(
                f"{_use_path(job, op)} ('{op.use}') reads {parts}, {c.positions} positions, but is declared with "
                f"{c.seq_len}; only a {' or '.join(k.name for k in KINDS.values() if k.text_tokens)} use adds its "
                f"own text tokens after its inputs. Set its "
                f"seq_len to {c.positions} or less (longer inputs are average-pooled to it)."
            )


def _check_unet_edges(job: JobSpec, graph: MetaGraph, op: MetaOp) -> None:
    """A unet2d use's own output (a feature map) feeds only its task's loss head: the runtime has no adapter from a
    feature map to another component. A ``mode: sample`` use's output is images, which an image use may read
    (:func:`check_sample_reader`)."""
    for dep in op.deps:
        producer = graph.metaops[dep]
        if producer.use != op.use and producer.mode == "sample":
            check_sample_reader(job, *use_index(job, op))
        elif producer.use != op.use and kind_of(job.components[producer.component]).denoiser:
            raise SpecError(
                f"{_use_path(job, op)} ('{op.use}') reads the output of unet2d use '{producer.use}'; the runtime feeds "
                "a unet2d's output only to its task's loss head. Make the unet2d use a leaf of its task."
            )


def check_sample_reader(job: JobSpec, t: int, u: int) -> None:
    """Use ``u`` of task ``t`` reads a ``mode: sample`` use's samples as its images (planner.usegraph.sample_source;
    runtime.sampleop.sample_pixels turns them into its pixels): it reads them alone, its component embeds images (a
    kind whose root use reads images: Loom's vit, a pretrained CLIP or SigLIP vision tower) and the sample has the
    channels of its images (a pixel-space denoiser: a latent one's x0 needs its VAE's decoder, which a use does not
    run). A SpecError, one line, naming the use and the fix."""
    from planner.usegraph import sample_source

    task = job.tasks[t]
    use, where = task.components[u], f"tasks[{t}].components[{u}] ('{task.components[u].use_name}')"
    source = task.components[sample_source(job, t, u)]
    comp, sampler = job.components[use.component], job.components[source.component]
    side = use_shape(job, t, next(i for i, x in enumerate(task.components) if x is source)).image_size
    channels = sampler.in_channels or kind_of(sampler).in_channels
    what = f"the samples of sample use '{source.use_name}' ({channels} x {side} x {side} images)"
    kind = kind_of(comp)
    if kind.root_input != "image" or kind.bridge:
        raise SpecError(f"{where} reads {what}; component '{use.component}' (kind '{comp.kind}') does not embed "
                        "images: only an image use (kind vit, a pretrained CLIP or SigLIP vision tower) reads them. "
                        f"Put a vision tower use with after: [{source.use_name}] first and read its output.")
    others = [name for name in task.upstream_names(u) if name != source.use_name]
    if others:
        raise SpecError(f"{where} reads {what} together with {others}; a use reads a sample use's images alone. Set "
                        f"after: [{source.use_name}] and join the others in a later use (after: [{use.use_name}, ...]).")
    want = comp.in_channels or kind.in_channels
    if want != channels:
        raise SpecError(f"{where} reads {what}; component '{use.component}' embeds {want}-channel images. Sample "
                        "in pixel space (a unet2d of in_channels 3, the reader's channels): a latent denoiser's x0 "
                        "needs its VAE's decoder, which a use does not run.")


def _use_path(job: JobSpec, op: MetaOp) -> str:
    t, u = use_index(job, op)
    return f"tasks[{t}].components[{u}]"


def _input_uses(job: JobSpec, op: MetaOp) -> list[tuple[str, int]]:
    """(name, use index) of the uses feeding ``op``'s use, in its ``after:`` order (the order of its inputs)."""
    t, u = use_index(job, op)
    return [(job.tasks[t].components[i].use_name, i) for i in upstream_indices(job, t, u)]


def _check_bridge_inputs(job: JobSpec, graph: MetaGraph, op: MetaOp) -> None:
    """A decoder or unet2d with several inputs attends to their outputs concatenated along the sequence (its
    memory or context), in the order of its ``after:`` list: they need one width."""
    if len(op.deps) < 2:
        return
    t, _ = use_index(job, op)
    inputs = _input_uses(job, op)  # none is a unet2d (_check_unet_edges ran first): (positions, width) outputs
    widths = [output_shape(job, t, i)[1] for _, i in inputs]
    if len(set(widths)) > 1:
        parts = ", ".join(f"'{name}' ({h} wide)" for (name, _), h in zip(inputs, widths))
        raise SpecError(
            f"{_use_path(job, op)} ('{op.use}') attends to {parts} concatenated along the sequence; they need one "
            "width. Give the inputs the same hidden_size, or fuse them in a transformer use first."
        )


def check_plan_matches_job(plan: Plan, graph: MetaGraph, source: str = "plan", job_name: str | None = None) -> None:
    """The one check that ``plan`` belongs to the job whose MetaGraph is ``graph`` (``loom run``, ``loom submit``
    call it in the driver; workers receive their payload after it passed): the same MetaOps in the same order (name, layer key, layer count, batch size and
    dependencies first, then every field: planner.validate.check_program), only layouts the runtime runs (tensor
    parallelism only on kinds with a ``tp_variant``, planner.kinds), and a plan that makes sense
    (planner.validate.check_plan) whose program (pieces, holdings, buckets, process groups) is the one
    planner.program derives from its waves for these MetaOps (check_program). The job's name, cluster and training
    settings may differ: a plan is a schedule of these MetaOps; its generate and sample uses must run as the runtime
    runs them (planner.generation.modes_refused). A SpecError naming ``source``."""
    from planner.generation import modes_refused
    from planner.validate import check_plan, check_program, placed_schedule  # the driver's: workers import this
    # module for its head checks

    check_plan(plan, source)
    want = [(op.name, op.key, op.num_layers, op.batch_size, list(op.deps)) for op in graph.metaops]
    have = [(op.name, op.layer_key, op.num_layers, op.batch_size, op.deps) for op in plan.metaops]
    if want != have:
        diff = next((f"{h[0]} vs {w[0]}" for h, w in zip(have, want) if h != w), f"{len(have)} MetaOps vs {len(want)}")
        job = f"job '{job_name}'" if job_name else "this job"
        raise SpecError(
            f"{source}: the plan was made for job '{plan.job}' (plan {plan.hash}), with other MetaOps than {job} "
            f"(first difference: {diff}). Re-run `loom plan JOB.yaml --save PLAN.json`."
        )
    for wave in plan.waves:
        for s in wave.slices:
            if s.tp_degree != 1 and KINDS[graph.metaops[s.metaop].kind].tp_variant is None:
                tp = tensor_parallel_kinds()
                raise SpecError(
                    f"{source}: MetaOp {plan.metaops[s.metaop].name} has tensor_parallel {s.tp_degree}; the runtime "
                    f"runs tensor parallelism for {', '.join(tp[:-1])} and {tp[-1]} layers only (on megatron-core)."
                )
            _check_allowed_tp(plan, graph, s.metaop, s.tp_degree, source)
    why = modes_refused(graph.metaops, placed_schedule(plan))
    if why is not None:
        raise SpecError(
            f"{source}: {why}, which the runtime does not run (a sample use runs at tensor_parallel 1; a decode's "
            "devices run the component's other uses in the TP groups they decode in, or none of them). `loom run "
            "JOB.yaml` without --plan plans what it runs (planner.generation.as_run)."
        )
    check_program(plan, graph.metaops, source)


def _check_allowed_tp(plan: Plan, graph: MetaGraph, metaop: int, degree: int, source: str) -> None:
    """A SpecError when a slice runs MetaOp ``metaop`` at a tensor-parallel ``degree`` its component does not allow
    (``tensor_parallel``; the planner never gives one): a hand-edited plan would otherwise fail inside a worker, e.g.
    TP on a pretrained BERT or CLIP tower, whose layers are not mapped onto megatron-core (planner.pretrained)."""
    op = graph.metaops[metaop]
    if degree not in op.allowed_tp:
        raise SpecError(
            f"{source}: MetaOp {plan.metaops[metaop].name} has tensor_parallel {degree}, which components."
            f"{op.component} does not allow (tensor_parallel {list(op.allowed_tp)}; a pretrained component other "
            "than the Llama family trains data parallel only). Re-run `loom plan JOB.yaml --save PLAN.json`."
        )


def check_local_workers(cluster: ClusterSpec | PlanCluster, source: str = "plan", cores: int | None = None) -> None:
    """A SpecError naming ``source`` when ``loom run`` without ``--address`` would start more worker processes (one
    per device of ``cluster``: a plan's, or the job's before it is planned) than :data:`WORKERS_PER_CORE` per core of
    this machine (``cores``: default ``os.cpu_count()``), instead of starting them and hanging."""
    cores = cores or os.cpu_count() or 1
    world = cluster.num_nodes * cluster.devices_per_node
    limit = WORKERS_PER_CORE * cores
    if world > limit:
        raise SpecError(
            f"{source}: cluster ({cluster.num_nodes} node(s) x {cluster.devices_per_node} devices) needs {world} "
            f"worker processes; `loom run` without --address starts them on this machine's {cores} CPU cores, at most "
            f"{limit} ({WORKERS_PER_CORE} per core). Plan for at most {limit} devices (cluster.devices_per_node), or "
            "join a cluster that has them with --address."
        )
