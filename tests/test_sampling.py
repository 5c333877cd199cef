import math

import torch
from diffusers import DDIMScheduler

from common.ddim_schedule import ddim_timesteps, scheduler_timesteps, step_options
from common.exploration import plan_rollout
from common.models.sd import StableDiffusion
from common.sampling import (
    LazyNoise,
    coarse_tail,
    ddim_step_with_logprob,
    denoise,
    guided_noise_pred,
    initial_noise,
    recompute_logprobs,
    rollout_noise,
    sample_rollout,
    tail_indices,
)


def _sched():
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)  # fmt: skip


def test_timesteps_match_diffusers():
    s = _sched()
    s.set_timesteps(20)
    assert ddim_timesteps(1000, 20, 1).tolist() == s.timesteps.tolist()


def test_every_timestep_spacing_and_clip_sample_match_diffusers():
    """Schedulers of other models (trailing spacing: SD-Turbo, zero-terminal-SNR models; clip_sample, DDIM's
    default where a config does not set it) were read as SD1.5's: the chain then differed from the model's own
    DDIM pipeline."""
    for spacing in ("leading", "trailing", "linspace"):
        for steps, offset in ((4, 0), (7, 1), (20, 1), (50, 1)):
            s = DDIMScheduler(steps_offset=offset, timestep_spacing=spacing)
            s.set_timesteps(steps)
            assert scheduler_timesteps(s, steps).tolist() == s.timesteps.tolist(), (spacing, steps)
    torch.manual_seed(2)
    s = DDIMScheduler(beta_schedule="scaled_linear", clip_sample=True, clip_sample_range=0.5,
                      timestep_spacing="trailing")  # fmt: skip
    s.set_timesteps(5)
    assert step_options(s) == {"prediction_type": "epsilon", "clip_sample": 0.5}
    x = torch.randn(2, 4, 8, 8)
    for t in s.timesteps.tolist():
        eps, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
        tt = torch.full((2,), t, dtype=torch.long)
        prev, _ = ddim_step_with_logprob(s.alphas_cumprod, float(s.final_alpha_cumprod), 1000, 5, eps, tt, x, 1.0,
                                         noise=noise, **step_options(s))  # fmt: skip
        ref = s.step(eps, t, x, eta=1.0, variance_noise=noise).prev_sample
        torch.testing.assert_close(prev, ref, atol=1e-5, rtol=1e-5)
        x = prev


def test_a_scheduler_the_step_cannot_reproduce_is_named_before_the_run(tmp_path):
    import json

    import pytest

    from common.models import ModelLoadError
    from common.pipelines import check_model_configs

    (tmp_path / "scheduler").mkdir()
    for config, expected in (({"thresholding": True}, "thresholding=true"),
                             ({"timestep_spacing": "karras"}, "timestep_spacing 'karras' is not supported"),
                             ({"prediction_type": "sample"}, "prediction_type 'sample' is not supported")):  # fmt: skip
        (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
        with pytest.raises(ModelLoadError, match=f"model.pretrained='{tmp_path}': its scheduler.*{expected}"):
            check_model_configs(str(tmp_path), None)
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"timestep_spacing": "trailing"}))
    check_model_configs(str(tmp_path), None)


def test_step_matches_diffusers_and_gaussian_density():
    torch.manual_seed(0)
    s = _sched()
    s.set_timesteps(10)
    x = torch.randn(3, 4, 8, 8)
    eps = torch.randn(3, 4, 8, 8)
    noise = torch.randn(3, 4, 8, 8)
    for t in s.timesteps.tolist():
        tt = torch.full((3,), t, dtype=torch.long)
        prev, lp = ddim_step_with_logprob(s.alphas_cumprod, float(s.final_alpha_cumprod), 1000, 10, eps, tt, x, 1.0,
                                          noise=noise)  # fmt: skip
        ref = s.step(eps, t, x, eta=1.0, variance_noise=noise).prev_sample
        torch.testing.assert_close(prev, ref, atol=1e-5, rtol=1e-5)
        # the log-prob is the mean over dimensions of the Gaussian log-density around the noiseless step
        mean = s.step(eps, t, x, eta=1.0, variance_noise=torch.zeros_like(noise)).prev_sample
        a_t = s.alphas_cumprod[t]
        prev_t = t - 100
        a_p = s.alphas_cumprod[prev_t] if prev_t >= 0 else s.final_alpha_cumprod
        std = math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
        dens = torch.distributions.Normal(mean.double(), std).log_prob(prev.double()).mean(dim=(1, 2, 3))
        torch.testing.assert_close(lp.double(), dens, atol=1e-4, rtol=1e-5)
        # given prev_sample, the same function recomputes the same log-prob
        _, lp2 = ddim_step_with_logprob(s.alphas_cumprod, float(s.final_alpha_cumprod), 1000, 10, eps, tt, x, 1.0,
                                        prev_sample=prev)  # fmt: skip
        torch.testing.assert_close(lp2, lp)
        x = prev


def test_eta_zero_is_deterministic_ddim():
    """eta 0 (AlignProp's option): diffusers' deterministic DDIM step, whatever the noise; log-prob reported as 0."""
    torch.manual_seed(1)
    s = _sched()
    s.set_timesteps(10)
    x = torch.randn(2, 4, 8, 8)
    for t in s.timesteps.tolist():
        eps = torch.randn(2, 4, 8, 8)
        tt = torch.full((2,), t, dtype=torch.long)
        a, lp = ddim_step_with_logprob(s.alphas_cumprod, float(s.final_alpha_cumprod), 1000, 10, eps, tt, x, 0.0,
                                       noise=torch.randn(2, 4, 8, 8))  # fmt: skip
        b, _ = ddim_step_with_logprob(s.alphas_cumprod, float(s.final_alpha_cumprod), 1000, 10, eps, tt, x, 0.0,
                                      noise=torch.randn(2, 4, 8, 8))  # fmt: skip
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(a, s.step(eps, t, x, eta=0.0).prev_sample, atol=1e-5, rtol=1e-5)
        assert torch.equal(lp, torch.zeros(2))
        x = a


def test_rollout_logprobs_recompute_exactly(tiny_cfg, tiny_pipe):
    model = StableDiffusion(tiny_pipe)
    plans = [plan_rollout(p, i, tiny_cfg.exploration, 6, 5.0, explore=True) for i, p in enumerate(["a cat", "a dog"])]
    cond = model.condition([p.weighted_prompt for p in plans])
    g = torch.tensor([p.guidance for p in plans], dtype=torch.float32)
    roll = sample_rollout(model, cond, model.negative(), g, [1, 2], 6, 1.0)
    assert roll.latents.shape == (2, 7, 4, 8, 8) and roll.log_probs.shape == (2, 6)
    again = sample_rollout(model, cond, model.negative(), g, [1, 2], 6, 1.0)
    torch.testing.assert_close(again.latents, roll.latents)  # reproducible from the seeds
    j = torch.arange(6)
    with torch.no_grad():
        lp = recompute_logprobs(model, roll.latents[:, :-1].flatten(0, 1), roll.latents[:, 1:].flatten(0, 1),
                                roll.timesteps.repeat(2), {k: v.repeat_interleave(6, 0) for k, v in cond.items()},
                                model.negative(),
                                g.flatten(), 6, 1.0)  # fmt: skip
    assert (lp.view(2, 6) - roll.log_probs).abs().max() < 1e-4
    assert j.numel() == 6


class _CountingTable(torch.Tensor):
    """A scheduler table that counts the copies `.to` makes of it (on a GPU, each is a copy from host memory,
    which synchronises the stream)."""

    moves = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        if func is torch.Tensor.to and out is not args[0]:
            cls.moves += 1
        return out


def test_scheduler_table_moves_once_per_device_not_once_per_step(tiny_cfg, tiny_pipe):
    """The sampler's chain and the learner's recomputation read alphas_cumprod from one device copy: moving it
    at every step cost a GPU stream sync per step. The cached copy gives the same samples and log-probs."""
    model = StableDiffusion(tiny_pipe)
    plans = [plan_rollout(p, i, tiny_cfg.exploration, 6, 5.0, explore=True) for i, p in enumerate(["a cat", "a dog"])]
    cond = model.condition([p.weighted_prompt for p in plans])
    g = torch.tensor([p.guidance for p in plans], dtype=torch.float32)
    ref = sample_rollout(model, cond, model.negative(), g, [1, 2], 6, 1.0)
    sch = model.scheduler
    # float64 on the CPU: every move to the float32 the step computes in is a real copy, as a move to a GPU is
    sch.alphas_cumprod = sch.alphas_cumprod.double().as_subclass(_CountingTable)
    _CountingTable.moves = 0
    roll = sample_rollout(model, cond, model.negative(), g, [1, 2], 6, 1.0)
    sample_rollout(model, cond, model.negative(), g, [3, 4], 6, 1.0)
    with torch.no_grad():
        lp = recompute_logprobs(model, roll.latents[:, :-1].flatten(0, 1), roll.latents[:, 1:].flatten(0, 1),
                                roll.timesteps.repeat(2), {k: v.repeat_interleave(6, 0) for k, v in cond.items()},
                                model.negative(), g.flatten(), 6, 1.0)  # fmt: skip
    assert _CountingTable.moves == 1  # two chains of 6 steps and a recomputation: one copy in all
    torch.testing.assert_close(roll.latents, ref.latents, rtol=0, atol=0)
    torch.testing.assert_close(roll.log_probs, ref.log_probs, rtol=0, atol=0)
    assert (lp.view(2, 6) - roll.log_probs).abs().max() < 1e-4


def test_lazy_noise_draws_the_same_values_as_one_block(tiny_cfg, tiny_pipe):
    """The sampler draws each step's noise as the chain reaches it (so that drawing overlaps the GPU's work);
    the values, and so the samples of a seed, are those of the single [B, T+1, ...] draw."""
    for shape in [(4, 8, 8), (4, 64, 64), (4, 128, 96)]:
        lazy = rollout_noise([5, 2**40 + 3], 3, shape)
        assert isinstance(lazy, LazyNoise) and lazy.shape == (2, 4, *shape)
        block = initial_noise([5, 2**40 + 3], 3, shape)
        assert all(torch.equal(lazy.step(i), block[:, i]) for i in (0, 2, 1, 3))  # any order, drawn once
    assert isinstance(rollout_noise([1], 3, (3, 5, 7)), torch.Tensor)  # 105 values a step: one block instead
    model = StableDiffusion(tiny_pipe)
    cond = model.condition([plan_rollout("a cat", 0, tiny_cfg.exploration, 6, 5.0, explore=False).weighted_prompt] * 2)
    g = torch.full((2, 6), 5.0)
    roll = sample_rollout(model, cond, model.negative(), g, [1, 2], 6, 1.0)
    with torch.no_grad():
        steps = list(denoise(model, cond, model.negative(), g, initial_noise([1, 2], 6, model.latent_shape), 1.0))
    torch.testing.assert_close(roll.latents[:, 0], initial_noise([1, 2], 6, model.latent_shape)[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(roll.latents[:, 1:], torch.stack([x for x, _ in steps], 1), rtol=0, atol=0)
    torch.testing.assert_close(roll.log_probs, torch.stack([lp for _, lp in steps], 1), rtol=0, atol=0)


def test_chain_recorded_step_by_step_equals_the_stacked_chain(tiny_cfg, tiny_pipe, monkeypatch):
    """On a GPU the sampler copies each step's latents to pinned host memory as they are made (overlapping the
    transfer with the next step); the same per-sample copies, forced on the CPU, give the stacked chain."""
    from common import sampling

    model = StableDiffusion(tiny_pipe)
    cond = model.condition([plan_rollout("a cat", 0, tiny_cfg.exploration, 6, 5.0, explore=False).weighted_prompt] * 3)
    g = torch.full((3, 6), 5.0)
    ref = sample_rollout(model, cond, model.negative(), g, [1, 2, 3], 6, 1.0)
    made = []

    class PerStep(sampling._HostChain):
        def __init__(self, shape, device):
            super().__init__(shape, device, per_step=True)
            made.append(self)

    monkeypatch.setattr(sampling, "_HostChain", PerStep)
    roll = sample_rollout(model, cond, model.negative(), g, [1, 2, 3], 6, 1.0)
    assert len(made) == 1 and made[0].host is roll.latents and not made[0].steps
    torch.testing.assert_close(roll.latents, ref.latents, rtol=0, atol=0)
    torch.testing.assert_close(roll.log_probs, ref.log_probs, rtol=0, atol=0)


def test_tail_indices_spread_the_jumps_over_the_untrained_steps():
    assert tail_indices(20, 6, 6) == [6, 8, 11, 13, 15, 18]
    assert tail_indices(20, 6, 14) == list(range(6, 20))  # one jump a step: the schedule itself
    assert tail_indices(20, 6, 50) == list(range(6, 20))  # never more jumps than steps left
    assert tail_indices(20, 19, 3) == [19]


def test_head_records_the_full_chains_first_steps_and_a_whole_tail_is_eta0_ddim(tiny_cfg, tiny_pipe):
    """`sampling.tail_steps`: the recorded head is the full chain's first steps to the bit (so DDPO's log-probs
    and the learner's recomputation are unchanged), and the coarse tail is deterministic DDIM: with one jump a
    step it is the eta-0 chain step by step (diffusers' DDIM step)."""
    model = StableDiffusion(tiny_pipe)
    cond = model.condition([plan_rollout(p, 0, tiny_cfg.exploration, 6, 5.0, explore=False).weighted_prompt
                            for p in ("a cat", "a dog")])  # fmt: skip
    g = torch.tensor([[2.0, 2.0, 3.0, 5.0, 5.0, 5.0], [4.0] * 6])
    full = sample_rollout(model, cond, model.negative(), g, [1, 2], 6, 1.0)
    cut = sample_rollout(model, cond, model.negative(), g, [1, 2], 6, 1.0, head=2, tail_steps=2)
    assert cut.latents.shape == (2, 3, 4, 8, 8) and cut.log_probs.shape == (2, 2) and cut.timesteps.shape == (2,)
    torch.testing.assert_close(cut.latents, full.latents[:, :3], rtol=0, atol=0)
    torch.testing.assert_close(cut.log_probs, full.log_probs[:, :2], rtol=0, atol=0)
    assert torch.equal(full.x0, full.latents[:, -1]) and cut.x0.shape == (2, 4, 8, 8)
    assert cut.final is not None and not torch.allclose(cut.x0, full.x0)
    # the whole tail, one jump a step, is eta-0 DDIM from the head's latents
    s = DDIMScheduler.from_config(model.scheduler.config)
    s.set_timesteps(6)
    assert s.timesteps.tolist() == full.timesteps.tolist()
    x = cut.latents[:, -1]
    with torch.no_grad():
        ours = coarse_tail(model, cond, model.negative(), g, x, full.timesteps, 2, 4)
        for i, t in enumerate(s.timesteps.tolist()[2:], start=2):
            tt = torch.full((2,), t, dtype=torch.long)
            eps = guided_noise_pred(model, x, tt, cond, model.negative(), g[:, i])
            x = s.step(eps, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)
    # reproducible from the seeds, like the full chain
    two = sample_rollout(model, cond, model.negative(), g, [1, 2], 6, 1.0, head=2, tail_steps=2)
    torch.testing.assert_close(two.x0, cut.x0, rtol=0, atol=0)


def test_a_cut_chain_needs_a_tail(tiny_cfg, tiny_pipe):
    import pytest

    model = StableDiffusion(tiny_pipe)
    cond = model.condition([plan_rollout("a cat", 0, tiny_cfg.exploration, 6, 5.0, explore=False).weighted_prompt])
    g = torch.full((1, 6), 5.0)
    with pytest.raises(ValueError, match="tail_steps"):
        sample_rollout(model, cond, model.negative(), g, [1], 6, 1.0, head=3)
    with pytest.raises(ValueError, match="head=7"):
        sample_rollout(model, cond, model.negative(), g, [1], 6, 1.0, head=7, tail_steps=1)
