"""AlignProp on a fixed batch of Shapes prompts and noise seeds: does the hard detector's score of exactly the
images trained on rise within a few updates? (Until session 18 the suite's Shapes learning test ran
`fixed_batch_gain` at FAST; it now runs a short evaluated run, bench/shapes_short_run.py.)

    THREADS=2 python bench/shapes_fixed_batch.py 0 1 2 3 4            # FAST (session 17's suite test), 5 seeds
    PROMPTS=8 UPDATES=5 STEPS=20 LR=3e-4 python bench/shapes_fixed_batch.py 0 1 2 3 4   # session 16's probe

Per seed: PROMPTS `shapes_pairs` prompts x 1 noise seed, the `shapes_alignprop` preset at STEPS DDIM steps
(backpropagating through all of them), learning rate LR, one optimizer step per update on that batch; prints
the hard `shapes` score after every update and the training reward (`shapes_soft`) of the batch per update.
Measured: docs/results.md, "A Shapes learning test for the suite".
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

PRESET = "shapes_alignprop"  # AlignProp through the whole chain, shapes_soft with rel_scale 8, minibatch 8
FAST = {"prompts": 16, "updates": 8, "steps": 10, "lr": 3e-4}  # session 17's suite test


def hard_details(learner, prompts: list[str], seeds: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The hard detector's score [B] and 0/1 components (full, colours, shapes, relation, extra) of the policy's
    images for these prompts and noise seeds (plain prompts, constant guidance: the same chain the samplers and
    the evaluation run), with the model's own conditioning and CFG negative."""
    from common.exploration import plan_rollout
    from learner.alignprop import sample_with_grad
    from rewards.shapes import ShapesReward

    s, m = learner.cfg.sampling, learner.model
    plans = [plan_rollout(p, sd, learner.cfg.exploration, s.num_steps, s.guidance_scale, False) for p, sd in zip(prompts, seeds)]
    with torch.no_grad():
        cond = m.condition([p.weighted_prompt for p in plans])
        guidance = torch.tensor([p.guidance for p in plans], dtype=torch.float32)
        latents = sample_with_grad(m, cond, m.negative(), guidance, seeds, s.num_steps, s.eta, 0)
        return ShapesReward().score_details(m.decode(latents), prompts)


def hard_scores(learner, prompts: list[str], seeds: list[int]) -> torch.Tensor:
    """The hard detector's score [B] of the policy's images (`hard_details`)."""
    return hard_details(learner, prompts, seeds)[0]


def fixed_batch_gain(
    seed: int,
    prompts: int = FAST["prompts"],
    updates: int = FAST["updates"],
    steps: int = FAST["steps"],
    lr: float = FAST["lr"],
    trace: bool = False,
) -> tuple[float, float, list[float]]:
    """(hard score before, hard score after, training reward per update) of `prompts` `shapes_pairs` prompts x 1
    noise seed each, after `updates` AlignProp updates (one optimizer step each) on exactly that batch. The
    training reward (`shapes_soft`) of update u is that of the policy after u - 1 updates: every update
    re-samples the same batch. With `trace`, the hard score after every update is printed."""
    from common.config import load_config
    from common.prompts import load_prompts
    from learner.alignprop import AlignPropLearner

    cfg = load_config(PRESET, [f"train.samples_per_epoch={prompts}", f"train.prompts_per_epoch={prompts}",
                               f"algorithm.gradient_accumulation={max(1, prompts // 8)}", f"sampling.num_steps={steps}",
                               f"algorithm.alignprop.truncation=[{steps},{steps}]", f"algorithm.learning_rate={lr}",
                               f"train.seed={seed}"])  # fmt: skip
    learner = AlignPropLearner(cfg)
    g = torch.Generator().manual_seed(seed)
    pool = load_prompts("shapes_pairs")
    chosen = [pool[int(i)] for i in torch.randperm(len(pool), generator=g)[:prompts]]
    seeds = [int(x) for x in torch.randint(0, 2**31 - 1, (prompts,), generator=g)]
    before = float(hard_scores(learner, chosen, seeds).mean())
    soft = []
    for u in range(updates):
        soft.append(learner.train_prompts(chosen, seeds)["reward_mean"])
        if trace:
            print(f"  seed {seed} update {u + 1}: {float(hard_scores(learner, chosen, seeds).mean()):.3f}", flush=True)
    return before, float(hard_scores(learner, chosen, seeds).mean()), soft


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    env = {"prompts": ("PROMPTS", int), "updates": ("UPDATES", int), "steps": ("STEPS", int), "lr": ("LR", float)}
    kw = {k: cast(os.environ[name]) if name in os.environ else FAST[k] for k, (name, cast) in env.items()}
    print(f"settings: {kw}", flush=True)
    for sd in map(int, sys.argv[1:]):
        b, a, soft = fixed_batch_gain(sd, **kw, trace=True)
        print(f"seed {sd}: hard {b:.3f} -> {a:.3f} ({a - b:+.3f}); shapes_soft per update "
              f"{' '.join(f'{x:.3f}' for x in soft)} ({soft[-1] - soft[0]:+.3f})", flush=True)
