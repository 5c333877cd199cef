"""AlignProp on a fixed batch of Shapes prompts and noise seeds: does the hard detector's score of exactly the
images trained on rise within a few updates? The candidate for a fast learning test in the suite.

    THREADS=2 python bench/shapes_fixed_batch.py 0 1 2 3 4

Per seed: 8 `shapes_pairs` prompts x 1 noise seed, the `shapes_alignprop` preset, `UPDATES` optimizer steps on
that batch; prints the hard `shapes` score after every update and the training reward (`shapes_soft`) per update.
Measured (docs/results.md, "AlignProp learns Shapes"): not robust enough for a test at this size.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

PRESET = "shapes_alignprop"  # AlignProp through the whole chain, shapes_soft with rel_scale 8, lr 3e-4, minibatch 8
PROMPTS = int(os.environ.get("PROMPTS", "8"))  # batch: PROMPTS prompts x 1 noise seed
OVERRIDES = [f"train.samples_per_epoch={PROMPTS}", f"train.prompts_per_epoch={PROMPTS}",
             f"algorithm.gradient_accumulation={max(1, PROMPTS // 8)}"]  # one optimizer step per update
UPDATES = int(os.environ.get("UPDATES", "5"))
EXTRA = os.environ.get("OVERRIDES", "").split()  # more overrides, e.g. OVERRIDES="algorithm.learning_rate=1e-3"


def hard_scores(learner, prompts: list[str], seeds: list[int]) -> torch.Tensor:
    """The hard detector's score [B] of the policy's images for these prompts and noise seeds (plain prompts,
    constant guidance: the same chain the samplers and the evaluation run)."""
    from common.exploration import plan_rollout
    from learner.alignprop import sample_with_grad
    from rewards.shapes import ShapesReward

    s = learner.cfg.sampling
    plans = [plan_rollout(p, sd, learner.cfg.exploration, s.num_steps, s.guidance_scale, False) for p, sd in zip(prompts, seeds)]
    with torch.no_grad():
        cond = learner.model.condition([p.weighted_prompt for p in plans])
        guidance = torch.tensor([p.guidance for p in plans], dtype=torch.float32)
        latents = sample_with_grad(learner.model, cond, learner.uncond, guidance, seeds, s.num_steps, s.eta, 0)
        return ShapesReward()(learner.model.decode(latents), prompts)


def fixed_batch_gain(seed: int, updates: int = UPDATES, trace: bool = False) -> tuple[float, float, list[float]]:
    """(hard score before, hard score after, training reward per update) of 8 `shapes_pairs` prompts x 1 noise
    seed each, after `updates` AlignProp updates on exactly that batch. The training reward (`shapes_soft`) of
    update u is that of the policy after u - 1 updates: every update re-samples the same batch. With `trace`,
    the hard score after every update is printed."""
    from common.config import load_config
    from common.prompts import load_prompts
    from learner.alignprop import AlignPropLearner

    cfg = load_config(PRESET, [*OVERRIDES, *EXTRA, f"train.seed={seed}"])
    learner = AlignPropLearner(cfg)
    g = torch.Generator().manual_seed(seed)
    pool = load_prompts("shapes_pairs")
    prompts = [pool[int(i)] for i in torch.randperm(len(pool), generator=g)[:PROMPTS]]
    seeds = [int(x) for x in torch.randint(0, 2**31 - 1, (PROMPTS,), generator=g)]
    before = float(hard_scores(learner, prompts, seeds).mean())
    soft = []
    for u in range(updates):
        soft.append(learner.train_prompts(prompts, seeds)["reward_mean"])
        if trace:
            print(f"  seed {seed} update {u + 1}: {float(hard_scores(learner, prompts, seeds).mean()):.3f}", flush=True)
    return before, float(hard_scores(learner, prompts, seeds).mean()), soft


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    for sd in map(int, sys.argv[1:]):
        b, a, soft = fixed_batch_gain(sd, trace=True)
        print(f"seed {sd}: hard {b:.3f} -> {a:.3f} ({a - b:+.3f}); shapes_soft per update "
              f"{' '.join(f'{x:.3f}' for x in soft)} ({soft[-1] - soft[0]:+.3f})", flush=True)
