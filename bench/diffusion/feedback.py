"""``python -m bench.diffusion.feedback STAGE ...``: does IterComp's feedback move the oracle? Measured single-process.

Stages (each writes under ``--work``, so a loaded machine can run them one at a time or side by side):

* ``rm --seed S``: the three reward models of ``itercomp-tiny.yaml`` on the recipe's pretrained vision tower, their
  scoring layers and heads trained on cached tower outputs (bench.diffusion.scorers: ``--rows`` training rows per
  category, ``--rm-steps`` steps of 64 pairs), then loaded into the recipe's own reward models
  (recipes.diffusion.scorers.RewardModels: the job's modules, as the ``feedback`` step reads a ``loom run``'s
  ``model.pt``), whose held-out accuracy is measured again through them. Writes ``rm-S/model.pt``.
* ``feedback --seed S --unet FOLDER``: the base UNet (recipes.diffusion.generator, pretrained by the ``denoise``
  step's code) before and after ``--steps`` of IterComp's feedback (recipes.diffusion.steps.feedback_update, the
  ``feedback`` step's update) against ``rm-S``; per category the oracle's mean score and the share of samples it
  scores 1, on ``--prompts`` held-out prompts x ``--samples`` samples from the same seeded noise before and after,
  and the paired change with its standard error; sample grids. ``--grad-from`` moves where the step with gradient
  may fall, ``--reward-weight 0`` trains on the denoising loss alone (the control). Writes ``feedback-S/``.
* ``iterate --seed S``: IterComp's second iteration: the fine-tuned UNet's samples of training and held-out prompts
  join the gallery's rankings (ranked by the oracle), and the reward models' scoring layers train on again from
  ``rm-S`` on the old rows plus the pairs with a new image; their held-out accuracy on pairs with a new image and on
  the gallery's held-out pairs, before and after. Writes ``iterate-S-rmR/`` (``--rm-seed R``), the retrained
  scoring layers beside the records, so that a second feedback round can read them as ``rm-R``.
* ``report``: collects every seed into bench/results/diffusion-feedback.{json,md} and the grids into
  docs/recipes/img/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import write_results
from bench.diffusion.scorers import MODELS, Scorer, cached_pairs, fit, pair_arrays, tower_features
from recipes.diffusion import generator, oracle
from recipes.diffusion.shapes import CATEGORIES

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "recipes" / "diffusion" / "itercomp-tiny.yaml"
IMAGES = ROOT / "docs" / "recipes" / "img"


def rm_layers(category: str) -> int:
    """The scoring layers of ``category``'s reward model in the spec (its ``<category>_rm`` component)."""
    from recipes.diffusion.scorers import load_job

    return load_job(SPEC).components[f"{category}_rm"].num_layers


def load_into(rewards, category: str, scorer: Scorer) -> None:
    """Copy a bench scorer (its ``layers`` and ``head``) into ``rewards``' model of ``category`` (the spec's
    ``<category>_rm`` transformer and the task's head): the same modules, named per component and layer."""
    params = rewards.parameters()
    for name, value in scorer.named_parameters():
        part, rest = name.split(".", 1)
        key = (f"{category}_rm/{rest.replace('.', '/', 1)}" if part == "layers" else f"head:{category}/0/{rest}")
        params[key] = value.detach()
    rewards.trainer.load_parameters(params)


def rewards_accuracy(rewards, category: str, rows) -> float:
    """Held-out pairwise accuracy of ``rewards``' model of ``category`` on (ranking, better, worse) ``rows``."""
    arrays = pair_arrays(rows)
    from recipes.diffusion.shapes import parse_prompt

    prompts = [parse_prompt(str(t), category) for t in arrays["prompt"]]
    with torch.no_grad():
        better = rewards.reward(torch.from_numpy(arrays["better"].astype(np.float32)), prompts, category)
        worse = rewards.reward(torch.from_numpy(arrays["worse"].astype(np.float32)), prompts, category)
    return float((better > worse).float().mean())


def stage_base(args) -> None:
    """The base UNet: the ``denoise`` step's code (generator.pretrain on exact renders) from the recipe's random UNet,
    ``--base-steps`` steps of ``--base-batch`` prompts at ``--base-lr``. Writes ``base/unet``."""
    torch.set_num_threads(1)
    start, out = time.time(), args.work / "base"
    unet, text = generator.load_unet(MODELS / "unet"), generator.load_text(MODELS / "text")
    losses = generator.pretrain(unet, text, args.base_steps, args.base_batch, args.base_lr, 0,
                                CATEGORIES, lambda m: print(m, flush=True), cosine=args.base_schedule == "cosine")
    unet.save_pretrained(out / "unet")
    tail = max(len(losses) // 10, 1)
    record = {"steps": args.base_steps, "batch": args.base_batch, "lr": args.base_lr, "schedule": args.base_schedule,
              "loss_first": float(np.mean(losses[:tail])), "loss_last": float(np.mean(losses[-tail:])),
              "wall_s": round(time.time() - start, 1)}
    (out / "record.json").write_text(json.dumps(record, indent=1) + "\n")


def unet_pairs(unet, text, category: str, seed: int, prompts: int, samples: int, denoise_steps: int,
               sample_seed: int) -> dict[str, list]:
    """IterComp's gallery with the UNet as one more model: per split (``train``: ``4 * prompts`` prompts,
    ``heldout``: ``prompts``) each gallery prompt's five images and ``samples`` of the UNet's, ranked by the oracle;
    the (ranking, better, worse) pairs with a UNet image."""
    from recipes.diffusion.gallery import GENERATORS, rank, synthetic_entry
    from recipes.diffusion.steps import new_image_pairs

    out = {}
    for split, count in (("train", prompts * 4), ("heldout", prompts)):
        entries = [synthetic_entry(seed, split, category, i) for i in range(count)]
        images = generator.sample_images(unet, text, [e.prompt for e in entries], denoise_steps,
                                         sample_seed + (split == "heldout"), samples)
        rankings = [rank(e.prompt, e.images + list(images[i * samples:(i + 1) * samples]))
                    for i, e in enumerate(entries)]
        out[split] = new_image_pairs(rankings, len(GENERATORS))
    return out


def as_float(feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in feats.items()}


def stage_rm(args) -> None:
    """The reward models (module doc); with ``--unet`` the base UNet's samples join the gallery first (IterComp's
    first gallery holds SDXL, the model it then fine-tunes): ``--unet-prompts`` x 4 training prompts per category,
    ``--unet-samples`` samples each, ranked by the oracle, their pairs with a UNet image added to the training rows."""
    from bench.diffusion.scorers import accuracy
    from recipes.diffusion.data import heldout_rows
    from recipes.diffusion.scorers import RewardModels, load_job

    torch.set_num_threads(1)
    out = args.work / f"rm-{args.seed}"
    out.mkdir(parents=True, exist_ok=True)
    rewards = RewardModels(load_job(SPEC), None, normalise=False)
    unet = generator.load_unet(args.unet) if args.unet is not None else None
    text = generator.load_text(MODELS / "text")
    for category in args.categories.split(","):
        start = time.time()
        train = tower_features(cached_pairs(args.cache, category, args.seed, args.rows, "train"), MODELS / "vision")
        held = tower_features(cached_pairs(args.cache, category, 0, args.heldout, "heldout"), MODELS / "vision")
        record = {"seed": args.seed, "category": category, "rows": args.rows, "steps": args.rm_steps,
                  "heldout": args.heldout, "schedule": args.rm_schedule, "unet": str(args.unet)}
        if unet is not None:
            new = unet_pairs(unet, text, category, 1000 + args.seed, args.unet_prompts, args.unet_samples,
                             args.denoise_steps, 500 + args.seed)
            feats = {split: tower_features(pair_arrays(rows, counted=split == "heldout"), MODELS / "vision")
                     for split, rows in new.items()}
            train = joined([train, feats["train"]])
            record["unet_pairs"] = {split: len(rows) for split, rows in new.items()}
        scorer, records = fit((category, "fusion", "pretrained", args.seed, train, held, args.rm_steps, 64,
                               args.rm_lr or 3e-3), schedule=args.rm_schedule, layers=rm_layers(category))
        torch.save(scorer.state_dict(), out / f"scorer-{category}.pt")
        load_into(rewards, category, scorer)
        record.update(bench_acc=records[-1]["acc"], acc_other=records[-1]["acc_other"],
                      acc=rewards_accuracy(rewards, category, heldout_rows(0, category, args.heldout)))
        if unet is not None:
            record["acc_unet"] = accuracy(scorer, as_float(feats["heldout"]))["acc"]
        record["wall_s"] = round(time.time() - start, 1)
        print(record, flush=True)
        (out / f"record-{category}.json").write_text(json.dumps(record, indent=1) + "\n")


def load_rewards(work: Path, seed: int):
    """The recipe's reward models with the scoring layers ``rm`` wrote under ``work/rm-<seed>``, normalised."""
    from recipes.diffusion.scorers import RewardModels, load_job

    rewards = RewardModels(load_job(SPEC), None, normalise=False)
    for category in CATEGORIES:
        scorer = Scorer("fusion", rm_layers(category))
        scorer.load_state_dict(torch.load(work / f"rm-{seed}" / f"scorer-{category}.pt"))
        load_into(rewards, category, scorer)
    rewards.normalise()
    return rewards


def oracle_scores(unet, text, prompts, samples: int, steps: int,
                  seed: int) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Per category the oracle's mean score (``score_<c>``) and share of samples scored 1 (``exact_<c>``); the
    images; each image's score."""
    images = generator.sample_images(unet, text, prompts, steps, seed, samples)
    scores = np.array([oracle.score(images[i], prompts[i // samples]) for i in range(len(images))])
    out = {}
    for c, mask in category_masks(prompts, samples).items():
        out[f"score_{c}"] = float(scores[mask].mean())
        out[f"exact_{c}"] = float((scores[mask] == 1).mean())
    return out, images, scores


def category_masks(prompts, samples: int) -> dict[str, np.ndarray]:
    """Per category, which of the ``len(prompts) * samples`` images (each prompt's samples adjacent) are its."""
    cats = np.repeat([p.category for p in prompts], samples)
    return {c: cats == c for c in CATEGORIES}


def paired_change(before: np.ndarray, after: np.ndarray, prompts, samples: int) -> dict[str, float]:
    """Per category the mean change of the oracle's score over the same noise and prompts (``change_<c>``) and its
    standard error over the samples (``change_se_<c>``): a paired difference, far less noisy than either mean."""
    out = {}
    for c, mask in category_masks(prompts, samples).items():
        diff = after[mask] - before[mask]
        out[f"change_{c}"] = float(diff.mean())
        out[f"change_se_{c}"] = float(diff.std(ddof=1) / np.sqrt(len(diff)))
    return out


def save_grid(images: np.ndarray, columns: int, path: Path) -> None:
    from PIL import Image

    tiles = generator.grid(images, columns)
    Image.fromarray(tiles).resize((tiles.shape[1] * 3, tiles.shape[0] * 3), Image.NEAREST).save(path)


def stage_feedback(args) -> None:
    from recipes.diffusion.steps import eval_prompts, feedback_update
    from runtime.sample import build_scheduler

    torch.set_num_threads(1)
    start, out = time.time(), args.work / f"feedback-{args.seed}"
    out.mkdir(parents=True, exist_ok=True)
    unet, text = generator.load_unet(args.unet), generator.load_text(MODELS / "text")
    rewards = [load_rewards(args.work, seed) for seed in args.rm_seeds]
    prompts = eval_prompts(0, args.prompts)  # the held-out stream's first prompts, the same for every seed
    before, images_before, scores_before = oracle_scores(unet, text, prompts, args.samples, args.denoise_steps, 100)
    print("before", before, flush=True)
    config = generator.sample_config(args.denoise_steps, (int(args.denoise_steps * args.grad_from),
                                                          args.denoise_steps - 1), args.seed)
    scheduler = build_scheduler(config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    history = []
    for step in range(args.steps):
        batch = generator.training_prompts(args.seed + 1, step, args.batch, tuple(args.categories.split(",")))
        history.append(float(feedback_update(unet, text, rewards, batch, scheduler, config, step, optimizer,
                                             args.pre_loss, args.reward_weight).mean()))
        if (step + 1) % max(args.steps // 10, 1) == 0:
            print(f"feedback step {step + 1}/{args.steps}: own-category reward {np.mean(history[-10:]):.3f} "
                  f"(wall {time.time() - start:.0f} s)", flush=True)
    after, images_after, scores_after = oracle_scores(unet, text, prompts, args.samples, args.denoise_steps, 100)
    change = paired_change(scores_before, scores_after, prompts, args.samples)
    print("after", after, change, flush=True)
    unet.save_pretrained(out / "unet")
    # grids: the first 8 prompts of each category (a row each), sample 0
    rows = [c * args.prompts * args.samples + i * args.samples for c in range(len(CATEGORIES)) for i in range(8)]
    for name, images in (("before", images_before), ("after", images_after)):
        save_grid(images[rows], 8, out / f"samples_{name}.png")
    tail = max(args.steps // 10, 1)
    record = {"seed": args.seed, "rm_seeds": args.rm_seeds, "categories": args.categories, "steps": args.steps,
              "batch": args.batch, "lr": args.lr,
              "pre_loss": args.pre_loss, "prompts": args.prompts, "samples": args.samples,
              "denoise_steps": args.denoise_steps, "grad_from": args.grad_from, "reward_weight": args.reward_weight,
              "before": before, "after": after, "change": change,
              "sample_scores": {"before": scores_before.round(4).tolist(), "after": scores_after.round(4).tolist()},
              "train_reward_first": float(np.mean(history[:tail])),
              "train_reward_last": float(np.mean(history[-tail:])), "wall_s": round(time.time() - start, 1)}
    (out / "record.json").write_text(json.dumps(record, indent=1) + "\n")


def joined(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def stage_iterate(args) -> None:
    """IterComp's second iteration (module doc)."""
    torch.set_num_threads(1)
    start, out = time.time(), args.work / f"iterate-{args.seed}-rm{args.rm_seed}"
    out.mkdir(parents=True, exist_ok=True)
    unet, text = generator.load_unet(args.work / f"feedback-{args.seed}" / "unet"), generator.load_text(MODELS / "text")
    for category in args.categories.split(","):
        record = {"seed": args.seed, "rm_seed": args.rm_seed, "category": category, "prompts": args.prompts,
                  "samples": args.samples, "schedule": args.rm_schedule, "lr": args.rm_lr or 1e-3,
                  "steps": args.rm_steps, "old_rows": args.old_rows}
        new = unet_pairs(unet, text, category, args.seed, args.prompts, args.samples, args.denoise_steps, args.seed + 7)
        feats = {split: tower_features(pair_arrays(rows, counted=split == "heldout"), MODELS / "vision")
                     for split, rows in new.items()}
        old = cached_pairs(args.cache, category, args.rm_seed, args.rows, "train")
        old_train = tower_features({k: v[:args.old_rows] for k, v in old.items()}, MODELS / "vision")
        gallery = tower_features(cached_pairs(args.cache, category, 0, args.heldout, "heldout"), MODELS / "vision")
        init = torch.load(args.work / f"rm-{args.rm_seed}" / f"scorer-{category}.pt")
        job = (category, "fusion", "pretrained", args.seed, joined([old_train, feats["train"]]), feats["heldout"],
               args.rm_steps, 64, record["lr"])
        before = Scorer("fusion", rm_layers(category))
        before.load_state_dict(init)
        from bench.diffusion.scorers import accuracy

        record[f"new_{category}_before"] = accuracy(before, as_float(feats["heldout"]))["acc"]
        record[f"gallery_{category}_before"] = accuracy(before, as_float(gallery))["acc"]
        scorer, _ = fit(job, init, schedule=args.rm_schedule, layers=rm_layers(category))
        record[f"new_{category}_after"] = accuracy(scorer, as_float(feats["heldout"]))["acc"]
        record[f"gallery_{category}_after"] = accuracy(scorer, as_float(gallery))["acc"]
        record[f"new_pairs_{category}"] = {k: len(v) for k, v in new.items()}
        torch.save(scorer.state_dict(), out / f"scorer-{category}.pt")  # a second feedback round reads these
        record["wall_s"] = round(time.time() - start, 1)
        print(record, flush=True)
        (out / f"record-{category}.json").write_text(json.dumps(record, indent=1) + "\n")


def run_key(record: dict) -> tuple:
    """What tells a feedback run from another: (pre_loss, lr, steps, seed, reward-model seeds, prompt categories,
    where the step with gradient may fall, the rewards' weight)."""
    return (record["pre_loss"], record["lr"], record["steps"], record["seed"], tuple(record.get("rm_seeds", [0])),
            record.get("categories", ",".join(CATEGORIES)), record.get("grad_from", 0.75),
            record.get("reward_weight", 1.0))


def _change_cell(record: dict, category: str) -> str:
    """One category's cell of the feedback table: before -> after (share scored 1), the paired change +- its error."""
    b, a = record["before"], record["after"]
    cell = (f"{b[f'score_{category}']:.3f} ({b[f'exact_{category}']:.2f}) -> "
            f"{a[f'score_{category}']:.3f} ({a[f'exact_{category}']:.2f})")
    change = record.get("change")
    if change:
        cell += f", {change[f'change_{category}']:+.3f} +- {change[f'change_se_{category}']:.3f}"
    return cell


def stage_report(args) -> None:
    import shutil

    runs = {kind: [{**json.loads(p.read_text()), "folder": p.parent.name}
                   for p in sorted(args.work.glob(f"{kind}-*/record*.json"))]
            for kind in ("rm", "feedback", "iterate")}
    folders = {}  # each feedback record's folder
    for work in [args.work, *args.also]:
        for path in sorted(work.glob("feedback-*/record.json")):
            record = json.loads(path.read_text())
            folders[run_key(record)] = path.parent
    runs["feedback"] = [json.loads((folders[k] / "record.json").read_text()) for k in sorted(folders)]
    lines = ["# Recipe diffusion: does IterComp's feedback move the oracle? (measured)", "",
             "`python -m bench.diffusion.feedback` stages `rm`, `feedback`, `iterate` per seed, then `report` "
             "(single process, this machine's CPU). Decoder ceiling (renders encoded to 16-px latents and decoded, "
             "under the oracle): " + ", ".join(f"{c} {v:.2f}" for c, v in generator.decoder_ceiling(64).items())
             + ".", ""]
    if runs["rm"]:
        lines += ["## Reward models (held-out gallery pairs, through the recipe's RewardModels)", "",
                  "| seed | " + " | ".join(CATEGORIES) + " |", "|---" * (len(CATEGORIES) + 1) + "|"]
        for seed in sorted({r["seed"] for r in runs["rm"]}):
            by = {r["category"]: r for r in runs["rm"] if r["seed"] == seed}
            lines.append(f"| {seed} | " + " | ".join(f"{by[c]['acc']:.3f} ({by[c]['acc_other']:.2f})" if c in by
                                                     else "-" for c in CATEGORIES) + " |")
        r = runs["rm"][0]
        lines += ["", f"In brackets: pairs without a missing object. {r['rows']} training rows per category, "
                  f"{r['steps']} steps of 64 pairs (lr 3e-3, {r.get('schedule', 'constant')}), {r['heldout']} "
                  "held-out pairs."]
        if "acc_unet" in r:
            lines += ["", f"The base UNet's samples joined the training gallery ({r['unet_pairs']['train']} pairs "
                      "with a UNet image, ranked by the oracle, for the first category and seed). Held-out pairs "
                      "with a base-UNet image (prompts of the held-out stream):", "",
                      "| seed | " + " | ".join(CATEGORIES) + " |", "|---" * (len(CATEGORIES) + 1) + "|"]
            for seed in sorted({r["seed"] for r in runs["rm"]}):
                by = {r["category"]: r for r in runs["rm"] if r["seed"] == seed}
                lines.append(f"| {seed} | " + " | ".join(
                    f"{by[c]['acc_unet']:.3f} ({by[c]['unet_pairs']['heldout']})" if c in by else "-"
                    for c in CATEGORIES) + " |")
    if runs["feedback"]:
        lines += ["", "## Feedback: the oracle on held-out prompts, before -> after", "",
                  "Mean oracle score (share of samples scored 1):", "",
                  "| pre_loss | lr | steps | seed | reward models | reward weight | gradient step from | prompts | "
                  + " | ".join(CATEGORIES) + " | own-category reward (train batches) |",
                  "|---" * (len(CATEGORIES) + 9) + "|"]
        for r in runs["feedback"]:
            models = ",".join(map(str, r.get("rm_seeds", [r.get("rm_seed", 0)])))
            lines.append(f"| {r['pre_loss']} | {r['lr']} | {r['steps']} | {r['seed']} | {models} | "
                         f"{r.get('reward_weight', 1.0):g} | {r.get('grad_from', 0.75):g} | "
                         f"{r.get('categories', 'all')} | " + " | ".join(_change_cell(r, c) for c in CATEGORIES)
                         + f" | {r['train_reward_first']:.2f} -> {r['train_reward_last']:.2f} |")
        f = runs["feedback"][0]
        lines += ["", "In brackets the share of samples scored 1, then the change of the mean over the same prompts "
                  "and noise, +- its standard error over the samples (runs before the paired change was recorded: "
                  "none). Gradient step from: the step with gradient falls uniformly between that fraction of the "
                  "denoising steps and the last (IterComp: 0.75).",
                  "", f"Settings: batches of {f['batch']} prompts (of the categories in `prompts`), the reward "
                  "models of the seeds in `reward models` (several: each one more hinge), "
                  f"DDIM {f['denoise_steps']} steps; {f['prompts']} held-out prompts x {f['samples']} samples per "
                  "category, the same noise before and after. Wall per seed: "
                  + ", ".join(f"{r['wall_s'] / 60:.1f} min" for r in runs["feedback"]) + "."]
    if runs["iterate"]:
        lines += ["", "## Iteration 2: reward models' held-out accuracy, before -> after retraining", "",
                  "| folder | seed | reward models' seed | held-out prompts | steps | old rows | lr | lr schedule | "
                  "category | pairs with a new image | gallery pairs |", "|---" * 11 + "|"]
        for r in runs["iterate"]:
            c = r["category"]
            lines.append(f"| {r['folder']} | {r['seed']} | {r.get('rm_seed', 0)} | {r['prompts']} | {r['steps']} | "
                         f"{r['old_rows']} | "
                         f"{r.get('lr', '-')} | {r.get('schedule', 'constant')} | {c} | "
                         f"{r[f'new_{c}_before']:.3f} -> {r[f'new_{c}_after']:.3f} "
                         f"({r[f'new_pairs_{c}']['heldout']}) | "
                         f"{r[f'gallery_{c}_before']:.3f} -> {r[f'gallery_{c}_after']:.3f} |")
        lines += ["", "4 x `held-out prompts` training prompts and the held-out prompts per category x 2 samples of "
                  "the fine-tuned UNet ranked into the gallery; the scoring layers train `steps` more steps on "
                  "`old rows` old rows plus the training pairs with a new image (lr '-': not recorded, the folder's "
                  "name says it where it was not 1e-3). In brackets the held-out pairs with a new image."]
    report = "\n".join(lines) + "\n"
    print(report)
    write_results(args.name, [r for kind in runs.values() for r in kind], report, {"work": str(args.work)})
    if args.no_images:
        return
    IMAGES.mkdir(parents=True, exist_ok=True)
    # "before": the base UNet, the same noise in every run
    # the default report's images keep their old names; another report's carry its name
    stem = "itercomp-feedback" if args.name == "diffusion-feedback" else args.name
    for (pre_loss, lr, steps, seed, _, _, grad_from, weight), folder in folders.items():
        shutil.copy(folder / "samples_before.png", IMAGES / f"{stem}-before.png")
        extra = (f"-from{grad_from:g}" if grad_from != 0.75 else "") + (f"-rw{weight:g}" if weight != 1 else "")
        shutil.copy(folder / "samples_after.png",
                    IMAGES / f"{stem}-pre{pre_loss}-lr{lr:g}-steps{steps}-seed{seed}{extra}.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.diffusion.feedback", description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("base", "rm", "feedback", "iterate", "report"))
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "diffusion-feedback")
    parser.add_argument("--also", type=Path, action="append", default=[],
                        help="stage report: more --work folders whose feedback runs join the table")
    parser.add_argument("--name", default="diffusion-feedback",
                        help="stage report: the results file stem under bench/results/ (and, unless the default, "
                        "of the grids under docs/recipes/img/)")
    parser.add_argument("--no-images", action="store_true", help="stage report: leave docs/recipes/img alone")
    parser.add_argument("--cache", type=Path, default=None, help="folder keeping the rendered pairs between runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--categories", default=",".join(CATEGORIES),
                        help="stage rm: the reward models to train; stage feedback: the categories of its training "
                        "prompts")
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--heldout", type=int, default=512)
    parser.add_argument("--rm-steps", type=int, default=400)
    parser.add_argument("--old-rows", type=int, default=1000, help="stage iterate: old training rows kept")
    parser.add_argument("--rm-lr", type=float, default=None,
                        help="the scoring layers' lr (default: 3e-3 in stage rm, 1e-3 in iteration 2)")
    parser.add_argument("--rm-seed", type=int, default=0, help="stage iterate: the reward models' seed")
    parser.add_argument("--rm-seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0],
                        help="stage feedback: the reward models' seeds, an ensemble when several (each one more "
                        "reward model of IterComp's sum of hinges)")
    parser.add_argument("--rm-schedule", choices=("constant", "cosine"), default="cosine",
                        help="stages rm and iterate: the scoring layers' lr over the steps "
                        "(bench.diffusion.scorers.fit)")
    parser.add_argument("--unet-prompts", type=int, default=100,
                        help="stage rm with --unet: x 4 training prompts per category the base UNet draws")
    parser.add_argument("--unet-samples", type=int, default=4, help="stage rm with --unet: samples per prompt")
    parser.add_argument("--unet", type=Path, default=None, help="the base UNet folder (the denoise step's model)")
    parser.add_argument("--base-steps", type=int, default=300, help="stage base: the UNet's denoising steps")
    parser.add_argument("--base-batch", type=int, default=32)
    parser.add_argument("--base-lr", type=float, default=2e-3)
    parser.add_argument("--base-schedule", choices=("constant", "cosine"), default="constant",
                        help="stage base: the UNet's lr over the steps")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--pre-loss", type=float, default=1.0)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--denoise-steps", type=int, default=20)
    parser.add_argument("--grad-from", type=float, default=0.75,
                        help="stage feedback: the step with gradient falls uniformly from this fraction of the "
                             "denoising steps to the last (IterComp: 30-39 of 40, 0.75)")
    parser.add_argument("--reward-weight", type=float, default=1.0,
                        help="stage feedback: the reward hinges' weight (0: the denoising loss alone, a control)")
    args = parser.parse_args(argv)
    if not 0 <= args.grad_from < 1:
        parser.error(f"--grad-from: {args.grad_from} is not a fraction in [0, 1)")
    {"base": stage_base, "rm": stage_rm, "feedback": stage_feedback, "iterate": stage_iterate, "report": stage_report}[args.stage](args)


if __name__ == "__main__":
    main()
