"""Does a coarse deterministic tail score a layout as the real chain would? (`sampling.tail_steps`)

DDPO on the layout steps only (`algorithm.timestep_window=[0, 0.3]`, the first 6 of 20) needs log-probs of those
steps alone; the other 14 only turn the layout into an image for the reward. This samples the first HEAD steps
of each training rollout once, then finishes each from the same latents in several ways:

    full_a, full_b   the real chain (eta as configured, all remaining steps), twice with independent noise after
                     the head: how much the reward of one layout varies by the tail alone (the ceiling)
    ode_K            `coarse_tail` with K deterministic DDIM jumps

and prints, per tail, the mean reward and component rates, its agreement with full_a (same relation verdict,
same full-success verdict), the correlation of rewards with full_a, and of rewards centred per prompt (what
DDPO's per-prompt advantages see), and the seconds the tail took. A coarse tail is as good a training signal as
the real one when it agrees with full_a about as well as full_b does.

    python bench/tail_check.py --config shapes_order_ddpo --per-prompt 4 --tails 3,5,8 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch


def centred(r: np.ndarray, prompts: list[str]) -> np.ndarray:
    out = r.copy()
    for p in set(prompts):
        m = np.array([q == p for q in prompts])
        out[m] -= r[m].mean()
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="shapes_order_ddpo")
    ap.add_argument("--set", action="append", default=[], help="config override, as learner.main's --set")
    ap.add_argument("--per-prompt", type=int, default=4, help="rollouts per training prompt")
    ap.add_argument("--max-prompts", type=int, default=60)
    ap.add_argument("--tails", default="3,5,8", help="coarse tail lengths to compare")
    ap.add_argument("--head", type=int, default=None, help="steps before the tail (default: the DDPO window's end)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from common.config import load_config
    from common.config_algorithm import window_steps
    from common.ddim_schedule import scheduler_timesteps
    from common.exploration import plan_rollout
    from common.pipelines import load_policy
    from common.prompts import load_prompts
    from common.sampling import coarse_tail, denoise, initial_noise
    from rewards.shapes import ShapesReward

    cfg = load_config(args.config, args.set)
    s = cfg.sampling
    model = load_policy(cfg.model, cfg.lora, "cpu", s.resolution)
    model.unet.eval()
    head = args.head or window_steps(s.num_steps, cfg.algorithm.timestep_window, 1.0)[0][-1] + 1
    prompts = load_prompts(cfg.prompts.train)[: args.max_prompts]
    rows = [(p, args.seed * 1_000_003 + i * 7919 + j) for i, p in enumerate(prompts) for j in range(args.per_prompt)]
    reward = ShapesReward()
    sch = model.scheduler
    ts = scheduler_timesteps(sch, s.num_steps)
    tails = [int(k) for k in args.tails.split(",") if k]
    got: dict[str, dict[str, list]] = {}
    secs: dict[str, float] = {}
    all_prompts: list[str] = []
    t_head = 0.0
    for b0 in range(0, len(rows), s.batch_size):
        batch = rows[b0 : b0 + s.batch_size]
        ps, seeds = [p for p, _ in batch], [sd for _, sd in batch]
        all_prompts += ps
        plans = [plan_rollout(p, sd, cfg.exploration, s.num_steps, s.guidance_scale, False) for p, sd in zip(ps, seeds)]
        cond = model.condition([p.weighted_prompt for p in plans])
        g = torch.tensor([p.guidance for p in plans], dtype=torch.float32)
        uncond = model.negative()
        noise_a = initial_noise(seeds, s.num_steps, model.latent_shape)
        other = initial_noise([sd + 500_000_009 for sd in seeds], s.num_steps, model.latent_shape)
        noise_b = torch.cat([noise_a[:, : head + 1], other[:, head + 1 :]], 1)
        with torch.no_grad():
            t0 = time.perf_counter()
            x = None
            for i, (x, _) in enumerate(denoise(model, cond, uncond, g, noise_a, s.eta)):
                if i + 1 == head:
                    break
            batch_head = time.perf_counter() - t0
            t_head += batch_head
            finals = {}
            for name, noise in (("full_a", noise_a), ("full_b", noise_b)):
                # the whole real chain: the two noises share the head's draws, so they share its latents x
                t0 = time.perf_counter()
                finals[name] = list(denoise(model, cond, uncond, g, noise, s.eta))[-1][0]
                secs[name] = secs.get(name, 0.0) + time.perf_counter() - t0 - batch_head  # the tail's share
            for k in tails:
                t0 = time.perf_counter()
                finals[f"ode_{k}"] = coarse_tail(model, cond, uncond, g, x, ts, head, k)
                secs[f"ode_{k}"] = secs.get(f"ode_{k}", 0.0) + time.perf_counter() - t0
            for name, y in finals.items():
                img = model.decode(y)
                r, d = reward.score_details(img, ps)
                slot = got.setdefault(name, {"reward": [], "full": [], "relation": [], "shapes": [], "extra": []})
                slot["reward"] += r.tolist()
                for c in ("full", "relation", "shapes", "extra"):
                    slot[c] += d[c].tolist()
        print(f"  {len(all_prompts)}/{len(rows)} rollouts", file=sys.stderr, flush=True)

    a = {k: np.array(v) for k, v in got["full_a"].items()}
    out = {"config": args.config, "head": head, "num_steps": s.num_steps, "rollouts": len(rows),
           "head_s": t_head, "tails": {}}  # fmt: skip
    print(f"{len(rows)} rollouts, head {head} of {s.num_steps} steps ({t_head:.1f} s)")
    print(f"{'tail':8} {'reward':>7} {'full':>6} {'rel':>6} {'shapes':>6} {'extra':>6} | {'same rel':>8} "
          f"{'same full':>9} {'corr r':>7} {'corr adv':>8} | {'s':>6}")
    for name, v in got.items():
        v = {k: np.array(x) for k, x in v.items()}
        row = {
            **{c: float(v[c].mean()) for c in ("reward", "full", "relation", "shapes", "extra")},
            "same_relation": float((v["relation"] == a["relation"]).mean()),
            "same_full": float((v["full"] == a["full"]).mean()),
            "corr_reward": float(np.corrcoef(v["reward"], a["reward"])[0, 1]),
            "corr_advantage": float(np.corrcoef(centred(v["reward"], all_prompts), centred(a["reward"], all_prompts))[0, 1]),
            "seconds": secs[name],
        }
        out["tails"][name] = row
        print(f"{name:8} {row['reward']:7.3f} {row['full']:6.3f} {row['relation']:6.3f} {row['shapes']:6.3f} "
              f"{row['extra']:6.3f} | {row['same_relation']:8.3f} {row['same_full']:9.3f} {row['corr_reward']:7.3f} "
              f"{row['corr_advantage']:8.3f} | {row['seconds']:6.1f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
