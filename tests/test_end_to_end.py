"""Whole runs through learner.main: the reward rises, and a resumed run matches an uninterrupted one."""

import json

import numpy as np
import pytest
import torch

from common.config import load_config
from learner.main import run
from learner.run_dir import RunDir

FAST = ["cluster.local_dashboard=false", "cluster.learner.torch_threads=1", "output.tensorboard=false"]


def test_tiny_run_raises_jpeg_compressibility(tmp_path):
    # Measured before writing this test (12 epochs, 10 steps, seeds 0-3 of the single-process loop):
    # mean training reward of the last 3 epochs minus the first 3 = +0.07, +0.07, +0.13, +0.13 kB.
    # The local backend runs the Ray backend's loop and classes (the resume test below checks that both give
    # the same weights); here it saves the actors' start-up.
    cfg = load_config("tiny", FAST + ["sampling.num_steps=10", "train.epochs=12", "eval.every=12",
                                      "train.checkpoint_every=0", "output.grid_every=0",
                                      "cluster.backend=local"])  # fmt: skip
    rows = run(cfg, tmp_path / "run", resume=False, log=lambda *_: None)
    epochs = [r for r in rows if not r.get("final_eval")]
    r = [x["reward_mean"] for x in epochs]
    gain = np.mean(r[-3:]) - np.mean(r[:3])
    assert gain > 0.03, r
    assert all(x["logprob_mismatch"] < 1e-4 for x in epochs)
    # the evaluation curve (plain prompts, fixed noise) is in the metrics and the plot
    assert "eval_reward_mean" in epochs[0] and rows[-1]["final_eval"]
    assert (tmp_path / "run" / "reward_curve.png").stat().st_size > 1000
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    keys = {"epoch", "reward_queries", "reward_mean", "reward_std", "approx_kl", "clipfrac", "ratio_mean",
            "logprob_mismatch", "policy_version", "dropped_stale", "time_sample", "time_reward", "time_learn",
            "samples_per_s"}  # fmt: skip
    assert keys <= set(json.loads(lines[0])) and {"eval_reward_mean", "eval_reward_std"} <= set(json.loads(lines[0]))
    assert json.loads(lines[-2])["reward_queries"] == 12 * 16


class _Stop(Exception):
    pass


@pytest.mark.parametrize("backend", ["ray", "local"])
def test_resume_matches_an_uninterrupted_run(ray_session, tmp_path, tiny_cfg, backend):
    """A run on `backend` that crashes after epoch 3 and resumes from its last checkpoint ends with the weights,
    tracker and metrics of an uninterrupted run on the local backend: resume is exact, and (for ray) the two
    backends are the same computation (max_staleness 0)."""
    # one sampler and one thread everywhere: the same kernels on the same batches, so the same bits (JPEG sizes
    # turn a last-bit difference in a pixel into a different reward)
    sets = FAST + ["sampling.num_steps=6", "train.samples_per_epoch=8", "algorithm.minibatch_size=4",
                   "train.epochs=4", "train.checkpoint_every=2", "eval.every=0", "output.grid_every=0",
                   "cluster.num_samplers=1", "cluster.local_torch_threads=1"]  # fmt: skip
    run(load_config("tiny", sets + ["cluster.backend=local"]), tmp_path / "a", resume=False, log=lambda *_: None)
    cfg = load_config("tiny", sets + [f"cluster.backend={backend}"])

    def crash_in_epoch_3(line):
        if line.startswith("epoch 3/4"):
            raise _Stop  # after epoch 3's row is written, before epoch 4: step_2 is the last checkpoint

    with pytest.raises(_Stop):
        run(cfg, tmp_path / "b", resume=False, log=crash_in_epoch_3)
    (tmp_path / "b" / "checkpoints" / ".tmp-step_3-half").mkdir()  # a crash mid-write leaves only a temp folder
    assert RunDir(tmp_path / "b").latest_checkpoint().name == "step_2"
    run(cfg, tmp_path / "b", resume=True, log=lambda *_: None)

    a, b = RunDir(tmp_path / "a"), RunDir(tmp_path / "b")
    lora_a, state_a, counters_a = a.load_checkpoint(a.latest_checkpoint())
    lora_b, state_b, counters_b = b.load_checkpoint(b.latest_checkpoint())
    assert counters_a == counters_b == {"epoch": 4, "reward_queries": 32, "policy_version": 4}
    assert state_a["tracker"] == state_b["tracker"]
    assert state_a["version"] == state_b["version"] == 4
    for k in lora_a:
        torch.testing.assert_close(lora_a[k], lora_b[k], atol=1e-6, rtol=1e-5)
    assert [r["epoch"] for r in b.read_metrics()] == [0, 1, 2, 3]
    _check_diffusers_lora_loads(cfg, a.latest_checkpoint(), lora_a)
    assert [r["reward_mean"] for r in b.read_metrics()] == pytest.approx([r["reward_mean"] for r in a.read_metrics()])


def _check_diffusers_lora_loads(cfg, ckpt, lora):
    """The checkpoint's LoRA in diffusers format gives the learner's UNet: pipe.load_lora_weights(dir)."""
    from common.pipelines import attach_lora, load_lora_state, load_pipeline

    ours = load_pipeline(cfg.model)
    attach_lora(ours.unet, cfg.lora)
    load_lora_state(ours.unet, lora)
    theirs = load_pipeline(cfg.model)
    theirs.load_lora_weights(str(ckpt))
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 32, 64, generator=g)
    with torch.no_grad():
        base = load_pipeline(cfg.model).unet(x, 500, emb).sample
        a, b = ours.unet(x, 500, emb).sample, theirs.unet(x, 500, emb).sample
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (a - base).abs().max() > 1e-4  # the LoRA is really there
