"""Reward-weighted regression: the weights, which samples shape the update, and where it pulls the model."""

import copy

import pytest
import torch

from common.config import apply_override, validate_config
from common.exploration import parse_prompt
from common.rollouts import RolloutGenerator
from common.sampling import guided_noise_pred
from learner.rwr import RWRLearner, rwr_weights


def _cfg(base, *overrides):
    data = base.model_dump(mode="json")
    for o in ("algorithm.name=rwr", "algorithm.minibatch_size=4", "algorithm.gradient_accumulation=1",
              "algorithm.stat_tracking.per_prompt=false", *overrides):  # fmt: skip
        apply_override(data, o)
    return validate_config(data)


@pytest.fixture(scope="module")
def scored_batch(tiny_cfg):
    batch = RolloutGenerator(tiny_cfg).generate(["a photo of a cat", "a photo of a dog"] * 4, list(range(8)))
    batch.rewards = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4])  # the first of each pair is better
    return batch


def _learner(cfg):
    learner = RWRLearner(cfg)
    torch.manual_seed(0)
    for p in learner.params:  # a non-zero B so every LoRA factor gets gradient
        torch.nn.init.normal_(p, std=0.02)
    return learner


def test_weights():
    adv = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    f = rwr_weights(adv, "filter", 1.0, 0.0)
    assert f.tolist() == [0.0, 0.0, 1.0, 1.0]  # strictly above min_advantage, mean 1 over the kept
    assert rwr_weights(adv, "filter", 1.0, -0.5).tolist() == pytest.approx([0.0, 1.0, 1.0, 1.0])
    e = rwr_weights(adv, "exp", 0.5, 0.0)
    assert torch.all(e[1:] > e[:-1]) and e.mean() == pytest.approx(1.0)
    assert e[3] / e[2] == pytest.approx(float(torch.exp(torch.tensor(1.5 / 0.5))), rel=1e-5)


def test_only_the_kept_samples_shape_the_update(tiny_cfg, scored_batch):
    """Filtered RWR trains on the better half only: changing the images of the dropped samples leaves the
    update exactly as it was, changing a kept one changes it."""
    cfg = _cfg(tiny_cfg)

    def update(batch):
        learner = _learner(cfg)
        m = learner.train(batch)
        return torch.cat([p.detach().flatten() for p in learner.params]), m

    base, m = update(scored_batch)
    assert m["kept_frac"] == 0.5 and m["policy_version"] == 1 and m["grad_norm"] > 0
    dropped = copy.copy(scored_batch)
    dropped.latents = scored_batch.latents.clone()
    dropped.latents[1::2, -1] += 1.0  # the worse sample of each pair
    torch.testing.assert_close(update(dropped)[0], base, atol=0, rtol=0)
    kept = copy.copy(scored_batch)
    kept.latents = scored_batch.latents.clone()
    kept.latents[0, -1] += 1.0
    assert (update(kept)[0] - base).abs().max() > 1e-6


def _denoising_loss(learner, x0, prompts, seed=123, scale=None):
    """The model's noise-prediction error on x0 at fixed noise and timesteps (8 per sample): of the conditional
    prediction, or with `scale` of the classifier-free guided one at that scale."""
    g = torch.Generator().manual_seed(seed)
    x0 = x0.repeat_interleave(8, 0)
    t = torch.randint(0, 1000, (x0.shape[0],), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    a = learner.alphas_cumprod[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    cond = learner.model.condition([parse_prompt(p) for p in prompts for _ in range(8)])
    with torch.no_grad():
        if scale is None:
            pred = learner.model.predict(xt, t, cond)
        else:
            pred = guided_noise_pred(learner.model, xt, t, cond, learner.uncond, torch.full((len(t),), scale))
    return float(((pred - eps) ** 2).mean())


def test_updates_pull_the_model_toward_the_better_samples(tiny_cfg, scored_batch):
    """Several updates on one batch fit the rewarded samples' images better than the same updates with the
    reward negated do, and the other samples' images worse: the model moves toward what the reward
    preferred (every update also lowers the error on both a little, as any denoising training does).
    Exp weighting at a low temperature behaves like the filter."""
    good, bad = scored_batch.latents[0::2, -1], scored_batch.latents[1::2, -1]
    prompts = scored_batch.prompts[0::2]
    for weighting in ("filter", "exp"):
        cfg = _cfg(tiny_cfg, f"algorithm.rwr.weighting={weighting}", "algorithm.rwr.temperature=0.5",
                   "algorithm.learning_rate=3e-3")  # fmt: skip
        losses = {}
        for sign in (1, -1):
            learner = _learner(cfg)
            batch = copy.copy(scored_batch)
            batch.rewards = sign * scored_batch.rewards
            for _ in range(8):
                learner.train(batch)
            losses[sign] = _denoising_loss(learner, good, prompts), _denoising_loss(learner, bad, prompts)
        assert losses[1][0] < losses[-1][0] and losses[1][1] > losses[-1][1], (weighting, losses)


def test_an_epoch_through_the_loop(tiny_cfg, tmp_path):
    from learner.local import LocalSystem
    from learner.loop import Trainer
    from learner.run_dir import RunDir

    cfg = _cfg(tiny_cfg, "train.epochs=2", "eval.every=2", "eval.max_prompts=2", "algorithm.inner_epochs=2")
    run = RunDir(tmp_path)
    run.create(cfg)
    system = LocalSystem(cfg)
    before = system.learner.checksum()
    rows = Trainer(cfg, run, system, log=lambda *_: None).fit()
    epochs = [r for r in rows if not r.get("final_eval")]
    assert [r["reward_queries"] for r in epochs] == [8, 16] and [r["policy_version"] for r in epochs] == [
        1,
        2,
    ]
    assert all(0 < r["kept_frac"] < 1 and r["loss"] > 0 for r in epochs)
    assert rows[-1]["eval_policy_version"] == 2 and system.learner.checksum() != before
    _, state, counters = run.load_checkpoint(run.latest_checkpoint())
    assert counters["policy_version"] == 2 and "tracker" in state


def test_min_reward_and_caption_dropout(tiny_cfg, scored_batch):
    """min_reward keeps only samples at or above it (here the two best); with uncond_fraction the update
    differs from the prompt-only one, and all-excluded batches train nothing."""
    learner = _learner(_cfg(tiny_cfg, "algorithm.rwr.min_reward=0.75", "algorithm.rwr.min_advantage=-100"))
    assert learner.train(scored_batch)["kept_frac"] == 0.25
    learner = _learner(_cfg(tiny_cfg, "algorithm.rwr.min_reward=2.0"))
    before = learner.checksum()
    m = learner.train(scored_batch)
    assert m["kept_frac"] == 0 and learner.checksum() == before
    plain, dropout = (_learner(_cfg(tiny_cfg, f"algorithm.rwr.uncond_fraction={f}")) for f in (0.0, 0.5))
    plain.train(scored_batch)
    dropout.train(scored_batch)
    assert plain.checksum() != dropout.checksum()


def test_reencode_targets_come_from_the_images(tiny_cfg, scored_batch):
    """target=reencode regresses on VAE posterior draws of the kept images: close to the sampled latents
    (the VAE round trip), different from them, and the dropped rows untouched."""
    learner = _learner(_cfg(tiny_cfg, "algorithm.rwr.target=reencode"))
    kept = torch.tensor([0, 2])
    x0 = learner.targets(scored_batch, kept)
    final = scored_batch.latents[:, -1]
    torch.testing.assert_close(x0[1], final[1], atol=0, rtol=0)
    assert not torch.equal(x0[0], final[0]) and torch.isfinite(x0).all()
    vae = learner.model.vae
    with torch.no_grad():
        post = vae.encode(scored_batch.images[kept].float() / 127.5 - 1.0).latent_dist
    z = (
        x0[kept] / vae.config.scaling_factor - post.mean
    ) / post.std  # a posterior draw: standard normal here
    assert abs(float(z.mean())) < 0.2 and abs(float(z.std()) - 1) < 0.2


def test_ema_is_published_and_training_continues_from_the_raw_weights(tiny_cfg, scored_batch):
    """With ema_decay the module holds the moving average between updates and the raw weights go on
    training: two updates equal a run without EMA on the raw weights, and the held weights are the
    moving average of the weights after each optimizer step, started at the initial ones."""
    d = 0.5
    plain = _learner(_cfg(tiny_cfg))
    ema = _learner(_cfg(tiny_cfg, f"algorithm.rwr.ema_decay={d}"))
    start = [p.detach().clone() for p in plain.params]
    per_step = []
    orig = plain._step

    def record():
        n = orig()
        per_step.append([p.detach().clone() for p in plain.params])
        return n

    plain._step = record
    for _ in range(2):
        plain.train(scored_batch)
        ema.train(scored_batch)
    # the raw weights of the EMA learner equal the plain learner's
    for r, p in zip(ema.raw, plain.params):
        torch.testing.assert_close(r, p.detach(), atol=1e-6, rtol=1e-5)
    # the EMA starts at the weights before the first step, then averages every step's
    expect = [w.clone() for w in start]
    for step in per_step:
        expect = [d * e + (1 - d) * w for e, w in zip(expect, step)]
    for p, e in zip(ema.params, expect):
        torch.testing.assert_close(p.detach(), e, atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(p, s) for p, s in zip(ema.params, start))


def test_guided_regresses_the_policys_own_denoiser(tiny_cfg, scored_batch):
    """guided=true fits the CFG-combined prediction: at guidance 1 that is the conditional prediction, so the
    update equals the plain one; at the sampler's guidance 5 it differs, and updates on the kept samples lower
    the guided error on them more than conditional updates do (the denoiser the policy samples with)."""
    def trained(*overrides, steps=1, grads=None):
        learner = _learner(_cfg(tiny_cfg, "algorithm.learning_rate=3e-3", *overrides))
        step = learner._step
        if grads is not None:  # the first optimizer step's gradient (Adam's step would amplify rounding)
            learner._step = lambda: grads.append(torch.cat([p.grad.flatten() for p in learner.params])) or step()
        for _ in range(steps):
            learner.train(scored_batch)
        return learner

    g_plain, g_guided, g_scale1 = [], [], []
    trained("sampling.guidance_scale=1.0", grads=g_plain)
    trained("sampling.guidance_scale=1.0", "algorithm.rwr.guided=true", grads=g_guided)
    trained("algorithm.rwr.guided=true", "algorithm.rwr.guided_scale=1.0", grads=g_scale1)  # sampling stays at 5
    assert float(g_plain[0].abs().max()) > 0
    for g in (g_guided, g_scale1):
        torch.testing.assert_close(g[0], g_plain[0], atol=1e-5 * float(g_plain[0].abs().max()), rtol=0)
    plain, guided = (trained("sampling.guidance_scale=5.0", *g, steps=6) for g in ([], ["algorithm.rwr.guided=true"]))
    assert max(float((a - b).abs().max()) for a, b in zip(plain.params, guided.params)) > 1e-3
    good, prompts = scored_batch.latents[0::2, -1], scored_batch.prompts[0::2]
    before = _denoising_loss(_learner(_cfg(tiny_cfg)), good, prompts, scale=5.0)
    after = {k: _denoising_loss(lr, good, prompts, scale=5.0) for k, lr in (("plain", plain), ("guided", guided))}
    assert after["guided"] < before and after["guided"] < after["plain"], (before, after)
    with pytest.raises(ValueError, match="uncond_fraction=0"):
        _cfg(tiny_cfg, "algorithm.rwr.guided=true", "algorithm.rwr.uncond_fraction=0.1")
    with pytest.raises(ValueError, match="set guided=true"):
        _cfg(tiny_cfg, "algorithm.rwr.guided_scale=2.0")
