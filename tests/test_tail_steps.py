"""sampling.tail_steps: DDPO's training rollouts record only the steps of its timestep window and finish each
image with a few deterministic jumps. The recorded steps, and so the update for given rewards, must be exactly
those of the whole chain; evaluation must still sample the whole chain."""

import pytest
import torch

from common.rollouts import RolloutGenerator
from learner.ddpo import DDPOLearner
from tests.test_fused_lora import _moved_learner  # a LoRA far from zero

PROMPTS = ["a photo of a cat", "a photo of a dog"] * 4


def _cfg(tiny_cfg, tail: int | None):
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.algorithm.timestep_window = (0.0, 0.5)  # the first 3 of 6 steps
    cfg.sampling.tail_steps = tail
    return cfg


def test_cut_rollouts_record_the_window_and_give_the_whole_chains_update(tiny_cfg):
    full_cfg, cut_cfg = _cfg(tiny_cfg, None), _cfg(tiny_cfg, 2)
    a, b = _moved_learner(full_cfg), _moved_learner(cut_cfg)
    full, cut = RolloutGenerator(full_cfg), RolloutGenerator(cut_cfg)
    full.set_weights(*a.weights())
    cut.set_weights(*b.weights())
    seeds = list(range(8))
    fb, cb = full.generate(PROMPTS, seeds), cut.generate(PROMPTS, seeds)
    assert fb.latents.shape[1] == 7 and cb.latents.shape[1] == 4  # x_T and the 3 window steps
    assert cb.log_probs.shape == (8, 3) and cb.guidance.shape == (8, 3) and cb.timesteps.tolist() == fb.timesteps[:3].tolist()
    torch.testing.assert_close(cb.latents, fb.latents[:, :4], rtol=0, atol=0)
    torch.testing.assert_close(cb.log_probs, fb.log_probs[:, :3], rtol=0, atol=0)
    assert not torch.equal(cb.images, fb.images)  # another tail, another image
    # evaluation images come from the whole chain whatever the setting
    ev_full, ev_cut = full.generate(PROMPTS[:2], [5, 6], explore=False), cut.generate(PROMPTS[:2], [5, 6], explore=False)
    assert ev_cut.latents.shape[1] == 7 and torch.equal(ev_cut.images, ev_full.images)

    rewards = torch.linspace(-1, 1, 8)
    fb.rewards, cb.rewards = rewards, rewards.clone()
    ma, mb = a.train(fb), b.train(cb)
    assert mb["logprob_mismatch"] < 1e-5 and abs(mb["ratio_mean"] - 1) < 1e-5
    sa, sb = a.weights()[1], b.weights()[1]
    assert max((sa[k] - sb[k]).abs().max().item() for k in sa) < 1e-6  # the same update
    assert any((sa[k] - _moved_learner(full_cfg).weights()[1][k]).abs().max() > 0 for k in sa)  # and it moved
    assert ma["approx_kl"] == pytest.approx(mb["approx_kl"], abs=1e-9)


def test_a_batch_shorter_than_the_window_is_refused(tiny_cfg):
    cut_cfg = _cfg(tiny_cfg, 2)
    batch = RolloutGenerator(cut_cfg).generate(PROMPTS[:4], list(range(4)))
    batch.rewards = torch.linspace(-1, 1, 4)
    wide = cut_cfg.model_copy(deep=True)
    wide.algorithm.timestep_window = (0.0, 1.0)
    with pytest.raises(ValueError, match="records 3 steps"):
        DDPOLearner(wide).train(batch)


def test_tail_steps_is_for_ddpo_only():
    from common.config import load_config

    with pytest.raises(ValueError, match="sampling.tail_steps"):
        load_config("shapes_order", ["sampling.tail_steps=4"])
    assert load_config("shapes_order_ddpo", ["sampling.tail_steps=4"]).sampling.tail_steps == 4
