"""Data-mixture detection's estimator (numpy, torch-free): a multinomial naive Bayes domain classifier, its
confusion matrix, and the mixture estimated from classified generations with the confusion corrected.

A model trained on a mixture ``p`` of domains generates, unconditionally, documents whose domain marginal is ``p``
(it fits the mixture by maximum likelihood). A classifier with confusion matrix ``C`` (``C[i, j]`` = P(predicted j |
true domain i), measured on held-out labelled text) turns that into predicted proportions ``q = C^T p``; counting
gives ``q``, and :func:`correct` solves ``C^T p = q`` for ``p`` on the probability simplex (the label-shift
correction; exact when ``q`` is exactly ``C^T p`` and ``C`` is invertible).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

TOKEN = re.compile(r"\w+|[^\w\s]")


def features(text: str) -> Counter:
    """Word unigrams and bigrams (so that structure, ``1 .`` against ``1 plus``, counts as well as vocabulary)."""
    words = TOKEN.findall(text.lower())
    return Counter(words) + Counter(f"{a} {b}" for a, b in zip(words, words[1:]))


@dataclass(frozen=True)
class NaiveBayes:
    """Multinomial naive Bayes with add-``alpha`` smoothing and a uniform prior (the classifier must not carry the
    reference set's domain balance into the counts it produces)."""

    domains: tuple[str, ...]
    vocab: dict[str, int]
    log_likelihood: np.ndarray  # (domains, vocab + 1): the last column is an unseen feature's

    @classmethod
    def fit(cls, texts: Sequence[str], labels: Sequence[str], alpha: float = 0.5) -> NaiveBayes:
        domains = tuple(sorted(set(labels)))
        vocab: dict[str, int] = {}
        rows = []
        for text in texts:
            f = features(text)
            for key in f:
                vocab.setdefault(key, len(vocab))
            rows.append(f)
        counts = np.zeros((len(domains), len(vocab) + 1))
        for f, label in zip(rows, labels):
            d = domains.index(label)
            for key, n in f.items():
                counts[d, vocab[key]] += n
        counts += alpha
        return cls(domains, vocab, np.log(counts / counts.sum(axis=1, keepdims=True)))

    def predict(self, texts: Sequence[str]) -> list[str]:
        """Each text's most likely domain (ties and texts without features: the first domain in sorted order)."""
        out = []
        unseen = len(self.vocab)
        for text in texts:
            score = np.zeros(len(self.domains))
            for key, n in features(text).items():
                score += n * self.log_likelihood[:, self.vocab.get(key, unseen)]
            out.append(self.domains[int(np.argmax(score))])
        return out


def confusion(truth: Sequence[str], predicted: Sequence[str], domains: Sequence[str]) -> np.ndarray:
    """``C[i, j]`` = share of the texts of domain i predicted as j (rows sum to 1; a domain without texts: identity)."""
    c = np.zeros((len(domains), len(domains)))
    for t, p in zip(truth, predicted):
        c[domains.index(t), domains.index(p)] += 1
    totals = c.sum(axis=1, keepdims=True)
    return np.where(totals > 0, c / np.where(totals > 0, totals, 1), np.eye(len(domains)))


def project_simplex(v: np.ndarray) -> np.ndarray:
    """The Euclidean projection of ``v`` onto {p >= 0, sum p = 1} (sort-based, Held et al.)."""
    u = np.sort(v)[::-1]
    cumulative = np.cumsum(u) - 1.0
    k = np.nonzero(u - cumulative / np.arange(1, len(v) + 1) > 0)[0][-1]
    return np.maximum(v - cumulative[k] / (k + 1), 0.0)


def correct(observed: np.ndarray, c: np.ndarray) -> np.ndarray:
    """The mixture ``p`` whose predicted proportions ``C^T p`` are ``observed``: the least-squares solution (with the
    sum-to-one row), projected on the simplex when it leaves it."""
    a = np.vstack([c.T, np.ones(len(c))])
    b = np.append(observed, 1.0)
    p, *_ = np.linalg.lstsq(a, b, rcond=None)
    return p if (p >= 0).all() else project_simplex(p)


def estimate(predicted: Sequence[str], c: np.ndarray, domains: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(raw counted proportions, confusion-corrected proportions) of the ``predicted`` labels."""
    counts = Counter(predicted)
    raw = np.array([counts[d] for d in domains], dtype=float) / max(len(predicted), 1)
    return raw, correct(raw, c)


def mae(estimated: np.ndarray, truth: Mapping[str, float], domains: Sequence[str]) -> float:
    """Mean absolute error over ``domains`` (proportions, 0.05 = 5 points)."""
    return float(np.mean([abs(e - truth.get(d, 0.0)) for e, d in zip(estimated, domains)]))
