"""Shapes scene generator and caption grammar."""

from __future__ import annotations

import numpy as np
import pytest

from common.shapes.prompt_sets import SHAPES_PROMPT_SETS
from common.shapes.scenes import (
    BACKGROUND,
    CaptionGrammarError,
    generate_scenes,
    heldout_object_pairs,
    is_heldout,
    make_scene,
    parse_caption,
    relation_holds,
)


def test_generator_is_deterministic_given_seed() -> None:
    a_img, a_cap = generate_scenes(24, seed=3)
    b_img, b_cap = generate_scenes(24, seed=3)
    c_img, _ = generate_scenes(24, seed=4)
    assert a_img.shape == (24, 64, 64, 3) and a_img.dtype == np.uint8
    assert np.array_equal(a_img, b_img) and a_cap == b_cap
    assert not np.array_equal(a_img, c_img)


def test_scenes_draw_what_the_caption_says() -> None:
    rng = np.random.default_rng(0)
    for _ in range(40):
        scene = make_scene("a red circle to the left of a blue square", rng)
        a, b = scene.objects
        assert (a.spec.colour, a.spec.shape, b.spec.colour, b.spec.shape) == (
            "red",
            "circle",
            "blue",
            "square",
        )
        assert relation_holds(a.cx - b.cx, a.cy - b.cy, "to the left of", margin=4.0)
        assert 7 <= a.half_size <= 14
    # The background is the fixed grey where nothing is drawn.
    assert tuple(scene.image[0, 0]) == BACKGROUND or tuple(scene.image[63, 63]) == BACKGROUND


def test_sizes_and_positions_vary() -> None:
    rng = np.random.default_rng(1)
    objs = [make_scene("a green triangle", rng).objects[0] for _ in range(50)]
    assert np.std([o.cx for o in objs]) > 8 and np.std([o.cy for o in objs]) > 8
    assert np.std([o.half_size for o in objs]) > 1.5


def test_heldout_compositions_never_appear_in_training_data() -> None:
    _, caps = generate_scenes(800, seed=0)
    pairs = [parse_caption(c) for c in caps if parse_caption(c).relation]
    assert len(pairs) > 300
    assert not any(is_heldout(*c.objects) for c in pairs)
    assert len(heldout_object_pairs()) == 20
    # With the hold-out off, held-out pairs do occur (the filter is what removes them).
    _, caps_all = generate_scenes(800, seed=0, exclude_heldout=False)
    assert any(parse_caption(c).relation and is_heldout(*parse_caption(c).objects) for c in caps_all)


def test_parse_round_trip_and_forgiven_spacing() -> None:
    cap = parse_caption("  An Orange   triangle above a green circle. ")
    assert cap.text == "an orange triangle above a green circle"
    assert cap.relation == "above" and [o.shape for o in cap.objects] == ["triangle", "circle"]


@pytest.mark.parametrize(
    "bad, needle",
    [
        ("a dolphin riding a bike", "not in the Shapes grammar"),
        ("a pink circle", "not in the Shapes grammar"),
        ("a red hexagon", "not in the Shapes grammar"),
        ("a red circle near a blue square", "not in the Shapes grammar"),
        ("a red circle to the left of a red square", "different colours"),
        ("", "not in the Shapes grammar"),
    ],
)
def test_parse_errors_name_the_caption_and_grammar(bad: str, needle: str) -> None:
    with pytest.raises(CaptionGrammarError, match=needle) as info:
        parse_caption(bad)
    assert repr(bad) in str(info.value)


def test_prompt_sets_are_deterministic_and_in_grammar() -> None:
    sizes = {"shapes_single": 18, "shapes_pairs": 60, "shapes_pairs_heldout": 40}
    for name, build in SHAPES_PROMPT_SETS.items():
        prompts = build()
        assert prompts == build() and len(prompts) == sizes[name] == len(set(prompts))
        caps = [parse_caption(p) for p in prompts]
        if name == "shapes_single":
            assert all(c.relation is None for c in caps)
        else:
            assert all(c.relation is not None for c in caps)
            assert all(is_heldout(*c.objects) == (name == "shapes_pairs_heldout") for c in caps)
