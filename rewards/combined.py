"""A weighted sum of registered rewards, with non-finite scores rejected loudly."""

from __future__ import annotations

import torch

from common.config import RewardConfig
from rewards.registry import build_reward


class NonFiniteRewardError(ValueError):
    """A reward returned NaN or infinity; such samples are never trained on."""


class WeightedReward:
    """sum_i weight_i * reward_i(images, prompts) over the terms of a RewardConfig."""

    def __init__(self, cfg: RewardConfig):
        self.terms = [(t.name, t.weight, build_reward(t.name, **t.options)) for t in cfg.terms]
        self.differentiable = all(r.differentiable for _, _, r in self.terms)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total reward [B] and each term's raw score [B] by name; raises NonFiniteRewardError on NaN/inf."""
        total = torch.zeros(images.shape[0])
        parts = {}
        for name, weight, fn in self.terms:
            score = fn(images, prompts).detach().float().cpu()
            if score.shape != (images.shape[0],):
                raise ValueError(f"reward {name!r} returned shape {tuple(score.shape)}, expected ({images.shape[0]},)")
            bad = (~torch.isfinite(score)).nonzero().flatten().tolist()
            if bad:
                raise NonFiniteRewardError(
                    f"reward {name!r} returned non-finite scores for {len(bad)} image(s) "
                    f"(prompts: {[prompts[i] for i in bad[:3]]}); they are not trained on"
                )
            parts[name] = score
            total = total + weight * score
        return total, parts
