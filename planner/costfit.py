"""Fits of what ``loom profile`` measures outside the layers, pure numpy (the planner stays torch-free).

- :func:`alpha_beta`: a link's per-message latency and seconds per byte, ``t = alpha + beta * bytes``, least squares
  of the relative errors over the measured (bytes, seconds) points with both terms >= 0. Two points give the line through them; one point a
  line through the origin.
- :func:`fit_step`: an optimizer step ``t = a + b * params + c * tensors`` (a per-step cost, a per-parameter cost and a
  per-tensor cost: the kernel launches AdamW pays for every tensor it updates, which dominate a small model's step),
  least squares over measured (params, tensors, seconds) points with every term >= 0.

Both are non-negative least squares over at most three unknowns, solved exactly by trying every set of free terms
(:func:`nonneg_lstsq`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np


def nonneg_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The ``w >= 0`` minimising ``|x w - y|``: the best least-squares solution over every subset of free columns whose
    solution is non-negative (the others held at 0). For the few columns the fits here have."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    best, best_res = np.zeros(x.shape[1]), float(np.sum(y * y))
    for k in range(1, x.shape[1] + 1):
        for cols in itertools.combinations(range(x.shape[1]), k):
            w, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
            if (w < 0).any():
                continue
            res = float(np.sum((x[:, cols] @ w - y) ** 2))
            if res < best_res - 1e-30:
                best, best_res = np.zeros(x.shape[1]), res
                best[list(cols)] = w
    return best


def alpha_beta(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(latency seconds, seconds per byte) of a link from its (bytes, seconds) points (module docstring)."""
    if not points:
        raise ValueError("alpha_beta: no points")
    if len(points) == 1:
        x0, t0 = points[0]
        return 0.0, t0 / x0
    xs = np.array([p[0] for p in points], dtype=float)
    ts = np.array([p[1] for p in points], dtype=float)
    # relative errors: each point counts alike, so the small messages pin the latency rather than the largest one's
    # noise deciding it (a fit to absolute errors could put the latency at 0 and price a small bucket at nothing)
    alpha, beta = nonneg_lstsq(np.stack([np.ones_like(xs), xs], axis=1) / ts[:, None], np.ones_like(ts))
    return float(alpha), float(beta)


def fit_step(points: Sequence[tuple[float, float, float]]) -> tuple[float, float, float]:
    """(seconds per step, per parameter, per tensor) of an optimizer from (params, tensors, seconds) points."""
    if not points:
        raise ValueError("fit_step: no points")
    data = np.array(points, dtype=float)
    # scale the columns to comparable sizes (parameters run to millions, tensors to hundreds) before solving
    x = np.stack([np.ones(len(data)), data[:, 0], data[:, 1]], axis=1)
    scale = np.maximum(np.abs(x).max(axis=0), 1e-30)
    w = nonneg_lstsq(x / scale, data[:, 2]) / scale
    return float(w[0]), float(w[1]), float(w[2])
