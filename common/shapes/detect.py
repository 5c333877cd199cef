"""Object detector for Shapes images, in a hard (exact, thresholded) and a soft (differentiable) form.

Both read an image float [3, H, W] in [0, 1] (H = W = 64) the same way:
  * colour: a pixel belongs to a named colour when its chroma (max - min channel) exceeds CHROMA_MIN
    and its opponent-colour hue is nearest to that colour's hue. Hue does not change when a colour is
    mixed with the grey background, so anti-aliased rims keep their colour instead of turning into
    a neighbouring one (a red rim is pink, and pink is nearer to orange than to red in RGB);
  * object: the largest 8-connected component of a colour's mask (hard), or the whole soft mask (soft);
  * shape: the template (circle, square, upright triangle) with the object's area and centroid that
    overlaps the mask best (IoU);
  * relation: scenes.relation_holds on the centroids (pixels, y down), margin 0.
Scores with partial credit, in [0, 1]:
  single object: 1/2 found (colour present, area >= MIN_AREA px) + 1/2 found with the right shape;
  pair: per object 1/6 found + 1/6 right shape, and 1/3 for the relation (needs both found).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.shapes.scenes import COLOURS, RELATION_AXES, SHAPES, Caption, parse_caption, relation_holds

CHROMA_MIN = 0.25  # in [0, 1] units; the grey background has chroma 0, the palette 0.5 to 0.9
MIN_AREA = 20.0  # pixels; the smallest generated object covers ~98 px
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)


def _opponent(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Opponent-colour coordinates (a, b) of rgb [..., 3, H, W]; hue = atan2(b, a)."""
    r, g, b = rgb.unbind(-3)
    return r - 0.5 * (g + b), (math.sqrt(3) / 2) * (g - b)


def _palette_hues() -> torch.Tensor:
    rgb = torch.tensor([COLOURS[c] for c in COLOUR_NAMES], dtype=torch.float32).view(-1, 3, 1, 1) / 255
    a, b = _opponent(rgb)
    return torch.atan2(b, a).view(-1)


PALETTE_HUES = _palette_hues()  # radians [K]


def colour_labels(images: torch.Tensor) -> torch.Tensor:
    """Hard colour label per pixel: long [B, H, W], index into COLOUR_NAMES, or -1 (background/grey)."""
    a, b = _opponent(images)
    hue = torch.atan2(b, a)
    chroma = images.amax(dim=-3) - images.amin(dim=-3)
    diff = torch.remainder(hue.unsqueeze(1) - PALETTE_HUES.to(hue).view(1, -1, 1, 1) + math.pi, 2 * math.pi)
    lab = (diff - math.pi).abs().argmin(dim=1)
    return torch.where(chroma > CHROMA_MIN, lab, torch.full_like(lab, -1))


def colour_memberships(
    images: torch.Tensor, hue_width: float = 0.15, chroma_width: float = 0.04
) -> torch.Tensor:
    """Soft colour membership per pixel, differentiable: [B, K, H, W] in [0, 1] (K = 6 colours).

    A sigmoid gate on chroma times a softmax over the colours of the hue's cosine similarity
    (hue_width in radians, chroma_width in [0, 1] units).
    """
    a, b = _opponent(images)
    norm = torch.sqrt(a * a + b * b + 1e-6)
    hues = PALETTE_HUES.to(images)
    cos = a.unsqueeze(1) * torch.cos(hues).view(1, -1, 1, 1) + b.unsqueeze(1) * torch.sin(hues).view(
        1, -1, 1, 1
    )
    cos = cos / norm.unsqueeze(1)
    probs = torch.softmax((cos - 1) / (hue_width**2 / 2), dim=1)
    # A smooth max-min (chroma) via logsumexp keeps gradients flowing to all channels.
    t = 0.02
    chroma = t * torch.logsumexp(images / t, dim=-3) + t * torch.logsumexp(-images / t, dim=-3)
    gate = torch.sigmoid((chroma - CHROMA_MIN) / chroma_width)
    return probs * gate.unsqueeze(1)


def largest_component(mask: torch.Tensor) -> torch.Tensor:
    """Largest 8-connected component of each boolean mask [N, H, W] (all False where the mask is empty)."""
    n, h, w = mask.shape
    m = mask.float().unsqueeze(1)
    labels = (torch.arange(1, h * w + 1, dtype=torch.float32).view(1, 1, h, w) * m).clone()
    for _ in range(h * w):
        new = F.max_pool2d(labels, 3, stride=1, padding=1) * m
        if torch.equal(new, labels):
            break
        labels = new
    labels = labels.view(n, -1).long()
    out = torch.zeros(n, h * w, dtype=torch.bool)
    for i in range(n):
        if labels[i].any():
            counts = torch.bincount(labels[i], minlength=1)
            counts[0] = 0
            out[i] = labels[i] == counts.argmax()
    return out.view(n, h, w)


def shape_templates(
    cx: torch.Tensor, cy: torch.Tensor, area: torch.Tensor, size: int, softness: float
) -> torch.Tensor:
    """Masks [N, 3, size, size] of a circle, square and upright triangle (SHAPES order), each with the given
    area (px^2) and area centroid (px); edges are sigmoids of the signed distance with `softness` px."""
    coords = torch.arange(size, dtype=cx.dtype, device=cx.device) + 0.5
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    dx = xs.view(1, size, size) - cx.view(-1, 1, 1)
    dy = ys.view(1, size, size) - cy.view(-1, 1, 1)
    area = area.clamp_min(1.0).view(-1, 1, 1)
    r = torch.sqrt(area / math.pi)
    circle = r - torch.sqrt(dx * dx + dy * dy + 1e-6)
    hs = torch.sqrt(area) / 2
    square = hs - torch.maximum(dx.abs(), dy.abs())
    ht = torch.sqrt(area / 2)  # bounding box 2h x 2h, area 2h^2, centroid h/3 below the box centre
    top, bottom = -4 * ht / 3, 2 * ht / 3
    # Distances to the base and the two slanted sides (slope 2: half-width grows h per 2h of height).
    d_base = bottom - dy
    slant = ((dy - top) / 2 - dx.abs()) * (2 / math.sqrt(5))
    triangle = torch.minimum(d_base, slant)
    sd = torch.stack([circle, square, triangle], dim=1)
    return torch.sigmoid(sd / softness)


def _iou(mask: torch.Tensor, templates: torch.Tensor) -> torch.Tensor:
    """Soft IoU of mask [N, H, W] with templates [N, S, H, W] -> [N, S]."""
    m = mask.unsqueeze(1)
    inter = (m * templates).sum(dim=(-1, -2))
    return inter / (m.sum(dim=(-1, -2)) + templates.sum(dim=(-1, -2)) - inter + 1e-6)


@dataclass
class Detection:
    """Per requested object, tensors [B]: found (0/1 or soft), shape_ok, cx, cy (px), area (px^2)."""

    found: torch.Tensor
    shape_ok: torch.Tensor
    cx: torch.Tensor
    cy: torch.Tensor
    area: torch.Tensor


def _moments(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Area (px^2) and centroid (px) of masks [N, H, W]."""
    _, h, w = mask.shape
    coords_y = torch.arange(h, dtype=mask.dtype, device=mask.device).view(1, h, 1) + 0.5
    coords_x = torch.arange(w, dtype=mask.dtype, device=mask.device).view(1, 1, w) + 0.5
    area = mask.sum(dim=(-1, -2))
    cx = (mask * coords_x).sum(dim=(-1, -2)) / (area + 1e-6)
    cy = (mask * coords_y).sum(dim=(-1, -2)) / (area + 1e-6)
    return area, cx, cy


def detect_hard(images: torch.Tensor, colour: list[str], shape: list[str]) -> Detection:
    """Find one object per image: images float [B, 3, H, W] in [0, 1], the requested colour and shape per image."""
    images = images.detach().float()
    labels = colour_labels(images)
    k = torch.tensor([COLOUR_NAMES.index(c) for c in colour])
    comp = largest_component(labels == k.view(-1, 1, 1)).float()
    area, cx, cy = _moments(comp)
    found = (area >= MIN_AREA).float()
    iou = _iou(comp, shape_templates(cx, cy, area, images.shape[-1], softness=0.35))
    want = torch.tensor([SHAPES.index(s) for s in shape])
    shape_ok = (iou.argmax(dim=1) == want).float() * found
    return Detection(found, shape_ok, cx, cy, area)


def detect_soft(
    images: torch.Tensor, colour: list[str], shape: list[str], shape_temp: float = 0.02
) -> Detection:
    """Differentiable counterpart of detect_hard: soft colour mask, soft centroid, softmax over template IoUs."""
    member = colour_memberships(images.float())
    k = torch.tensor([COLOUR_NAMES.index(c) for c in colour], device=images.device)
    mask = member[torch.arange(images.shape[0], device=images.device), k]
    area, cx, cy = _moments(mask)
    found = torch.sigmoid((area - MIN_AREA) / (MIN_AREA / 4))
    iou = _iou(mask, shape_templates(cx, cy, area, images.shape[-1], softness=0.5))
    want = torch.tensor([SHAPES.index(s) for s in shape], device=images.device)
    p = torch.softmax(iou / shape_temp, dim=1)
    shape_ok = p[torch.arange(images.shape[0], device=images.device), want] * found
    return Detection(found, shape_ok, cx, cy, area)


@dataclass
class SceneScore:
    """Per image [B]: score in [0, 1] and its parts; objects_ok and relation_ok are 0/1 for hard scoring."""

    score: torch.Tensor
    objects_ok: torch.Tensor  # every requested object found with the right colour and shape
    relation_ok: torch.Tensor  # pairs: relation satisfied with both objects found; singles: 1
    detections: list[Detection]


def _parse_all(prompts: list[str]) -> list[Caption]:
    return [parse_caption(p) for p in prompts]


def score_scenes(
    images: torch.Tensor, prompts: list[str], soft: bool = False, rel_scale: float = 2.0, rel_weight: float = 1 / 3
) -> SceneScore:
    """Score images float [B, 3, H, W] in [0, 1] against their captions (see the module docstring).

    soft=True gives the differentiable score (rel_scale: px width of the relation's sigmoids).
    rel_weight: a pair's credit for its relation (the objects share the rest equally); 1/3 is the
    documented score.
    Raises CaptionGrammarError for any caption outside the Shapes grammar.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be float [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(
            f"got {images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image"
        )
    caps = _parse_all(prompts)
    detect = detect_soft if soft else detect_hard
    b = images.shape[0]
    dev = images.device
    dets = []
    for j in range(2):
        # Singles reuse object 0 in slot 1; their slot-1 result is ignored below.
        objs = [c.objects[min(j, len(c.objects) - 1)] for c in caps]
        dets.append(detect(images, [o.colour for o in objs], [o.shape for o in objs]))
    is_pair = torch.tensor([c.relation is not None for c in caps], device=dev)
    d0, d1 = dets
    dx, dy = d0.cx - d1.cx, d0.cy - d1.cy
    if soft:
        ux = torch.tensor([RELATION_AXES[c.relation][0] if c.relation else 0.0 for c in caps], device=dev)
        uy = torch.tensor([RELATION_AXES[c.relation][1] if c.relation else 0.0 for c in caps], device=dev)
        along = dx * ux + dy * uy
        across = (dx * uy - dy * ux).abs()
        rel = torch.sigmoid(along / rel_scale) * torch.sigmoid((along - across) / rel_scale)
    else:
        rel = torch.tensor(
            [
                float(c.relation is not None and relation_holds(float(x), float(y), c.relation))
                for c, x, y in zip(caps, dx, dy)
            ],
            device=dev,
        )
    rel = rel * d0.found * d1.found
    single = 0.5 * d0.found + 0.5 * d0.shape_ok
    pair = (d0.found + d0.shape_ok + d1.found + d1.shape_ok) * ((1 - rel_weight) / 4) + rel * rel_weight
    score = torch.where(is_pair, pair, single)
    objects_ok = torch.where(is_pair, d0.shape_ok * d1.shape_ok, d0.shape_ok)
    relation_ok = torch.where(is_pair, rel, torch.ones(b, device=dev))
    if not soft:
        score = score.clamp(0, 1)
    return SceneScore(score=score, objects_ok=objects_ok, relation_ok=relation_ok, detections=dets)


def extra_objects(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """1.0 where an image holds a solid blob of a colour its caption does not name, else 0.0: [B].

    Solid: its mask, eroded by one pixel, still has a connected component of >= MIN_AREA pixels (the
    smallest generated object keeps ~60). Anti-aliased edges and seams between two objects leave thin
    rims of an in-between hue (purple around blue, orange between red and yellow) that are not objects
    and vanish under the erosion.

    Catches a reward rising for the wrong reason (e.g. extra objects that happen to satisfy a relation).
    """
    labels = colour_labels(images.detach().float())
    b, k = labels.shape[0], len(COLOUR_NAMES)
    masks = torch.stack([labels == c for c in range(k)], dim=1).flatten(0, 1).float()  # [B*K, H, W]
    eroded = -F.max_pool2d(-masks.unsqueeze(1), 3, stride=1, padding=1).squeeze(1) > 0.5
    counts = largest_component(eroded).sum(dim=(-1, -2)).view(b, k)  # largest solid blob of each colour, px
    named = torch.zeros_like(counts, dtype=torch.bool)
    for i, cap in enumerate(_parse_all(prompts)):
        for obj in cap.objects:
            named[i, COLOUR_NAMES.index(obj.colour)] = True
    return ((counts >= MIN_AREA) & ~named).any(dim=1).float()
