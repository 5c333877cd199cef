import pytest
import torch

from common.config import RewardConfig, RewardTerm
from rewards import build_reward, reward_names
from rewards.combined import NonFiniteRewardError, WeightedReward
from rewards.registry import register_reward


def test_jpeg_rewards_order_flat_above_noise():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    comp = build_reward("jpeg_compressibility")
    incomp = build_reward("jpeg_incompressibility")
    images = torch.cat([flat, noise])
    c, i = comp(images, ["a", "b"]), incomp(images, ["a", "b"])
    assert c.shape == (2,) and c[0] > c[1] + 3  # noise costs kilobytes more
    torch.testing.assert_close(c, -i)
    assert not comp.differentiable


def test_unknown_reward_lists_known_ones():
    with pytest.raises(KeyError, match="unknown reward 'aesthetic_typo'; known rewards: .*jpeg_compressibility"):
        build_reward("aesthetic_typo")
    assert {"jpeg_compressibility", "jpeg_incompressibility"} <= set(reward_names())


@register_reward("_test_nan")
class _NanReward:
    name = "_test_nan"
    differentiable = False

    def __call__(self, images, prompts):
        out = torch.zeros(images.shape[0])
        out[1] = float("nan")
        return out


def test_weighted_sum_and_nan_rejected():
    cfg = RewardConfig(terms=[RewardTerm(name="jpeg_compressibility", weight=2.0), RewardTerm(name="jpeg_incompressibility", weight=1.0)])
    images = torch.rand(2, 3, 32, 32)
    total, parts = WeightedReward(cfg)(images, ["a", "b"])
    torch.testing.assert_close(total, parts["jpeg_compressibility"])  # 2*(-s) + s = -s
    bad = WeightedReward(RewardConfig(terms=[RewardTerm(name="_test_nan")]))
    with pytest.raises(NonFiniteRewardError, match="non-finite scores for 1 image"):
        bad(images, ["a", "b"])
