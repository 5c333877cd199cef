import numpy as np
import pytest
import torch

from common.config import CfgScheduleConfig, ExplorationConfig, PromptWeightingConfig
from common.exploration import (
    apply_token_weights,
    parse_prompt,
    plan_rollout,
    random_weighting,
    sample_guidance,
    schedule_values,
    tokenize_weighted,
)
from common.tokenizer import build_clip_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_clip_tokenizer(model_max_length=32)


def test_schedules_per_step_values():
    np.testing.assert_allclose(schedule_values("constant", 1, 7, 0.5, 4), [7, 7, 7, 7])
    np.testing.assert_allclose(schedule_values("step", 1, 7, 0.4, 10), [1] * 4 + [7] * 6)
    np.testing.assert_allclose(schedule_values("step", 1, 7, 0.0, 3), [7, 7, 7])
    np.testing.assert_allclose(schedule_values("linear", 1, 7, 0, 4), [1, 3, 5, 7])
    cos = schedule_values("cosine", 1, 7, 0, 5)
    np.testing.assert_allclose(cos, [1, 1 + 6 * (1 - np.cos(np.pi / 4)) / 2, 4, 1 + 6 * (1 - np.cos(3 * np.pi / 4)) / 2, 7])
    assert np.all(np.diff(cos) >= 0)


def test_jitter_is_bounded_and_reproducible():
    cfg = CfgScheduleConfig(kind="step", low=2, high=6, switch=0.5, scale_jitter=1.0, switch_jitter=0.2)
    a = sample_guidance(cfg, 20, np.random.default_rng(3))
    b = sample_guidance(cfg, 20, np.random.default_rng(3))
    c = sample_guidance(cfg, 20, np.random.default_rng(4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert 1 <= a.min() <= 3 and 5 <= a.max() <= 7
    n_low = int((a == a.min()).sum())
    assert 6 <= n_low <= 14


def test_tokenization_by_segments_equals_whole_prompt(tok):
    for text in ["a photo of a cat", "a red circle to the left of a blue square", "Hello, 4k world!!  ok"]:
        ids, w = tokenize_weighted(tok, parse_prompt(text))
        ref = tok(text, padding="max_length", max_length=32, truncation=True).input_ids
        assert ids == ref
        assert w == [1.0] * 32


def test_explicit_weights_land_on_the_phrase_tokens(tok):
    wp = parse_prompt("a (red fox:1.3) in the snow")
    assert wp.segments == [("a ", 1.0), ("red fox", 1.3), (" in the snow", 1.0)]
    ids, w = tokenize_weighted(tok, wp)
    red_fox = tok("red fox", add_special_tokens=False).input_ids
    start = ids.index(red_fox[0])
    assert ids[start : start + len(red_fox)] == red_fox
    assert w[start : start + len(red_fox)] == [1.3] * len(red_fox)
    assert all(x == 1.0 for i, x in enumerate(w) if not start <= i < start + len(red_fox))
    # the ids equal those of the prompt without the syntax
    assert ids == tok("a red fox in the snow", padding="max_length", max_length=32).input_ids


def test_random_weighting_picks_content_words_reproducibly():
    cfg = PromptWeightingConfig(num_phrases=2, low=0.5, high=1.5)
    a = random_weighting("a red circle to the left of a blue square", cfg, np.random.default_rng(7))
    b = random_weighting("a red circle to the left of a blue square", cfg, np.random.default_rng(7))
    assert a.picks == b.picks and len(a.picks) == 2
    for word, w in a.picks:
        assert word in {"red", "circle", "blue", "square"} and 0.5 <= w <= 1.5
    assert a.text == "a red circle to the left of a blue square"
    # explicit weights are kept and never re-drawn
    c = random_weighting("a (red:2.0) cat", PromptWeightingConfig(num_phrases=3), np.random.default_rng(0))
    assert ("red", 2.0) in c.segments and [p for p, _ in c.picks] == ["cat"]


def test_compel_formula():
    z = torch.randn(2, 5, 3)
    z0 = torch.randn(5, 3)
    w = torch.tensor([[1.0, 2.0, 1, 1, 0.0], [1, 1, 1, 1, 1]])
    out = apply_token_weights(z, z0, w)
    torch.testing.assert_close(out[0, 1], z0[1] + 2 * (z[0, 1] - z0[1]))
    torch.testing.assert_close(out[0, 4], z0[4])
    torch.testing.assert_close(out[1], z[1])


def test_plan_reproducible_and_evaluation_plain():
    cfg = ExplorationConfig()
    p1 = plan_rollout("a photo of a cat", 11, cfg, 10, 5.0, explore=True)
    p2 = plan_rollout("a photo of a cat", 11, cfg, 10, 5.0, explore=True)
    assert p1.guidance == p2.guidance and p1.weighted_prompt.picks == p2.weighted_prompt.picks
    assert p1.guidance[0] == cfg.cfg_schedule.low and p1.guidance[-1] == cfg.cfg_schedule.high
    ev = plan_rollout("a photo of a cat", 11, cfg, 10, 5.0, explore=False)
    assert ev.guidance == [5.0] * 10 and ev.weighted_prompt.picks == []
    off = plan_rollout("a photo of a cat", 11, ExplorationConfig(enabled=False), 10, 4.0, explore=True)
    assert off.guidance == [4.0] * 10 and off.weighted_prompt.picks == []
