"""The diffusion recipe's gallery (generators with error rates, oracle rankings, pairs), its real-gallery folder
format and the reward models' pairwise loss."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from recipes.diffusion import folder, gallery, oracle
from recipes.diffusion.heads import pairwise_loss
from recipes.diffusion.shapes import CATEGORIES, Prompt, render


def test_pairs_of_places_are_every_ordered_pair_across_places():
    assert gallery.pairs([[2], [0, 1], [3]]) == [(2, 0), (2, 1), (2, 3), (0, 3), (1, 3)]
    assert gallery.pairs([[0, 1]]) == []


def test_rank_orders_by_score_and_ties_share_a_place():
    prompt = Prompt("attribute", (("red", "circle"), ("blue", "square")))
    ranking = gallery.rank(prompt, [np.zeros(1)] * 4, scores=[0.5, 1.0, 0.5, 0.0])
    assert ranking.places == [[1], [0, 2], [3]]


def test_minimal_pairs_keep_both_objects_and_rank_the_exact_drawing_first():
    for category in CATEGORIES:
        rankings = [gallery.minimal_pair(0, "train", category, i) for i in range(8)]
        strict = [r for r in rankings if len(r.places) == 2]  # a swap of two equal shapes draws the prompt: a tie
        assert len(strict) >= 5
        for ranking in strict:
            assert ranking.places == [[0], [1]]
            exact, wrong = (oracle.blobs(image) for image in ranking.images)
            assert set(exact) == set(wrong) == {c for c, _ in ranking.prompt.objects}  # no object missing
            assert oracle.score(ranking.images[0], ranking.prompt) == 1.0


def test_scattered_pixels_of_a_colour_are_no_object():
    """A noise image has pixels near every palette colour; none is a region, so no prompt's object is found."""
    noise = np.random.default_rng(0).random((3, 32, 32)).astype(np.float32)
    assert (oracle.segment(noise) >= 0).sum() > 4 * oracle.MIN_PIXELS
    assert oracle.blobs(noise) == {}
    prompt = Prompt("spatial", (("red", "square"), ("blue", "square")), "left of")
    assert oracle.score(noise, prompt) == 0.0


def test_exact_generator_is_always_right_and_errors_lower_the_oracle_score():
    rng = np.random.default_rng(0)
    for category in CATEGORIES:
        for _ in range(20):
            prompt = Prompt(category, (("green", "triangle"), ("yellow", "circle")),
                            {"attribute": None, "spatial": "below", "nonspatial": "inside"}[category])
            scene, struck = gallery.draw(prompt, 0.0, rng)
            assert struck == [] and oracle.score(render(scene, rng), prompt) == 1.0
            scene, struck = gallery.draw(prompt, 1.0, rng)
            expected = set(gallery.ERRORS) - ({"wrong relation"} if category == "attribute" else set())
            assert set(struck) == expected
            assert oracle.score(render(scene, rng), prompt) < 1.0


def test_error_rates_order_the_generators_mean_scores():
    means = []
    for g, (_, rate) in enumerate(gallery.GENERATORS):
        scores = []
        for i in range(60):
            entry = gallery.synthetic_entry(0, "train", CATEGORIES[i % 3], i)
            scores.append(oracle.score(entry.images[g], entry.prompt))
        means.append(float(np.mean(scores)))
    assert means[0] == 1.0 and all(a > b for a, b in zip(means, means[1:])), means


def test_synthetic_entries_are_deterministic_and_splits_differ():
    a, b = gallery.synthetic_entry(3, "train", "spatial", 7), gallery.synthetic_entry(3, "train", "spatial", 7)
    assert a.prompt == b.prompt and a.places == b.places
    assert all(np.array_equal(x, y) for x, y in zip(a.images, b.images))
    held = [gallery.synthetic_entry(3, "heldout", "spatial", i).prompt for i in range(5)]
    assert held != [gallery.synthetic_entry(3, "train", "spatial", i).prompt for i in range(5)]


def test_pairwise_loss_on_hand_made_rewards():
    better, worse = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    expected = -torch.log(torch.sigmoid(better - worse))
    assert torch.allclose(pairwise_loss(better, worse), expected)
    assert pairwise_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(np.log(2))
    big = pairwise_loss(torch.tensor([-100.0]), torch.tensor([100.0]))
    assert torch.isfinite(big).all() and big.item() == pytest.approx(200.0)


def test_folder_round_trip_keeps_rankings_and_pairs(tmp_path):
    folder.write_gallery(tmp_path, seed=0, prompts=2, splits=("heldout",))
    for category in CATEGORIES:
        loaded = folder.load_split(tmp_path, "heldout", category)
        assert len(loaded) == 2
        for i, ranking in enumerate(loaded):
            original = gallery.synthetic_entry(0, "heldout", category, i)
            assert ranking.prompt == original.prompt and ranking.places == original.places
            assert all(np.abs(x - y).max() <= 0.5 / 255 + 1e-6 for x, y in zip(ranking.images, original.images))
    rows = folder.folder_rows(tmp_path, "heldout", "spatial", 0, step=0, batch_size=4, start=0, stop=4)
    assert all((b, w) in gallery.pairs(r.places) for r, b, w in rows)


def _write(tmp_path, entry) -> str:
    (tmp_path / "train").mkdir(exist_ok=True)
    (tmp_path / "train" / folder.RANKINGS).write_text(json.dumps({"rankings": [entry]}))
    folder._load.cache_clear()
    return str(tmp_path)


@pytest.mark.parametrize("change,message", [
    ({"rank": [0, 0]}, r"rank \(\[0, 0\]\) must name each image index 0..1 exactly once"),
    ({"prompt": "a red blob and a blue square"}, r"rankings\[0\]: prompt .* is not a attribute prompt"),
    ({"images": ["a.png", "missing.png"]}, r"rankings\[0\].images\[1\]: no such image"),
    ({"category": "texture"}, r"category \('texture'\) is not one of attribute, spatial, nonspatial"),
])
def test_folder_errors_are_one_line_naming_the_entry(tmp_path, change, message):
    folder.write_gallery(tmp_path / "src", seed=0, prompts=1, splits=("train",))
    (tmp_path / "train").mkdir()
    src = tmp_path / "src" / "train" / "attribute" / "0_0.png"
    (tmp_path / "train" / "a.png").write_bytes(src.read_bytes())
    (tmp_path / "train" / "b.png").write_bytes(src.read_bytes())
    entry = {"category": "attribute", "prompt": "a red circle and a blue square", "images": ["a.png", "b.png"],
             "rank": [0, 1]} | change
    data_dir = _write(tmp_path, entry)
    with pytest.raises(ValueError, match=message) as err:
        folder.load_split(data_dir, "train", "attribute")
    assert "\n" not in str(err.value)


def test_missing_rankings_file_says_what_the_folder_holds(tmp_path):
    with pytest.raises(ValueError, match="a gallery folder holds train/ and heldout/"):
        folder.load_split(tmp_path, "heldout", "spatial")
