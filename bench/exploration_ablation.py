"""What each DiffExp exploration setting does to the training rollouts of the Shapes base model (sampling only).

For every setting: P prompts x N samples each (the same prompts and noise seeds for every setting), scored
by the `shapes` reward. DDPO learns from reward differences between samples of one prompt, so the columns
that matter are: the mean reward (exploration that wrecks the samples teaches nothing), the within-prompt
reward std and the fraction of prompts whose N samples all score the same (no signal), the best-of-N
reward per prompt (the rare high-reward samples exploration is meant to find), the full-success rate,
and layout diversity (common/shapes/diversity.py).

    python bench/exploration_ablation.py --prompts 16 --per-prompt 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS: dict[str, list[str]] = {
    "off (constant 5)": ["exploration.enabled=false"],
    "step 1->5 @0.4": ["exploration.cfg_schedule={kind: step, low: 1.0, high: 5.0, switch: 0.4}"],
    "step 2->5 @0.4": ["exploration.cfg_schedule={kind: step, low: 2.0, high: 5.0, switch: 0.4}"],
    "step 1->7.5 @0.4": ["exploration.cfg_schedule={kind: step, low: 1.0, high: 7.5, switch: 0.4}"],
    "step 1->5 @0.2": ["exploration.cfg_schedule={kind: step, low: 1.0, high: 5.0, switch: 0.2}"],
    "step 1->5 @0.6": ["exploration.cfg_schedule={kind: step, low: 1.0, high: 5.0, switch: 0.6}"],
    "linear 1->7.5": ["exploration.cfg_schedule={kind: linear, low: 1.0, high: 7.5}"],
    "cosine 1->7.5": ["exploration.cfg_schedule={kind: cosine, low: 1.0, high: 7.5}"],
    "weights k=1 [0.5,1.5]": ["exploration.prompt_weighting={enabled: true, num_phrases: 1, low: 0.5, high: 1.5}"],
    "weights k=2 [0.5,1.5]": ["exploration.prompt_weighting={enabled: true, num_phrases: 2, low: 0.5, high: 1.5}"],
    "weights k=1 [0.0,2.0]": ["exploration.prompt_weighting={enabled: true, num_phrases: 1, low: 0.0, high: 2.0}"],
    "weights k=2 [0.8,1.2]": ["exploration.prompt_weighting={enabled: true, num_phrases: 2, low: 0.8, high: 1.2}"],
}
# A setting of one strategy runs with the other strategy off.
ONLY_CFG = ["exploration.enabled=true", "exploration.prompt_weighting.enabled=false"]
ONLY_WEIGHTS = ["exploration.enabled=true", "exploration.cfg_schedule={kind: constant, low: 5.0, high: 5.0}"]


def measure(overrides: list[str], prompts: list[str], per_prompt: int, seed: int) -> dict:
    import numpy as np

    from common.config import load_config
    from common.rollouts import RolloutGenerator, sample_seeds
    from common.shapes.diversity import mean_diversity, prompt_diversity
    from rewards.combined import WeightedReward

    cfg = load_config("shapes", overrides + ["sampling.batch_size=32"])
    gen = RolloutGenerator(cfg)
    ps = [p for p in prompts for _ in range(per_prompt)]
    t0 = time.perf_counter()
    batch = gen.generate(ps, sample_seeds(seed, 0, len(ps)), explore=True)
    images = batch.images_float()
    reward, parts = WeightedReward(cfg.reward)(images, ps, details=True)
    r = reward.view(len(prompts), per_prompt).numpy()
    full = parts["shapes/full"].view(len(prompts), per_prompt).numpy()
    div = mean_diversity([prompt_diversity(images[i * per_prompt : (i + 1) * per_prompt], p) for i, p in enumerate(prompts)])
    return {
        "reward_mean": float(r.mean()),
        "within_prompt_std": float(r.std(axis=1).mean()),
        "zero_std_frac": float((r.std(axis=1) == 0).mean()),
        "best_of_n": float(r.max(axis=1).mean()),
        "full_success": float(full.mean()),
        "any_full_in_group": float((full.max(axis=1) > 0).mean()),
        "position_spread_px": div["position_spread"],
        "pixel_distance": div["pixel_distance"],
        "n": int(r.size),
        "seconds": time.perf_counter() - t0,
        "_se_reward": float(np.std(r) / np.sqrt(r.size)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16, help="the first P prompts of shapes_pairs")
    ap.add_argument("--per-prompt", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", help="setting names separated by ';' (default: all)")
    ap.add_argument("--json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from common.prompts import load_prompts

    prompts = load_prompts("shapes_pairs")[: args.prompts]
    names = [n.strip() for n in args.only.split(";")] if args.only else list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"--only: unknown setting(s) {unknown}; known: {'; '.join(SETTINGS)}")
    results = {}
    print(f"{'setting':24} {'reward':>7} {'std/prompt':>10} {'zero-std':>8} {'best-of-N':>9} {'full':>6} "
          f"{'any full':>8} {'pos spread':>10} {'pix dist':>8}")  # fmt: skip
    for name in names:
        base = ONLY_WEIGHTS if name.startswith("weights") else ONLY_CFG if name != "off (constant 5)" else []
        res = measure(base + SETTINGS[name], prompts, args.per_prompt, args.seed)
        results[name] = res
        print(f"{name:24} {res['reward_mean']:7.3f} {res['within_prompt_std']:10.3f} {res['zero_std_frac']:8.2f} "
              f"{res['best_of_n']:9.3f} {res['full_success']:6.3f} {res['any_full_in_group']:8.2f} "
              f"{res['position_spread_px']:10.2f} {res['pixel_distance']:8.3f}", flush=True)  # fmt: skip
    print(f"(n = {args.prompts} x {args.per_prompt} per setting; reward SE about "
          f"{max(r['_se_reward'] for r in results.values()):.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
