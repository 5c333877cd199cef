"""Sampler time with and without `sampling.fuse_lora`, interleaved, on the CPU or a GPU.

    python bench/fuse_lora_speed.py --threads 2
    python bench/fuse_lora_speed.py --preset shapes_order_ddpo --repeats 8

For each workload, two RolloutGenerators (fused and not) generate the same 8 prompts and seeds in turn,
after one warm-up call each; prints each call's seconds and the ratio fused / unfused of their sums.
Default workloads: ddpo-pytorch's tiny one (attention-only LoRA rank 4, `tiny`) and the Shapes DDPO
stage's (`shapes_order_ddpo`: rank-8 LoRA on attention and feed-forward, `shapes-base-order`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORKLOADS = {
    "tiny": ["lora.rank=4", "lora.alpha=4", "lora.target_modules=[to_q,to_k,to_v,to_out.0]", "sampling.batch_size=8"],
    "shapes_order_ddpo": [],
}
PROMPTS = {"tiny": "a photo of a cat", "shapes_order_ddpo": "a red circle left of a blue square"}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", action="append", choices=sorted(WORKLOADS), help="default: both")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="config override for both generators")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from common.config import load_config
    from common.rollouts import RolloutGenerator

    out = {}
    for preset in args.preset or list(WORKLOADS):
        gens = {}
        for fuse in (False, True):
            over = WORKLOADS[preset] + ["exploration.enabled=false", f"sampling.fuse_lora={str(fuse).lower()}"]
            gens[fuse] = RolloutGenerator(load_config(preset, over + args.set))
        prompts, seeds = [PROMPTS[preset]] * 8, list(range(8))
        times: dict[bool, list[float]] = {False: [], True: []}
        for g in gens.values():
            g.generate(prompts, seeds)  # warm-up
        for _ in range(args.repeats):
            for fuse, g in gens.items():
                t0 = time.perf_counter()
                g.generate(prompts, seeds)
                times[fuse].append(time.perf_counter() - t0)
        out[preset] = {"unfused_s": [round(t, 3) for t in times[False]], "fused_s": [round(t, 3) for t in times[True]],
                       "fused_over_unfused": round(sum(times[True]) / sum(times[False]), 3)}  # fmt: skip
        print(f"{preset}: unfused {out[preset]['unfused_s']} s, fused {out[preset]['fused_s']} s, "
              f"ratio {out[preset]['fused_over_unfused']} ({args.threads} threads)", file=sys.stderr)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
