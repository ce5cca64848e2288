"""Text into token rows: the tokenizer of a task's data, documents encoded with their trained positions, and rows
padded or packed to a sequence length.

Owns the token layout of a :class:`runtime.data.TaskBatch` fed from text (the keys of ``batch.targets``, per token
use ``u``): ``batch.inputs[u]`` ids ``(B, S)`` long; ``targets[labels_key(u)]`` the ids a next-token loss learns,
aligned with the ids (position ``j`` predicts ``labels[j + 1]``), :data:`IGNORE_INDEX` on padding, prompts,
non-assistant chat turns and each document's first token; ``targets[positions_key(u)]`` position ids (restarting at
0 for each document of a packed row); ``targets[segments_key(u)]`` segment ids (1, 2, ... for the documents of a row
in order, 0 on padding): a layer that stops attention at document boundaries lets token i attend to j only when
their segment ids are equal and nonzero (:func:`document_mask` builds that mask). A preference pair's rejected sequence has the same four under
:func:`rejected_key`. Transformers (and torch) are imported only when a tokenizer is loaded.
"""

from __future__ import annotations

import bisect
import functools
import re
from dataclasses import dataclass
from typing import Any

from runtime.source_files import DataError, check_tokenizer_folder

IGNORE_INDEX = -100  # a label no loss learns (torch.nn.functional.cross_entropy's default ignore_index)
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")  # a chat template's marking of what the model generates


def labels_key(use: str) -> str:
    """``batch.targets`` key of use ``use``'s next-token labels ``(B, S)`` long."""
    return f"labels:{use}"


def positions_key(use: str) -> str:
    """``batch.targets`` key of use ``use``'s position ids ``(B, S)`` long."""
    return f"positions:{use}"


def segments_key(use: str) -> str:
    """``batch.targets`` key of use ``use``'s segment ids ``(B, S)`` long (0: padding)."""
    return f"segments:{use}"


def prompt_mask_key(use: str) -> str:
    """``batch.targets`` key of a ``mode: generate`` use's prompt mask ``(B, P)`` bool (False on left padding): its
    rollouts and the uses reading them attend to the real prompt tokens only (runtime.generate, runtime.modules
    .row_kwargs). Without it every prompt token is attended."""
    return f"prompt_mask:{use}"


def document_mask(segments: Any, causal: bool = True) -> Any:
    """The attention mask of rows with segment ids ``segments`` ``(B, S)``: ``(B, 1, S, S)`` bool, True where query
    i may attend to key j: same nonzero segment (and j <= i when ``causal``); a padding query attends to itself only,
    so no row of scores is empty. The ``attn_mask`` of ``torch.nn.functional.scaled_dot_product_attention``."""
    import torch

    same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)
    size = segments.shape[1]
    allowed = same | torch.eye(size, dtype=torch.bool, device=segments.device)
    if causal:
        allowed &= torch.ones(size, size, dtype=torch.bool, device=segments.device).tril()
    return allowed[:, None]


def rejected_key(key: str) -> str:
    """The key of a preference pair's rejected sequence for ``key`` (a use name for the ids, or one of the keys
    above): ``targets[rejected_key(u)]`` are the rejected ids, ``targets[rejected_key(labels_key(u))]`` its labels."""
    return f"rejected:{key}"


# --------------------------------------------------------------------------- tokenizers


@functools.lru_cache(maxsize=8)
def load_tokenizer(folder: str, where: str) -> Any:
    """The tokenizer saved in ``folder``, loaded offline (``AutoTokenizer.from_pretrained(local_files_only=True)``);
    a DataError naming ``where`` and the folder when there is none or it does not load, or when it has neither a pad
    nor an eos token (rows are padded with the pad token, else eos)."""
    check_tokenizer_folder(folder, where)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # transformers raises many types for a broken folder
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise DataError(f"{where} ({folder}): the tokenizer does not load ({type(exc).__name__}: {first_line}). "
                        "Save it again with save_pretrained.") from None
    if pad_id(tokenizer) is None:
        raise DataError(f"{where} ({folder}): the tokenizer has no pad or eos token, so rows cannot be padded. Set "
                        "tokenizer.pad_token and save it again.")
    return tokenizer


def pad_id(tokenizer: Any) -> int | None:
    """The id rows are padded with: the pad token's, else the eos token's."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def vocab_size(tokenizer: Any) -> int:
    """Number of ids the tokenizer can produce (its vocabulary and added tokens)."""
    return len(tokenizer)


# --------------------------------------------------------------------------- documents


@dataclass(frozen=True)
class Document:
    """One encoded document: ids and, aligned with them, the labels a next-token loss learns (IGNORE_INDEX where it
    learns nothing)."""

    ids: tuple[int, ...]
    labels: tuple[int, ...]

    def truncated(self, length: int) -> Document:
        return Document(self.ids[:length], self.labels[:length])


def encode_text(tokenizer: Any, text: str) -> Document:
    """``text`` with the tokenizer's special tokens (a BOS where it adds one) and an eos at the end (when the tokenizer
    has one); every token is learned."""
    ids = list(tokenizer(text)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return Document(tuple(ids), tuple(ids))


def encode_completion(tokenizer: Any, prompt: str, completion: str) -> Document:
    """``prompt`` then ``completion`` (as :func:`encode_text` would join them), learning the completion only."""
    head = list(tokenizer(prompt)["input_ids"])
    tail = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not tail or tail[-1] != eos):
        tail.append(eos)
    return Document(tuple(head + tail), tuple([IGNORE_INDEX] * len(head) + tail))


def encode_chat(tokenizer: Any, messages: list[dict[str, str]], at: str) -> Document:
    """A conversation rendered with the tokenizer's chat template, learning the assistant turns only.

    A template that marks the generated text (``{% generation %}``) says what is learned: transformers' assistant
    token mask. Otherwise the assistant spans are found by rendering prefixes: turn i's text is what
    ``messages[:i + 1]`` adds to ``messages[:i]`` rendered with the generation prompt (so the role header is not
    learned, the end-of-turn marker is), and tokens whose first character falls in a span are learned. A DataError
    naming ``at`` when the tokenizer has no chat template, or when an unmarked template does not render a
    conversation's prefixes as prefixes of the whole."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise DataError(f"{at}: the tokenizer has no chat_template, which format chat renders conversations with. "
                        "Use a tokenizer that has one, or format text.")
    if isinstance(template, str) and GENERATION_TAG.search(template):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids = list(out["input_ids"])
        return Document(tuple(ids), tuple(i if m else IGNORE_INDEX for i, m in zip(ids, out["assistant_masks"])))
    render = functools.partial(tokenizer.apply_chat_template, tokenize=False)
    full = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], add_generation_prompt=True), render(messages[: i + 1])
        if not (full.startswith(through) and through.startswith(before)):
            raise DataError(f"{at}: the tokenizer's chat template does not render this conversation incrementally "
                            f"(turn {i}'s prefix is not a prefix of the whole), so its assistant tokens cannot be "
                            "found. Use a template that renders earlier turns unchanged, or one that marks them "
                            "with {% generation %}.")
        spans.append((len(before), len(through)))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    starts = [a for a, _ in spans]
    labels = []
    for token, (first, last) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        k = bisect.bisect_right(starts, first) - 1
        learned = k >= 0 and first < spans[k][1] and last > first
        labels.append(token if learned else IGNORE_INDEX)
    return Document(tuple(encoded["input_ids"]), tuple(labels))


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class TokenRow:
    """One row of a token use: ids, labels, position ids and segment ids, each of the row's length."""

    ids: list[int]
    labels: list[int]
    positions: list[int]
    segments: list[int]


def padded_row(doc: Document, seq_len: int, pad: int) -> TokenRow:
    """``doc`` truncated to ``seq_len`` and padded with ``pad`` (labels IGNORE_INDEX, segment 0 there); its first
    token is never learned (nothing predicts it)."""
    doc = doc.truncated(seq_len)
    fill = seq_len - len(doc.ids)
    labels = [IGNORE_INDEX, *doc.labels[1:]] if doc.ids else []
    return TokenRow(list(doc.ids) + [pad] * fill, labels + [IGNORE_INDEX] * fill,
                    list(range(seq_len)), [1] * len(doc.ids) + [0] * fill)


def packed_length(docs: list[Document], seq_len: int) -> int:
    """Tokens the packed stream of ``docs`` holds: each document truncated to ``seq_len``."""
    return sum(min(len(d.ids), seq_len) for d in docs)


def packed_row(docs: list[Document], order: tuple[int, ...], ends: list[int], row: int, seq_len: int,
               pad: int) -> TokenRow:
    """Row ``row`` of the packed stream: the documents ``docs[order[0]], docs[order[1]], ...`` (each truncated to
    ``seq_len``) concatenated and cut into rows of ``seq_len``; ``ends[k]`` is the stream offset where the k-th of
    them ends (cumulative lengths). A document cut at a row boundary continues in the next row (its positions
    continue; it is a new segment there). The last row is padded."""
    first, stop = row * seq_len, (row + 1) * seq_len
    out = TokenRow([], [], [], [])
    k = bisect.bisect_right(ends, first)
    segment = 0
    while k < len(order) and len(out.ids) < seq_len:
        doc = docs[order[k]].truncated(seq_len)
        begin = ends[k] - len(doc.ids)
        lo, hi = max(first, begin) - begin, min(stop, ends[k]) - begin
        segment += 1
        out.ids.extend(doc.ids[lo:hi])
        out.labels.extend(IGNORE_INDEX if j == 0 else doc.labels[j] for j in range(lo, hi))
        out.positions.extend(range(lo, hi))
        out.segments.extend([segment] * (hi - lo))
        k += 1
    fill = seq_len - len(out.ids)
    out.ids.extend([pad] * fill)
    out.labels.extend([IGNORE_INDEX] * fill)
    out.positions.extend(range(fill))
    out.segments.extend([0] * fill)
    return out
