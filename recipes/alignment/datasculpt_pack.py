"""DataSculpt's core (arXiv 2409.00997), numpy only: a locally fitted embedding model, spherical k-means, the packers
(plain first-fit, concatenate-and-cut, DataSculpt's greedy multi-objective assignment) and the packing metrics.

A packing is a list of windows; each window a list of :data:`Piece` ``(doc, start, stop)``: tokens ``[start, stop)``
of document ``doc``. Every packer places each token of every document exactly once: a document longer than the
window's ``capacity`` is cut into capacity-sized chunks first (the paper's preprocessing splits documents at the
context length), so a document either sits whole in one window or counts as truncated (its pieces in several).

The embedding model is LSA: TF-IDF over the corpus's words (sublinear tf, smoothed idf, the ``max_features`` most
frequent words) projected on the top ``dims`` right singular vectors of the TF-IDF matrix, rows L2-normalised, so a
dot product is a cosine. It stands in for the paper's BGE-M3 (no pretrained encoder can be downloaded here); it is
fitted on the corpus being packed, as an "embedding model created locally".
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Piece = tuple[int, int, int]  # (document index, first token, one past the last token)
WORD = re.compile(r"\w+")


# --------------------------------------------------------------------------- the embedding model


@dataclass(frozen=True)
class Embedding:
    """A fitted LSA model: ``vocab`` (word -> column), ``idf`` (V,), ``components`` (dims, V)."""

    vocab: dict[str, int]
    idf: np.ndarray
    components: np.ndarray

    def tfidf(self, texts: Sequence[str]) -> np.ndarray:
        """(N, V) float32: (1 + log tf) * idf per known word, rows L2-normalised (a row of zeros for no known word)."""
        x = np.zeros((len(texts), len(self.vocab)), dtype=np.float32)
        for i, text in enumerate(texts):
            for word, n in Counter(WORD.findall(text.lower())).items():
                j = self.vocab.get(word)
                if j is not None:
                    x[i, j] = 1.0 + np.log(n)
        x *= self.idf
        return _normalise(x)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(N, dims) float32 unit vectors (zero for a text without a known word)."""
        return _normalise(self.tfidf(texts) @ self.components.T)


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def fit_embedding(texts: Sequence[str], dims: int = 32, max_features: int = 2048) -> Embedding:
    """LSA fitted on ``texts`` (module docstring). The right singular vectors come from the eigenvectors of the
    (V, V) Gram matrix ``X^T X``, so memory grows with the vocabulary, not the corpus."""
    df = Counter(word for text in texts for word in set(WORD.findall(text.lower())))
    words = sorted(df, key=lambda w: (-df[w], w))[:max_features]
    vocab = {w: j for j, w in enumerate(sorted(words))}
    n = len(texts)
    idf = np.array([np.log((1 + n) / (1 + df[w])) + 1.0 for w in sorted(words)], dtype=np.float32)
    model = Embedding(vocab, idf, np.zeros((0, len(vocab)), dtype=np.float32))
    gram = np.zeros((len(vocab), len(vocab)), dtype=np.float64)
    for start in range(0, n, 1024):
        x = model.tfidf(texts[start:start + 1024]).astype(np.float64)
        gram += x.T @ x
    values, vectors = np.linalg.eigh(gram)  # ascending
    top = vectors[:, ::-1][:, :min(dims, len(vocab))].T
    top *= np.where(top.sum(axis=1, keepdims=True) < 0, -1.0, 1.0)  # a deterministic sign per component
    return Embedding(vocab, idf, top.astype(np.float32))


def kmeans(x: np.ndarray, k: int, seed: int = 0, iterations: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means of unit rows ``x``: (labels (N,), unit centres (k, d)); k-means++ seeding by cosine
    distance, then assign to the most similar centre and re-normalise the means until nothing moves."""
    rng = np.random.default_rng(seed)
    k = max(1, min(k, len(x)))
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        dist = np.clip(1.0 - np.max(x @ np.array(centres).T, axis=1), 0.0, None)
        total = dist.sum()
        centres.append(x[rng.choice(len(x), p=dist / total)] if total > 0 else x[rng.integers(len(x))])
    c = np.array(centres)
    labels = np.full(len(x), -1)
    for _ in range(iterations):
        new = np.argmax(x @ c.T, axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = x[labels == j]
            if len(members):
                c[j] = _normalise(members.sum(axis=0, keepdims=True))[0]
    return labels, c


# --------------------------------------------------------------------------- packers


def pieces(lengths: Sequence[int], capacity: int) -> list[Piece]:
    """Each document as one piece, or capacity-sized chunks when it is longer than ``capacity`` (corpus order)."""
    out = []
    for doc, n in enumerate(lengths):
        out += [(doc, s, min(s + capacity, n)) for s in range(0, max(n, 1), capacity)] if n > capacity else [(doc, 0, n)]
    return out


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[Piece]]:
    """Plain first-fit: pieces in corpus order, each into the first window with room, else a new window."""
    windows: list[list[Piece]] = []
    room: list[int] = []
    for piece in pieces(lengths, capacity):
        size = piece[2] - piece[1]
        w = next((i for i, r in enumerate(room) if r >= size), None)
        if w is None:
            windows.append([])
            room.append(capacity)
            w = len(windows) - 1
        windows[w].append(piece)
        room[w] -= size
    return windows


def concat_cut(lengths: Sequence[int], capacity: int) -> list[list[Piece]]:
    """Concatenate the corpus in order and cut every ``capacity`` tokens (Loom's ``pack: true``; the usual
    pre-training packing): full windows, documents cut at every window boundary."""
    windows: list[list[Piece]] = [[]]
    room = capacity
    for doc, n in enumerate(lengths):
        start = 0
        while start < n:
            if room == 0:
                windows.append([])
                room = capacity
            take = min(room, n - start)
            windows[-1].append((doc, start, start + take))
            start, room = start + take, room - take
    return windows


@dataclass(frozen=True)
class Weights:
    """The greedy assignment's objective weights: a piece goes to the open window with room that maximises
    ``similarity * cos(window centroid, doc) + cluster * [same cluster] + fill * size / room`` (relevance,
    homogeneity, utilisation as best fit); integrity is a hard constraint (a piece is never cut to fit). A new window
    opens when none has room, or when the best score is below ``open_below`` while fewer windows are open than the
    tokens need at ``target`` utilisation (1.0: the least number of windows that can hold them, so that seeding new
    windows for relevance never costs utilisation below that count; measured against first-fit in
    bench/results/alignment-datasculpt.md)."""

    similarity: float = 1.0
    cluster: float = 0.5
    fill: float = 0.25
    open_below: float = 1.0
    target: float = 1.0


def datasculpt(lengths: Sequence[int], emb: np.ndarray, labels: np.ndarray, capacity: int,
               weights: Weights = Weights()) -> list[list[Piece]]:
    """DataSculpt's greedy semantic packing: pieces longest first (the paper's largest-fit order), clusters from
    :func:`kmeans`, each piece to the best-scoring window (:class:`Weights`); a window's centroid is the running mean
    of its documents' embeddings and its cluster that of the document that opened it."""
    todo = sorted(pieces(lengths, capacity), key=lambda p: (-(p[2] - p[1]), p[0], p[1]))
    budget = int(np.ceil(sum(lengths) / (capacity * weights.target)))
    dims = emb.shape[1]
    sums = np.zeros((len(todo), dims), dtype=np.float64)
    room = np.zeros(len(todo), dtype=np.int64)
    cluster = np.zeros(len(todo), dtype=np.int64)
    windows: list[list[Piece]] = []
    for piece in todo:
        doc, size = piece[0], piece[2] - piece[1]
        n = len(windows)
        best, score = None, -np.inf
        if n:
            fits = room[:n] >= size
            if fits.any():
                norms = np.linalg.norm(sums[:n], axis=1)
                cos = sums[:n] @ emb[doc] / np.where(norms > 0, norms, 1.0)
                scores = (weights.similarity * cos + weights.cluster * (cluster[:n] == labels[doc])
                          + weights.fill * size / np.maximum(room[:n], 1))
                scores[~fits] = -np.inf
                best = int(np.argmax(scores))
                score = float(scores[best])
        if best is None or (score < weights.open_below and n < budget):
            best = n
            windows.append([])
            room[best], cluster[best] = capacity, labels[doc]
        windows[best].append(piece)
        room[best] -= size
        sums[best] += emb[doc]
    return [sorted(w, key=lambda p: (p[0], p[1])) for w in windows]


# --------------------------------------------------------------------------- metrics


def metrics(windows: Sequence[Sequence[Piece]], lengths: Sequence[int], capacity: int, emb: np.ndarray,
            topics: Sequence[str] | None = None) -> dict[str, float]:
    """``utilisation`` (document tokens / (windows x capacity)), ``truncation_rate`` (documents whose tokens sit in
    more than one window / documents), ``similarity`` (per window of 2+ documents, the mean pairwise cosine of its
    documents' embeddings; averaged over those windows), ``topic_purity`` (the same with 1 for a pair of one topic,
    when ``topics`` are known), ``windows`` and ``docs_per_window``."""
    placed = sum(p[2] - p[1] for w in windows for p in w)
    spread = Counter(p[0] for w in windows for p in w)
    sims, purity = [], []
    for w in windows:
        docs = sorted({p[0] for p in w})
        if len(docs) < 2:
            continue
        e = emb[docs]
        gram = e @ e.T
        pairs = len(docs) * (len(docs) - 1)
        sims.append(float((gram.sum() - np.trace(gram)) / pairs))
        if topics is not None:
            same = sum(topics[a] == topics[b] for a in docs for b in docs if a != b)
            purity.append(same / pairs)
    out = {"utilisation": placed / (len(windows) * capacity) if windows else 0.0,
           "truncation_rate": sum(1 for d in spread if spread[d] > 1) / max(len(lengths), 1),
           "similarity": float(np.mean(sims)) if sims else 0.0, "windows": float(len(windows)),
           "docs_per_window": sum(len({p[0] for p in w}) for w in windows) / max(len(windows), 1)}
    if topics is not None:
        out["topic_purity"] = float(np.mean(purity)) if purity else 0.0
    return out
