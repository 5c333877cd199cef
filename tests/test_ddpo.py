import pytest
import torch

from common.rollouts import RolloutGenerator
from learner.actor import split_stale
from learner.ddpo import DDPOLearner, ppo_loss
from tests.test_trajectory import make_batch


def test_ppo_loss_clips_the_ratio():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.0, 1.5, 0.5, 1.05]))
    adv = torch.tensor([1.0, 1.0, -1.0, 1.0])
    loss, info = ppo_loss(new, old, adv, clip_range=0.1)
    # max(-A r, -A clip(r)): [-1, -1.1, 0.9, -1.05]
    torch.testing.assert_close(loss, torch.tensor([-1.0, -1.1, 0.9, -1.05]).mean())
    assert info["clipfrac"] == 0.5
    assert abs(float(info["ratio_mean"]) - (1 + 1.5 + 0.5 + 1.05) / 4) < 1e-6


def test_stale_batches_are_dropped_and_counted():
    batches = [make_batch(b=2, version=5), make_batch(b=3, version=4), make_batch(b=1, version=2)]
    fresh, dropped = split_stale(batches, version=5, max_staleness=1)
    assert [b.policy_version for b in fresh] == [5, 4] and dropped == 1
    fresh, dropped = split_stale(batches, version=5, max_staleness=0)
    assert [b.policy_version for b in fresh] == [5] and dropped == 4


@pytest.fixture(scope="module")
def scored_batch(tiny_cfg):
    gen = RolloutGenerator(tiny_cfg)
    batch = gen.generate(["a photo of a cat", "a photo of a dog"] * 4, list(range(8)))
    batch.rewards = torch.linspace(-1, 1, 8)
    return batch


def _grads(learner):
    return torch.cat([p.grad.flatten() for p in learner.params])


@pytest.mark.parametrize(
    "setting",
    [["algorithm.timestep_chunk=1"], ["algorithm.max_unet_batch=6"], ["algorithm.timestep_chunk=4", "algorithm.max_unet_batch=10"],
     ["algorithm.gradient_checkpointing=true"], ["algorithm.gradient_checkpointing=true", "algorithm.max_unet_batch=4"]],
)  # fmt: skip
def test_memory_settings_give_the_plain_gradient(tiny_cfg, scored_batch, setting):
    """DDPO sums its loss over (sample, timestep) pairs, so splitting them into several UNet calls (a loop over
    timesteps, or calls of at most max_unet_batch images with both CFG halves) or recomputing activations
    (gradient checkpointing) must give the gradient of one call over all of them. (Calls of a single pair,
    max_unet_batch=2, differ by 1.1e-5 relative: float32 kernels take other paths at batch 1.)"""
    from common.config import apply_override, validate_config

    grads = []
    for overrides in ([], setting):
        data = tiny_cfg.model_dump(mode="json")
        for o in overrides:
            apply_override(data, o)
        learner = DDPOLearner(validate_config(data))
        torch.manual_seed(0)
        for p in learner.params:  # a non-zero B so every LoRA factor gets gradient
            torch.nn.init.normal_(p, std=0.01)
        adv = torch.linspace(-1, 1, 8)
        idx = torch.arange(4)
        steps = torch.stack([torch.randperm(6, generator=torch.Generator().manual_seed(i)) for i in range(4)])
        learner.model.unet.train()  # as in train(): checkpointing is active in train mode only
        learner._minibatch_backward(scored_batch, adv, idx, steps)
        grads.append(_grads(learner))
    rel = (grads[0] - grads[1]).norm() / grads[0].norm()
    assert grads[0].norm() > 0 and rel < 1e-5, rel


def test_on_policy_first_minibatch_and_update(tiny_cfg, scored_batch):
    learner = DDPOLearner(tiny_cfg)
    before = learner.checksum()
    m = learner.train(scored_batch)
    assert m["logprob_mismatch"] < 1e-4 and abs(m["ratio_mean"] - 1) < 1e-4
    assert learner.version == 1 and learner.checksum() != before
    with pytest.raises(ValueError, match="needs a scored batch"):
        scored_batch_unscored = make_batch(rewards=False)
        learner.train(scored_batch_unscored)


def test_epoch_prompts_in_groups():
    from learner.driver import epoch_prompts

    prompts = [f"p{i}" for i in range(10)]
    grouped = epoch_prompts(prompts, seed=0, epoch=3, n=12, groups=3)
    assert len(grouped) == 12 and len(set(grouped)) == 3
    assert all(grouped.count(p) == 4 for p in set(grouped))
    assert grouped == epoch_prompts(prompts, seed=0, epoch=3, n=12, groups=3)  # a function of (seed, epoch)
    assert epoch_prompts(prompts, 0, 4, 12, 3) != grouped
    assert len(epoch_prompts(prompts, 0, 3, 12)) == 12


def test_timestep_window_trains_only_the_early_steps(tiny_cfg, scored_batch):
    """With timestep_window (0, 0.5) the learner never reads a step outside the window: poisoning the
    late steps' latents and log-probs with NaN leaves the update finite and on-policy."""
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.algorithm.timestep_window = (0.0, 0.5)  # 6 steps -> steps 0, 1, 2
    poisoned = scored_batch.concat([scored_batch])  # a copy
    poisoned.latents[:, 4:] = float("nan")  # x after steps 3.. (index j+1 for step j >= 3)
    poisoned.log_probs[:, 3:] = float("nan")
    learner = DDPOLearner(cfg)
    m = learner.train(poisoned)
    assert m["logprob_mismatch"] < 1e-4 and all(torch.isfinite(p).all() for p in learner.params)
    full = DDPOLearner(tiny_cfg)
    assert not torch.isfinite(torch.tensor(full.train(poisoned)["loss"]))  # without the window NaN reaches the loss


def test_timestep_window_config():
    from common.config import ConfigError, load_config, window_steps

    assert window_steps(20, (0.0, 0.5), 1.0) == (list(range(10)), 10)
    assert window_steps(20, (0.0, 0.4), 0.5) == (list(range(8)), 4)
    assert window_steps(3, (0.9, 1.0), 1.0) == ([2], 1)
    # both ends round alike, so a boundary splits the chain without a shared step (float error included)
    for n, w in [(25, 0.3), (20, 0.33), (100, 0.29), (20, 0.3)]:
        early, late = window_steps(n, (0.0, w), 1.0)[0], window_steps(n, (w, 1.0), 1.0)[0]
        assert early + late == list(range(n)), (n, w)
    assert window_steps(100, (0.29, 1.0), 1.0)[0][0] == 29
    assert load_config("tiny", ["algorithm.timestep_window=[0,0.5]"]).derived()["trained_timesteps_per_sample"] == 10
    with pytest.raises(ConfigError, match="algorithm.timestep_window: must be"):
        load_config("tiny", ["algorithm.timestep_window=[0.5,0.5]"])


def test_sgd_optimizer_follows_the_gradient_size(tiny_cfg, scored_batch):
    """AdamW's first step moves every weight with a gradient by ~lr (sign-like); SGD's steps scale with
    each gradient, so their sizes spread over orders of magnitude."""
    spread = {}
    for name in ("adamw", "sgd"):
        cfg = tiny_cfg.model_copy(deep=True)
        cfg.algorithm.optimizer, cfg.algorithm.learning_rate, cfg.algorithm.weight_decay = name, 0.1, 0.0
        cfg.algorithm.gradient_accumulation = 4  # one optimizer step for the batch of 8
        cfg.algorithm.minibatch_size = 2
        learner = DDPOLearner(cfg)
        before = [p.detach().clone() for p in learner.params]
        m = learner.train(scored_batch)
        assert m["logprob_mismatch"] < 1e-4
        moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(learner.params, before)]).abs()
        moved = moved[moved > 0]
        spread[name] = float(moved.median() / moved.max())
    assert isinstance(DDPOLearner(cfg).optimizer, torch.optim.SGD)
    assert spread["adamw"] > 0.5 and spread["sgd"] < 0.2, spread


def test_update_size_shows_a_single_step_epoch_moving(tiny_cfg, scored_batch):
    """With one optimizer step an epoch the PPO ratio is 1 while the gradient is taken, so approx_kl and clipfrac
    are 0 whether or not the policy moved; update_norm is the L2 norm of the LoRA change, which for Adam's first
    step (about lr per weight, whatever the gradient's size) scales with the learning rate."""
    from common.config import apply_override, validate_config

    norms = {}
    for lr in (1e-4, 1e-3):
        data = tiny_cfg.model_dump(mode="json")
        for o in ("algorithm.gradient_accumulation=2", "algorithm.inner_epochs=1", f"algorithm.learning_rate={lr}"):
            apply_override(data, o)
        learner = DDPOLearner(validate_config(data))  # 8 samples, minibatch 4 x 2: one step
        before = learner.snapshot()
        w0 = [p.detach().clone() for p in learner.params]
        m = learner.train(scored_batch)
        m.update(learner.update_size(before))
        assert m["approx_kl"] == 0 and m["clipfrac"] == 0
        change = torch.cat([(p.detach() - w).flatten() for p, w in zip(learner.params, w0)]).norm()
        assert abs(m["update_norm"] - float(change)) <= 1e-6 * max(float(change), 1.0)
        norms[lr] = m["update_norm"]
    assert 8 < norms[1e-3] / norms[1e-4] <= 10 + 1e-3, norms
    assert learner.update_size(learner.snapshot()) == {"update_norm": 0.0}


@pytest.mark.parametrize("algorithm", ["ddpo", "rwr"])
def test_a_last_step_of_fewer_minibatches_takes_the_mean_of_its_samples(tiny_cfg, scored_batch, algorithm):
    """8 samples in minibatches of 2 with gradient_accumulation 3: steps of 3 minibatches and of 1. Each step's
    gradient must be the mean over its own samples, as with one step per minibatch (the weights held still);
    the last step's was a third of it when every loss was divided by the nominal accumulation."""
    from learner.rwr import RWRLearner

    cls = {"ddpo": DDPOLearner, "rwr": RWRLearner}[algorithm]
    steps = {}
    for acc in (1, 3):
        cfg = tiny_cfg.model_copy(deep=True)
        cfg.algorithm.name, cfg.algorithm.minibatch_size, cfg.algorithm.gradient_accumulation = algorithm, 2, acc
        cfg.algorithm.max_grad_norm = 1e9
        cfg.algorithm.rwr.weighting = "exp"  # RWR keeps every sample: the same 4 minibatches as DDPO
        learner = cls(cfg)
        torch.manual_seed(0)
        for p in learner.params:  # a non-zero B so every LoRA factor gets gradient
            torch.nn.init.normal_(p, std=0.01)
        recorded = []

        def step(learner=learner, recorded=recorded):  # record each step's gradient; the weights stay put
            recorded.append(_grads(learner).clone())
            learner.optimizer.zero_grad(set_to_none=True)
            return 0.0

        learner._step = step
        learner.train(scored_batch)
        steps[acc] = recorded
    one, three = steps[1], steps[3]
    assert len(one) == 4 and len(three) == 2  # 4 minibatches: [3, 1] of them per step, the last one short
    for got, want in ((three[0], sum(one[:3]) / 3), (three[1], one[3])):
        assert want.norm() > 0 and (got - want).norm() / want.norm() < 1e-5


def test_a_resumed_learner_keeps_its_moments_and_takes_the_configs_hyperparameters(tiny_cfg, scored_batch):
    """A checkpoint brings back the optimizer's moments and step counts; `--resume --set
    algorithm.learning_rate=...` must still take effect (load_state_dict restored the saved rate)."""
    learner = DDPOLearner(tiny_cfg)
    learner.train(scored_batch)
    state, lora = learner.state_dict(), learner.weights()[1]
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.algorithm.learning_rate, cfg.algorithm.weight_decay, cfg.algorithm.adam_betas = 1e-5, 0.5, (0.8, 0.99)
    resumed = DDPOLearner(cfg)
    resumed.load_state_dict(state, lora)
    group = resumed.optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (1e-5, 0.5, (0.8, 0.99))
    saved = learner.optimizer.state_dict()["state"]
    got = resumed.optimizer.state_dict()["state"]
    assert saved.keys() == got.keys() and all(torch.equal(saved[k]["exp_avg"], got[k]["exp_avg"]) for k in saved)
