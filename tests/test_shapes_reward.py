"""Shapes rewards: the hard detector on generated scenes (right and deliberately wrong), the soft one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.shapes.diversity import prompt_diversity
from common.shapes.scenes import CaptionGrammarError, corrupt_caption, make_scene
from rewards import build_reward


def _scenes(captions: list[str], seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    imgs = [make_scene(c, rng).image for c in captions]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255


PAIRS = [
    "a red circle to the left of a blue square",
    "an orange triangle above a green circle",
    "a purple square below a yellow triangle",
    "a blue triangle to the right of a red triangle",
    "a green square to the left of a purple circle",
    "a yellow circle below an orange square",
]
SINGLES = [
    "a red circle",
    "an orange square",
    "a yellow triangle",
    "a green circle",
    "a blue square",
    "a purple triangle",
]


def test_reward_protocol_and_registry() -> None:
    hard, soft = build_reward("shapes"), build_reward("shapes_soft")
    assert (hard.name, hard.differentiable) == ("shapes", False)
    assert (soft.name, soft.differentiable) == ("shapes_soft", True)
    imgs = _scenes(PAIRS[:2])
    for reward in (hard, soft):
        out = reward(imgs, PAIRS[:2])
        assert out.shape == (2,) and out.dtype == torch.float32


def test_ground_truth_scenes_score_one() -> None:
    caps = (PAIRS + SINGLES) * 2
    score = build_reward("shapes")(_scenes(caps), caps)
    assert torch.all(score == 1.0), score


@pytest.mark.parametrize(
    "kind, pair_score, single_score",
    [("wrong_colour", 2 / 6, 0.0), ("wrong_shape", 5 / 6, 0.5), ("swapped_relation", 2 / 3, None)],
)
def test_wrong_scenes_lose_exactly_their_part(
    kind: str, pair_score: float, single_score: float | None
) -> None:
    rng = np.random.default_rng(5)
    caps = PAIRS + (SINGLES if single_score is not None else [])
    imgs = _scenes(caps)
    wrong = [corrupt_caption(c, kind, rng).text for c in caps]
    score = build_reward("shapes")(imgs, wrong)
    expected = torch.tensor([pair_score] * len(PAIRS) + [single_score] * (len(caps) - len(PAIRS)))
    assert torch.allclose(score, expected.float(), atol=1e-6), (wrong, score)


def test_soft_reward_is_differentiable_and_ranks_like_the_hard_one() -> None:
    rng = np.random.default_rng(7)
    caps = PAIRS + SINGLES
    imgs = _scenes(caps)
    # Score the same images against right and wrong captions: a mix of every partial-credit level.
    prompts = caps + [corrupt_caption(c, "wrong_colour", rng).text for c in caps]
    prompts += [corrupt_caption(c, "swapped_relation", rng).text for c in PAIRS]
    batch = torch.cat([imgs, imgs, imgs[: len(PAIRS)]]).requires_grad_(True)
    soft = build_reward("shapes_soft")(batch, prompts)
    hard = build_reward("shapes")(batch.detach(), prompts)
    soft.sum().backward()
    assert batch.grad is not None and torch.isfinite(batch.grad).all() and batch.grad.abs().sum() > 0
    assert ((soft - hard).abs() < 0.2).all(), (soft, hard)

    def rank(x: torch.Tensor) -> torch.Tensor:
        return x.argsort().argsort().double()

    # Ties in the hard score make rank order arbitrary there; Pearson on ranks of soft vs hard level means.
    assert torch.corrcoef(torch.stack([soft.detach().double(), hard.double()]))[0, 1] > 0.95
    assert torch.corrcoef(torch.stack([rank(soft.detach()), rank(hard)]))[0, 1] > 0.8


def test_out_of_grammar_caption_raises_never_scores_zero() -> None:
    imgs = _scenes(["a red circle"])
    for name in ("shapes", "shapes_soft"):
        with pytest.raises(CaptionGrammarError, match="a dolphin riding a bike"):
            build_reward(name)(imgs, ["a dolphin riding a bike"])
    with pytest.raises(ValueError, match="1 images but 2 prompts"):
        build_reward("shapes")(imgs, ["a red circle", "a red circle"])


def test_diversity_separates_varied_from_identical_samples() -> None:
    prompt = PAIRS[0]
    varied = _scenes([prompt] * 12, seed=1)
    same = varied[:1].repeat(12, 1, 1, 1)
    d_varied, d_same = prompt_diversity(varied, prompt), prompt_diversity(same, prompt)
    assert d_varied.found_fraction == 1.0
    assert d_varied.position_spread > 5 and d_varied.size_spread > 1 and d_varied.pixel_distance > 0.1
    assert d_same.position_spread < 1e-3 and d_same.pixel_distance == 0.0


def test_score_details_split_the_caption_into_components() -> None:
    reward = build_reward("shapes")
    images = _scenes(PAIRS + SINGLES)
    score, d = reward.score_details(images, PAIRS + SINGLES)
    torch.testing.assert_close(score, reward(images, PAIRS + SINGLES))
    assert set(d) == {"full", "colours", "shapes", "relation", "extra"}
    for k in ("full", "colours", "shapes", "relation"):
        assert d[k].tolist() == [1.0] * 12, k  # ground-truth scenes satisfy every part of their caption
    assert d["extra"].sum() == 0
    # swapped relation: colours and shapes still right, relation and full wrong
    swapped = [corrupt_caption(c, "swapped_relation", np.random.default_rng(0)).text for c in PAIRS]
    _, w = reward.score_details(images[:6], swapped)
    assert w["relation"].sum() == 0 and w["full"].sum() == 0 and w["colours"].tolist() == [1.0] * 6
    # a pair image scored against one of its objects alone: the other object is an extra one
    _, e = reward.score_details(images[:1], ["a red circle"])
    assert e["extra"].tolist() == [1.0] and e["full"].tolist() == [1.0]


def test_soft_relation_width_and_weight() -> None:
    """A wider relation sigmoid (rel_scale) still gets a swapped relation's gradient, where the default 2 px
    saturates; rel_weight moves the pair's credit between the objects and the relation."""
    rng = np.random.default_rng(11)
    imgs = _scenes(PAIRS)
    swapped = [corrupt_caption(c, "swapped_relation", rng).text for c in PAIRS]

    def relation_grad(scale: float) -> float:
        x = imgs.clone().requires_grad_(True)
        build_reward("shapes_soft", rel_scale=scale, rel_weight=1.0)(x, swapped).sum().backward()
        return float(x.grad.abs().sum())

    assert relation_grad(8.0) > 100 * relation_grad(2.0)
    right = build_reward("shapes_soft", rel_scale=8.0, rel_weight=0.0)(imgs, PAIRS)
    objects_only = build_reward("shapes_soft", rel_scale=8.0, rel_weight=0.0)(imgs, swapped)
    assert torch.allclose(right, objects_only)  # rel_weight 0: the relation does not count
    third = build_reward("shapes_soft", rel_scale=8.0)(imgs, swapped)
    half = build_reward("shapes_soft", rel_scale=8.0, rel_weight=0.5)(imgs, swapped)
    assert (half < third).all()  # a wrong relation costs more when it weighs more
    with pytest.raises(ValueError, match="rel_weight must be in"):
        build_reward("shapes_soft", rel_weight=1.5)
