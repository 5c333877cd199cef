"""Which noise decides the reward? A variance decomposition of the reward over the sampler's noise draws.

A rollout's noise is x_T plus one draw per DDIM step (eta > 0). This script samples, for each prompt,
groups of rollouts that share all noise except a chosen part, and reports the reward variance within
the groups: the variance that part of the noise alone causes, holding the rest fixed.

- `--what init`: groups share x_T and differ in every step's noise; the fraction of the within-prompt
  variance that x_T explains is 1 - within-group / within-prompt.
- `--what steps`: for each window of steps (`--windows 0-3,3-6,...`), groups share x_T and the noise of
  every step outside the window and differ inside it.

A policy gradient can only credit the steps whose noise moves the reward, so this says where DDPO's
`algorithm.timestep_window` should look (docs/results.md). Exploration is off; evaluation-style plain
prompts are not used: the training sampler with the preset's guidance.

    python bench/noise_decomp.py --what init  --prompts 8 --groups 4 --draws 8
    python bench/noise_decomp.py --what steps --prompts 8 --groups 2 --draws 8 --windows 0-3,3-6,6-10,10-20,0-20
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="shapes")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--what", choices=["init", "steps"], default="init")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--groups", type=int, default=4, help="groups (shared noise) per prompt")
    ap.add_argument("--draws", type=int, default=8, help="rollouts per group")
    ap.add_argument("--windows", default="0-3,3-6,6-10,10-20,0-20", help="step windows [a, b) for --what steps")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from common import sampling
    from common.config import load_config
    from common.prompts import load_prompts
    from common.rollouts import RolloutGenerator
    from rewards.combined import WeightedReward

    window = [0, 0]

    def grouped_noise(seeds, num_steps, shape):
        """Seed = group * 1000 + draw: the group's noise everywhere, the draw's own inside the window
        (--what steps) or in every step but x_T (--what init)."""
        out = []
        for s in seeds:
            base = torch.randn((num_steps + 1, *shape), generator=torch.Generator().manual_seed(int(s) // 1000))
            own = torch.randn((num_steps + 1, *shape), generator=torch.Generator().manual_seed(int(s)))
            lo, hi = (0, num_steps) if args.what == "init" else window
            base[1 + lo : 1 + hi] = own[1 + lo : 1 + hi]
            out.append(base)
        return torch.stack(out)

    sampling.rollout_noise = grouped_noise  # sample_rollout draws its noise through this
    cfg = load_config(args.config, ["exploration.enabled=false"] + args.overrides)
    gen = RolloutGenerator(cfg)
    reward = WeightedReward(cfg.reward)
    prompts = load_prompts(cfg.prompts.train)
    picks = [prompts[(p * 7) % len(prompts)] for p in range(args.prompts)]

    def rewards() -> torch.Tensor:
        rows = []
        for p, prompt in enumerate(picks):
            seeds = [(p * 100 + g + 1) * 1000 + d for g in range(args.groups) for d in range(args.draws)]
            b = gen.generate([prompt] * len(seeds), seeds, explore=False)
            rows.append(reward(b.images_float(), b.prompts)[0].view(args.groups, args.draws))
        return torch.stack(rows)  # [prompts, groups, draws]

    n = args.prompts * args.groups * args.draws
    print(f"{args.config}: {args.prompts} prompts x {args.groups} groups x {args.draws} draws = {n} rollouts per row")
    specs = [(0, 0)] if args.what == "init" else [tuple(int(x) for x in w.split("-")) for w in args.windows.split(",")]
    print("| noise varied | mean reward | within-group variance | its SE | within-prompt variance |")
    print("|---|---|---|---|---|")
    for spec in specs:
        window[:] = spec
        t0 = time.perf_counter()
        r = rewards()
        within = r.var(2, unbiased=True)  # [prompts, groups]
        centred = r - r.mean((1, 2), keepdim=True)
        within_prompt = float(centred.pow(2).sum() / (args.prompts * (args.groups * args.draws - 1)))
        se = float(within.std(unbiased=True) / within.numel() ** 0.5)
        label = "all steps' noise, x_T shared" if args.what == "init" else f"steps [{spec[0]}, {spec[1]})"
        print(f"| {label} | {float(r.mean()):.3f} | {float(within.mean()):.4f} | {se:.4f} | {within_prompt:.4f} |"
              f"  ({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
        if args.what == "init":
            print(f"x_T explains {1 - float(within.mean()) / within_prompt:.2f} of the within-prompt variance")


if __name__ == "__main__":
    main()
