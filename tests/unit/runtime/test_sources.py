"""runtime.sources (tasks[].data): every format's batch layout, masks and packing, sharding and resume determinism,
each bad input as one DataError line, and a task with data training through the single-process reference."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from planner.spec import parse_job
from runtime import sources
from runtime.data import task_batch
from runtime.heads import NUM_CLASSES, build_head
from runtime.source_files import NUM_LABEL_CLASSES, DataError, check_data_files
from runtime.tokenizer import IGNORE_INDEX, labels_key, load_tokenizer, positions_key, rejected_key, segments_key

ROOT = Path(__file__).resolve().parents[3]
CHAT = ROOT / "examples" / "data" / "chat.jsonl"
SEQ, BATCH = 24, 8


def _make_tokenizer_module():
    spec = importlib.util.spec_from_file_location("make_tokenizer", ROOT / "examples" / "make_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    make = _make_tokenizer_module()
    texts = make.corpus_texts(CHAT) + ["the cat sat on the mat", "a dog ran far", "good bad answer question thing",
                                       "square bar"]
    return make.build_tokenizer(tmp_path_factory.mktemp("tok"), texts)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(str(tok_dir), "test")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def lm_job(data: dict, batch: int = BATCH, seq: int = SEQ, vocab: int = 128, seed: int = 3, loss: str = "lm"):
    return parse_job(lm_doc(data, batch, seq, vocab, seed, loss))


def lm_doc(data: dict, batch: int = BATCH, seq: int = SEQ, vocab: int = 128, seed: int = 3, loss: str = "lm") -> dict:
    return ({
        "name": "src", "training": {"seed": seed, "lr": 3e-3, "precision": "fp32"},
        "components": {"lm": {"kind": "llama", "num_layers": 1, "hidden_size": 32, "num_heads": 4, "seq_len": seq,
                              "vocab_size": vocab}},
        "tasks": [{"name": "t", "batch_size": batch, "loss": loss, "components": [{"component": "lm"}], "data": data}],
        "cluster": {"device": "cpu", "devices_per_node": 1},
    })


def learned(tok, batch, row: int, use: str = "lm") -> list[str]:
    labels = batch.targets[labels_key(use)][row]
    return tok.convert_ids_to_tokens([int(i) for i in labels if i != IGNORE_INDEX])


# --------------------------------------------------------------------------- formats


def test_text_rows_are_padded_with_eos_and_labels_ignore_padding(tmp_path, tok, tok_dir) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"body": "the cat sat on the mat"}, {"body": "a dog ran far"}])
    job = lm_job({"format": "text", "path": str(path), "tokenizer": str(tok_dir), "text_field": "body",
                  "shuffle": False}, batch=2, seq=10)
    b = task_batch(job, 0, 0, 0, 2)
    ids, labels = b.inputs["lm"], b.targets[labels_key("lm")]
    assert ids.shape == (2, 10) and ids.dtype == torch.long
    assert tok.convert_ids_to_tokens(ids[1].tolist()) == ["a", "dog", "ran", "far", "<eos>"] + ["<pad>"] * 5
    assert labels[1].tolist() == [IGNORE_INDEX, *ids[1, 1:5].tolist()] + [IGNORE_INDEX] * 5  # first token unpredicted
    assert b.targets[segments_key("lm")][1].tolist() == [1] * 5 + [0] * 5
    assert b.targets[positions_key("lm")][0].tolist() == list(range(10))
    assert b.labels.shape == (2,)


def test_chat_learns_only_the_assistant_turns(tmp_path, tok, tok_dir) -> None:
    convo = [{"role": "system", "content": "answer in one short sentence ."},
             {"role": "user", "content": "what colour is the sky ?"},
             {"role": "assistant", "content": "the sky is blue ."},
             {"role": "user", "content": "what is one plus two ?"},
             {"role": "assistant", "content": "one plus two is three ."}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": convo}])
    job = lm_job({"format": "chat", "path": str(path), "tokenizer": str(tok_dir)}, batch=1, seq=64)
    b = task_batch(job, 0, 0, 0, 1)
    assert learned(tok, b, 0) == ["the", "sky", "is", "blue", ".", "<|im_end|>",
                                  "one", "plus", "two", "is", "three", ".", "<|im_end|>"]
    rendered = tok.apply_chat_template(convo, tokenize=False)
    n = int(b.targets[segments_key("lm")][0].sum())
    assert tok.convert_ids_to_tokens(b.inputs["lm"][0, :n].tolist()) == tok.convert_ids_to_tokens(
        tok(rendered, add_special_tokens=False)["input_ids"])


def test_chat_templates_that_mark_generation_or_rewrite_earlier_turns(tmp_path, tok_dir) -> None:
    """A template with {% generation %} says what is learned (transformers' assistant mask), even when it renders
    earlier assistant turns differently; the same template unmarked cannot be split into turns and is refused."""
    from runtime.tokenizer import encode_chat

    tok = load_tokenizer(str(tok_dir), "test")
    marked = tok.__class__.from_pretrained(str(tok_dir))
    rewrite = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
               "{% if loop.last %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}"
               "{% generation %}.<|im_end|>{% endgeneration %}{% endif %}{% else %}{{ m['content'] }}<|im_end|>"
               "{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    marked.chat_template = rewrite
    convo = [{"role": "user", "content": "what is one plus two ?"}, {"role": "assistant", "content": "three ."},
             {"role": "user", "content": "what colour is the sky ?"}, {"role": "assistant", "content": "blue ."}]
    doc = encode_chat(marked, convo, "x")
    assert marked.convert_ids_to_tokens([i for i in doc.labels if i != IGNORE_INDEX]) == [
        ".", "<|im_end|>", "blue", ".", "<|im_end|>"]
    marked.chat_template = rewrite.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    with pytest.raises(DataError, match="x: the tokenizer's chat template does not render this conversation "
                                        "incrementally"):
        encode_chat(marked, convo, "x")


def test_preference_rows_carry_both_sequences_and_scores(tmp_path, tok, tok_dir) -> None:
    rows = [{"prompt": "what colour is the sky ?", "chosen": "blue .", "rejected": "green .", "score_chosen": 0.9,
             "score_rejected": 0.1},
            {"prompt": "what is one plus one ?", "chosen": "two .", "rejected": "three ."}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    job = lm_job({"format": "preference", "path": str(path), "tokenizer": str(tok_dir), "shuffle": False}, batch=2)
    b = task_batch(job, 0, 0, 0, 2)
    assert learned(tok, b, 0) == ["blue", ".", "<eos>"]
    rejected = b.targets[rejected_key(labels_key("lm"))][0]
    assert tok.convert_ids_to_tokens([int(i) for i in rejected if i != IGNORE_INDEX]) == ["green", ".", "<eos>"]
    assert torch.equal(b.inputs["lm"][0, :6], b.targets[rejected_key("lm")][0, :6])  # the same prompt, 6 tokens
    assert b.targets[rejected_key("lm")][0, 6] != b.inputs["lm"][0, 6]
    for key in (positions_key("lm"), segments_key("lm")):
        assert b.targets[rejected_key(key)].shape == (2, SEQ)
    assert b.targets["score_chosen"][0].item() == pytest.approx(0.9)
    assert math.isnan(b.targets["score_chosen"][1].item()) and math.isnan(b.targets["score_rejected"][1].item())


def image_folder(tmp_path: Path, n: int = 4) -> Path:
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    rows = []
    for i in range(n):
        colour = (255, 0, 0) if i % 2 else (0, 0, 255)
        Image.new("RGB", (10 + i, 7), colour).save(folder / "sub" / f"{i}.png")
        rows.append({"image": f"sub/{i}.png", "label": i % 2, "caption": "a red thing" if i % 2 else "a blue thing"})
    write_jsonl(folder / "manifest.jsonl", rows)
    return folder


def clip_job(folder: Path, tok_dir: Path, loss: str = "contrastive", batch: int = 4, **data):
    uses = [{"component": "img"}, {"component": "txt", "after": []}] if loss == "contrastive" else [
        {"component": "img"}]
    return parse_job({
        "name": "img", "training": {"seed": 1, "precision": "fp32"},
        "components": {
            "img": {"kind": "vit", "num_layers": 1, "hidden_size": 32, "num_heads": 4, "patch_size": 4,
                    "image_size": 8},
            "txt": {"kind": "transformer", "num_layers": 1, "hidden_size": 32, "num_heads": 4, "seq_len": 6,
                    "vocab_size": 128},
        },
        "tasks": [{"name": "t", "batch_size": batch, "loss": loss, "components": uses,
                   "data": {"format": "images", "path": str(folder), "tokenizer": str(tok_dir), "shuffle": False,
                            **data}}],
    })


def test_images_are_resized_normalised_and_carry_labels_and_captions(tmp_path, tok, tok_dir) -> None:
    folder = image_folder(tmp_path)
    b = task_batch(clip_job(folder, tok_dir, "cross_entropy"), 0, 0, 0, 4)
    images = b.inputs["img"]
    assert images.shape == (4, 3, 8, 8) and images.dtype == torch.float32
    assert torch.allclose(images[1, 0], torch.ones(8, 8)) and torch.allclose(images[1, 2], -torch.ones(8, 8))
    assert torch.allclose(images[0, 2], torch.ones(8, 8))  # blue: [0, 1] pixels to [-1, 1]
    assert b.labels.tolist() == [0, 1, 0, 1] and b.labels.dtype == torch.long
    clip = task_batch(clip_job(folder, tok_dir), 0, 0, 0, 4)
    assert tok.convert_ids_to_tokens(clip.inputs["txt"][1, :4].tolist()) == ["a", "red", "thing", "<eos>"]


def test_image_normalisation_follows_a_pretrained_preprocessor(tmp_path) -> None:
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.25, 0.0],
                                                                   "image_std": [0.5, 0.25, 1.0]}))
    assert sources.image_normalisation(str(tmp_path)) == ((0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    assert sources.image_normalisation(None) == ((0.5,), (0.5,))


# --------------------------------------------------------------------------- packing


def test_packed_rows_are_the_documents_in_epoch_order_with_segments_and_positions(tmp_path, tok, tok_dir) -> None:
    texts = ["the cat sat", "a dog ran far", "the mat", "good answer", "bad question the cat", "far"]
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    seq = 8
    job = lm_job({"format": "text", "path": str(path), "tokenizer": str(tok_dir), "pack": True}, batch=2, seq=seq)
    source = sources._source(type(job), job.model_dump_json(), 0)
    docs = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
    total = sum(len(d) for d in docs)
    assert source.rows_per_epoch == math.ceil(total / seq)
    rows = source.rows_per_epoch
    b = task_batch(job, 0, 0, 0, 2)
    steps = [task_batch(job, 0, s, 0, 2) for s in range(math.ceil(rows / 2))]
    ids = torch.cat([s.inputs["lm"] for s in steps])[:rows].reshape(-1)
    segs = torch.cat([s.targets[segments_key("lm")] for s in steps])[:rows].reshape(-1)
    order = source._order(0)
    stream = [i for k in order for i in docs[k]]
    assert ids[:total].tolist() == stream and (segs[total:] == 0).all()
    assert (ids[total:] == tok.pad_token_id).all()
    pos = b.targets[positions_key("lm")][0].tolist()
    seg = b.targets[segments_key("lm")][0].tolist()
    first = docs[order[0]]
    assert pos[:len(first)] == list(range(len(first))) and pos[len(first)] == 0
    assert seg[:len(first)] == [1] * len(first) and seg[len(first)] == 2
    labels = b.targets[labels_key("lm")][0].tolist()
    starts = [j for j in range(seq) if pos[j] == 0]
    assert all(labels[j] == IGNORE_INDEX for j in starts)  # no prediction crosses a document boundary
    assert all(labels[j] == b.inputs["lm"][0, j].item() for j in range(seq) if j not in starts)


def test_document_mask_stops_attention_at_document_boundaries() -> None:
    from runtime.tokenizer import document_mask

    segments = torch.tensor([[1, 1, 2, 2, 2, 0]])
    mask = document_mask(segments)[0, 0]
    assert mask.shape == (6, 6)
    assert mask[1].tolist() == [True, True, False, False, False, False]
    assert mask[4].tolist() == [False, False, True, True, True, False]
    assert mask[5].tolist() == [False] * 5 + [True]  # padding sees itself only: no empty row of scores
    assert document_mask(segments, causal=False)[0, 0, 2].tolist() == [False, False, True, True, True, False]
    q = k = v = torch.randn(1, 1, 6, 4)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(segments))
    alone = torch.nn.functional.scaled_dot_product_attention(q[:, :, 2:5], k[:, :, 2:5], v[:, :, 2:5], is_causal=True)
    torch.testing.assert_close(out[:, :, 2:5], alone)  # the second document as if it were alone


def test_packed_chat_keeps_assistant_masks(tok, tok_dir) -> None:
    job = lm_job({"format": "chat", "path": str(CHAT), "tokenizer": str(tok_dir), "pack": True}, batch=4, seq=48)
    b = task_batch(job, 0, 2, 0, 4)
    assert (b.targets[segments_key("lm")] > 0).all()  # full rows
    words = " ".join(learned(tok, b, 1))
    assert "<|im_end|>" in words and "what" not in words and "user" not in words


# --------------------------------------------------------------------------- sharding and resume


@pytest.mark.parametrize("pack", [False, True])
def test_shards_equal_the_rows_of_the_whole_batch(tok_dir, pack) -> None:
    job = lm_job({"format": "chat", "path": str(CHAT), "tokenizer": str(tok_dir), "pack": pack})
    whole = task_batch(job, 0, 5, 0, BATCH)
    parts = [task_batch(job, 0, 5, 0, 4), task_batch(job, 0, 5, 4, 8)]
    assert parts[1].first_row == 4
    for key, tensor in whole.inputs.items():
        assert torch.equal(torch.cat([p.inputs[key] for p in parts]), tensor)
    for key, tensor in whole.targets.items():
        assert torch.equal(torch.cat([p.targets[key] for p in parts]), tensor), key


def test_resume_reads_what_an_uninterrupted_run_reads(tok_dir) -> None:
    job = lm_job({"format": "chat", "path": str(CHAT), "tokenizer": str(tok_dir)})
    for step in range(7):
        task_batch(job, 0, step, 0, BATCH)
    after = task_batch(job, 0, 7, 0, BATCH)
    sources._source.cache_clear()  # a fresh process: nothing remembered but the step
    resumed = task_batch(job, 0, 7, 0, BATCH)
    assert torch.equal(after.inputs["lm"], resumed.inputs["lm"])
    assert torch.equal(after.targets[labels_key("lm")], resumed.targets[labels_key("lm")])


def test_each_epoch_visits_every_row_once_in_its_own_seeded_order(tmp_path, tok_dir) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"the cat {w}"} for w in ("sat", "ran", "far", "mat", "dog")])
    job = lm_job({"format": "text", "path": str(path), "tokenizer": str(tok_dir)}, batch=5)
    epochs = [task_batch(job, 0, e, 0, 5).inputs["lm"][:, 2] for e in range(3)]  # the varying word, one per row
    assert all(sorted(e.tolist()) == sorted(epochs[0].tolist()) for e in epochs)
    assert not all(torch.equal(e, epochs[0]) for e in epochs[1:])
    other_seed = lm_job({"format": "text", "path": str(path), "tokenizer": str(tok_dir)}, batch=5, seed=4)
    fixed = lm_job({"format": "text", "path": str(path), "tokenizer": str(tok_dir), "shuffle": False}, batch=5)
    assert task_batch(fixed, 0, 1, 0, 5).inputs["lm"][:, 2].tolist() == task_batch(fixed, 0, 0, 0, 5).inputs["lm"][
        :, 2].tolist()
    assert not torch.equal(task_batch(other_seed, 0, 0, 0, 5).inputs["lm"], task_batch(job, 0, 0, 0, 5).inputs["lm"])


# --------------------------------------------------------------------------- losses


def test_next_token_head_learns_only_the_labelled_tokens(tok_dir) -> None:
    job = lm_job({"format": "chat", "path": str(CHAT), "tokenizer": str(tok_dir)}, batch=2)
    head, b = build_head(job, 0), task_batch(job, 0, 0, 0, 2)
    hidden = torch.randn(2, SEQ, 32)
    got = head({"lm": hidden}, b)
    logits = head.out(head.normed(hidden[:, :-1]))
    targets = b.targets[labels_key("lm")][:, 1:]
    for row in range(2):
        keep = targets[row] != IGNORE_INDEX
        expected = torch.nn.functional.cross_entropy(logits[row][keep], targets[row][keep])
        torch.testing.assert_close(got[row], expected)


def test_a_chat_task_trains_through_the_reference(tok_dir) -> None:
    from runtime.reference import ReferenceTrainer

    job = lm_job({"format": "chat", "path": str(CHAT), "tokenizer": str(tok_dir)}, seq=32)
    trainer = ReferenceTrainer(job)
    losses = [trainer.train_step(step)["t"] for step in range(12)]
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0], losses


def test_label_classes_agree_with_the_heads() -> None:
    assert NUM_LABEL_CLASSES == NUM_CLASSES


def test_every_format_is_declared_checked_and_encoded() -> None:
    from planner.data_spec import DATA_FORMATS, DataFormat
    from runtime.source_files import FORMATS

    assert set(DATA_FORMATS) == set(DataFormat.__args__) == set(FORMATS) == set(sources.ENCODERS)


# --------------------------------------------------------------------------- bad input


def check(job) -> str:
    """The one-line DataError of the start-up check (``loom run``'s), after the torch-free one agrees."""
    sources._source.cache_clear()
    with pytest.raises(DataError) as err:
        sources.check_data(job)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_files_and_folders(tmp_path, tok_dir) -> None:
    missing = tmp_path / "no.jsonl"
    assert check(lm_job({"format": "chat", "path": str(missing), "tokenizer": str(tok_dir)})).startswith(
        f"tasks[0].data.path ({missing}): no such file; format chat reads a JSONL file.")
    assert "no such folder" in check(clip_job(tmp_path / "nowhere", tok_dir))
    (tmp_path / "empty").mkdir()
    assert "tasks[0].data.manifest" in check(clip_job(tmp_path / "empty", tok_dir))


@pytest.mark.parametrize("marker", ["dataset_info.json", "dataset_dict.json"])
def test_a_dataset_saved_with_save_to_disk_is_refused_pointing_at_jsonl(tmp_path, tok_dir, marker) -> None:
    """What datasets' save_to_disk writes (a Dataset: data-*.arrow, dataset_info.json, state.json; a DatasetDict:
    dataset_dict.json and a folder per split) is refused in one line saying how to write it as JSONL."""
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / marker).write_text("{}")
    (saved / "data-00000-of-00001.arrow").write_bytes(b"\xff\xff\xff\xff")
    for fmt in ("text", "chat"):
        message = check(lm_job({"format": fmt, "path": str(saved), "tokenizer": str(tok_dir)}))
        assert message.startswith(f"tasks[0].data.path ({saved}): a dataset saved with the datasets library's "
                                  "save_to_disk, which Loom does not read"), message
        assert ".to_json('data.jsonl', lines=True)" in message
    assert "save_to_disk" in check(clip_job(saved, tok_dir))


def test_invalid_json_names_the_file_and_line(tmp_path, tok_dir) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "the cat"}, "", '{"text": "a dog",}'])
    message = check(lm_job({"format": "text", "path": str(path), "tokenizer": str(tok_dir)}))
    assert f"({path}): line 3 is not valid JSON" in message and "Fix or remove the line" in message
    with pytest.raises(DataError, match="line 3 is not valid JSON"):
        check_data_files(lm_job({"format": "text", "path": str(path), "tokenizer": str(tok_dir)}))


def test_chat_without_an_assistant_turn_names_its_line(tmp_path, tok_dir) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "the cat"}]},
                                              {"messages": [{"role": "user", "content": "hello"}]}])
    assert "line 2: the conversation has no assistant turn" in check(
        lm_job({"format": "chat", "path": str(path), "tokenizer": str(tok_dir)}))


def test_missing_and_mistyped_fields(tmp_path, tok_dir) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "the cat"}, {"txt": "a dog"}])
    assert "line 2: no 'text' field" in check(lm_job({"format": "text", "path": str(path), "tokenizer": str(tok_dir)}))
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": 3}])
    assert "'rejected' is int" in check(lm_job({"format": "preference", "path": str(path), "tokenizer": str(tok_dir)}))
    folder = image_folder(tmp_path)
    write_jsonl(folder / "manifest.jsonl", [{"image": "sub/0.png", "label": 12, "caption": "a"}])
    assert "'label' (12) is outside [0, 10)" in check(clip_job(folder, tok_dir, "cross_entropy"))


def test_missing_tokenizer_names_the_folder(tmp_path, tok_dir) -> None:
    missing = tmp_path / "no-tokenizer"
    assert f"tasks[0].data.tokenizer ({missing}): no such tokenizer folder" in check(
        lm_job({"format": "chat", "path": str(CHAT), "tokenizer": str(missing)}))
    missing.mkdir()
    assert "holds no tokenizer" in check(lm_job({"format": "chat", "path": str(CHAT), "tokenizer": str(missing)}))
    (missing / "tokenizer.json").write_bytes(bytes(range(128, 256)))  # what `loom run` alone used to refuse
    assert f"{missing / 'tokenizer.json'}: not a tokenizer file (not UTF-8 text)" in check(
        lm_job({"format": "chat", "path": str(CHAT), "tokenizer": str(missing)}))
    (missing / "tokenizer.json").write_text("[1, 2]")
    assert "not a tokenizer file (a JSON list, not an object)" in check(
        lm_job({"format": "chat", "path": str(CHAT), "tokenizer": str(missing)}))
    assert "has no pretrained folder" in check(lm_job({"format": "chat", "path": str(CHAT)}))
    with pytest.raises(DataError, match="components.lm .* has no pretrained folder"):  # loom validate's check too
        check_data_files(lm_job({"format": "chat", "path": str(CHAT)}))


def test_validate_and_run_agree_on_which_uses_read_text(tmp_path, tok_dir) -> None:
    from runtime.source_files import _text_uses

    folder = image_folder(tmp_path)
    jobs = [(lm_job({"format": "chat", "path": str(CHAT), "tokenizer": str(tok_dir)}), ["lm"]),
            (clip_job(folder, tok_dir), ["txt"]), (clip_job(folder, tok_dir, "cross_entropy"), [])]
    for job, expected in jobs:
        source = sources.TaskSource(job, 0)
        components = [sources.use_component(job, 0, use)[0] for use in source.token_uses]
        assert _text_uses(job, 0) == components == expected


def test_tokenizer_larger_than_the_embedding(tok_dir) -> None:
    message = check(lm_job({"format": "chat", "path": str(CHAT), "tokenizer": str(tok_dir)}, vocab=16))
    assert "components.lm embeds 16 (vocab_size)" in message and "vocab_size >=" in message


def test_unreadable_image_and_a_path_outside_the_folder(tmp_path, tok_dir) -> None:
    folder = image_folder(tmp_path)
    (folder / "sub" / "1.png").write_bytes(b"not a png")
    assert "line 2: image" in check(clip_job(folder, tok_dir)) and "cannot be read" in check(clip_job(folder, tok_dir))
    write_jsonl(folder / "manifest.jsonl", [{"image": "../outside.png", "caption": "a"}])
    assert "points outside the folder" in check(clip_job(folder, tok_dir))


def test_format_that_does_not_fit_the_task(tmp_path, tok_dir) -> None:
    assert "trains a next-token loss" in check(
        lm_job({"format": "chat", "path": str(CHAT), "tokenizer": str(tok_dir)}, loss="cross_entropy"))
    job = parse_job({"name": "f", "components": {"m": {"kind": "mlp", "num_layers": 1, "hidden_size": 8}},
                     "tasks": [{"name": "t", "batch_size": 2, "loss": "mse", "components": [{"component": "m"}],
                                "data": {"format": "text", "path": str(CHAT)}}]})
    assert "reads features inputs" in check(job)
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    packed_pairs = lm_job({"format": "preference", "path": str(pairs), "tokenizer": str(tok_dir), "pack": True})
    assert check(packed_pairs) == ("tasks[0].data.pack (true): format preference rows are not packed; remove `pack`, "
                                   "or use format text or chat.")
    with pytest.raises(DataError, match="rows are not packed"):
        check_data_files(packed_pairs)  # loom validate's check
    path = write_jsonl(tmp_path / "l.jsonl", [{"text": "the cat", "label": 1}])
    assert "has no one label for loss cross_entropy" in check(
        lm_job({"format": "text", "path": str(path), "tokenizer": str(tok_dir), "pack": True}, loss="cross_entropy"))


def test_loom_validate_and_run_refuse_bad_data_in_one_line(tmp_path, tok_dir) -> None:
    from orchestrator.cli import app
    from orchestrator.run_inputs import check_runnable_job

    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    spec = tmp_path / "job.yaml"  # a relative data path is read from the spec's folder
    spec.write_text(yaml.safe_dump(lm_doc({"format": "chat", "path": "bad.jsonl", "tokenizer": str(tok_dir)})))
    result = CliRunner().invoke(app, ["validate", str(spec)])
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: tasks[0].data.path ({path}): line 1: the conversation has no assistant "
                                     "turn, so nothing to learn (the loss covers assistant turns only). Add one or "
                                     "remove the line.")
    with pytest.raises(DataError, match="no assistant turn"):
        check_runnable_job(lm_job({"format": "chat", "path": str(path), "tokenizer": str(tok_dir)}), None)


def test_an_image_folder_trains_a_captioner_and_a_classifier_through_the_reference(tmp_path, tok_dir) -> None:
    """A llama reads a ViT's 17 image tokens, then learns the caption; the ViT alone classifies the colour."""
    from runtime.reference import ReferenceTrainer

    folder, rows = tmp_path / "shapes", []
    folder.mkdir()
    colours = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 70, 230), "yellow": (230, 220, 40)}
    for n in range(16):
        name, shape = list(colours)[n % 4], ("square", "bar")[n // 8]
        img = Image.new("RGB", (16, 16))
        img.paste(colours[name], (2 + n % 3, 2, 12, 12 if shape == "square" else 6))
        img.save(folder / f"{n}.png")
        rows.append({"image": f"{n}.png", "label": n % 4, "caption": f"a {name} {shape} ."})
    write_jsonl(folder / "manifest.jsonl", rows)
    data = {"format": "images", "path": str(folder), "tokenizer": str(tok_dir)}
    job = parse_job({
        "name": "shapes", "training": {"seed": 0, "lr": 3e-3, "precision": "fp32"},
        "components": {
            "vision": {"kind": "vit", "num_layers": 1, "hidden_size": 32, "num_heads": 4, "patch_size": 4,
                       "image_size": 16},
            "lm": {"kind": "llama", "num_layers": 1, "hidden_size": 32, "num_heads": 4, "seq_len": 23,
                   "vocab_size": 128},
        },
        "tasks": [{"name": "caption", "batch_size": 8, "loss": "lm", "data": data,
                   "components": [{"component": "vision"}, {"component": "lm"}]},
                  {"name": "colour", "batch_size": 8, "loss": "cross_entropy", "data": data,
                   "components": [{"component": "vision"}]}],
    })
    batch = task_batch(job, 0, 0, 0, 8)
    assert batch.inputs["vision"].shape == (8, 3, 16, 16) and batch.inputs["lm"].shape == (8, 6)  # 23 - 17 positions
    trainer = ReferenceTrainer(job)
    losses = [trainer.train_step(step) for step in range(10)]
    for task in ("caption", "colour"):
        assert sum(s[task] for s in losses[-3:]) / 3 < 0.7 * losses[0][task], (task, losses)


def test_a_pretrained_llama_takes_its_tokenizer_from_its_folder(tmp_path) -> None:
    """No data.tokenizer: the tokenizer saved in the component's pretrained folder (examples/make_models.py's Llama,
    its vocabulary the tokenizer's size) encodes the chat, and the model trains on the assistant turns."""
    import sys

    from runtime.reference import ReferenceTrainer

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from make_models import save_llama
        from make_tokenizer import build_tokenizer, corpus_texts
    finally:
        sys.path.remove(str(ROOT / "examples"))
    folder = tmp_path / "llama"
    build_tokenizer(folder, corpus_texts(CHAT))
    save_llama(folder, vocab_size=len(load_tokenizer(str(folder), "test")), num_hidden_layers=1)
    job = parse_job({"name": "p", "training": {"lr": 3e-3, "precision": "fp32"},
                     "components": {"llm": {"pretrained": str(folder), "seq_len": 32}},
                     "tasks": [{"name": "sft", "batch_size": 4, "loss": "lm", "components": [{"component": "llm"}],
                                "data": {"format": "chat", "path": str(CHAT)}}]})
    check_data_files(job)
    sources.check_data(job)
    trainer = ReferenceTrainer(job)
    losses = [trainer.train_step(step)["sft"] for step in range(3)]
    assert losses[-1] < losses[0], losses


def test_packing_needs_a_causal_lm_on_plain_layers(tok_dir) -> None:
    """Only layers that keep attention within each document may read packed rows: a bidirectional encoder or a
    component the planner may put on megatron TP layers is refused at validation."""
    data = {"format": "text", "path": str(CHAT), "text_field": "messages", "tokenizer": str(tok_dir), "pack": True}
    for change, expected in [({"kind": "transformer"}, "components.lm is a transformer, whose attention does not stop"),
                             ({"tensor_parallel": [1, 2]}, "components.lm may run tensor parallel ([1, 2])")]:
        doc = lm_doc(data)
        doc["components"]["lm"] |= change
        for check_job in (check_data_files, sources.check_data):  # loom validate's check, and loom run's
            with pytest.raises(DataError, match=re.escape(f"tasks[0].data.pack (true): {expected}")):
                check_job(parse_job(doc))
