"""The files behind a task's ``data:`` (planner.data_spec.DataSpec): read, check and index them, torch-free.

Owns what a source's files must hold and the order its rows are visited in: :func:`load_records` reads a JSONL file
(or an image folder's manifest) into checked records, :func:`check_data_files` checks every task's files and is what
``loom validate`` runs (torch-free, like runtime.checks: a test loads no torch), :func:`epoch_order` is the seeded
permutation of an epoch. Each problem is one :class:`DataError` line naming the field, the file, the line and the fix.
runtime.sources turns the records into batches (tokenizer, images, torch); nothing here imports torch or transformers.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.data_spec import DataSpec
from planner.errors import LoomError, SpecError
from planner.jsonfile import JsonKind, read_json
from planner.spec import JobSpec

NUM_LABEL_CLASSES = 10  # classes of a cross_entropy label: runtime.heads.NUM_CLASSES (a test checks they agree)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # one of them marks a tokenizer folder
TOKENIZER_JSON = JsonKind("tokenizer file", "not a tokenizer file", "the JSON tokenizer.save_pretrained writes",
                          "Save the tokenizer again with tokenizer.save_pretrained", 512 * 2**20)
LABEL_LOSSES = ("cross_entropy", "mse")  # losses whose rows carry a label (an int class, a number)
PREFERENCE_SCORES = ("score_chosen", "score_rejected")


class DataError(LoomError):
    """A task's data files are missing, malformed or do not fit the task (one line; the CLI's exit code 2)."""


@dataclass(frozen=True)
class Records:
    """The checked records of one source: JSON objects (a manifest's lines for images) and their line numbers."""

    path: Path  # the JSONL file (the manifest for images)
    rows: tuple[dict[str, Any], ...]
    lines: tuple[int, ...]  # 1-based line of each row in ``path``

    def __len__(self) -> int:
        return len(self.rows)


def data_where(t: int, field: str = "path") -> str:
    """The spec path of task ``t``'s data field, as errors name it."""
    return f"tasks[{t}].data.{field}"


def label_kind(loss: str) -> str | None:
    """'class' (an int in [0, NUM_LABEL_CLASSES)) for cross_entropy, 'value' (a number) for mse, else None."""
    return {"cross_entropy": "class", "mse": "value"}.get(loss)


def task_labels(job: JobSpec, t: int) -> str | None:
    """:func:`label_kind` of task ``t``'s loss, or None when a use denoises (a unet2d's mse target is its noise)."""
    from planner.kinds import kind_of

    if any(kind_of(job.components[u.component]).denoiser for u in job.tasks[t].components):
        return None
    return label_kind(job.tasks[t].loss)


def check_data_dir(job: JobSpec) -> None:
    """The job's ``data_dir`` (a recipe's real data; already resolved, an earlier phase's artifact included) is a
    folder; a DataError otherwise."""
    if job.data_dir is None or Path(job.data_dir).is_dir():
        return
    what = "not a folder" if Path(job.data_dir).exists() else "no such folder"
    raise DataError(f"data_dir ({job.data_dir}): {what}; it holds the recipe's real data, one subfolder per split "
                    "(docs/recipes/<recipe>.md). Fix the path, or remove data_dir for synthetic data.")


def check_data_files(job: JobSpec) -> None:
    """Every task's data files exist and hold what its format and loss need (a DataError otherwise), each tokenizer
    folder named or implied holds a tokenizer, and a chat task's template renders its conversations
    (runtime.chat_template), and ``data_dir`` is a folder. Torch-free: what ``loom validate`` can check."""
    check_data_dir(job)
    for t, task in enumerate(job.tasks):
        if task.data is None:
            continue
        text_uses = _text_uses(job, t)
        check_packing(job, t)
        records = load_records(task.data, t, task_labels(job, t), bool(text_uses))
        if text_uses:
            folder, where = tokenizer_folder(job, t, text_uses[0])
            path = check_tokenizer_folder(folder, where)
            if task.data.format == "chat":
                from runtime.chat_template import check_chat_template  # it imports this module

                check_chat_template(path, where, records, task.data.messages_field)
        check_vae(job, t)


def check_vae(job: JobSpec, t: int):
    """Task ``t``'s VAE (planner.vae_config.VaeInfo) when its data names one, else None: a DataError when its uses
    read latents without one, or it names one that is not an AutoencoderKL, does not match its weights, or encodes
    another number of channels than a unet2d use reads."""
    from planner.kinds import kind_of
    from planner.pretrained import PretrainedError
    from planner.vae_config import check_vae_use, resolve_vae

    data, where = job.tasks[t].data, data_where(t, "vae")
    latents = [u.component for u in job.tasks[t].components if kind_of(job.components[u.component]).root_input == "latents"]
    if data is None or (data.vae is None and not latents):
        return None
    if data.vae is None:
        raise DataError(f"{where}: components.{latents[0]} reads latents, which image files do not give; set "
                        "tasks[].data.vae to a diffusers AutoencoderKL folder that encodes the images into them.")
    if not latents:
        raise DataError(f"{where} ({data.vae}): no use of this task reads latents (a unet2d component); remove "
                        "`vae:`.")
    try:
        info = resolve_vae(data.vae, where)
        if info.image_channels not in (1, 3):
            raise DataError(f"{where} ({data.vae}): the VAE encodes {info.image_channels}-channel images; image files "
                            "give 1 (grey) or 3 (RGB). Use a VAE whose in_channels is 1 or 3.")
        for name in latents:
            comp = job.components[name]
            check_vae_use(info, where, name, comp.in_channels or kind_of(comp).in_channels)
    except PretrainedError as exc:
        raise DataError(str(exc)) from None
    return info


def check_packing(job: JobSpec, t: int) -> None:
    """A packed task's token uses need layers that keep attention within each document: causal LMs (llama kind,
    Loom's or pretrained) on plain layers; megatron-core's tensor-parallel layers do not take the per-document mask."""
    from planner.kinds import kind_of

    if job.tasks[t].data is None or not job.tasks[t].data.pack:
        return
    for name in _text_uses(job, t):
        comp = job.components[name]
        if not kind_of(comp).causal_lm:
            raise DataError(f"{data_where(t, 'pack')} (true): components.{name} is a {comp.kind}, whose attention does "
                            "not stop at document boundaries; packing needs a causal LM (llama kind). Remove `pack`.")
        if any(d != 1 for d in comp.tensor_parallel):
            raise DataError(f"{data_where(t, 'pack')} (true): components.{name} may run tensor parallel "
                            f"({comp.tensor_parallel}), whose layers take no per-document mask. Remove `pack` or set "
                            "tensor_parallel: [1].")


def _text_uses(job: JobSpec, t: int) -> list[str]:
    """The components of task ``t``'s uses whose kind reads token ids, in order: the uses its data must give text
    (runtime.sources builds them from the use graph; a test checks the two agree on the examples' shapes)."""
    from planner.kinds import kind_of

    return [u.component for u in job.tasks[t].components if kind_of(job.components[u.component]).root_input == "tokens"]


def tokenizer_folder(job: JobSpec, t: int, component: str) -> tuple[str, str]:
    """(folder, spec path naming it) of task ``t``'s tokenizer: its ``data.tokenizer``, else the ``pretrained``
    folder of ``component`` (the task's first use reading token ids); a DataError when neither is set."""
    data = job.tasks[t].data
    if data.tokenizer is not None:
        return data.tokenizer, data_where(t, "tokenizer")
    folder = getattr(job.components[component], "pretrained", None)
    if folder is None:
        raise DataError(f"{data_where(t, 'tokenizer')}: none given, and components.{component} (the first use "
                        "reading token ids) has no pretrained folder to take one from. Set tasks[].data.tokenizer "
                        "to a tokenizer folder.")
    return folder, f"components.{component}.pretrained"


def check_tokenizer_folder(folder: str, where: str) -> Path:
    """``folder`` as a Path when it holds a tokenizer (one of TOKENIZER_FILES); a DataError naming it otherwise."""
    path = Path(folder)
    if not path.is_dir():
        raise DataError(f"{where} ({folder}): no such tokenizer folder. Point it at a folder saved with "
                        "tokenizer.save_pretrained (tokenizer.json, tokenizer_config.json).")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise DataError(f"{where} ({folder}): the folder holds no tokenizer ({' or '.join(TOKENIZER_FILES)}). Save "
                        "one there with tokenizer.save_pretrained, or set tasks[].data.tokenizer to a folder that has "
                        "one.")
    for name in TOKENIZER_FILES:  # what transformers reads first: JSON objects (a binary file loaded only in a run)
        if (path / name).is_file():
            try:
                data = read_json(path / name, TOKENIZER_JSON)
            except SpecError as exc:
                raise DataError(f"{where}: {exc}") from None
            if not isinstance(data, dict):
                raise DataError(f"{where}: {path / name}: not a tokenizer file (a JSON {type(data).__name__}, not an "
                                f"object). {TOKENIZER_JSON.fix}.")
    return path


# --------------------------------------------------------------------------- reading and checking


def load_records(spec: DataSpec, t: int, labels: str | None, captions: bool) -> Records:
    """The checked records of task ``t``'s source (cached per file state, so each process reads a file once).
    ``labels``: :func:`label_kind` of the task's loss; ``captions``: an images source's rows need a caption."""
    entry = format_of(spec)
    if spec.pack and not entry.packable:
        packable = " or ".join(name for name, e in FORMATS.items() if e.packable)
        raise DataError(f"{data_where(t, 'pack')} (true): format {spec.format} rows are not packed; remove `pack`, "
                        f"or use format {packable}.")
    _check_exists(spec, t)
    stat = row_file(spec).stat()
    return _load(spec, t, labels, captions, stat.st_mtime_ns, stat.st_size)


def row_file(spec: DataSpec) -> Path:
    """The JSONL file holding a source's rows: ``path``, or the manifest inside it for a folder format."""
    return Path(spec.path) / spec.manifest if format_of(spec).folder else Path(spec.path)


@functools.lru_cache(maxsize=32)
def _load(spec: DataSpec, t: int, labels: str | None, captions: bool, mtime: int, size: int) -> Records:
    path, check = row_file(spec), format_of(spec).check_row
    where = data_where(t, "manifest" if format_of(spec).folder else "path")
    rows, lines = [], []
    for line, row in read_jsonl(path, where):
        check(spec, row, f"{where} ({path}): line {line}", labels, captions)
        rows.append(row)
        lines.append(line)
    if not rows:
        raise DataError(f"{where} ({path}): no rows (the file is empty); a source needs at least one line.")
    return Records(path, tuple(rows), tuple(lines))


SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")  # what datasets' save_to_disk writes


def _check_exists(spec: DataSpec, t: int) -> None:
    where, path = data_where(t), Path(spec.path)
    if path.is_dir() and any((path / name).is_file() for name in SAVED_DATASET_FILES):
        raise DataError(f"{where} ({spec.path}): a dataset saved with the datasets library's save_to_disk, which "
                        "Loom does not read (datasets is not a dependency). Write it as JSONL and point `path` at "
                        "the file: datasets.load_from_disk(path).to_json('data.jsonl', lines=True) (a DatasetDict: "
                        "one split, e.g. load_from_disk(path)['train']).")
    if format_of(spec).folder:
        if not path.is_dir():
            raise DataError(f"{where} ({spec.path}): no such folder; format {spec.format} reads a folder with a "
                            f"manifest ({spec.manifest}). Check the path.")
        if not (path / spec.manifest).is_file():
            raise DataError(f"{data_where(t, 'manifest')} ({spec.manifest}): no such file in {spec.path}; write one "
                            "JSON object per image there ({\"image\": \"rel/path.png\", \"label\": 0}), or set "
                            "tasks[].data.manifest.")
    elif not path.is_file():
        raise DataError(f"{where} ({spec.path}): no such file; format {spec.format} reads a JSONL file. Check the "
                        "path.")


def read_jsonl(path: Path, where: str | None = None):
    """(line number, object) of every non-blank line; a DataError for a line that is not a JSON object, naming
    ``where`` (the spec field) and the path when given, else only the line (a caller that names the file itself)."""
    at = f"{where} ({path}): " if where else ""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{at}cannot read it as UTF-8 text ({exc}).") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{at}line {number} is not valid JSON ({exc.msg} at column {exc.colno}); each line must "
                            "be one JSON object. Fix or remove the line.") from None
        except RecursionError:  # the parser recurses once per bracket
            raise DataError(f"{at}line {number} is nested too deeply to read as JSON; each line must be one JSON "
                            "object. Fix or remove the line.") from None
        if not isinstance(row, dict):
            raise DataError(f"{at}line {number} is a JSON {type(row).__name__}, not an object; each line must be one "
                            "JSON object.")
        yield number, row


def _field(row: dict, key: str, kind: type | tuple[type, ...], at: str, what: str) -> Any:
    if key not in row:
        raise DataError(f"{at}: no '{key}' field ({what}); add it to every line, or name the field the file uses "
                        "in tasks[].data.")
    value = row[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{at}: '{key}' is {type(value).__name__} {json.dumps(value)[:40]}, expected {what}.")
    return value


def _check_label(spec: DataSpec, row: dict, at: str, labels: str | None) -> None:
    if labels == "class":
        value = _field(row, spec.label_field, int, at, f"an integer class in [0, {NUM_LABEL_CLASSES})")
        if not 0 <= value < NUM_LABEL_CLASSES:
            raise DataError(f"{at}: '{spec.label_field}' ({value}) is outside [0, {NUM_LABEL_CLASSES}); cross_entropy "
                            f"tasks have {NUM_LABEL_CLASSES} classes. Renumber the labels.")
    elif labels == "value":
        _field(row, spec.label_field, (int, float), at, "a number (the mse target)")


def _check_text(spec: DataSpec, row: dict, at: str, labels: str | None, captions: bool) -> None:
    _field(row, spec.text_field, str, at, "the text")
    _check_label(spec, row, at, labels)


def _check_chat(spec: DataSpec, row: dict, at: str, labels: str | None, captions: bool) -> None:
    messages = _field(row, spec.messages_field, list, at, "a list of {role, content} messages")
    for i, message in enumerate(messages):
        where = f"{at}: {spec.messages_field}[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{where} is a {type(message).__name__}, not a {{role, content}} object.")
        _field(message, "role", str, where, "a role (system, user, assistant)")
        _field(message, "content", str, where, "the message text")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{at}: the conversation has no assistant turn, so nothing to learn (the loss covers "
                        "assistant turns only). Add one or remove the line.")


def _check_preference(spec: DataSpec, row: dict, at: str, labels: str | None, captions: bool) -> None:
    for key in ("prompt", "chosen", "rejected"):
        _field(row, key, str, at, "text")
    for key in PREFERENCE_SCORES:
        if key in row:
            _field(row, key, (int, float), at, "a number")


def _check_image_row(spec: DataSpec, row: dict, at: str, labels: str | None, captions: bool) -> None:
    relative = _field(row, "image", str, at, "an image path relative to the folder")
    folder = Path(spec.path).resolve()
    image = (folder / relative).resolve()
    if not image.is_relative_to(folder):
        raise DataError(f"{at}: 'image' ({relative}) points outside the folder {folder}; manifest paths must stay "
                        "inside tasks[].data.path. Move the image into the folder.")
    _check_image_file(image, at)
    _check_label(spec, row, at, labels)
    if captions:
        _field(row, spec.caption_field, str, at, "a caption (the task reads text)")


def _check_image_file(image: Path, at: str) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as img:
            img.verify()
    except FileNotFoundError:
        raise DataError(f"{at}: image {image} does not exist. Fix the manifest line or add the file.") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"{at}: image {image} cannot be read ({type(exc).__name__}: {exc}). Replace or remove "
                        "it.") from None


# --------------------------------------------------------------------------- the formats

RowCheck = Callable[[DataSpec, dict, str, "str | None", bool], None]  # (spec, row, where, labels, captions)


@dataclass(frozen=True)
class FormatEntry:
    """What one data format reads and gives: the torch-free facts (runtime.sources.ENCODERS encodes its rows; a
    test checks both registries and planner.data_spec.DATA_FORMATS name the same formats)."""

    name: str
    check_row: RowCheck  # raises a DataError for a row that lacks what the format needs
    fills: tuple[str, ...]  # the input kinds its rows give the task's uses ("tokens", "image", "latents")
    folder: bool = False  # ``path`` is a folder whose manifest holds the rows (else ``path`` is the JSONL file)
    next_token_only: bool = False  # of the built-in losses, trains lm/next_token only
    packable: bool = False  # its documents may be packed into rows
    pairs: bool = False  # two sequences per row (chosen, rejected)


FORMATS: dict[str, FormatEntry] = {e.name: e for e in (
    FormatEntry("text", _check_text, ("tokens",), packable=True),
    FormatEntry("chat", _check_chat, ("tokens",), next_token_only=True, packable=True),
    FormatEntry("preference", _check_preference, ("tokens",), next_token_only=True, pairs=True),
    FormatEntry("images", _check_image_row, ("image", "tokens", "latents"), folder=True),  # latents: with a vae
)}


def format_of(spec: DataSpec) -> FormatEntry:
    """The registry entry of ``spec.format`` (the spec's Literal admits only registered names)."""
    return FORMATS[spec.format]


# --------------------------------------------------------------------------- order


def stable_int(*parts: object) -> int:
    """A 63-bit integer from ``parts`` that is the same in every process (unlike ``hash``)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@functools.lru_cache(maxsize=8)  # a step's rows span one epoch or two; a few tasks
def epoch_order(num_rows: int, seed: int, task: str, epoch: int, shuffle: bool) -> tuple[int, ...]:
    """The order task ``task`` visits its ``num_rows`` rows in during ``epoch``: a permutation seeded by (seed,
    task, epoch), or file order without ``shuffle``. A pure function: every rank and a resumed run agree."""
    order = list(range(num_rows))
    if shuffle:
        random.Random(stable_int("data-order", seed, task, epoch)).shuffle(order)
    return tuple(order)
