"""Procedural Shapes scenes: a seeded generator of 64x64 RGB images with captions, and the caption grammar.

Grammar (lower case, single spaces; "an" before a vowel is accepted as well as "a"):

    single:   "a <colour> <shape>"
    pair:     "a <colour> <shape> <relation> a <colour> <shape>"
    colour:   red | orange | yellow | green | blue | purple
    shape:    circle | square | triangle
    relation: to the left of | to the right of | above | below

The two objects of a pair always have different colours, so that a colour names one object.
Positions are in pixels, x to the right and y downwards, measured at an object's area centroid.
A relation holds when the displacement along the relation's axis has the right sign and is larger
than the displacement across it (so that "left of" is unambiguous), the same rule the detector uses.
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (240, 215, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "purple": (140, 50, 180),
}
BACKGROUND: tuple[int, int, int] = (235, 235, 235)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
# Unit vector (x right, y down) in which object A lies relative to object B for "A <relation> B".
RELATION_AXES: dict[str, tuple[float, float]] = {
    "to the left of": (-1.0, 0.0),
    "to the right of": (1.0, 0.0),
    "above": (0.0, -1.0),
    "below": (0.0, 1.0),
}
# The relation word that states the opposite layout; used to build deliberately wrong captions.
OPPOSITE_RELATION: dict[str, str] = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}
# Half-extent of an object's bounding box in pixels: objects span 14 to 28 px.
MIN_HALF_SIZE = 7.0
MAX_HALF_SIZE = 14.0
# Ground-truth pairs satisfy |along| >= |across| + RELATION_MARGIN_PX so the detector's rule has slack.
RELATION_MARGIN_PX = 4.0
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ObjectSpec:
    """One requested or drawn object: a named colour and a shape."""

    colour: str
    shape: str

    @property
    def phrase(self) -> str:
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Caption:
    """A parsed caption: one object, or two objects and the relation of the first to the second."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    @property
    def text(self) -> str:
        if self.relation is None:
            return self.objects[0].phrase
        return f"{self.objects[0].phrase} {self.relation} {self.objects[1].phrase}"


@dataclass(frozen=True)
class PlacedObject:
    """A drawn object: its spec, centroid (x, y) in pixels and half-size in pixels."""

    spec: ObjectSpec
    cx: float
    cy: float
    half_size: float


@dataclass(frozen=True)
class Scene:
    """A generated scene: image uint8 [64, 64, 3], its caption and the objects drawn."""

    image: np.ndarray
    caption: Caption
    objects: tuple[PlacedObject, ...]


class CaptionGrammarError(ValueError):
    """A caption that is not in the Shapes grammar (see the module docstring)."""


_COLOUR_RE = "|".join(COLOURS)
_SHAPE_RE = "|".join(SHAPES)
_REL_RE = "|".join(re.escape(r) for r in RELATIONS)
_OBJ_RE = rf"an? ({_COLOUR_RE}) ({_SHAPE_RE})"
_SINGLE = re.compile(rf"^{_OBJ_RE}$")
_PAIR = re.compile(rf"^{_OBJ_RE} ({_REL_RE}) {_OBJ_RE}$")
GRAMMAR_HELP = (
    "expected 'a <colour> <shape>' or 'a <colour> <shape> <relation> a <colour> <shape>' with colour in "
    f"{list(COLOURS)}, shape in {list(SHAPES)}, relation in {list(RELATIONS)}, two different colours"
)


def parse_caption(text: str) -> Caption:
    """Parse a Shapes caption; case and surrounding/double spaces are forgiven, nothing else.

    Raises CaptionGrammarError naming the caption and the grammar for anything outside it.
    """
    norm = " ".join(text.lower().split()).rstrip(".")
    m = _SINGLE.match(norm)
    if m:
        return Caption(objects=(ObjectSpec(m.group(1), m.group(2)),))
    m = _PAIR.match(norm)
    if m:
        a, b = ObjectSpec(m.group(1), m.group(2)), ObjectSpec(m.group(4), m.group(5))
        if a.colour == b.colour:
            raise CaptionGrammarError(
                f"caption {text!r} names the colour {a.colour!r} twice; the two objects of a Shapes "
                "caption must have different colours"
            )
        return Caption(objects=(a, b), relation=m.group(3))
    raise CaptionGrammarError(f"caption {text!r} is not in the Shapes grammar: {GRAMMAR_HELP}")


def all_objects() -> list[ObjectSpec]:
    """The 18 colour/shape objects, in a fixed order."""
    return [ObjectSpec(c, s) for c in COLOURS for s in SHAPES]


def all_object_pairs() -> list[tuple[ObjectSpec, ObjectSpec]]:
    """Unordered pairs of objects with different colours (135), in a fixed order."""
    return [(a, b) for a, b in itertools.combinations(all_objects(), 2) if a.colour != b.colour]


@functools.lru_cache(maxsize=8)
def heldout_object_pairs(n: int = 20, seed: int = 1234) -> frozenset[frozenset[ObjectSpec]]:
    """The held-out compositions: n unordered object pairs never drawn together in base training.

    Chosen by a fixed seed, so the set is the same everywhere; each object still appears in training
    alone and with other partners, so only the combination is unseen.
    """
    pairs = all_object_pairs()
    idx = np.random.default_rng(seed).permutation(len(pairs))[:n]
    return frozenset(frozenset(pairs[i]) for i in sorted(idx))


def is_heldout(a: ObjectSpec, b: ObjectSpec) -> bool:
    """Whether the unordered pair {a, b} is one of the held-out compositions."""
    return frozenset((a, b)) in heldout_object_pairs()


def relation_holds(dx: float, dy: float, relation: str, margin: float = 0.0) -> bool:
    """Whether A at displacement (dx, dy) = A - B (pixels, y down) satisfies 'A <relation> B'."""
    ux, uy = RELATION_AXES[relation]
    along = dx * ux + dy * uy
    across = abs(dx * uy - dy * ux)
    return along > 0 and along >= across + margin


def _shape_mask(shape: str, cx: float, cy: float, h: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean mask of a shape whose area centroid is (cx, cy) and bounding box half-size h."""
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= h * h
    if shape == "square":
        return (np.abs(xs - cx) <= h) & (np.abs(ys - cy) <= h)
    if shape == "triangle":
        # Upright isosceles triangle, bounding box 2h x 2h; its centroid is h/3 below the box centre.
        top = cy - h - h / 3.0
        t = (ys - top) / (2.0 * h)  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(xs - cx) <= t * h)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(objects: tuple[PlacedObject, ...] | list[PlacedObject]) -> np.ndarray:
    """Draw objects on the background, anti-aliased by 4x supersampling; returns uint8 [64, 64, 3]."""
    s = _SUPERSAMPLE
    img = np.empty((IMAGE_SIZE * s, IMAGE_SIZE * s, 3), dtype=np.float32)
    img[:] = BACKGROUND
    coords = (np.arange(IMAGE_SIZE * s, dtype=np.float32) + 0.5) / s
    for obj in objects:
        # Only the object's neighbourhood is rasterised (speed).
        pad = obj.half_size * 1.5 + 2
        x0 = max(0, int((obj.cx - pad) * s))
        x1 = min(IMAGE_SIZE * s, int((obj.cx + pad) * s) + 1)
        y0 = max(0, int((obj.cy - pad) * s))
        y1 = min(IMAGE_SIZE * s, int((obj.cy + pad) * s) + 1)
        ys, xs = np.meshgrid(coords[y0:y1], coords[x0:x1], indexing="ij")
        m = _shape_mask(obj.spec.shape, obj.cx, obj.cy, obj.half_size, xs, ys)
        img[y0:y1, x0:x1][m] = COLOURS[obj.spec.colour]
    img = img.reshape(IMAGE_SIZE, s, IMAGE_SIZE, s, 3).mean(axis=(1, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _bbox(obj: PlacedObject) -> tuple[float, float, float, float]:
    dy = obj.half_size / 3.0 if obj.spec.shape == "triangle" else 0.0
    return (
        obj.cx - obj.half_size,
        obj.cy - obj.half_size - dy,
        obj.cx + obj.half_size,
        obj.cy + obj.half_size - dy,
    )


def _fits(obj: PlacedObject) -> bool:
    x0, y0, x1, y1 = _bbox(obj)
    return x0 >= 1 and y0 >= 1 and x1 <= IMAGE_SIZE - 1 and y1 <= IMAGE_SIZE - 1


def _apart(a: PlacedObject, b: PlacedObject, gap: float = 3.0) -> bool:
    ax0, ay0, ax1, ay1 = _bbox(a)
    bx0, by0, bx1, by1 = _bbox(b)
    return ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0


def _place(spec: ObjectSpec, rng: np.random.Generator, max_half: float = MAX_HALF_SIZE) -> PlacedObject:
    h = float(rng.uniform(MIN_HALF_SIZE, max_half))
    lo, hi = h + 1.5, IMAGE_SIZE - h - 1.5
    dy = h / 3.0 if spec.shape == "triangle" else 0.0
    return PlacedObject(spec, float(rng.uniform(lo, hi)), float(rng.uniform(lo + dy, hi + dy)), h)


def place_objects(caption: Caption, rng: np.random.Generator) -> tuple[PlacedObject, ...]:
    """Random sizes and positions that fit the image, do not overlap and satisfy the caption's relation."""
    if caption.relation is None:
        return (_place(caption.objects[0], rng),)
    for attempt in range(10_000):
        # Smaller objects after many failures, so that every relation can always be placed.
        max_half = MAX_HALF_SIZE if attempt < 200 else 10.0
        a = _place(caption.objects[0], rng, max_half)
        b = _place(caption.objects[1], rng, max_half)
        if _apart(a, b) and relation_holds(a.cx - b.cx, a.cy - b.cy, caption.relation, RELATION_MARGIN_PX):
            return (a, b)
    raise RuntimeError(f"could not place {caption.text!r}")  # unreachable in practice


def random_caption(
    rng: np.random.Generator, pair_fraction: float = 0.5, exclude_heldout: bool = True
) -> Caption:
    """A random caption: two objects with probability pair_fraction, else one.

    With exclude_heldout, pairs from heldout_object_pairs() are never returned (base training data).
    """
    objs = all_objects()
    if rng.random() >= pair_fraction:
        return Caption(objects=(objs[int(rng.integers(len(objs)))],))
    while True:
        a, b = objs[int(rng.integers(len(objs)))], objs[int(rng.integers(len(objs)))]
        if a.colour == b.colour or (exclude_heldout and is_heldout(a, b)):
            continue
        return Caption(objects=(a, b), relation=RELATIONS[int(rng.integers(len(RELATIONS)))])


def make_scene(caption: Caption | str, rng: np.random.Generator) -> Scene:
    """Draw one scene for a caption (text or parsed) with random sizes and positions."""
    cap = parse_caption(caption) if isinstance(caption, str) else caption
    objects = place_objects(cap, rng)
    return Scene(image=render(objects), caption=cap, objects=objects)


def generate_scenes(
    n: int, seed: int, pair_fraction: float = 0.5, exclude_heldout: bool = True
) -> tuple[np.ndarray, list[str]]:
    """n scenes, deterministic given seed: images uint8 [n, 64, 64, 3] and their caption texts."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    captions: list[str] = []
    for i in range(n):
        scene = make_scene(random_caption(rng, pair_fraction, exclude_heldout), rng)
        images[i] = scene.image
        captions.append(scene.caption.text)
    return images, captions


CORRUPTIONS: tuple[str, ...] = ("wrong_colour", "wrong_shape", "swapped_relation")


def corrupt_caption(caption: Caption | str, kind: str, rng: np.random.Generator) -> Caption:
    """A caption that a scene drawn for `caption` deliberately fails, for testing the detector.

    wrong_colour: the first object's colour becomes one that no object of the caption has;
    wrong_shape: the first object's shape becomes another shape;
    swapped_relation: the relation word becomes its opposite (pairs only).
    """
    cap = parse_caption(caption) if isinstance(caption, str) else caption
    first, rest = cap.objects[0], cap.objects[1:]
    if kind == "wrong_colour":
        used = {o.colour for o in cap.objects}
        free = [c for c in COLOURS if c not in used]
        first = ObjectSpec(free[int(rng.integers(len(free)))], first.shape)
        return Caption(objects=(first, *rest), relation=cap.relation)
    if kind == "wrong_shape":
        other = [s for s in SHAPES if s != first.shape]
        first = ObjectSpec(first.colour, other[int(rng.integers(len(other)))])
        return Caption(objects=(first, *rest), relation=cap.relation)
    if kind == "swapped_relation":
        if cap.relation is None:
            raise ValueError(f"swapped_relation needs a two-object caption, got {cap.text!r}")
        return Caption(objects=cap.objects, relation=OPPOSITE_RELATION[cap.relation])
    raise ValueError(f"unknown corruption {kind!r}; expected one of {CORRUPTIONS}")
