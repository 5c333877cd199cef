"""AlignProp: reward backpropagation through the sampling chain, truncated to the last K steps."""

import pytest
import torch

from common.config import apply_override, validate_config
from common.exploration import plan_rollout
from common.ddim_schedule import ddim_timesteps
from common.sampling import ddim_step_with_logprob, guided_noise_pred, initial_noise, sample_rollout
from learner.alignprop import AlignPropLearner, sample_with_grad

PROMPTS = ["a red circle to the left of a blue square", "a green triangle above a yellow circle"]


def _cfg(base, *overrides):
    data = base.model_dump(mode="json")
    for o in ("algorithm.name=alignprop", "reward.terms=[{name: shapes_soft}]", "prompts.train=shapes_pairs",
              "train.samples_per_epoch=8", "algorithm.minibatch_size=2", "algorithm.gradient_accumulation=2", *overrides):  # fmt: skip
        apply_override(data, o)
    return validate_config(data)


@pytest.fixture(scope="module")
def learner(tiny_cfg):
    ap = AlignPropLearner(_cfg(tiny_cfg))
    torch.manual_seed(0)
    for p in ap.params:  # a non-zero B so the gradient reaches every LoRA factor
        torch.nn.init.normal_(p, std=0.02)
    return ap


def _plans(learner, seeds):
    s = learner.cfg.sampling
    plans = [plan_rollout(p, sd, learner.cfg.exploration, s.num_steps, s.guidance_scale, True) for p, sd in zip(PROMPTS, seeds)]
    cond = learner.model.condition([p.weighted_prompt for p in plans])
    return cond, torch.tensor([p.guidance for p in plans], dtype=torch.float32)


def _grads(learner):
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in learner.params])


def test_the_chain_is_the_samplers_chain(learner):
    """Same seeds, weights, exploration draws: AlignProp's differentiable chain lands on the sampler's latents."""
    cond, g = _plans(learner, [3, 4])
    s = learner.cfg.sampling
    with torch.no_grad():
        ours = sample_with_grad(learner.model, cond, learner.uncond, g, [3, 4], s.num_steps, s.eta, k=2)
        roll = sample_rollout(learner.model, cond, learner.uncond, g, [3, 4], s.num_steps, s.eta)
    torch.testing.assert_close(ours, roll.latents[:, -1], atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_lora_only(learner):
    learner.optimizer.zero_grad(set_to_none=True)
    loss, r, parts = learner.minibatch_loss(PROMPTS, [1, 2], k=2)
    loss.backward()
    named = dict(learner.model.unet.named_parameters())
    with_grad = [n for n, p in named.items() if p.grad is not None]
    assert with_grad and all("lora_" in n for n in with_grad)
    assert all(p.grad is None for m in (learner.model.vae, *[e for _, e in learner.model.encoders]) for p in m.parameters())
    assert _grads(learner).abs().sum() > 0 and torch.isfinite(_grads(learner)).all()
    assert loss.item() == pytest.approx(-float(r.mean()), abs=1e-6) and "shapes_soft" in parts
    learner.optimizer.zero_grad(set_to_none=True)


def test_truncation_matches_a_hand_written_loss(learner):
    """With K = 1, only the last step carries gradient: equal to a loss written out by hand that runs the
    first T-1 steps without a graph; with K = T the gradient differs (the early steps then contribute)."""
    m, s = learner.model, learner.cfg.sampling
    seeds = [5, 6]
    cond, g = _plans(learner, seeds)
    learner.optimizer.zero_grad(set_to_none=True)
    loss, _, _ = learner.minibatch_loss(PROMPTS, seeds, k=1)
    loss.backward()
    ours = _grads(learner).clone()

    learner.optimizer.zero_grad(set_to_none=True)
    sch = m.scheduler
    ts = ddim_timesteps(1000, s.num_steps, 1)
    noise = initial_noise(seeds, s.num_steps, m.latent_shape)
    x = noise[:, 0]
    for i, t in enumerate(ts.tolist()):
        tt = torch.full((2,), t)
        with torch.set_grad_enabled(i == s.num_steps - 1):
            eps = guided_noise_pred(m, x, tt, cond, learner.uncond, g[:, i])
            x, _ = ddim_step_with_logprob(sch.alphas_cumprod, float(sch.final_alpha_cumprod), 1000, s.num_steps, eps, tt,
                                          x, s.eta, noise=noise[:, i + 1])  # fmt: skip
    (-learner.reward.differentiable_total(m.decode(x), PROMPTS)[0].mean()).backward()
    by_hand = _grads(learner).clone()
    assert ours.norm() > 0 and (ours - by_hand).norm() / by_hand.norm() < 1e-5

    learner.optimizer.zero_grad(set_to_none=True)
    loss, _, _ = learner.minibatch_loss(PROMPTS, seeds, k=s.num_steps)
    loss.backward()
    full = _grads(learner)
    assert (full - ours).norm() / ours.norm() > 1e-3
    learner.optimizer.zero_grad(set_to_none=True)


def test_an_epoch_through_the_loop_counts_queries_and_moves_the_policy(tiny_cfg, tmp_path):
    from learner.local import LocalSystem
    from learner.loop import Trainer
    from learner.run_dir import RunDir

    cfg = _cfg(tiny_cfg, "train.epochs=2", "eval.every=2", "eval.max_prompts=2", "algorithm.alignprop.truncation=[1,3]",
               "eval.reward={terms: [{name: shapes}]}", "algorithm.learning_rate=0.01")  # fmt: skip
    run = RunDir(tmp_path)
    run.create(cfg)
    system = LocalSystem(cfg)
    before = system.learner.checksum()
    rows = Trainer(cfg, run, system, log=lambda *_: None).fit()
    epochs = [r for r in rows if not r.get("final_eval")]
    assert [r["reward_queries"] for r in epochs] == [8, 16] and [r["policy_version"] for r in epochs] == [1, 2]
    assert all(1 <= r["truncation_k"] <= 3 and r["grad_norm"] > 0 for r in epochs)
    assert epochs[0]["reward_shapes_soft_mean"] == pytest.approx(epochs[0]["reward_mean"])
    assert "eval_shapes_full_mean" in rows[-1]  # evaluation reports the hard detector (eval.reward)
    assert rows[-1]["eval_policy_version"] == 2 and system.learner.checksum() != before
    ckpt = run.latest_checkpoint()
    lora, state, counters = run.load_checkpoint(ckpt)
    assert counters["policy_version"] == 2 and state["version"] == 2


def test_alignprop_refuses_a_non_differentiable_reward(tiny_cfg):
    from common.config import ConfigError
    from learner.main import preflight

    cfg = _cfg(tiny_cfg, "reward.terms=[{name: jpeg_compressibility}]")
    with pytest.raises(ConfigError, match=r"jpeg_compressibility is not differentiable; differentiable rewards: .*shapes_soft"):
        preflight(cfg)


def test_start_up_sizes_name_the_steps_that_carry_gradients(tiny_cfg):
    d = _cfg(tiny_cfg, "algorithm.alignprop.truncation=[2,5]", "algorithm.inner_epochs=3").derived()
    assert d["trained_timesteps_per_sample"] == 5  # k_max, not DDPO's timestep window
    assert d["optimizer_steps_per_epoch"] == 2  # 8 samples / (2 x 2); AlignProp draws each sample once
