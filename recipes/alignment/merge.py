"""Merging fine-tuned models (Baichuan Alignment §2.4: domain SFT checkpoints merged before RL; Model Stock best).

    python -m recipes.alignment.merge METHOD OUT BASE MODEL [MODEL ...] [--weights W ...] [--scale L]

Each MODEL is a Hugging Face folder as ``loom run`` exports a trained pretrained component (``OUT/export/<name>``,
runtime.export) or as ``save_pretrained`` writes one; BASE is the folder they were all fine-tuned from. Methods, per
tensor (one weight of one layer: how MergeKit applies them):

- ``linear``: the weighted mean of the models (weights default equal; normalised to sum 1);
- ``task_arithmetic``: ``base + scale * sum_i w_i (model_i - base)`` (Ilharco et al. 2023; weights default 1);
- ``model_stock``: ``t * mean(models) + (1 - t) * base`` with ``t = k cos(theta) / (1 + (k - 1) cos(theta))``, k the
  number of models and ``cos(theta)`` the mean pairwise cosine between their deltas ``model_i - base`` (Jang et al.,
  "Model Stock", arXiv 2403.19522, Eq. in §3: the perpendicular foot of the fine-tuned centre on the plane through
  the base). Deltas of zero norm count as aligned (cos = 1).

The output folder is the first model's with merged weights (config, tokenizer and the rest copied), so a later
``pretrained:`` or ``from_pretrained`` reads it. Every model must hold the same tensor names and shapes as the base:
anything else is refused in one line (MergeError).

In a phased job (docs/job-spec.md, Phases) the step ``merge`` runs it between phases (:func:`merge_step`, registered
by recipes/alignment/__init__.py): ``{method, component, base, models, weights, scale}``, ``models`` usually earlier
phases' ``@<phase>/model``; it writes ``model`` (``OUT/<phase>/export/<component>/``).
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from planner.errors import LoomError
from planner.pretrained import INDEX_FILE, SINGLE_FILE, tensor_files
from runtime.pretrained import read_tensors

METHODS = ("linear", "task_arithmetic", "model_stock")


class MergeError(LoomError):
    """Models that cannot be merged: a missing folder, different tensors or shapes, bad weights."""


def linear(models: Sequence[torch.Tensor], base: torch.Tensor, weights: Sequence[float], scale: float) -> torch.Tensor:
    """Weighted mean of ``models`` (weights normalised to sum 1); ``base`` and ``scale`` are unused."""
    total = sum(weights)
    return sum(w / total * m for w, m in zip(weights, models))


def task_arithmetic(models: Sequence[torch.Tensor], base: torch.Tensor, weights: Sequence[float],
                    scale: float) -> torch.Tensor:
    """``base + scale * sum_i w_i (model_i - base)``."""
    return base + scale * sum(w * (m - base) for w, m in zip(weights, models))


def stock_ratio(models: Sequence[torch.Tensor], base: torch.Tensor) -> float:
    """Model Stock's interpolation ratio ``t = k cos / (1 + (k - 1) cos)``, cos the mean pairwise cosine of the deltas
    (1 for a single model or zero deltas: the average itself)."""
    deltas = [(m - base).flatten().double() for m in models]
    k = len(deltas)
    cosines = []
    for a, b in itertools.combinations(deltas, 2):
        norms = a.norm() * b.norm()
        cosines.append(float(a @ b / norms) if norms > 0 else 1.0)
    cos = sum(cosines) / len(cosines) if cosines else 1.0
    return k * cos / (1 + (k - 1) * cos)


def model_stock(models: Sequence[torch.Tensor], base: torch.Tensor, weights: Sequence[float],
                scale: float) -> torch.Tensor:
    """``t * mean(models) + (1 - t) * base``, t from :func:`stock_ratio` (weights and scale unused)."""
    t = stock_ratio(models, base)
    return t * torch.stack(list(models)).mean(dim=0) + (1 - t) * base


MERGERS: dict[str, Callable[..., torch.Tensor]] = {"linear": linear, "task_arithmetic": task_arithmetic,
                                                   "model_stock": model_stock}


def _names(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise MergeError(f"{what} ({folder}): no such folder; give a model folder (config.json and safetensors), "
                         "e.g. a run's OUT/export/<component>.")
    files = tensor_files(folder)
    if not files:
        raise MergeError(f"{what} ({folder}): no safetensors weights in the folder; give a folder save_pretrained "
                         "or `loom run` export wrote.")
    return files


def merge_tensors(method: str, models: Sequence[dict[str, torch.Tensor]], base: dict[str, torch.Tensor],
                  weights: Sequence[float] | None = None, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Every tensor of ``base`` merged from ``models`` (same names and shapes) by ``method`` (one of METHODS)."""
    if method not in MERGERS:
        raise MergeError(f"method ('{method}') is not a merge method; use one of {', '.join(METHODS)}.")
    weights = list(weights) if weights is not None else [1.0] * len(models)
    if len(weights) != len(models) or (method == "linear" and sum(weights) <= 0):
        raise MergeError(f"--weights ({weights}): need one weight per model ({len(models)}), summing to more than 0.")
    out = {}
    for name, b in base.items():
        parts = [m[name] for m in models]
        out[name] = MERGERS[method](parts, b, weights, scale).to(b.dtype)
    return out


def merge_folders(method: str, out: str | Path, base: str | Path, models: Sequence[str | Path],
                  weights: Sequence[float] | None = None, scale: float = 1.0) -> Path:
    """Merge model folders ``models`` fine-tuned from ``base`` into folder ``out`` (module docstring); returns it."""
    from safetensors.torch import save_file

    if not models:
        raise MergeError("models: none given; name at least one fine-tuned model folder.")
    base_files = _names(Path(base), "base")
    for i, folder in enumerate(models):
        names = _names(Path(folder), f"models[{i}]")
        if set(names) != set(base_files):
            diff = sorted(set(names) ^ set(base_files))[:3]
            raise MergeError(f"models[{i}] ({folder}): its tensors differ from the base's (e.g. {diff}); merge only "
                             "models fine-tuned from that base.")
    names = sorted(base_files)
    base_t = read_tensors(base, names)
    loaded = [read_tensors(folder, names) for folder in models]
    for i, tensors in enumerate(loaded):
        bad = next((n for n in names if tensors[n].shape != base_t[n].shape), None)
        if bad is not None:
            raise MergeError(f"models[{i}] ({models[i]}): tensor {bad} has shape {tuple(loaded[i][bad].shape)}, the "
                             f"base's {tuple(base_t[bad].shape)}; merge only models of the base's architecture.")
    merged = merge_tensors(method, loaded, base_t, weights, scale)
    target, first = Path(out), Path(models[0])
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for path in first.iterdir():  # config, tokenizer, generation config: everything but the weights
        if path.is_file() and path.name != INDEX_FILE and not path.name.endswith(".safetensors"):
            shutil.copy2(path, tmp / path.name)
    save_file({k: v.contiguous() for k, v in merged.items()}, str(tmp / SINGLE_FILE), metadata={"format": "pt"})
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


STEP_ARGS = ("method", "component", "base", "models", "weights", "scale")


def check_merge_args(args: dict, base: Path | None) -> None:
    """The ``merge`` step's args, torch-free (the orchestrator runs it before anything runs): a ValueError naming the
    argument. ``component``, ``models`` and ``weights`` as the built-in ``average`` checks them."""
    from planner.pipeline import check_average, check_known_args, check_model_arg, is_finite_number

    check_known_args(args, STEP_ARGS, "merge")
    if args.get("method") not in METHODS:
        raise ValueError(f"method ({args.get('method')!r}): expected one of {', '.join(METHODS)}. Fix the value.")
    check_model_arg("base", args.get("base"), base, "the from_pretrained folder every model was fine-tuned from")
    scale = args.get("scale", 1.0)
    if not is_finite_number(scale):
        raise ValueError(f"scale ({scale!r}): expected a finite number (task_arithmetic's delta scale). Fix the "
                         "value.")
    check_average({k: args[k] for k in ("component", "models", "weights") if k in args}, base)


def merge_step(ctx) -> None:
    """Step ``merge`` (given a planner.pipeline.StepContext): :func:`merge_folders` of ``models`` over ``base`` into
    ``OUT/<phase>/export/<component>/``; a MergeError (one line) when the folders cannot be merged."""
    from planner.pipeline import MODEL

    args = ctx.args
    merge_folders(args["method"], ctx.artifact(MODEL) / args["component"], ctx.path(args["base"]),
                  [ctx.path(m) for m in args["models"]], args.get("weights"), float(args.get("scale", 1.0)))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.alignment.merge", description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=METHODS)
    parser.add_argument("out", help="folder to write the merged model into")
    parser.add_argument("base", help="the model folder every MODEL was fine-tuned from")
    parser.add_argument("models", nargs="+", help="fine-tuned model folders")
    parser.add_argument("--weights", type=float, nargs="+", help="one per model (linear, task_arithmetic)")
    parser.add_argument("--scale", type=float, default=1.0, help="task_arithmetic: the deltas' scale (default 1)")
    args = parser.parse_args(argv)
    try:
        folder = merge_folders(args.method, args.out, args.base, args.models, args.weights, args.scale)
    except MergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {folder} ({args.method} of {len(args.models)} models over {args.base})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
