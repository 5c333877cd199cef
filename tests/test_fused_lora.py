"""sampling.fuse_lora: samplers fold the LoRA into the UNet's weights per generate call; the policy, its
log-probs and the modules the learner shares must be what they are without it."""

import torch

from common.pipelines import fused_lora
from common.rollouts import RolloutGenerator
from learner.ddpo import DDPOLearner

PROMPTS = ["a photo of a cat", "a photo of a dog"] * 4


def _moved_learner(cfg) -> DDPOLearner:
    """A learner whose LoRA is far from zero (B starts at zero, where fusing would change nothing)."""
    learner = DDPOLearner(cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in learner.params:
            p.normal_(std=0.05)
    learner.version = 3
    return learner


def _unet_state(unet):
    return {n: (p.detach().clone(), p.requires_grad) for n, p in unet.named_parameters()}


def test_fused_sampling_is_the_unfused_policy_and_restores_the_modules(tiny_cfg):
    fused_cfg = tiny_cfg.model_copy(deep=True)
    fused_cfg.sampling.fuse_lora = True
    learner = _moved_learner(tiny_cfg)
    plain, fused = RolloutGenerator(tiny_cfg), RolloutGenerator(fused_cfg)
    for g in (plain, fused):
        assert g.set_weights(*learner.weights()) == (3, learner.checksum())
    before = _unet_state(fused.model.unet)

    a, b = plain.generate(PROMPTS, list(range(8))), fused.generate(PROMPTS, list(range(8)))
    assert (a.latents - b.latents).abs().max() < 1e-4  # float32: the same chain up to rounding
    assert (a.log_probs - b.log_probs).abs().max() < 1e-4
    assert (a.images.int() - b.images.int()).abs().max() <= 1
    # fusing does change the weights (an unchanged UNet would make this test vacuous): inside the context the
    # base layers hold W0 + scaling B A, not the loaded W0
    with torch.no_grad(), fused_lora(fused.model.unet):
        w = {n: p.detach().clone() for n, p in fused.model.unet.named_parameters() if "base_layer" in n}
    assert any(not torch.equal(w[n], before[n][0]) for n in w)

    after = _unet_state(fused.model.unet)  # every weight and requires_grad flag back exactly
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n][0], before[n][0]) and after[n][1] == before[n][1] for n in before)
    assert fused.held() == (3, learner.checksum())

    b.rewards = torch.linspace(-1, 1, 8)  # the learner (unfused) scores the fused sampler's chain on-policy
    m = learner.train(b)
    assert m["logprob_mismatch"] < 1e-4 and abs(m["ratio_mean"] - 1) < 1e-4


def test_fused_sampling_on_the_learners_own_modules(tiny_cfg):
    """The local backend samples with the learner's modules: after a fused generate they are exactly as before
    (weights, trainable LoRA, adapters on) and the learner's update is on-policy."""
    fused_cfg = tiny_cfg.model_copy(deep=True)
    fused_cfg.sampling.fuse_lora = True
    learner = _moved_learner(tiny_cfg)
    before = _unet_state(learner.model.unet)
    batch = RolloutGenerator(fused_cfg, model=learner.model).generate(PROMPTS[:4], list(range(4)))
    after = _unet_state(learner.model.unet)
    assert all(torch.equal(after[n][0], before[n][0]) and after[n][1] == before[n][1] for n in before)
    assert all(p.requires_grad for p in learner.params)
    batch.rewards = torch.linspace(-1, 1, 4)
    m = learner.train(batch)
    assert m["logprob_mismatch"] < 1e-4 and learner.checksum() != lora_checksum_of(before)


def lora_checksum_of(state) -> str:
    from common.pipelines import lora_checksum

    return lora_checksum({n: t for n, (t, _) in state.items() if "lora_" in n})


def test_channels_last_sampling_is_the_same_policy(tiny_cfg):
    """sampling.channels_last keeps the sampler's convolution weights in NHWC (GPU convolutions' native layout):
    the same policy and on-policy log-probs for a learner whose UNet stays contiguous."""
    cl_cfg = tiny_cfg.model_copy(deep=True)
    cl_cfg.sampling.channels_last = cl_cfg.sampling.fuse_lora = True
    learner = _moved_learner(tiny_cfg)
    plain, cl = RolloutGenerator(tiny_cfg), RolloutGenerator(cl_cfg)
    convs = [m.weight for m in cl.model.unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert any(not w.is_contiguous() for w in convs)  # a 1x1 kernel is both; a 3x3 one is changed
    for g in (plain, cl):
        g.set_weights(*learner.weights())
    a, b = plain.generate(PROMPTS, list(range(8))), cl.generate(PROMPTS, list(range(8)))
    assert (a.latents - b.latents).abs().max() < 1e-4 and (a.log_probs - b.log_probs).abs().max() < 1e-4
    b.rewards = torch.linspace(-1, 1, 8)
    m = learner.train(b)
    assert m["logprob_mismatch"] < 1e-4 and abs(m["ratio_mean"] - 1) < 1e-4


def test_compiled_sampling_is_the_same_policy_and_the_learner_runs_eagerly(tiny_cfg):
    """sampling.compile: the sampler's gradient-free UNet calls go through torch.compile (here the 'eager'
    backend: dynamo's tracing, guards and recompiles without a C++ toolchain), fused and unfused; the chain is
    the eager one and the learner's update on it, which takes gradients through the module itself, is on-policy."""
    c_cfg = tiny_cfg.model_copy(deep=True)
    c_cfg.sampling.compile = "eager"
    learner = _moved_learner(tiny_cfg)
    plain, comp = RolloutGenerator(tiny_cfg), RolloutGenerator(c_cfg)
    m = comp.model
    assert m.sampling_unet is not None and m.sampling_unet is not m.unet
    with torch.no_grad():
        assert m.unet_call() is m.sampling_unet
    assert m.unet_call() is m.unet  # a call that takes gradients: the module itself
    for g in (plain, comp):
        g.set_weights(*learner.weights())
    a = plain.generate(PROMPTS, list(range(8)))
    for fuse in (False, True):
        comp.cfg.sampling.fuse_lora = fuse
        b = comp.generate(PROMPTS, list(range(8)))
        assert (a.latents - b.latents).abs().max() < 1e-4 and (a.log_probs - b.log_probs).abs().max() < 1e-4
    b.rewards = torch.linspace(-1, 1, 8)
    m = learner.train(b)
    assert m["logprob_mismatch"] < 1e-4 and abs(m["ratio_mean"] - 1) < 1e-4


def test_compiled_learner_takes_the_same_update(tiny_cfg):
    """algorithm.compile: the learner's UNet calls that take gradients go through torch.compile ('eager'
    backend here); one update from the same state and batch gives the same metrics and LoRA weights."""
    c_cfg = tiny_cfg.model_copy(deep=True)
    c_cfg.algorithm.compile = "eager"
    plain, comp = _moved_learner(tiny_cfg), _moved_learner(c_cfg)
    assert comp.model.training_unet is not None and comp.model.unet_call() is comp.model.training_unet
    with torch.no_grad():
        assert comp.model.unet_call() is comp.model.unet  # no sampling.compile: gradient-free calls stay eager
    gen = RolloutGenerator(tiny_cfg)
    gen.set_weights(*plain.weights())
    batch = gen.generate(PROMPTS, list(range(8)))
    batch.rewards = torch.linspace(-1, 1, 8)
    before = [p.detach().clone() for p in comp.params]
    a, b = plain.train(batch), comp.train(batch)
    assert b["logprob_mismatch"] < 1e-4 and abs(a["loss"] - b["loss"]) < 1e-5
    for p, q in zip(plain.params, comp.params):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(p, q) for p, q in zip(comp.params, before))  # the update moved the weights
