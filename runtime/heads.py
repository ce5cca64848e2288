"""Task loss heads: what turns a task's leaf outputs and its batch into per-sample losses.

Built-in losses (:data:`SUPPORTED_LOSSES`: runtime.checks.BUILTIN_LOSSES) and the losses recipes register (:func:`register_loss`, called when
the orchestrator loads a job's recipe: orchestrator.recipes; the runtime never imports a recipe). Heads are built like every other
module (runtime.modules: seeded, deterministic) and own a final LayerNorm over their leaf outputs. The next-token and
InfoNCE heads compute their losses through kernels/ (chunked: never the whole logits) unless ``training.kernels`` is
``off`` (docs/kernels.md). The pooled heads pool a pretrained tower's leaf as its model does (runtime.pooling,
``tasks[].pooling``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from kernels import backend_for, infonce_rows, linear_cross_entropy
from planner.components import resolve_shape
from planner.kinds import kind_of
from planner.spec import ComponentSpec, JobSpec
from runtime import unet
from runtime.checks import BUILTIN_LOSSES, check_head, check_loss_name, feedback_leaf, next_token_source
from runtime.grpo import GRPOHead, grpo_head
from planner.usegraph import leaf_uses, use_component
from runtime.kinds import image_channels
from runtime.modules import DEFAULT_VOCAB, build_initialised, layer_seed
from runtime.optim import lm_kernel_weights
from runtime.pooling import model_pooled_leaves, pooled_width
from runtime.pretrained_pooling import attach_poolers
from runtime.tokenizer import IGNORE_INDEX, labels_key

if TYPE_CHECKING:  # data imports this module
    from runtime.data import TaskBatch

NUM_CLASSES = 10  # classes of the synthetic cross-entropy tasks
SUPPORTED_LOSSES = BUILTIN_LOSSES  # the losses this module builds; what each needs is checked in runtime.checks
INFONCE_TEMPERATURE = 0.07  # CLIP's initial temperature; its log-inverse is learned


# --------------------------------------------------------------------------- loss heads


class TaskHead(nn.Module):
    """Base of the loss heads: ``forward(outputs, batch)`` -> per-sample losses ``(B,)``.

    ``outputs`` maps each leaf use name to its output ``(B, S, H)``; ``batch`` is the task's
    :class:`runtime.data.TaskBatch` for the same samples. A head built with ``norm_width`` owns a final
    LayerNorm (:meth:`normed`) for leaf outputs of that width: the pre-LN layers leave the residual
    stream unnormalised, and a projection straight off it starts with outsized outputs and learns slowly.
    Leaves of other widths (``leaf_widths``) are first projected to the narrowest, ``Linear(H_leaf, H_min)``
    per token without bias, as CLIP projects each tower into one embedding space.

    A leaf in ``model_pooled`` (leaf names) is pooled by its pretrained model's own pooling (``poolers``, attached
    after initialisation by runtime.pretrained_pooling.attach_poolers; ``leaf_widths`` then holds its pooled width),
    not by the head's LayerNorm and a mean; a head whose leaves are all so pooled has no LayerNorm.
    """

    def __init__(self, task: str, leaves: list[str], norm_width: int | None = None,
                 leaf_widths: dict[str, int] | None = None, model_pooled: frozenset[str] = frozenset()):
        super().__init__()
        self.task, self.leaves = task, list(leaves)
        if self.leaves and all(leaf in model_pooled for leaf in self.leaves):
            norm_width = None
        self.norm = nn.LayerNorm(norm_width, eps=1e-5) if norm_width is not None else None
        widths = leaf_widths or {}
        narrowest = min(widths.values(), default=0)
        self.project = nn.ModuleDict({str(i): nn.Linear(widths[leaf], narrowest, bias=False)
                                      for i, leaf in enumerate(self.leaves) if widths[leaf] != narrowest}
                                     if widths else {})
        self.poolers = nn.ModuleDict()  # leaf index -> runtime.pretrained_pooling.PretrainedPooler

    def normed(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) if self.norm is not None else x

    def pooled(self, outputs: dict[str, torch.Tensor], batch: TaskBatch | None = None) -> list[torch.Tensor]:
        """One vector per sample of each leaf output, in leaf order, projected to the narrowest width: ``(B, H)``
        each. A leaf with a model pooler gives its model's ``pooler_output`` (CLIP text's reads its ids in
        ``batch.inputs``); every other leaf the mean over the sequence of its (projected) normalised output."""
        missing = [leaf for leaf in self.leaves if leaf not in outputs]
        assert not missing, f"task {self.task}: head got no output for leaf uses {missing}"
        out = []
        for i, leaf in enumerate(self.leaves):
            key = str(i)
            if key in self.poolers:
                ids = batch.inputs.get(leaf) if batch is not None else None
                x = self.poolers[key](outputs[leaf], ids)
                out.append(self.project[key](x) if key in self.project else x)
                continue
            x = self.project[key](outputs[leaf]) if key in self.project else outputs[leaf]
            out.append(self.normed(x).mean(dim=1))
        return out


class ClassifierHead(TaskHead):
    """cross_entropy: sum of the pooled normalised leaves -> ``Linear(H, 10)`` -> CE against integer labels."""

    def __init__(self, task: str, leaves: list[str], widths: dict[str, int],
                 model_pooled: frozenset[str] = frozenset()):
        hidden_size = min(widths.values())
        super().__init__(task, leaves, hidden_size, widths, model_pooled)
        self.out = nn.Linear(hidden_size, NUM_CLASSES, bias=True)

    def forward(self, outputs: dict[str, torch.Tensor], batch: TaskBatch) -> torch.Tensor:
        logits = self.out(torch.stack(self.pooled(outputs, batch)).sum(dim=0))
        return F.cross_entropy(logits, batch.labels, reduction="none")


class RegressionHead(TaskHead):
    """mse: sum of the pooled normalised leaves -> ``Linear(H, 1)`` -> squared error against float labels."""

    def __init__(self, task: str, leaves: list[str], widths: dict[str, int],
                 model_pooled: frozenset[str] = frozenset()):
        hidden_size = min(widths.values())
        super().__init__(task, leaves, hidden_size, widths, model_pooled)
        self.out = nn.Linear(hidden_size, 1, bias=True)

    def forward(self, outputs: dict[str, torch.Tensor], batch: TaskBatch) -> torch.Tensor:
        pred = self.out(torch.stack(self.pooled(outputs, batch)).sum(dim=0)).squeeze(-1)
        return (pred - batch.labels) ** 2


class PairedCosineHead(TaskHead):
    """contrastive: per-sample ``1 - cos(pool(a)_i, pool(b)_i)`` of the two leaves; no parameters.

    Only positive pairs; ``infonce`` (:class:`InfoNCEHead`) scores each row against the whole batch.
    """

    def forward(self, outputs: dict[str, torch.Tensor], batch: TaskBatch) -> torch.Tensor:
        a, b = self.pooled(outputs, batch)
        return 1.0 - F.cosine_similarity(a, b, dim=-1)


class InfoNCEHead(TaskHead):
    """infonce: CLIP's symmetric contrastive loss over the whole batch. The pooled, normalised, unit-length leaves
    ``a`` and ``b`` of every row of the task's batch (``batch.every_row``: gathered from the data-parallel shards
    of the loss) give logits ``exp(scale) * a_i . b_j``; row i's loss is the mean of cross-entropy of ``a_i``
    against all ``b`` and of ``b_i`` against all ``a``, the target being row i. Each shard scores its own rows, so
    the shards' sum is the full batch's."""

    def __init__(self, task: str, leaves: list[str], widths: dict[str, int], kernels: str = "auto",
                 model_pooled: frozenset[str] = frozenset()):
        super().__init__(task, leaves, min(widths.values()), widths, model_pooled)
        self.logit_scale = nn.Parameter(torch.empty(()))
        self.kernels = kernels

    def init_structure(self) -> None:
        self.logit_scale.fill_(math.log(1 / INFONCE_TEMPERATURE))

    def forward(self, outputs: dict[str, torch.Tensor], batch: TaskBatch) -> torch.Tensor:
        a, b = (F.normalize(batch.every_row(x), dim=-1) for x in self.pooled(outputs, batch))
        backend = backend_for(self.kernels, a.device)
        rows = batch.rows_in_gathered  # a micro-batch is its own batch here (its rows gathered, not the whole batch's)
        if backend is not None:  # only this shard's rows of the logits, a chunk at a time (kernels.infonce_rows)
            return infonce_rows(a, b, self.logit_scale.exp(), rows.start, len(rows), backend=backend)
        logits = self.logit_scale.exp() * a @ b.T  # (all rows, all rows)
        mine = torch.arange(rows.start, rows.stop, device=logits.device)
        return 0.5 * (F.cross_entropy(logits[mine], mine, reduction="none")
                      + F.cross_entropy(logits.T[mine], mine, reduction="none"))


class NextTokenHead(TaskHead):
    """lm / next_token: ``Linear(H, vocab)`` on the normalised leaf, cross-entropy of each position against the next
    token, mean over the predicted tokens. The tokens are ``batch.inputs[text]``, at positions ``offset`` onwards
    of the leaf's sequence: 0 for a chain of llama uses (the root's ids: position t predicts id t+1), T for a
    llama use that reads T positions of other inputs, then its own text (runtime.connect: position T - 1 + j
    predicts text id j)."""

    def __init__(self, task: str, leaves: list[str], text: str, offset: int, hidden_size: int, vocab_size: int,
                 kernels: str = "auto"):
        super().__init__(task, leaves, hidden_size)
        self.text, self.offset, self.kernels = text, offset, kernels
        self.out = nn.Linear(hidden_size, vocab_size, bias=True)

    def kernel_weights(self) -> list[nn.Parameter]:
        """The output projection, when kernels.linear_cross_entropy reads it (runtime.optim.keep_kernel_grad_buffers:
        its gradient is added into a persistent buffer)."""
        return lm_kernel_weights(self.out, self.kernels)

    def forward(self, outputs: dict[str, torch.Tensor], batch: TaskBatch) -> torch.Tensor:
        first = max(self.offset - 1, 0)  # the first predicting position
        hidden = self.normed(outputs[self.leaves[0]][:, first:-1])  # (B, P, H)
        labels = batch.targets.get(labels_key(self.text))  # a data source's (runtime.tokenizer): IGNORE_INDEX unlearned
        targets = (batch.inputs[self.text] if labels is None else labels)[:, first + 1 - self.offset:]
        per_token = next_token_losses(hidden, self.out, targets, self.kernels)
        if labels is None:
            return per_token.mean(dim=1)  # (B,)
        return per_token.sum(dim=1) / (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)  # mean over learned tokens


def next_token_losses(hidden: torch.Tensor, out: nn.Module, targets: torch.Tensor, kernels: str) -> torch.Tensor:
    """Cross-entropy of ``out(hidden)`` ``(..., V)`` against ``targets`` ``(...)`` per position, 0 where a target is
    IGNORE_INDEX: through the chunked linear + cross-entropy kernel (kernels.linear_cross_entropy: never the
    logits) unless ``kernels`` (training.kernels) is ``off`` or ``out`` is not a plain linear layer."""
    backend = backend_for(kernels, hidden.device)
    if backend is None or not isinstance(out, nn.Linear):
        logits = out(hidden)
        return F.cross_entropy(logits.movedim(-1, 1), targets, reduction="none", ignore_index=IGNORE_INDEX)
    return linear_cross_entropy(hidden, out.weight, out.bias, targets, IGNORE_INDEX, backend=backend)


HeadFactory = Callable[[JobSpec, int, list[str]], TaskHead]
_RECIPE_LOSSES: dict[str, HeadFactory] = {}
_RECIPE_CHECKS: dict[str, Callable[[JobSpec, int], None]] = {}  # loss -> its torch-light check (register_loss)


class DenoisingHead(TaskHead):
    """``mse`` on a unet2d leaf: GroupNorm -> SiLU -> conv_out (c0 -> in_channels) predicts the noise added to the
    use's latents; per-sample mean squared error against it (epsilon prediction, as DDPM)."""

    def __init__(self, task: str, leaf: str, channels: int, in_channels: int, image_size: int):
        super().__init__(task, [leaf])
        self.side = image_size
        self.norm_out = nn.GroupNorm(unet.groups(channels), channels, eps=1e-5)
        self.conv_out = nn.Conv2d(channels, in_channels, kernel_size=3, padding=1)

    def forward(self, outputs: dict[str, torch.Tensor], batch: TaskBatch) -> torch.Tensor:
        leaf = self.leaves[0]
        h = outputs[leaf].reshape(outputs[leaf].shape[0], -1, self.side, self.side)
        predicted = self.conv_out(F.silu(self.norm_out(h)))
        return ((predicted - batch.targets[unet.noise_key(leaf)]) ** 2).flatten(1).mean(dim=1)


def _denoising_head(job: JobSpec, task_index: int, leaves: list[str]) -> Callable[[], TaskHead] | None:
    """The head factory of a task whose only leaf is a unet2d use (None when no leaf is; runtime.checks.check_head
    has refused every other unet2d leaf)."""
    task = job.tasks[task_index]
    name, comp = use_component(job, task_index, leaves[0])
    if not kind_of(comp).denoiser:
        return None
    u = next(i for i, use in enumerate(task.components) if use.use_name == leaves[0])
    side = resolve_shape(comp, name, task.components[u], f"tasks[{task_index}].components[{u}]").image_size
    return lambda: DenoisingHead(task.name, leaves[0], comp.hidden_size, image_channels(comp), side)


def _feedback_head(job: JobSpec, task_index: int) -> TaskHead:
    """The ``feedback`` head of task ``task_index`` over its sample leaf (runtime.checks.feedback_leaf)."""
    from runtime.feedback import FeedbackHead
    from runtime.sampleop import latent_shape

    task = job.tasks[task_index]
    leaf = feedback_leaf(job, task_index)
    use = next(u for u in task.components if u.use_name == leaf)
    op = SimpleNamespace(task=task.name, use=leaf)
    return FeedbackHead(task.name, leaf, job.components[use.component].hidden_size, latent_shape(job, op),
                        task.feedback)


def _next_token_args(job: JobSpec, task_index: int) -> tuple[str, int, int, int]:
    """(use whose ids are predicted, their offset in the leaf's sequence, hidden size, vocab size) of a next-token
    task (runtime.checks.next_token_source; a ValueError as there)."""
    text, offset = next_token_source(job, task_index)
    comp = use_component(job, task_index, text)[1]
    return text, offset, comp.hidden_size, comp.vocab_size or DEFAULT_VOCAB


def register_loss(name: str, factory: HeadFactory, check: Callable[[JobSpec, int], None] | None = None) -> None:
    """Make loss ``name`` available to tasks: ``factory(job, task_index, leaf uses)`` builds its head (the
    runtime initialises the head's parameters afterwards, see :func:`build_head`); ``check(job, task_index)``, when
    given, raises a ValueError for a task the head cannot serve (its uses, its ``loss_args``) without building
    anything, so that ``loom run`` refuses the job before any worker starts (:func:`check_recipe_loss`). Recipes
    call this on import."""
    assert name not in SUPPORTED_LOSSES, f"loss {name} is built in"
    _RECIPE_LOSSES[name] = factory
    if check is not None:
        _RECIPE_CHECKS[name] = check


def check_recipe_loss(job: JobSpec, task_index: int) -> None:
    """The registered check of task ``task_index``'s recipe loss (nothing for a loss registered without one)."""
    check = _RECIPE_CHECKS.get(job.tasks[task_index].loss)
    if check is not None:
        check(job, task_index)


def registered_losses() -> tuple[str, ...]:
    """The losses recipes registered in this process (runtime.checks.check_trainable's ``recipe_losses``)."""
    return tuple(sorted(_RECIPE_LOSSES))


def check_loss(job: JobSpec, task_index: int) -> str:
    """The task's loss name; a ValueError naming the task and the supported names when unknown (the recipe's own
    losses count once the orchestrator has loaded the recipe in this process)."""
    return check_loss_name(job, task_index, registered_losses())


def build_head(job: JobSpec, task_index: int) -> TaskHead:
    """The loss head of task ``task_index`` (its own parameters, seeded by ``layer_seed(seed, "task:" + name, 0)``).

    ``head(outputs, batch)`` returns per-sample losses ``(B,)``. Raises ValueError as :func:`head_factory`.
    """
    seed = layer_seed(job.training.seed, "task:" + job.tasks[task_index].name, 0)
    head = build_initialised(head_factory(job, task_index), seed)
    if isinstance(head, NextTokenHead) and (comp := pretrained_lm(job, task_index)) is not None:
        from runtime import pretrained

        head = pretrained.load_lm_head(comp, head)
    if isinstance(head, GRPOHead):  # a pretrained policy's or reference's own final norm and LM head
        from runtime import pretrained

        for role, lm in (("policy", head.policy), ("reference", head.reference)):
            comp = use_component(job, task_index, head.roles[role])[1] if lm is not None else None
            if comp is not None and comp.pretrained:
                pretrained.load_lm_head(comp, lm).requires_grad_(role == "policy" and not comp.frozen)
    if isinstance(head, DenoisingHead) and (comp := use_component(job, task_index, head.leaves[0])[1]).pretrained:
        from runtime import unet_pretrained  # the diffusers UNet's conv_norm_out and conv_out

        head = unet_pretrained.load_head(comp, head)
    if (sampled := sampled_unet(job, task_index)) is not None and sampled[1].pretrained:
        from runtime import unet_pretrained  # the sampled diffusers UNet's conv_norm_out and conv_out

        head = unet_pretrained.load_head(sampled[1], head)
    if model_pooled_leaves(job, task_index):  # the pretrained towers' own pooling modules
        head = attach_poolers(job, task_index, head)
    if hasattr(head, "load_pretrained"):  # a recipe's head that starts from pretrained weights (DPO's LM heads)
        head = head.load_pretrained(job, task_index)
    return head


def pretrained_lm(job: JobSpec, task_index: int) -> ComponentSpec | None:
    """The pretrained component whose tokens next-token task ``task_index`` predicts (it predicts them through that
    model's final norm and LM head); None when that component is not pretrained."""
    comp = use_component(job, task_index, next_token_source(job, task_index)[0])[1]
    return comp if comp.pretrained else None


def sampled_unet(job: JobSpec, task_index: int) -> tuple[str, ComponentSpec] | None:
    """(name, spec) of the unet2d a ``mode: sample`` use of task ``task_index`` samples for an image use to read
    (planner.usegraph.sample_source) rather than for a feedback head: the task's head then holds that UNet's output
    layer (:func:`with_sample_output`); None for a task without one."""
    task = job.tasks[task_index]
    if task.loss == "feedback":
        return None  # runtime.feedback.FeedbackHead holds it
    return next(((use.component, job.components[use.component]) for use in task.components if use.mode == "sample"),
                None)


def with_sample_output(factory: Callable[[], TaskHead], channels: int, in_channels: int) -> Callable[[], TaskHead]:
    """``factory`` whose head also owns a sampled UNet's output layer (``norm_out``: GroupNorm, SiLU, ``conv_out``),
    as runtime.feedback.FeedbackHead does: runtime.sampleop runs the sampled denoiser through the task's head, which
    is where the UNet's output layer trains and is saved. Registered after the head's own parameters, so their
    seeded initial values are those of the head alone."""

    def build() -> TaskHead:
        head = factory()
        if hasattr(head, "conv_out"):  # a denoising leaf's head: the same UNet's (runtime.checks.check_head)
            return head
        head.norm_out = nn.GroupNorm(unet.groups(channels), channels, eps=1e-5)
        head.conv_out = nn.Conv2d(channels, in_channels, kernel_size=3, padding=1)
        return head

    return build


def head_factory(job: JobSpec, task_index: int) -> Callable[[], TaskHead]:
    """What builds task ``task_index``'s head, after checking that the task can have one (runtime.checks.check_head,
    without building it), with a sampled UNet's output layer when the task samples one (:func:`sampled_unet`). Raises
    ValueError for an unknown loss, a contrastive or infonce task without exactly two leaves, a unet2d leaf with
    another loss than mse, or a next-token task the causal layers cannot serve."""
    factory = _loss_factory(job, task_index)
    if (sampled := sampled_unet(job, task_index)) is not None:
        return with_sample_output(factory, sampled[1].hidden_size, image_channels(sampled[1]))
    return factory


def _loss_factory(job: JobSpec, task_index: int) -> Callable[[], TaskHead]:
    """:func:`head_factory` without a sampled UNet's output layer."""
    task = job.tasks[task_index]
    loss = check_head(job, task_index, registered_losses())
    leaves = leaf_uses(job, task_index)
    if loss in _RECIPE_LOSSES:
        return lambda: _RECIPE_LOSSES[loss](job, task_index, leaves)
    if loss == "feedback":  # runtime.feedback: the UNet's output layer, the frozen VAE decoder and scorers
        return lambda: _feedback_head(job, task_index)
    if denoising := _denoising_head(job, task_index, leaves):
        return denoising
    if loss == "grpo":  # runtime.grpo: rollouts, reward model, reference, policy
        return lambda: grpo_head(job, task_index)
    if loss in ("lm", "next_token"):
        text, offset, width, vocab = _next_token_args(job, task_index)
        return lambda: NextTokenHead(task.name, leaves, text, offset, width, vocab, job.training.kernels)
    pooled = frozenset(leaves[i] for i in model_pooled_leaves(job, task_index))  # by the models' own pooling
    comps = {leaf: use_component(job, task_index, leaf)[1] for leaf in leaves}
    widths = {leaf: pooled_width(c) if leaf in pooled else c.hidden_size for leaf, c in comps.items()}
    if loss == "cross_entropy":
        return lambda: ClassifierHead(task.name, leaves, widths, pooled)
    if loss == "mse":
        return lambda: RegressionHead(task.name, leaves, widths, pooled)
    if loss == "infonce":
        return lambda: InfoNCEHead(task.name, leaves, widths, job.training.kernels, pooled)
    return lambda: PairedCosineHead(task.name, leaves, leaf_widths=widths, model_pooled=pooled)
