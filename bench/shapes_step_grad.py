"""Where does the Shapes reward's gradient reach in the sampling chain? For a batch of base-model rollouts,
the norm of d(score)/d(x_t) at every denoising step, for the relation term alone (`shapes_soft` with
rel_weight 1) and for the objects alone (rel_weight 0): AlignProp's LoRA gradient at step t is this latent
gradient pulled back through that step's UNet call, so a relation gradient that fades towards the early
(layout-deciding) steps would explain a relation that does not learn.

    python bench/shapes_step_grad.py --prompts 8 --rel-scale 8

Prints one row per step: step index (0 = first, noisiest), the mean over images of |d score / d x_t| for
each term, and their ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--rel-scale", type=float, default=8.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from common.config import load_config
    from common.exploration import plan_rollout
    from common.prompts import load_prompts
    from common.sampling import denoise, initial_noise
    from learner.alignprop import AlignPropLearner
    from rewards.shapes import ShapesSoftReward

    cfg = load_config("shapes_alignprop", ["algorithm.gradient_checkpointing=false"])
    learner = AlignPropLearner(cfg)
    model, s = learner.model, cfg.sampling
    g = torch.Generator().manual_seed(args.seed)
    pool = load_prompts("shapes_pairs")
    prompts = [pool[int(i)] for i in torch.randperm(len(pool), generator=g)[: args.prompts]]
    seeds = [int(x) for x in torch.randint(0, 2**31 - 1, (len(prompts),), generator=g)]
    plans = [plan_rollout(p, sd, cfg.exploration, s.num_steps, s.guidance_scale, False) for p, sd in zip(prompts, seeds)]
    terms = {"relation": ShapesSoftReward(args.rel_scale, rel_weight=1.0), "objects": ShapesSoftReward(args.rel_scale, rel_weight=0.0)}
    cond = model.condition([p.weighted_prompt for p in plans])
    guidance = torch.tensor([p.guidance for p in plans], dtype=torch.float32)
    noise = initial_noise(seeds, s.num_steps, model.latent_shape)
    norms = {}
    for name, reward in terms.items():
        xs = []
        for x, _ in denoise(model, cond, learner.uncond, guidance, noise, s.eta, grad_steps=s.num_steps):
            x.retain_grad()
            xs.append(x)
        score = reward(model.decode(xs[-1]), prompts)
        score.sum().backward()
        norms[name] = [float(x.grad.flatten(1).norm(dim=1).mean()) for x in xs]
        print(f"{name}: mean score {float(score.detach().mean()):.3f}", flush=True)
    print("step | |d relation / d x| | |d objects / d x| | relation / objects")
    for i, (r, o) in enumerate(zip(norms["relation"], norms["objects"])):
        print(f"{i:4d} | {r:.3e} | {o:.3e} | {r / max(o, 1e-30):.3f}")


if __name__ == "__main__":
    main()
