"""bench.diffusion.feedback's pieces: the 16-px latents keep what the oracle judges, the frozen decoder passes the
gradient, and a scorer trained on cached tower outputs is the recipe's reward model once loaded into it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bench.diffusion.feedback import load_into, paired_change
from bench.diffusion.scorers import Scorer, pair_arrays, tower_features
from recipes.diffusion import generator
from recipes.diffusion.data import heldout_rows
from recipes.diffusion.models import save_towers
from recipes.diffusion.scorers import RewardModels, load_job
from recipes.diffusion.shapes import CATEGORIES, SIDE, parse_prompt

TINY = Path(__file__).resolve().parents[3] / "recipes" / "diffusion" / "itercomp-tiny.yaml"


def test_latents_keep_what_the_oracle_judges():
    ceiling = generator.decoder_ceiling(12)
    assert ceiling["attribute"] >= 0.9 and ceiling["spatial"] >= 0.9 and ceiling["nonspatial"] >= 0.75, ceiling
    latents = torch.zeros(2, 3, generator.LATENT, generator.LATENT, requires_grad=True)
    images = generator.decode(latents)
    assert images.shape == (2, 3, SIDE, SIDE)
    images[:, 0, :4, :4].sum().backward()
    assert latents.grad[:, 0, :2, :2].abs().min() > 0 and latents.grad[:, 1:].abs().max() == 0


def test_a_bench_scorer_loaded_into_the_reward_models_gives_their_rewards(tmp_path):
    import yaml

    vision, text = save_towers(tmp_path)
    data = yaml.safe_load(TINY.read_text())
    data["components"]["vision"]["pretrained"], data["components"]["text"]["pretrained"] = str(vision), str(text)
    spec = tmp_path / "rm.yaml"
    spec.write_text(yaml.safe_dump(data))
    rewards = RewardModels(load_job(spec), normalise=False)
    torch.manual_seed(3)
    scorer = Scorer("fusion").eval()
    arrays = pair_arrays(heldout_rows(0, "spatial", 6))
    feats = tower_features(arrays, vision, models=tmp_path)
    with torch.no_grad():
        want = scorer(feats["better"].float(), feats["prompt"].float())
        before = rewards.reward(torch.from_numpy(arrays["better"].astype(np.float32)),
                                [parse_prompt(str(t), "spatial") for t in arrays["prompt"]], "spatial")
        load_into(rewards, "spatial", scorer)
        got = rewards.reward(torch.from_numpy(arrays["better"].astype(np.float32)),
                             [parse_prompt(str(t), "spatial") for t in arrays["prompt"]], "spatial")
    assert not torch.allclose(before, want, atol=1e-2)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)  # the bench's tower outputs are float16


def test_the_paired_change_is_per_category_over_the_same_samples():
    """Two prompts per category, two samples each (adjacent): the change is the mean of after - before over the
    category's four samples, its error their standard deviation over sqrt(4)."""
    prompts = [parse_prompt(p, c) for c, p in (("attribute", "a red circle and a blue square"),
                                                ("spatial", "a red circle left of a blue square"),
                                                ("nonspatial", "a red circle inside a blue square"))
               for _ in range(2)]
    before = np.zeros(12)
    after = np.array([1, 1, 1, 1, 0, 0.5, 0, 0.5, -1, 0, 0, 0], dtype=float)
    out = paired_change(before, after, prompts, samples=2)
    assert [out[f"change_{c}"] for c in CATEGORIES] == [1.0, 0.25, -0.25]
    assert out["change_se_attribute"] == 0.0
    assert np.isclose(out["change_se_spatial"], np.std([0, 0.5, 0, 0.5], ddof=1) / 2)
