"""Batches of the diffusion recipe's reward-model tasks: (prompt, better image, worse image) pairs of one category.

A reward-model task (loss ``itercomp_<category>``, :data:`LOSSES`) has three root uses and two leaves
(:func:`pair_layout`): two image uses of one image tower (the first in the task's list reads the better image, the
second the worse), one token use (the prompt's words, recipes.diffusion.shapes.tokenize), and two leaf uses, one fed
by each image use (both usually one scoring component fed by the image and the prompt). The batch holds
``inputs[better]`` and ``inputs[worse]`` ``(B, C, I, I)`` float32 (pixels mapped from [0, 1] to [-1, 1]) and
``inputs[prompt]`` ``(B, S)`` long; ``labels`` are zeros (the pair's order is the label).

Rows: split ``train`` takes prompt ``step * batch_size + row`` of the category's synthetic gallery and one of its
pairs chosen by the row's seed (a prompt whose images all tie is replaced by the next one); ``heldout`` enumerates
the pairs of a separate stream of prompts in order (recipes.diffusion.evaluate scores them). With ``data_dir`` the
rows come from a real gallery folder instead (recipes.diffusion.folder).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from planner.components import resolve_shape
from planner.spec import JobSpec
from planner.usegraph import leaf_uses, root_uses, upstream_uses, use_component
from recipes.diffusion.feedback import denoise_batch, feedback_batch
from recipes.diffusion.gallery import Ranking, minimal_pair, pairs, synthetic_entry
from recipes.diffusion.shapes import CATEGORIES, tokenize
from runtime.data import TaskBatch
from runtime.kinds import image_channels
from runtime.modules import stable_seed

LOSSES = {f"itercomp_{category}": category for category in CATEGORIES}
# the feedback phase's tasks: loss feedback (reward_model scorers), the planned DAG's loss (recipes.diffusion.feedback_loss)
# and the denoising task beside them
PROMPT_BATCHES = {"feedback": feedback_batch, "itercomp_feedback": feedback_batch, "mse": denoise_batch}
MINIMAL_EVERY = 2  # every second training row is a minimal pair (0: gallery pairs only)
MAX_REDRAWS = 64  # prompts tried for one training row before giving up (all-tied prompts are rare)


@dataclass(frozen=True)
class PairLayout:
    """Which uses of a reward-model task read what: image uses, prompt use, the leaf scored for each image."""

    category: str
    better: str
    worse: str
    prompt: str
    better_leaf: str
    worse_leaf: str
    side: int  # image side of the image uses
    channels: int
    seq_len: int  # the prompt use's token count


def _path(job: JobSpec, t: int) -> str:
    return f"tasks[{t}] ('{job.tasks[t].name}')"


def _ancestors(upstream: dict[str, list[str]], use: str) -> set[str]:
    seen, todo = set(), [use]
    while todo:
        for up in upstream[todo.pop()]:
            if up not in seen:
                seen.add(up)
                todo.append(up)
    return seen | {use}


def pair_layout(job: JobSpec, t: int) -> PairLayout:
    """The :class:`PairLayout` of task ``t``; a ValueError naming the task and what it needs otherwise."""
    task = job.tasks[t]
    if task.loss not in LOSSES:
        raise ValueError(f"{_path(job, t)}.loss ('{task.loss}') is not a loss of recipe diffusion; expected one of "
                         f"{', '.join(LOSSES)}.")
    roots = root_uses(job, t)
    kinds = {name: use_component(job, t, name)[1].kind for name in roots}
    images = [name for name in roots if kinds[name] == "vit"]
    texts = [name for name in roots if kinds[name] != "vit"]
    leaves = leaf_uses(job, t)
    upstream = upstream_uses(task)
    fed = {leaf: [img for img in images if img in _ancestors(upstream, leaf)] for leaf in leaves}
    if len(images) != 2 or len(texts) != 1 or len(leaves) != 2 or sorted(len(f) for f in fed.values()) != [1, 1] \
            or fed[leaves[0]] == fed[leaves[1]]:
        raise ValueError(
            f"{_path(job, t)}.components: a reward-model task needs two root image (vit) uses (better, then worse), "
            f"one root prompt use and two leaf uses each fed by one image use; it has roots {kinds} and leaves "
            f"{ {leaf: f for leaf, f in fed.items()} }. See recipes/diffusion/itercomp-tiny.yaml.")
    better_leaf = next(leaf for leaf in leaves if fed[leaf] == [images[0]])
    worse_leaf = next(leaf for leaf in leaves if fed[leaf] == [images[1]])
    shapes = {use.use_name: resolve_shape(job.components[use.component], use.component, use,
                                          f"tasks[{t}].components[{u}]")
              for u, use in enumerate(task.components) if use.use_name in (images[0], texts[0])}
    vision = use_component(job, t, images[0])[1]
    if use_component(job, t, images[1])[0] != use_component(job, t, images[0])[0]:
        raise ValueError(f"{_path(job, t)}.components: uses '{images[0]}' and '{images[1]}' must be the same image "
                         "component (one reward model scores both images of a pair).")
    return PairLayout(LOSSES[task.loss], images[0], images[1], texts[0], better_leaf, worse_leaf,
                      shapes[images[0]].image_size, image_channels(vision), shapes[texts[0]].seq_len)


def pixels(images: list[np.ndarray], side: int, channels: int) -> torch.Tensor:
    """``(B, channels, side, side)`` float32 in [-1, 1] from ``(3, I, I)`` images in [0, 1] (resized bilinearly when
    ``I != side``)."""
    if not images:
        return torch.zeros(0, channels, side, side)
    x = torch.from_numpy(np.stack(images)) * 2.0 - 1.0
    if x.shape[-1] != side:
        x = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", antialias=True)
    if channels != x.shape[1]:
        x = x.mean(dim=1, keepdim=True).expand(-1, channels, -1, -1)
    return x.contiguous()


def pair_batch(layout: PairLayout, rows: list[tuple[Ranking, int, int]], first_row: int = 0) -> TaskBatch:
    """The batch of ``rows`` (ranking, better image index, worse image index)."""
    better = pixels([r.images[b] for r, b, _ in rows], layout.side, layout.channels)
    worse = pixels([r.images[w] for r, _, w in rows], layout.side, layout.channels)
    ids = np.stack([tokenize(r.prompt.text, layout.seq_len) for r, _, _ in rows]) if rows else \
        np.zeros((0, layout.seq_len), dtype=np.int64)
    inputs = {layout.better: better, layout.worse: worse, layout.prompt: torch.from_numpy(ids)}
    return TaskBatch(inputs, torch.zeros(len(rows)), len(rows), first_row=first_row)


def train_row(seed: int, category: str, index: int) -> tuple[Ranking, int, int]:
    """Training row ``index``: every :data:`MINIMAL_EVERY`-th row (odd rows) a minimal pair
    (recipes.diffusion.gallery.minimal_pair), the others a pair of the first gallery prompt from ``index`` on (in
    steps of a large stride) whose images do not all tie, chosen by the row's seed."""
    if MINIMAL_EVERY and index % MINIMAL_EVERY == MINIMAL_EVERY - 1:
        for attempt in range(MAX_REDRAWS):
            ranking = minimal_pair(seed, "train", category, index + attempt * (1 << 40))
            if len(ranking.places) == 2:
                return ranking, ranking.places[0][0], ranking.places[1][0]
    for attempt in range(MAX_REDRAWS):
        ranking = synthetic_entry(seed, "train", category, index + attempt * (1 << 40))
        candidates = pairs(ranking.places)
        if candidates:
            rng = np.random.default_rng(stable_seed("diffusion-pair", seed, category, index))
            better, worse = candidates[int(rng.integers(len(candidates)))]
            return ranking, better, worse
    raise RuntimeError(f"{MAX_REDRAWS} prompts in a row without a pair: the gallery's generators all agree.")


def heldout_rows(seed: int, category: str, count: int, rankings=None) -> list[tuple[Ranking, int, int]]:
    """The first ``count`` held-out pairs: every pair of held-out prompt 0, then 1, ... (``rankings``: an iterable
    of rankings instead of the synthetic held-out stream)."""
    out: list[tuple[Ranking, int, int]] = []
    source = rankings if rankings is not None else (synthetic_entry(seed, "heldout", category, i)
                                                    for i in range(1 << 30))
    for ranking in source:
        out += [(ranking, b, w) for b, w in pairs(ranking.places)]
        if len(out) >= count:
            break
    return out[:count]


def job_batch(job: JobSpec, t: int, step: int, start: int, stop: int, split: str = "train") -> TaskBatch:
    """The recipe's dataset (runtime.data.register_dataset): rows ``[start, stop)`` of task ``t`` at ``step`` (a
    feedback task's prompts and a denoising task's exact images: recipes.diffusion.feedback)."""
    if job.tasks[t].loss in PROMPT_BATCHES:  # the feedback phase's tasks (recipes.diffusion.feedback)
        return PROMPT_BATCHES[job.tasks[t].loss](job, t, step, start, stop)
    layout = pair_layout(job, t)
    size = job.tasks[t].batch_size
    if not 0 <= start <= stop <= (size if split == "train" else 1 << 30):
        raise ValueError(f"{_path(job, t)}: sample range [{start}, {stop}) is outside its batch of {size}.")
    if job.data_dir is not None:
        from recipes.diffusion.folder import folder_rows  # local: only real galleries read files

        return pair_batch(layout, folder_rows(job.data_dir, split, layout.category, job.training.seed, step, size,
                                              start, stop), start)
    if split == "train":
        rows = [train_row(job.training.seed, layout.category, step * size + row) for row in range(start, stop)]
    elif split == "heldout":
        rows = heldout_rows(job.training.seed, layout.category, (step + 1) * size)[step * size + start:
                                                                                      step * size + stop]
    else:
        raise ValueError(f"split ('{split}') is not a split of recipe diffusion; use train or heldout.")
    return pair_batch(layout, rows, start)
