"""Shapes testbed rewards: a programmatic alignment detector for captions of the Shapes grammar.

`shapes` is the exact (thresholded, non-differentiable) score; `shapes_soft` is its differentiable
counterpart for reward backpropagation (soft colour masks, soft centroids, softmax over shape-template
overlaps). Both score in [0, 1] with partial credit (common/shapes/detect.py says how) and raise
CaptionGrammarError for a caption outside the grammar, never a silent 0.
"""

from __future__ import annotations

import torch

from common.shapes.detect import extra_objects, score_scenes
from rewards.registry import register_reward


@register_reward("shapes")
class ShapesReward:
    """Hard Shapes alignment score: images float [B, 3, H, W] in [0, 1], prompts -> float [B] in [0, 1]."""

    name = "shapes"
    differentiable = False

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return score_scenes(images, prompts, soft=False).score.to(images.device, torch.float32)

    def score_details(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The score [B] and 0/1 components [B]: full (everything right), colours (every named colour
        found), shapes (every object found with its shape), relation (pairs; 1 for singles), extra (an
        unnamed colour present)."""
        with torch.no_grad():
            s = score_scenes(images, prompts, soft=False)
            d0, d1 = s.detections
            colours = d0.found * d1.found  # a single object fills both slots, so this is d0.found there
            details = {"full": s.objects_ok * s.relation_ok, "colours": colours, "shapes": s.objects_ok,
                       "relation": s.relation_ok, "extra": extra_objects(images, prompts)}  # fmt: skip
        return s.score.float(), {k: v.float() for k, v in details.items()}


@register_reward("shapes_soft")
class ShapesSoftReward:
    """Differentiable Shapes alignment score: images float [B, 3, H, W] in [0, 1] -> float [B] in [0, 1].

    rel_scale: width in pixels of the relation's sigmoids. Smaller is closer to the hard rule, but the
        sigmoids saturate: at 2 px a wrong layout (objects ~20 px apart) gets almost no gradient, so reward
        backpropagation improves the objects and leaves the relation alone (docs/results.md); 8 px reaches it.
    rel_weight: a pair's share of the score for its relation (default 1/3, as `shapes`); the objects share
        the rest.
    """

    name = "shapes_soft"
    differentiable = True

    def __init__(self, rel_scale: float = 2.0, rel_weight: float = 1 / 3) -> None:
        if rel_scale <= 0:
            raise ValueError(f"shapes_soft rel_scale must be > 0 pixels (got {rel_scale})")
        if not 0 <= rel_weight <= 1:
            raise ValueError(f"shapes_soft rel_weight must be in [0, 1] (got {rel_weight})")
        self.rel_scale = rel_scale
        self.rel_weight = rel_weight

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return score_scenes(images, prompts, soft=True, rel_scale=self.rel_scale, rel_weight=self.rel_weight).score
