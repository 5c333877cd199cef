"""Signal-to-noise ratio of the DDPO policy gradient: how many reward queries one useful update direction costs.

Draws K independent batches of N rollouts (the same prompts, fresh noise), computes each batch's DDPO
gradient on the LoRA weights at the start of training (ratio 1: the plain policy gradient
-mean(A * grad log p)), and compares them. For independent estimates g_a = mu + noise_a with per-sample
covariance S:
    E[g_a . g_b] = |mu|^2 (a != b)        E[|g_a|^2] = |mu|^2 + tr(S) / N
so the mean off-diagonal dot product estimates the signal |mu|^2, and the per-sample SNR is
|mu|^2 / tr(S). The batch size at which two independent gradient estimates have cosine 1/2 is
N_half = tr(S) / |mu|^2: below it an optimizer step mostly follows noise.

    python bench/grad_snr.py --batches 6 --samples 32 --windows 0-1,0-0.5,0.5-1
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="shapes")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--samples", type=int, default=32, help="N rollouts per batch")
    ap.add_argument("--groups", type=int, default=4, help="prompts per batch (N / groups samples each)")
    ap.add_argument("--windows", default="0-1,0-0.5,0.5-1", help="timestep windows (fractions of the steps)")
    ap.add_argument("--json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from common.config import load_config
    from common.prompts import load_prompts
    from common.rollouts import RolloutGenerator, sample_seeds
    from learner.ddpo import DDPOLearner
    from learner.loop import epoch_prompts
    from rewards.combined import WeightedReward

    n = args.samples
    cfg = load_config(args.config, [f"train.samples_per_epoch={n}", f"algorithm.minibatch_size={min(16, n)}",
                                    "algorithm.gradient_accumulation=1", "algorithm.timestep_chunk=4",
                                    "algorithm.stat_tracking.per_prompt=true", f"algorithm.stat_tracking.min_count={n // args.groups}",
                                    f"algorithm.stat_tracking.buffer_size={n // args.groups}"] + args.overrides)  # fmt: skip
    learner = DDPOLearner(cfg)
    gen = RolloutGenerator(cfg, model=learner.model)
    reward = WeightedReward(cfg.reward)
    prompts = epoch_prompts(load_prompts(cfg.prompts.train), 0, 0, n, args.groups)
    t0 = time.perf_counter()
    batches = []
    for k in range(args.batches):
        b = gen.generate(prompts, sample_seeds(cfg.train.seed, 1000 + k, n))
        b.rewards = reward(b.images_float(), b.prompts)[0]
        batches.append(b)
    print(f"{args.batches} batches of {n} rollouts ({args.groups} prompts) in {time.perf_counter() - t0:.0f} s; "
          f"mean reward {float(torch.cat([b.rewards for b in batches]).mean()):.3f}", flush=True)  # fmt: skip

    def gradient(batch, steps_idx: list[int]) -> torch.Tensor:
        learner.tracker.buffers.clear()
        adv, _ = learner.advantages(batch)
        for p in learner.params:
            p.grad = None
        steps = torch.tensor([steps_idx] * n)
        mb = cfg.algorithm.minibatch_size
        for s in range(0, n, mb):
            idx = torch.arange(s, min(n, s + mb))
            learner._minibatch_backward(batch, adv, idx, steps[idx])
        return torch.cat([p.grad.flatten() for p in learner.params]) * (mb / n)

    t = cfg.sampling.num_steps
    results = {}
    print(f"{'window':>10} {'steps':>6} {'|g|^2':>10} {'signal |mu|^2':>14} {'+-SE':>9} {'SNR/sample':>10} "
          f"{'N for cos 0.5':>14} {'at least':>9} {'mean cos':>8}")  # fmt: skip
    for w in args.windows.split(","):
        lo, hi = (float(x) for x in w.split("-"))
        idx = list(range(int(lo * t), max(int(lo * t) + 1, round(hi * t))))
        t1 = time.perf_counter()
        g = [gradient(b, idx).double() for b in batches]
        pairs = list(itertools.combinations(range(len(g)), 2))
        dots = torch.tensor([float(g[a] @ g[b]) for a, b in pairs])
        cos = torch.tensor([float(g[a] @ g[b] / (g[a].norm() * g[b].norm())) for a, b in pairs])
        sq = torch.tensor([float(x @ x) for x in g])
        signal = float(dots.mean())
        # the pairs share batches, so their SE is approximate: use the number of batches, not pairs
        se = float(dots.std()) / math.sqrt(len(g))
        noise_per_sample = (float(sq.mean()) - signal) * n
        snr = signal / noise_per_sample if noise_per_sample > 0 else float("nan")
        n_half = noise_per_sample / signal if signal > 0 else float("inf")
        # with the signal taken at most 2 SE above its estimate (and at least 0): the batch N_half is at least this
        n_half_low = noise_per_sample / (max(signal, 0.0) + 2 * se) if se > 0 else float("nan")
        results[w] = {"steps": len(idx), "grad_sq": float(sq.mean()), "signal": signal, "signal_se": se,
                      "snr_per_sample": snr, "n_for_cos_half": n_half, "n_for_cos_half_at_least": n_half_low,
                      "mean_cos": float(cos.mean()), "seconds": time.perf_counter() - t1}  # fmt: skip
        print(f"{w:>10} {len(idx):6d} {float(sq.mean()):10.3e} {signal:14.3e} {se:9.2e} {snr:10.2e} "
              f"{n_half:14.0f} {n_half_low:9.0f} {float(cos.mean()):8.3f}", flush=True)  # fmt: skip
    print("A signal within about 2 SE of 0 means no direction was detectable with these batches.")
    if args.json:
        Path(args.json).write_text(json.dumps({"batches": args.batches, "samples": n, "windows": results}, indent=1))


if __name__ == "__main__":
    main()
