"""The diffusion recipe's renderer and oracle agree: hand-made right and wrong images of each category, and every
image the renderer draws for a prompt scores 1."""

from __future__ import annotations

import numpy as np
import pytest

from recipes.diffusion import oracle
from recipes.diffusion.shapes import (
    CATEGORIES, WORD_IDS, Prompt, Scene, Shape, layout, parse_prompt, random_prompt, render, tokenize,
)

RNG = np.random.default_rng(0)


def image(*objects: Shape) -> np.ndarray:
    return render(Scene(objects), np.random.default_rng(1))


def test_each_shape_is_read_back_at_both_sizes():
    for shape in ("circle", "square", "triangle"):
        for half in (3, 4, 6, 7):
            found = oracle.blobs(image(Shape("green", shape, 15, 15, half)))
            assert list(found) == ["green"] and found["green"].shape == shape, (shape, half)


def test_attribute_binding_right_swapped_missing_and_wrong_shape():
    prompt = Prompt("attribute", (("red", "circle"), ("blue", "square")))
    right = image(Shape("red", "circle", 8, 8, 5), Shape("blue", "square", 23, 22, 5))
    swapped = image(Shape("blue", "circle", 8, 8, 5), Shape("red", "square", 23, 22, 5))
    missing = image(Shape("red", "circle", 8, 8, 5))
    wrong_shape = image(Shape("red", "triangle", 8, 8, 5), Shape("blue", "square", 23, 22, 5))
    assert oracle.score(right, prompt) == 1.0
    assert oracle.score(swapped, prompt) == 0.0
    assert oracle.score(missing, prompt) == 0.5
    assert oracle.score(wrong_shape, prompt) == 0.5


@pytest.mark.parametrize("relation,first,second", [
    ("left of", (7, 16), (24, 15)), ("right of", (24, 15), (7, 16)), ("above", (16, 7), (15, 24)),
    ("below", (15, 24), (16, 7)),
])
def test_spatial_relations_right_and_mirrored(relation, first, second):
    prompt = Prompt("spatial", (("yellow", "triangle"), ("green", "circle")), relation)
    right = image(Shape("yellow", "triangle", *first, 4), Shape("green", "circle", *second, 4))
    mirrored = image(Shape("yellow", "triangle", *second, 4), Shape("green", "circle", *first, 4))
    assert oracle.score(right, prompt) == 1.0
    assert oracle.score(mirrored, prompt) == pytest.approx(2 / 3)  # both objects right, the relation wrong


def test_spatial_diagonal_counts_for_its_dominant_axis_only():
    a, b = Shape("red", "square", 6, 6, 3), Shape("blue", "circle", 26, 14, 3)  # 20 right, 8 down
    assert oracle.score(image(a, b), Prompt("spatial", (("red", "square"), ("blue", "circle")), "left of")) == 1.0
    assert oracle.score(image(a, b), Prompt("spatial", (("red", "square"), ("blue", "circle")), "above")) == \
        pytest.approx(2 / 3)


@pytest.mark.parametrize("outer", ["circle", "square", "triangle"])
def test_nonspatial_inside_and_next_to(outer):
    inside = layout(Prompt("nonspatial", (("red", "square"), ("blue", outer)), "inside"), RNG)
    apart = layout(Prompt("nonspatial", (("red", "square"), ("blue", outer)), "next to"), RNG)
    for relation, right, wrong in (("inside", inside, apart), ("next to", apart, inside)):
        prompt = Prompt("nonspatial", (("red", "square"), ("blue", outer)), relation)
        assert oracle.score(render(right, RNG), prompt) == 1.0, relation
        assert oracle.score(render(wrong, RNG), prompt) == pytest.approx(2 / 3), relation


def test_rendered_prompts_all_score_one():
    rng = np.random.default_rng(5)
    for category in CATEGORIES:
        for _ in range(60):
            prompt = random_prompt(category, rng)
            assert oracle.score(render(layout(prompt, rng), rng), prompt) == 1.0, prompt.text


def test_a_blank_image_shows_nothing():
    assert oracle.blobs(image()) == {}
    assert oracle.score(image(), Prompt("spatial", (("red", "circle"), ("blue", "square")), "above")) == 0.0


def test_prompts_parse_back_and_tokenize():
    rng = np.random.default_rng(3)
    for category in CATEGORIES:
        prompt = random_prompt(category, rng)
        assert parse_prompt(prompt.text, category) == prompt
    ids = tokenize("a red circle next to a blue square", 10)
    assert ids.tolist() == [1, *(WORD_IDS[w] for w in "a red circle next to a blue square".split()), 2]
    with pytest.raises(ValueError, match=r"words \['purple'\]"):
        tokenize("a purple circle", 10)
    with pytest.raises(ValueError, match="seq_len 6 holds 4"):
        tokenize("a red circle and a blue square", 6)
    with pytest.raises(ValueError, match="is not a spatial prompt"):
        parse_prompt("a red circle and a blue square", "spatial")


def test_largest_component_follows_a_winding_region_and_keeps_the_first_of_equal_ones():
    """A U-shaped region (its ends meet only through the bend) is one region; of two equal regions the one whose
    first pixel comes first in row-major order is kept; diagonal neighbours are not connected."""
    mask = np.zeros((8, 8), dtype=bool)
    mask[1:7, 1] = mask[6, 1:6] = mask[1:7, 5] = True  # U: 15 pixels
    mask[0, 6] = mask[0, 7] = True  # touches the U's right arm (1, 5) only diagonally
    got = oracle.largest_component(mask)
    assert got.sum() == 15 and got[1, 1] and got[1, 5] and not got[0, 6] and not got[0, 7]
    twins = np.zeros((6, 6), dtype=bool)
    twins[4:6, 0:2] = twins[0:2, 4:6] = True
    assert oracle.largest_component(twins)[0, 4] and not oracle.largest_component(twins)[4, 0]
    assert not oracle.largest_component(np.zeros((4, 4), dtype=bool)).any()
