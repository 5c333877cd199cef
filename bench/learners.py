"""Data-parallel learners: seconds per DDPO update with 1 against N learner actors, measured in one run.

    python bench/learners.py                    # tiny model, 32 samples, 1 vs 2 learners, 1 torch thread each
    python bench/learners.py --config shapes --samples 64 --set algorithm.timestep_window=[0.0,0.5]

Every learner gets the same scored batch and runs its share of each optimizer step's minibatches; the
gradients are summed with a gloo all-reduce (ray.util.collective) before each step. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--learners", default="1,2")
    ap.add_argument("--updates", type=int, default=3)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args(argv)
    import ray
    import torch

    from common.config import load_config
    from common.rollouts import RolloutGenerator
    from learner.actor import LearnerActor

    counts = [int(x) for x in args.learners.split(",")]
    base = [f"train.samples_per_epoch={args.samples}", "cluster.learner.torch_threads=1", *args.set]
    cfg0 = load_config(args.config, base)
    torch.set_num_threads(2)
    prompts = (["a red circle above a blue square", "a green triangle below a yellow circle"] * args.samples)[: args.samples]
    batch = RolloutGenerator(cfg0).generate(prompts, list(range(args.samples)))
    batch.rewards = torch.randn(args.samples, generator=torch.Generator().manual_seed(0))
    ray.init(num_cpus=max(counts) + 1, include_dashboard=False, log_to_driver=False)
    out = {"config": args.config, "samples": args.samples, "cpus": __import__("os").cpu_count(), "results": []}
    for n in counts:
        cfg = load_config(args.config, base + [f"cluster.num_learners={n}"])
        cls = ray.remote(LearnerActor).options(num_cpus=1, max_concurrency=2, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        learners = [cls.remote(cfg) for _ in range(n)]
        ray.get([lr.join_group.remote(n, r, f"bench-{n}") for r, lr in enumerate(learners)])
        times = []
        for u in range(args.updates + 1):  # the first is warm-up
            batch.policy_version = u
            ref = ray.put(batch)
            t = time.perf_counter()
            ray.get([lr.train_got.remote([("0", [ref])]) for lr in learners])
            times.append(time.perf_counter() - t)
        out["results"].append({"learners": n, "s_per_update": round(sum(times[1:]) / args.updates, 2)})
        print(json.dumps(out["results"][-1]), file=sys.stderr, flush=True)
        for lr in learners:
            ray.kill(lr)
    if len(out["results"]) > 1:
        out["speedup"] = round(out["results"][0]["s_per_update"] / out["results"][-1]["s_per_update"], 2)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
