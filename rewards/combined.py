"""A weighted sum of registered rewards, with non-finite scores rejected loudly."""

from __future__ import annotations

import torch

from common.config import RewardConfig
from rewards.registry import build_reward


class NonFiniteRewardError(ValueError):
    """A reward returned NaN or infinity; such samples are never trained on."""


def drop_nonfinite(batches: list, epoch: int) -> tuple[list, int]:
    """(the batches without their samples whose reward is NaN or infinite, how many samples were dropped).
    Raises NonFiniteRewardError, one line, if no sample of the epoch is left."""
    kept, dropped = [], 0
    for b in batches:
        ok = torch.isfinite(b.rewards)
        dropped += int((~ok).sum())
        if bool(ok.all()):
            kept.append(b)
        elif bool(ok.any()):
            kept.append(b.select(ok.nonzero().flatten()))
    if not kept:
        raise NonFiniteRewardError(
            f"every one of epoch {epoch}'s {dropped} samples got a non-finite reward (NaN or inf): check the reward "
            "terms (reward.terms) and their inputs; nothing was trained on"
        )
    return kept, dropped


class WeightedReward:
    """sum_i weight_i * reward_i(images, prompts) over the terms of a RewardConfig."""

    def __init__(self, cfg: RewardConfig, device: str | None = None):
        """`device`: where learned rewards run (the reward actor's); rewards without models ignore it."""
        self.terms = [(t.name, t.weight, build_reward(t.name, device=device, **t.options)) for t in cfg.terms]
        self.differentiable = all(r.differentiable for _, _, r in self.terms)

    def __call__(
        self, images: torch.Tensor, prompts: list[str], details: bool = False, keep_nonfinite: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total reward [B] and, by name, each term's raw score [B]; with `details` also the components [B]
        of rewards that have `score_details`, as "term/component" (evaluation logs them; training needs
        only the score). Raises NonFiniteRewardError on NaN/inf, unless `keep_nonfinite` (training: the learner
        drops those samples and counts them as dropped_nonfinite)."""
        total = torch.zeros(images.shape[0])
        parts = {}
        for name, weight, fn in self.terms:
            with torch.no_grad():  # scoring for DDPO; AlignProp calls differentiable rewards directly
                if details and hasattr(fn, "score_details"):
                    score, comps = fn.score_details(images, prompts)
                    parts.update({f"{name}/{k}": v.detach().float().cpu() for k, v in comps.items()})
                else:
                    score = fn(images, prompts)
            score = score.detach().float().cpu()
            if score.shape != (images.shape[0],):
                raise ValueError(f"reward {name!r} returned shape {tuple(score.shape)}, expected ({images.shape[0]},)")
            bad = (~torch.isfinite(score)).nonzero().flatten().tolist()
            if bad and not keep_nonfinite:
                raise NonFiniteRewardError(
                    f"reward {name!r} returned non-finite scores for {len(bad)} image(s) "
                    f"(prompts: {[prompts[i] for i in bad[:3]]}); they are not trained on"
                )
            parts[name] = score
            total = total + weight * score
        return total, parts


    def differentiable_total(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total reward [B] with gradients to `images` (reward backpropagation) and each term's score [B]
        (detached, CPU). Every term must be differentiable; non-finite scores raise NonFiniteRewardError."""
        total = 0.0
        parts = {}
        for name, weight, fn in self.terms:
            if not fn.differentiable:
                raise ValueError(f"reward {name!r} is not differentiable")
            score = fn(images, prompts).float()
            bad = (~torch.isfinite(score.detach())).nonzero().flatten().tolist()
            if bad:
                raise NonFiniteRewardError(
                    f"reward {name!r} returned non-finite scores for {len(bad)} image(s) "
                    f"(prompts: {[prompts[i] for i in bad[:3]]}); they are not trained on"
                )
            parts[name] = score.detach().cpu()
            total = total + weight * score
        return total, parts


def score_in_batches(
    reward: WeightedReward, images: torch.Tensor, prompts: list[str], batch_size: int, details: bool = False,
    keep_nonfinite: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`reward` over images float [N, 3, H, W] in calls of at most `batch_size`: (total [N], parts [N] each)."""
    totals, parts = [], {}
    for i in range(0, images.shape[0], batch_size):
        total, p = reward(images[i : i + batch_size], prompts[i : i + batch_size], details, keep_nonfinite)
        totals.append(total)
        for k, v in p.items():
            parts.setdefault(k, []).append(v)
    return torch.cat(totals), {k: torch.cat(v) for k, v in parts.items()}
