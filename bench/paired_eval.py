"""Paired evaluation of fine-tuned runs against their base model: the same prompts and the same noise for
both, so the change is measured per image and its CI is that of the mean paired difference (much
narrower than two independent CIs when most images do not change).

    python bench/paired_eval.py runs/sweeps/early4/w02-128-s0 runs/sweeps/early4/w02-128-s1 --images 4

For each run: its config (config.yaml) and its last complete checkpoint's LoRA; evaluation on every set
of `prompts.eval` (first `--max-prompts` prompts x `--images` images, seeds from `eval.seed`), plain
prompts and the constant guidance, as the run's own evaluation does. Prints, per set and reward
component, base -> fine-tuned means and the paired difference with its 95% CI; the base model is
evaluated once per distinct evaluation set. The last lines give the seed mean of each difference with a
t-interval over the runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--images", type=int, default=4, help="images per prompt")
    ap.add_argument("--max-prompts", type=int, default=60)
    ap.add_argument("--sets", default="", help="comma-separated prompt sets (default: each run's prompts.eval)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from bench.runs import base_weights, last_checkpoint
    from common.prompts import load_prompts
    from common.rollouts import RolloutGenerator, sample_seeds
    from rewards.combined import WeightedReward, score_in_batches

    def score(gen, reward, cfg, prompts, seeds) -> dict[str, torch.Tensor]:
        out: dict[str, list] = {}
        for i in range(0, len(prompts), 64):
            b = gen.generate(prompts[i : i + 64], seeds[i : i + 64], explore=False)
            total, parts = score_in_batches(reward, b.images_float(), b.prompts, cfg.reward.batch_size, True)
            for k, v in {"reward": total, **parts}.items():
                out.setdefault(k.replace("/", "_"), []).append(v)
        return {k: torch.cat(v).double() for k, v in out.items()}

    base_cache: dict = {}
    results = []
    for run_path in args.runs:
        cfg, ckpt, lora, learner_state, counters = last_checkpoint(run_path)
        reward = WeightedReward(cfg.eval.reward or cfg.reward)
        gen = RolloutGenerator(cfg)
        sets = args.sets.split(",") if args.sets else (cfg.prompts.eval or [cfg.prompts.train])
        entry = {"run": str(run_path), "checkpoint": str(ckpt), "reward_queries": counters["reward_queries"], "sets": {}}
        for src in sets:
            prompts = [p for p in load_prompts(src)[: args.max_prompts] for _ in range(args.images)]
            seeds = sample_seeds(cfg.eval.seed, -1, len(prompts))
            key = (cfg.model.pretrained, src, args.images, args.max_prompts, cfg.eval.seed, cfg.sampling.num_steps,
                   cfg.sampling.guidance_scale)  # fmt: skip
            if key not in base_cache:
                gen.set_weights(0, base_weights(lora))
                base_cache[key] = score(gen, reward, cfg, prompts, seeds)
            gen.set_weights(int(learner_state["version"]), lora)
            tuned = score(gen, reward, cfg, prompts, seeds)
            base = base_cache[key]
            rows = {}
            for k in tuned:
                d = tuned[k] - base[k]
                n = d.numel()
                rows[k] = {"base": float(base[k].mean()), "tuned": float(tuned[k].mean()), "diff": float(d.mean()),
                           "ci95": 1.96 * float(d.std(unbiased=True)) / math.sqrt(n), "n": n,
                           "changed": float((d != 0).double().mean())}  # fmt: skip
                print(f"{run_path.name} | {Path(src).stem} | {k}: {rows[k]['base']:.3f} -> {rows[k]['tuned']:.3f} "
                      f"(paired diff {rows[k]['diff']:+.3f} +- {rows[k]['ci95']:.3f}, n={n}, "
                      f"{rows[k]['changed']:.0%} of images changed score)", flush=True)  # fmt: skip
            entry["sets"][Path(src).stem] = rows
        results.append(entry)
    if len(results) > 1:
        print("\nseed mean of the paired differences (95% t-interval over runs):")
        for s in results[0]["sets"]:
            for k in results[0]["sets"][s]:
                ds = [r["sets"][s][k]["diff"] for r in results if s in r["sets"]]
                m = sum(ds) / len(ds)
                sd = math.sqrt(sum((x - m) ** 2 for x in ds) / (len(ds) - 1)) if len(ds) > 1 else 0.0
                print(f"{s} | {k}: {m:+.3f} +- {T95.get(len(ds) - 1, 2.0) * sd / math.sqrt(len(ds)):.3f} "
                      f"(runs: {', '.join(f'{x:+.3f}' for x in ds)})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
