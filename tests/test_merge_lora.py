"""bench/merge_lora.py: a run's LoRA fused into its base model gives a model directory whose UNet is the run's policy."""

import pytest
import torch

from bench.merge_lora import merge_lora
from learner.ddpo import DDPOLearner
from learner.run_dir import RunDir


def test_merged_model_reproduces_the_runs_policy(tiny_cfg, tmp_path):
    from common.config import ModelConfig
    from common.pipelines import load_pipeline

    learner = DDPOLearner(tiny_cfg)
    torch.manual_seed(0)
    for p in learner.params:  # a LoRA far from zero, so that fusing it matters
        torch.nn.init.normal_(p, std=0.05)
    run = RunDir(tmp_path / "run")
    run.create(tiny_cfg)
    run.save_checkpoint(1, learner.checkpoint_state(), {"reward_queries": 8, "epoch": 1})
    out = tmp_path / "merged"
    logs = []
    rel = merge_lora(run.path, out, log=logs.append)
    assert rel < 1e-5 and "step_1" in logs[0]

    merged = load_pipeline(ModelConfig(pretrained=str(out)))
    base = load_pipeline(tiny_cfg.model)
    assert not any("lora" in n for n, _ in merged.unet.named_parameters())
    c = merged.unet.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g)
    cond = torch.randn(2, 7, c.cross_attention_dim, generator=g)
    t = torch.tensor([900, 50])
    with torch.no_grad():
        want = learner.model.unet(x, t, encoder_hidden_states=cond).sample
        got = merged.unet(x, t, encoder_hidden_states=cond).sample
        plain = base.unet(x, t, encoder_hidden_states=cond).sample
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) < 1e-5 * scale  # the fused model is the policy...
    assert float((plain - want).abs().max()) > 1e-3 * scale  # ...and not the base model
    assert (out / "merged_from.json").is_file()

    with pytest.raises(SystemExit, match="exists"):
        merge_lora(run.path, out)
    with pytest.raises(SystemExit, match=r"no complete checkpoint step_9 \(complete: step_1\)"):
        merge_lora(run.path, tmp_path / "other", checkpoint="step_9")
    assert not (tmp_path / "other").exists()
