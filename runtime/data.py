"""Deterministic data for every task of a job, shardable by sample range.

Owns :class:`TaskBatch`, :func:`task_batch` (what a task trains on: its ``data:`` source, runtime.sources, else
synthetic data) and :func:`synthetic_batch`. Sample ``i`` of task ``t`` at step ``k`` is
drawn from its own generator seeded by (job seed, task name, step, i), so any data-parallel shard
``[start, stop)`` equals the same rows of the full batch, on any process, with no shared state:
the step index is the whole iterator state (nothing else to checkpoint).

The data is learnable, so that losses fall in a training run: each sample first draws its label
(a class for cross_entropy, a float for mse, a hidden class shared by both branches for
contrastive and infonce), then its root inputs carry it: a class marker token on half the positions, a
per-class channel offset on images and features, and for lm/next_token arithmetic token
sequences (``a, a+d, a+2d, ...`` mod vocab with 10% noise).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from planner.components import resolve_shape
from planner.spec import JobSpec
from runtime.heads import NUM_CLASSES, check_loss
from planner.kinds import kind_of
from planner.usegraph import connection, root_uses, use_component
from runtime.kinds import image_channels, is_token_decoder
from runtime.modules import DEFAULT_VOCAB, stable_seed
from runtime.unet import NUM_TIMESTEPS, NoiseSchedule, noise_key, timesteps_key

LM_NOISE = 0.1  # fraction of positions of an lm sequence replaced by random tokens
MARKER_RATE = 0.5  # fraction of positions carrying the class marker token
NOISE = NoiseSchedule()


@dataclass
class TaskBatch:
    """Rows ``[start, start + num_samples)`` of one task's global batch at one step.

    ``inputs``: per root use, token ids ``(B, S)`` long in ``[0, vocab)`` (transformer, llama,
    decoder), images ``(B, C, I, I)`` float32 (vit) or features ``(B, S, H)`` float32 (mlp); a transformer or
    llama use whose connector adds its own text after its inputs (runtime.connect) gets ids ``(B, S - T)``.
    Token decoder uses (decoder with vocab_size) get ids ``(B, S)`` too, root or not; every unet2d use gets
    noisy latents ``(B, C, I, I)``, with its timesteps ``(B,)`` long and the noise added ``(B, C, I, I)`` in
    ``targets`` (keys runtime.unet.timesteps_key / noise_key).
    ``labels``: ``(B,)`` long in ``[0, 10)`` for cross_entropy, float32 for mse, float32 zeros
    (unused) for contrastive, infonce and lm/next_token (whose targets are the input ids).
    ``targets``: further tensors a loss reads (a recipe's; a unet2d use's timesteps and noise).
    """

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    num_samples: int
    targets: dict[str, torch.Tensor] = field(default_factory=dict)
    first_row: int = 0  # index of these rows' first in the task's batch
    # index of the first row of the micro-batch these rows belong to (training.grad_accum_steps): every_row gathers
    # that micro-batch's rows, so these rows sit at first_row - micro_first among them
    micro_first: int = 0
    # every_row's gather (None: these rows are the whole batch); the executor sets it on a loss host's shard
    gather_rows: Callable[[torch.Tensor], torch.Tensor] | None = None

    def to(self, device: torch.device) -> TaskBatch:
        """This batch with every tensor on ``device`` (itself when they are there already)."""
        if self.labels.device == torch.device(device):
            return self
        move = lambda d: {k: v.to(device, non_blocking=True) for k, v in d.items()}  # noqa: E731
        return replace(self, inputs=move(self.inputs), labels=self.labels.to(device), targets=move(self.targets))

    def every_row(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (one row per sample of this batch, differentiable) for every row of the task's (micro-)batch, in
        order: the data-parallel shards' rows gathered, gradients summed back to each shard (a loss coupling the
        samples of a batch, as InfoNCE, needs them); ``x`` itself when these rows are the whole (micro-)batch. These
        rows are at :attr:`rows_in_gathered` among them."""
        return x if self.gather_rows is None else self.gather_rows(x)

    @property
    def rows_in_gathered(self) -> range:
        """Where these rows are among :meth:`every_row`'s."""
        first = self.first_row - self.micro_first
        return range(first, first + self.num_samples)


SPLITS = ("train", "heldout", "transfer")
BatchSource = Callable[[JobSpec, int, int, int, int, str], TaskBatch]
_RECIPE_DATA: dict[str, BatchSource] = {}


def register_dataset(recipe: str, source: BatchSource) -> None:
    """Make ``source(job, task_index, step, start, stop, split)`` the data of every job with ``recipe: <recipe>``.

    It must return rows ``[start, stop)`` of the task's batch at ``step`` of ``split`` (one of SPLITS),
    deterministically per row, so that any shard equals the same rows of the full batch."""
    _RECIPE_DATA[recipe] = source


@dataclass(frozen=True)
class _RootInput:
    """How to draw one root use's input for one sample: kind 'tokens', 'image', 'latents' or 'features'."""

    use: str
    kind: str
    shape: tuple[int, ...]  # per sample
    vocab_size: int  # tokens only
    pattern: torch.Tensor | None  # (NUM_CLASSES, channels): per-class offsets of images/features


def root_inputs(job: JobSpec, task_index: int) -> list[_RootInput]:
    """What task ``task_index``'s data must give, per use that reads data (root uses, token decoders, uses with text
    of their own after their inputs): its kind of input and per-sample shape."""
    task = job.tasks[task_index]
    seed = job.training.seed
    out = []
    roots = root_uses(job, task_index)
    for u, use in enumerate(task.components):
        name = use.use_name
        comp_name, comp = use_component(job, task_index, name)
        c = None if name in roots else connection(job, task_index, u)
        text_len = c.text_len if c is not None else 0  # a connected use's own text after its inputs
        entry = kind_of(comp, comp_name)
        kind = entry.root_input  # what the use reads from the data
        # a bridge's input module reads the use's own data besides the upstream output, unless it runs learned queries
        own = is_token_decoder(comp) or (entry.bridge and not entry.queries)
        if name not in roots and not own and not text_len:
            continue
        shape = resolve_shape(comp, comp_name, task.components[u], f"tasks[{task_index}].components[{u}]")
        if kind == "tokens":
            seq = text_len or shape.seq_len
            out.append(_RootInput(name, "tokens", (seq,), comp.vocab_size or DEFAULT_VOCAB, None))
            continue
        if kind in ("image", "latents"):
            channels = image_channels(comp)
            sample_shape = (channels, shape.image_size, shape.image_size)
        elif kind == "features":
            channels = comp.hidden_size
            sample_shape = (shape.seq_len, channels)
        else:
            raise NotImplementedError(
                f"tasks[{task_index}].components[{u}]: kind '{comp.kind}' reads '{kind}' inputs, for which the "
                "runtime has no synthetic data yet; supported inputs: tokens, image, latents, features."
            )
        gen = torch.Generator().manual_seed(stable_seed("pattern", seed, task.name, name))
        pattern = torch.randn(NUM_CLASSES, channels, generator=gen)
        out.append(_RootInput(name, kind, sample_shape, 0, pattern))
    return out


def _draw_label(loss: str, gen: torch.Generator) -> tuple[torch.Tensor, int, float]:
    """(label, class carried by the inputs, scalar carried by the inputs) of one sample."""
    if loss in ("cross_entropy", "contrastive", "infonce"):
        cls = int(torch.randint(0, NUM_CLASSES, (1,), generator=gen))
        label = torch.tensor(cls) if loss == "cross_entropy" else torch.tensor(0.0)
        return label, cls, 1.0
    if loss == "mse":
        value = float(torch.randn(1, generator=gen))
        return torch.tensor(value), 0, value
    return torch.tensor(0.0), 0, 0.0  # lm / next_token: the ids are the targets


def _draw_tokens(root: _RootInput, loss: str, cls: int, value: float, gen: torch.Generator) -> torch.Tensor:
    (seq,), vocab = root.shape, root.vocab_size
    if loss in ("lm", "next_token"):
        first = torch.randint(0, vocab, (1,), generator=gen)
        stride = torch.randint(1, 4, (1,), generator=gen)
        ids = (first + stride * torch.arange(seq)) % vocab
        rate, marker = LM_NOISE, torch.randint(0, vocab, (seq,), generator=gen)
    else:
        ids = torch.randint(0, vocab, (seq,), generator=gen)
        # mse: the marker (token 0) density grows with the label; classes: marker = the class's token
        rate = float(torch.sigmoid(torch.tensor(value))) if loss == "mse" else MARKER_RATE
        marker = torch.full((seq,), cls % vocab)
    return torch.where(torch.rand(seq, generator=gen) < rate, marker, ids)


def _draw_dense(root: _RootInput, loss: str, cls: int, value: float, gen: torch.Generator) -> torch.Tensor:
    offset = root.pattern[0] * value if loss == "mse" else root.pattern[cls] * value
    noise = torch.randn(root.shape, generator=gen)
    if root.kind in ("image", "latents"):
        return noise + offset.view(-1, 1, 1)  # per channel
    return noise + offset  # features: per hidden unit, every position


def _draw_latents(root: _RootInput, loss: str, cls: int, value: float, gen: torch.Generator) -> list[torch.Tensor]:
    """[noisy latents x_t, timestep t, noise eps]: clean latents are an image-like draw (class offsets plus noise,
    scaled by half), t uniform over the DDPM schedule, ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``."""
    x0 = 0.5 * _draw_dense(root, loss, cls, value, gen)
    t = int(torch.randint(0, NUM_TIMESTEPS, (1,), generator=gen))
    eps = torch.randn(root.shape, generator=gen)
    return [NOISE.noised(x0, eps, t), torch.tensor(t), eps]


def _check_range(job: JobSpec, task_index: int, start: int, stop: int) -> None:
    size = job.tasks[task_index].batch_size
    if not 0 <= start <= stop <= size:
        raise ValueError(
            f"tasks[{task_index}] ('{job.tasks[task_index].name}'): sample range [{start}, {stop}) is outside its "
            f"batch of {size}; need 0 <= start <= stop <= {size}."
        )


def task_batch(job: JobSpec, task_index: int, step: int, start: int, stop: int, split: str = "train") -> TaskBatch:
    """Samples ``[start, stop)`` of task ``task_index``'s global batch at ``step``: what the task trains on.

    A task with ``data:`` reads its source (runtime.sources.source_batch: files, tokenizer, images); any other
    task gets :func:`synthetic_batch` (a recipe's registered dataset, else the built-in synthetic data). Either way
    deterministic per (seed, step, row): any shard equals the matching rows of the full batch."""
    if job.tasks[task_index].data is not None:
        from runtime.sources import source_batch  # local: sources imports this module

        return source_batch(job, task_index, step, start, stop, split)
    return synthetic_batch(job, task_index, step, start, stop, split)


def synthetic_batch(job: JobSpec, task_index: int, step: int, start: int, stop: int, split: str = "train") -> TaskBatch:
    """Samples ``[start, stop)`` of task ``task_index``'s global batch at ``step`` (see :class:`TaskBatch`).

    A job with a recipe takes the recipe's registered dataset (see :func:`register_dataset`); the
    built-in synthetic data has one split, "train". Deterministic per sample: any shard equals the
    matching rows of the full batch. Raises ValueError for an unknown loss or a range outside the
    batch, NotImplementedError for a root use of a kind the runtime does not run.
    """
    task = job.tasks[task_index]
    loss = check_loss(job, task_index)
    if split not in SPLITS:
        raise ValueError(f"split ('{split}') is not a data split; use one of {', '.join(SPLITS)}.")
    if job.recipe is not None:
        if job.recipe not in _RECIPE_DATA:
            raise ValueError(f"recipe ('{job.recipe}') has no dataset in this process: the orchestrator loads recipes "
                             "(orchestrator.recipes.load_recipe), and a recipe's package calls register_dataset.")
        return _RECIPE_DATA[job.recipe](job, task_index, step, start, stop, split)
    if split != "train":
        raise ValueError(f"split ('{split}'): the built-in synthetic data has only the 'train' split; use a recipe's data.")
    _check_range(job, task_index, start, stop)
    roots = root_inputs(job, task_index)
    columns: dict[str, list[torch.Tensor]] = {root.use: [] for root in roots}
    labels = []
    for index in range(start, stop):
        gen = torch.Generator().manual_seed(stable_seed("data", job.training.seed, task.name, step, index))
        label, cls, value = _draw_label(loss, gen)
        labels.append(label)
        for root in roots:
            draw = {"tokens": _draw_tokens, "latents": _draw_latents}.get(root.kind, _draw_dense)
            columns[root.use].append(draw(root, loss, cls, value, gen))
    inputs, targets = {}, {}
    for root in roots:
        if root.kind == "latents":  # columns of [x_t, t, eps] per sample
            rows = list(zip(*columns[root.use])) or [[], [], []]
            noisy, steps, noise = (torch.stack(list(c)) if c else torch.empty(0) for c in rows)
            inputs[root.use], targets[timesteps_key(root.use)], targets[noise_key(root.use)] = noisy, steps, noise
            continue
        dtype = torch.long if root.kind == "tokens" else torch.float32
        rows = columns[root.use]
        inputs[root.use] = torch.stack(rows) if rows else torch.empty((0, *root.shape), dtype=dtype)
    label_dtype = torch.long if loss == "cross_entropy" else torch.float32
    labels_t = torch.stack(labels).to(label_dtype) if labels else torch.empty(0, dtype=label_dtype)
    return TaskBatch(inputs, labels_t, stop - start, targets, first_row=start)


def task_loss_sum(head: torch.nn.Module, outputs: dict[str, torch.Tensor], batch: TaskBatch,
                  global_batch_size: int) -> torch.Tensor:
    """``head(outputs, batch).sum() / global_batch_size``: summed over the data-parallel shards of a
    batch this is the full-batch mean loss. The task's ``loss_weight`` is the caller's to apply."""
    return head(outputs, batch).sum() / global_batch_size
