"""Batches from a task's ``data:`` (planner.data_spec.DataSpec): the batch source that replaces synthetic data.

Owns :func:`source_batch` (rows ``[start, stop)`` of a task's global batch at a step, the runtime.data.BatchSource
contract) and :func:`check_data` (everything ``loom run`` checks of the data before Ray starts). Row ``i`` of step
``k`` is global row ``g = k * batch_size + i`` of the task's stream: epoch ``g // R``, position ``g % R`` in that
epoch's seeded permutation (runtime.source_files.epoch_order), R the rows of an epoch (the records; for a packed
source, the rows the packed documents fill). So a rank reads only its rows, any shard equals the same rows of the
whole batch, and a run resumed at step k reads what an uninterrupted one would: the step is the whole iterator state.

What each format fills (per use that reads data, runtime.data.root_inputs): token uses get ids with the token layout
of runtime.tokenizer (labels, positions, segments in ``batch.targets``); image uses get images ``(B, C, I, I)`` float32
resized to the use's side and normalised (the component's preprocessor_config.json mean/std when its pretrained folder
has one, else to [-1, 1]); ``batch.labels`` are the rows' labels for cross_entropy (long) and mse (float32), zeros
otherwise. A preference row's chosen sequence is the token use's input, its rejected one and the scores are in
``batch.targets`` (:data:`SCORE_KEYS`; NaN where a row has no score). A unet2d use of an images source with a ``vae``
gets the VAE's latents of each image (runtime.vae, encoded once per image and process), noised as the synthetic data
noises its latents: a timestep and noise drawn per (seed, task, step, row), in ``batch.targets``
(runtime.unet.timesteps_key / noise_key).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from planner.data_spec import DataSpec
from planner.spec import JobSpec
from planner.usegraph import use_component
from runtime.chat_template import check_chat_template
from runtime.data import NOISE, TaskBatch, root_inputs
from runtime.modules import stable_seed
from runtime.source_files import (
    PREFERENCE_SCORES, DataError, check_data_dir, check_packing, check_vae, epoch_order, format_of, load_records,
    task_labels, tokenizer_folder,
)
from runtime.unet import noise_key, timesteps_key
from runtime.tokenizer import (
    Document, TokenRow, encode_chat, encode_completion, encode_text, labels_key, load_tokenizer, packed_length,
    packed_row, pad_id, padded_row, positions_key, rejected_key, segments_key, vocab_size,
)

SCORE_KEYS = PREFERENCE_SCORES  # batch.targets keys of a preference batch's scores (B,) float32
TEXT_LOSSES = ("lm", "next_token")


def check_data(job: JobSpec) -> None:
    """Build every task's source once: files, rows, tokenizer, vocabulary, what the task's uses read. A DataError
    (one line, naming the field, file, line and fix) for the first problem; the sources stay cached for the run."""
    for t, task in enumerate(job.tasks):
        check_packing(job, t)
        if task.data is not None:
            _source(type(job), job.model_dump_json(), t)
    check_recipe_data(job)


def check_recipe_data(job: JobSpec) -> None:
    """A job's ``data_dir`` (a recipe's real data), read as its workers will: the first row of each task without
    ``data:`` from the recipe's dataset (the recipe loaded in this process), so that a missing or malformed folder is
    one DataError before any Ray process starts, not a worker's error at the first batch."""
    check_data_dir(job)
    if job.recipe is None or job.data_dir is None:
        return
    from runtime.data import synthetic_batch  # the recipe's registered dataset for a job with a recipe

    for t, task in enumerate(job.tasks):
        if task.data is None:
            try:
                synthetic_batch(job, t, 0, 0, 1, "train")
            except (ValueError, OSError, KeyError) as exc:
                raise DataError(f"data_dir ({job.data_dir}): tasks[{t}] ('{task.name}') cannot read its first row: "
                                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def source_batch(job: JobSpec, t: int, step: int, start: int, stop: int, split: str = "train") -> TaskBatch:
    """Rows ``[start, stop)`` of task ``t``'s global batch at ``step`` read from its ``data:`` (see the module
    docstring); a ValueError for a split other than train (a source has one split)."""
    if split != "train":
        raise ValueError(f"split ('{split}'): tasks[{t}].data has only the 'train' split.")
    return _source(type(job), job.model_dump_json(), t).batch(step, start, stop)


def epoch_rows(job: JobSpec, t: int) -> int:
    """The rows of one epoch of task ``t``'s source: its lines, or the rows its packed documents fill."""
    return _source(type(job), job.model_dump_json(), t).rows_per_epoch


@functools.lru_cache(maxsize=16)
def _source(kind: type, job_json: str, t: int) -> TaskSource:
    """Task ``t``'s source of a job or of a worker's payload (runtime.payload: the same fields), cached by content."""
    return TaskSource(kind.model_validate_json(job_json), t)


@dataclass(frozen=True)
class _ImageUse:
    use: str
    channels: int
    side: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


class TaskSource:
    """One task's source, checked on construction (a DataError otherwise): its records, tokenizer and the uses it
    fills. Documents are encoded on first use and kept."""

    def __init__(self, job: JobSpec, t: int):
        self.job, self.t, self.task = job, t, job.tasks[t]
        self.spec = self.task.data
        assert self.spec is not None
        self.format = format_of(self.spec)
        self.labels = task_labels(job, t)
        roots = root_inputs(job, t)
        self._check_uses(roots)
        self.token_uses = {r.use: r.shape[0] for r in roots if r.kind == "tokens"}
        self.image_uses = [self._image_use(r) for r in roots if r.kind == "image"]
        self.vae = check_vae(job, t)
        self.latent_uses = [self._latent_use(r) for r in roots if r.kind == "latents"]
        self.records = load_records(self.spec, t, self.labels, bool(self.token_uses))
        self.tokenizer = self._tokenizer(roots) if self.token_uses else None
        self._docs: dict[int, tuple[Document, Document | None]] = {}
        self.rows_per_epoch = len(self.records)
        if self.spec.pack:
            self._pack_setup()

    # ------------------------------------------------------------------ checks

    def _check_uses(self, roots) -> None:
        fmt, loss, where = self.spec.format, self.task.loss, f"tasks[{self.t}] ('{self.task.name}')"
        fills = self.format.fills
        for r in roots:
            if r.kind not in fills:
                raise DataError(f"{where}.data.format ({fmt}): use '{r.use}' reads {r.kind} inputs, which format "
                                f"{fmt} does not give ({', '.join(fills)}); use a source of that kind or remove "
                                "the task's data.")
        tokens = [r.use for r in roots if r.kind == "tokens"]
        if self.format.next_token_only and loss not in TEXT_LOSSES and loss in _builtin_losses():
            raise DataError(f"{where}.loss ({loss}): format {fmt} trains a next-token loss (lm or next_token) on its "
                            "assistant turns or chosen answers. Set loss: lm, or use format text or images with "
                            "labels.")
        if (self.spec.pack or self.format.pairs) and len(tokens) != 1:
            what = "pack" if self.spec.pack else f"format {fmt}"
            raise DataError(f"{where}.data: {what} needs exactly one use reading token ids; this task has "
                            f"{len(tokens)} ({tokens}).")
        if self.spec.pack and self.labels is not None:
            raise DataError(f"{where}.data.pack (true): a packed row holds several documents, so it has no one label "
                            f"for loss {loss}. Remove `pack`, or train a next-token loss.")
        if "image" in fills and not any(r.kind in ("image", "latents") for r in roots):
            raise DataError(f"{where}.data.format ({fmt}): no use of this task reads images. Use a text format.")

    def _tokenizer(self, roots):
        first = use_component(self.job, self.t, next(iter(self.token_uses)))[0]
        folder, where = tokenizer_folder(self.job, self.t, first)
        tokenizer = load_tokenizer(folder, where)
        if self.spec.format == "chat":  # a template that fails to render: one line here, not a worker's traceback
            check_chat_template(Path(folder), where, self.records, self.spec.messages_field)
        size = vocab_size(tokenizer)
        for r in roots:
            if r.kind == "tokens" and size > r.vocab_size:
                comp_name = use_component(self.job, self.t, r.use)[0]
                raise DataError(f"{where} ({folder}): the tokenizer has {size} tokens but components.{comp_name} "
                                f"embeds {r.vocab_size} (vocab_size); ids beyond it have no embedding. Set "
                                f"components.{comp_name}.vocab_size >= {size}.")
        return tokenizer

    def _image_use(self, root) -> _ImageUse:
        channels, side = root.shape[0], root.shape[1]
        if channels not in (1, 3):
            raise DataError(f"tasks[{self.t}].data.format (images): use '{root.use}' reads {channels}-channel images; "
                            "image files give 1 (grey) or 3 (RGB). Set the component's in_channels to 1 or 3.")
        mean, std = image_normalisation(getattr(use_component(self.job, self.t, root.use)[1], "pretrained", None))
        if len(mean) != channels:
            mean, std = (mean[0],) * channels, (std[0],) * channels
        return _ImageUse(root.use, channels, side, mean, std)

    def _latent_use(self, root) -> tuple[_ImageUse, tuple[int, ...]]:
        """(the images to load for a latents use: the VAE's channels, the use's side times the VAE's factor, in
        [-1, 1]; the latents' shape per row)."""
        side = root.shape[1] * self.vae.factor
        return _ImageUse(root.use, self.vae.image_channels, side, (0.5,), (0.5,)), root.shape

    def _latents(self, records: list[int], rows: range, step: int) -> dict[str, tuple[torch.Tensor, ...]]:
        """Per latents use: (noisy latents, timesteps, noise) of ``records`` at global rows ``rows`` of ``step``."""
        from runtime.unet import NUM_TIMESTEPS
        from runtime.vae import encode_image

        out = {}
        for image, shape in self.latent_uses:
            noisy, steps, noise = [], [], []
            for record, row in zip(records, rows):
                x0 = encode_image(self.vae.path, _load_image(str(Path(self.spec.path) / self.records.rows[record]["image"]),
                                                               image))
                gen = torch.Generator().manual_seed(stable_seed("latents", self.job.training.seed, self.task.name,
                                                                step, row))
                t = int(torch.randint(0, NUM_TIMESTEPS, (1,), generator=gen))
                eps = torch.randn(shape, generator=gen)
                noisy.append(NOISE.noised(x0, eps, t))
                steps.append(t)
                noise.append(eps)
            empty = torch.empty(0, *shape)
            out[image.use] = (torch.stack(noisy) if noisy else empty, torch.tensor(steps, dtype=torch.long),
                              torch.stack(noise) if noise else empty)
        return out

    # ------------------------------------------------------------------ rows

    def _doc(self, index: int) -> tuple[Document, Document | None]:
        """(document, rejected document of a preference row or None) of record ``index``, encoded once."""
        if index not in self._docs:
            at = f"{self.records.path}: line {self.records.lines[index]}"
            encode = ENCODERS[self.spec.format]
            self._docs[index] = encode(self.tokenizer, self.spec, self.records.rows[index], at)
        return self._docs[index]

    def _pack_setup(self) -> None:
        self.seq_len = next(iter(self.token_uses.values()))
        self.packed_docs = [self._doc(i)[0] for i in range(len(self.records))]
        self.rows_per_epoch = max(1, math.ceil(packed_length(self.packed_docs, self.seq_len) / self.seq_len))

    @functools.lru_cache(maxsize=4)  # noqa: B019 (one source per task, kept for the run)
    def _packed_epoch(self, epoch: int) -> tuple[tuple[int, ...], list[int]]:
        order = self._order(epoch)
        ends, total = [], 0
        for index in order:
            total += min(len(self.packed_docs[index].ids), self.seq_len)
            ends.append(total)
        return order, ends

    def _order(self, epoch: int) -> tuple[int, ...]:
        return epoch_order(len(self.records), self.job.training.seed, self.task.name, epoch, self.spec.shuffle)

    def batch(self, step: int, start: int, stop: int) -> TaskBatch:
        size = self.task.batch_size
        if not 0 <= start <= stop <= size:
            raise ValueError(f"tasks[{self.t}] ('{self.task.name}'): sample range [{start}, {stop}) is outside its "
                             f"batch of {size}; need 0 <= start <= stop <= {size}.")
        slots = [divmod(step * size + i, self.rows_per_epoch) for i in range(start, stop)]
        if self.spec.pack:
            return self._packed_batch(slots, start)
        records = [self._order(epoch)[pos] for epoch, pos in slots]
        inputs, targets = {}, {}
        for use, seq_len in self.token_uses.items():
            docs = [self._doc(i) for i in records]
            pad = pad_id(self.tokenizer)
            _put_rows(inputs, targets, use, [padded_row(d, seq_len, pad) for d, _ in docs], seq_len)
            if self.format.pairs:
                _put_rows(inputs, targets, use, [padded_row(r, seq_len, pad) for _, r in docs], seq_len, rejected_key)
                for key in SCORE_KEYS:
                    targets[key] = torch.tensor([float(self.records.rows[i].get(key, math.nan)) for i in records])
        for image in self.image_uses:
            folder = Path(self.spec.path)
            pictures = [_load_image(str(folder / self.records.rows[i]["image"]), image) for i in records]
            inputs[image.use] = torch.stack(pictures) if pictures else torch.empty(0, image.channels, image.side,
                                                                                   image.side)
        for use, (noisy, steps, noise) in self._latents(records, range(start, stop), step).items():
            inputs[use], targets[timesteps_key(use)], targets[noise_key(use)] = noisy, steps, noise
        return TaskBatch(inputs, self._labels(records), stop - start, targets, first_row=start)

    def _packed_batch(self, slots: list[tuple[int, int]], start: int) -> TaskBatch:
        use = next(iter(self.token_uses))
        rows = []
        for epoch, pos in slots:
            order, ends = self._packed_epoch(epoch)
            rows.append(packed_row(self.packed_docs, order, ends, pos, self.seq_len, pad_id(self.tokenizer)))
        inputs, targets = {}, {}
        _put_rows(inputs, targets, use, rows, self.seq_len)
        return TaskBatch(inputs, torch.zeros(len(rows)), len(rows), targets, first_row=start)

    def _labels(self, records: list[int]) -> torch.Tensor:
        if self.labels is None:
            return torch.zeros(len(records))
        values = [self.records.rows[i][self.spec.label_field] for i in records]
        return torch.tensor(values, dtype=torch.long if self.labels == "class" else torch.float32)


Encoder = Callable[[Any, DataSpec, dict, str], "tuple[Document, Document | None]"]
ENCODERS: dict[str, Encoder] = {  # (tokenizer, spec, row, where) -> (document, rejected document or None)
    "text": lambda tok, spec, row, at: (encode_text(tok, row[spec.text_field]), None),
    "chat": lambda tok, spec, row, at: (encode_chat(tok, row[spec.messages_field], at), None),
    "preference": lambda tok, spec, row, at: (encode_completion(tok, row["prompt"], row["chosen"]),
                                              encode_completion(tok, row["prompt"], row["rejected"])),
    "images": lambda tok, spec, row, at: (encode_text(tok, row[spec.caption_field]), None),  # the caption
}


def _put_rows(inputs: dict, targets: dict, use: str, rows: list[TokenRow], seq_len: int, key=lambda k: k) -> None:
    """The four tensors of ``rows`` (B, seq_len) into the batch's inputs and targets under ``key(...)``."""
    def column(attr: str) -> torch.Tensor:
        return torch.tensor([getattr(r, attr) for r in rows], dtype=torch.long).reshape(len(rows), seq_len)

    (inputs if key(use) == use else targets)[key(use)] = column("ids")
    targets[key(labels_key(use))] = column("labels")
    targets[key(positions_key(use))] = column("positions")
    targets[key(segments_key(use))] = column("segments")


def _builtin_losses() -> tuple[str, ...]:
    from runtime.checks import BUILTIN_LOSSES

    return BUILTIN_LOSSES


@functools.lru_cache(maxsize=64)  # read on every forward of a use reading samples (runtime.sampleop.sample_pixels)
def image_normalisation(pretrained: str | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel: the pretrained folder's preprocessor_config.json image_mean/image_std (what the
    tower was trained with), else 0.5/0.5 (pixels in [0, 1] become [-1, 1])."""
    if pretrained is not None:
        config = Path(pretrained) / "preprocessor_config.json"
        if config.is_file():
            values = json.loads(config.read_text())
            if "image_mean" in values and "image_std" in values:
                return tuple(values["image_mean"]), tuple(values["image_std"])
    return (0.5,), (0.5,)


@functools.lru_cache(maxsize=1024)
def _load_image(path: str, use: _ImageUse) -> torch.Tensor:
    """The image at ``path`` as ``(C, side, side)`` float32: converted to grey or RGB, resized (bilinear),
    ``(pixels / 255 - mean) / std`` per channel."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB" if use.channels == 3 else "L").resize((use.side, use.side), Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).reshape(use.side, use.side, use.channels)
    x = pixels.permute(2, 0, 1) / 255.0
    return (x - torch.tensor(use.mean).view(-1, 1, 1)) / torch.tensor(use.std).view(-1, 1, 1)
