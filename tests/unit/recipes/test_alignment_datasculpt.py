"""recipes.alignment.datasculpt: the packers' invariants, DataSculpt's similarity against first-fit on a clustered
corpus, the step's files and args, the pipeline."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from orchestrator.recipes import import_recipe
from orchestrator.steps import STEPS, StepContext, check_step_args
from planner.errors import SpecError
from recipes.alignment import datasculpt, datasculpt_pack as pack, make

import_recipe("alignment")  # its phase steps (PHASE_STEPS), as loom registers them for a job naming the recipe

WINDOW = 64


@pytest.fixture(scope="module")
def corpus():
    docs = datasculpt.synthetic_corpus(3, 300, WINDOW)
    texts = [d["text"] for d in docs]
    emb = pack.fit_embedding(texts, 16).embed(texts)
    labels, _ = pack.kmeans(emb, 8, seed=3)
    return docs, [len(t.split()) for t in texts], emb, labels


def placed_tokens(windows, lengths, capacity):
    """Every token of every document is placed exactly once and no window holds more than ``capacity``."""
    covered = {d: [] for d in range(len(lengths))}
    for w in windows:
        assert sum(e - s for _, s, e in w) <= capacity
        for d, s, e in w:
            assert 0 <= s < e <= lengths[d]
            covered[d].append((s, e))
    for d, spans in covered.items():
        spans.sort()
        assert spans[0][0] == 0 and spans[-1][1] == lengths[d], d
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), (d, spans)
    return covered


@pytest.mark.parametrize("packer", ["first_fit", "concat_cut", "datasculpt"])
def test_every_token_is_placed_once_within_the_window(corpus, packer):
    docs, lengths, emb, labels = corpus
    capacity = WINDOW - 1
    windows = (pack.datasculpt(lengths, emb, labels, capacity) if packer == "datasculpt"
               else getattr(pack, packer)(lengths, capacity))
    covered = placed_tokens(windows, lengths, capacity)
    cut = sum(len(spans) > 1 for spans in covered.values())
    m = pack.metrics(windows, lengths, capacity, emb)
    assert m["truncation_rate"] == pytest.approx(cut / len(lengths))
    assert m["utilisation"] == pytest.approx(sum(lengths) / (len(windows) * capacity))
    if packer != "concat_cut":  # only documents longer than the window are cut
        assert cut == sum(n > capacity for n in lengths) > 0


def test_datasculpt_packs_related_documents_at_first_fits_utilisation(corpus):
    docs, lengths, emb, labels = corpus
    topics = [d["topic"] for d in docs]
    capacity = WINDOW - 1
    ours = pack.metrics(pack.datasculpt(lengths, emb, labels, capacity), lengths, capacity, emb, topics)
    base = pack.metrics(pack.first_fit(lengths, capacity), lengths, capacity, emb, topics)
    assert ours["utilisation"] >= base["utilisation"] - 1e-9
    assert ours["similarity"] > base["similarity"] + 0.2
    assert ours["topic_purity"] > 2 * base["topic_purity"]  # the known labels agree with the embedding


def test_the_embedding_and_clusters_recover_the_topics(corpus):
    docs, _, emb, labels = corpus
    topics = [d["topic"] for d in docs]
    same = np.array([[a == b for b in topics] for a in topics])
    gram = emb @ emb.T
    assert gram[same].mean() > gram[~same].mean() + 0.3
    purity = sum(Counter(t for t, c in zip(topics, labels) if c == k).most_common(1)[0][1] for k in set(labels))
    assert purity / len(topics) > 0.8


def test_the_step_writes_text_rows_of_the_packed_windows(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in datasculpt.synthetic_corpus(1, 120, 48)))
    args = {"corpus": "corpus.jsonl", "window": 48, "clusters": 5, "dims": 8}
    check_step_args("datasculpt", args, "phases[0].args", tmp_path)
    metrics = STEPS["datasculpt"].run(StepContext("pack", args | {"corpus": str(corpus)}, tmp_path / "pack", tmp_path))
    assert set(metrics) <= set(STEPS["datasculpt"].metrics) and metrics["similarity"] > metrics["firstfit_similarity"]
    rows = [json.loads(line) for line in (tmp_path / "pack" / "data" / "train.jsonl").read_text().splitlines()]
    windows = [json.loads(line) for line in (tmp_path / "pack" / "data" / "windows.jsonl").read_text().splitlines()]
    assert len(rows) == len(windows) == metrics["windows"]
    assert all(len(r["text"].split()) == w["tokens"] <= 47 for r, w in zip(rows, windows))
    for bad, match in [({"window": 4}, r"phases\[0\]\.args\.window \(4\): expected a whole number in 8\.\."),
                       ({"corpus": "none.jsonl"}, r"args\.corpus \('none.jsonl'\): no such JSONL file"),
                       ({"tokenizer": "nowhere"}, r"args\.tokenizer \('nowhere'\): no such tokenizer folder"),
                       ({"extra": 1}, r"args\.extra: unknown argument of step 'datasculpt'")]:
        with pytest.raises(SpecError, match=match):
            check_step_args("datasculpt", args | bad, "phases[0].args", tmp_path)
    corpus.write_text('{"text": "one"}\n{"txt": "two"}\n')
    with pytest.raises(ValueError, match=r"line 2 has no non-empty string \"text\""):
        datasculpt.read_corpus(corpus)


def test_the_pipeline_is_checked_whole():
    from orchestrator.pipeline import read_pipeline

    pipeline = read_pipeline(make.HERE / "pipeline" / "datasculpt-tiny.yaml")
    assert [(p.name, p.spec.step) for p in pipeline.phases] == [("pack", "datasculpt"), ("pretrain", None)]
    assert pipeline.phases[1].job.tasks[0].components[0].seq_len == pipeline.phases[0].spec.args["window"]
