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


@register_reward("_test_nan_some")
class _SomeNanReward:
    """The JPEG size, but NaN for images of prompts containing 'nan' and inf for 'inf'."""

    name = "_test_nan_some"
    differentiable = False

    def __init__(self):
        self.jpeg = build_reward("jpeg_compressibility")

    def __call__(self, images, prompts):
        out = self.jpeg(images, prompts)
        for i, p in enumerate(prompts):
            if "nan" in p or "inf" in p:
                out[i] = float("nan") if "nan" in p else float("inf")
        return out


def test_nonfinite_training_samples_are_dropped_and_counted(tiny_cfg, tmp_path):
    """A training reward's NaN/inf samples are dropped and counted (dropped_nonfinite); the run goes on. Only
    an epoch with no finite sample stops it, in one line."""
    from learner.local import LocalSystem
    from learner.loop import Trainer
    from learner.run_dir import RunDir
    from test_system import _cfg

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na nan cat\nan inf dog\na dog\n")
    cfg = _cfg(tiny_cfg, "cluster.backend=local", f"prompts.train={prompts}", "train.samples_per_epoch=8",
               "train.prompts_per_epoch=4", "train.epochs=2", "eval.every=0", "reward.terms=[{name: _test_nan_some}]",
               "algorithm.stat_tracking.per_prompt=false")  # fmt: skip
    run = RunDir(tmp_path / "run")
    run.create(cfg)
    rows = Trainer(cfg, run, LocalSystem(cfg), log=lambda *_: None).fit()
    for r in rows:
        n_bad = r["dropped_nonfinite"]
        assert n_bad > 0 and r["trained_samples"] == 8 - n_bad, r
        assert r["reward_queries"] == 8 * (r["epoch"] + 1) and torch.isfinite(torch.tensor(r["reward_mean"]))
    all_bad = tmp_path / "bad.txt"
    all_bad.write_text("a nan cat\nan inf dog\n")
    cfg = _cfg(cfg, f"prompts.train={all_bad}", "train.prompts_per_epoch=2")
    run = RunDir(tmp_path / "run2")
    run.create(cfg)
    with pytest.raises(NonFiniteRewardError, match=r"every one of epoch 0's 8 samples got a non-finite reward"):
        Trainer(cfg, run, LocalSystem(cfg), log=lambda *_: None).fit()


def test_reward_text_caches_are_bounded_and_keep_what_a_call_reads():
    """The learned rewards' per-prompt text embeddings: a huge prompt set must not grow them without end, and a
    call never loses a prompt it asked for."""
    from rewards.loading import TextFeatureCache

    calls = []

    def encode(missing):
        calls.append(list(missing))
        return torch.stack([torch.full((2,), float(len(p))) for p in missing])

    cache = TextFeatureCache(size=3)
    assert cache(["a", "bb", "a"], encode).tolist() == [[1, 1], [2, 2], [1, 1]] and calls == [["a", "bb"]]
    cache(["ccc", "a"], encode)  # "a" used again: "bb" is now the least recent
    out = cache(["dddd", "eeeee", "a"], encode)
    assert out[:, 0].tolist() == [4, 5, 1] and list(cache.entries) == ["dddd", "eeeee", "a"]
    assert calls[-1] == ["dddd", "eeeee"]
