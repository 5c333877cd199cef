"""Named Shapes prompt sets; each is a deterministic list of captions in the Shapes grammar.

shapes_single:        the 18 one-object captions (easy for the base model);
shapes_pairs:         relational two-object captions over compositions seen in base training (the hard
                      prompts for fine-tuning): 60 captions drawn with a fixed seed;
shapes_pairs_heldout: relational captions over the held-out compositions (never drawn together in base
                      training): every held-out pair, both orders, one relation word each (40 captions).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from common.shapes.scenes import (
    RELATIONS,
    Caption,
    ObjectSpec,
    all_object_pairs,
    all_objects,
    heldout_object_pairs,
    is_heldout,
)

PAIRS_SET_SIZE = 60
_SEED = 2024


def shapes_single() -> list[str]:
    """'a <colour> <shape>' for every colour and shape (18 captions)."""
    return [Caption(objects=(o,)).text for o in all_objects()]


def _relational(pairs: list[tuple[ObjectSpec, ObjectSpec]], rng: np.random.Generator) -> list[str]:
    return [
        Caption(objects=(a, b), relation=RELATIONS[int(rng.integers(len(RELATIONS)))]).text for a, b in pairs
    ]


def shapes_pairs() -> list[str]:
    """60 relational captions over seen compositions, random order and relation word, fixed seed."""
    rng = np.random.default_rng(_SEED)
    seen = [p for p in all_object_pairs() if not is_heldout(*p)]
    pick = rng.permutation(len(seen))[:PAIRS_SET_SIZE]
    ordered = [seen[i] if rng.random() < 0.5 else seen[i][::-1] for i in pick]
    return _relational(ordered, rng)


def shapes_pairs_heldout() -> list[str]:
    """Relational captions over the held-out compositions, both orders of each pair (40 captions)."""
    rng = np.random.default_rng(_SEED + 1)
    pairs = sorted(
        (tuple(sorted(p, key=lambda o: (o.colour, o.shape))) for p in heldout_object_pairs()),
        key=lambda p: (p[0].colour, p[0].shape, p[1].colour, p[1].shape),
    )
    ordered = [q for a, b in pairs for q in ((a, b), (b, a))]
    return _relational(ordered, rng)


SHAPES_PROMPT_SETS: dict[str, Callable[[], list[str]]] = {
    "shapes_single": shapes_single,
    "shapes_pairs": shapes_pairs,
    "shapes_pairs_heldout": shapes_pairs_heldout,
}
