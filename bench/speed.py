"""Seconds per epoch (sample / reward / learn), samples per second and peak memory.

Runs one workload three ways and prints a table:
  local   the local backend (cluster.backend=local: one process, no Ray), torch on all cores
  ray-s0  the Ray system, replay.max_staleness=0 (strictly on-policy)
  ray-s1  the Ray system, replay.max_staleness=1 (sampling overlaps learning)

    python bench/speed.py                       # the tiny preset
    python bench/speed.py --workload reference  # ddpo-pytorch's tiny workload (attention-only LoRA r4, lr 3e-4)
    python bench/speed.py --epochs 8 --set sampling.num_steps=10

The first epoch of each mode is warm-up and is left out of the averages.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# The local loop keeps OpenMP's default wait policy: alone on the machine, spinning threads are its
# fastest setting (2.09 s vs 3.67 s per reference epoch with PASSIVE). Actors get cluster.omp_wait_policy.

REFERENCE = [  # ddpo-pytorch measured on this machine: 6.2 s/epoch, 2.6 samples/s
    "lora.rank=4", "lora.alpha=4", "lora.target_modules=[to_q,to_k,to_v,to_out.0]", "algorithm.learning_rate=3e-4",
    "sampling.num_steps=20", "sampling.eta=1.0", "exploration.enabled=false", "sampling.guidance_scale=5.0",
    "train.samples_per_epoch=16", "sampling.batch_size=8", "algorithm.minibatch_size=8",
    "algorithm.gradient_accumulation=2",
]  # fmt: skip
COMMON = ["eval.every=0", "output.grid_every=0", "train.checkpoint_every=0", "output.tensorboard=false",
          "cluster.local_dashboard=false"]  # fmt: skip


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_local(cfg, threads: int) -> tuple[list[dict], float]:
    """The local backend (one process, no Ray) through the same epoch loop as the Ray runs."""
    from learner.local import LocalSystem
    from learner.loop import Trainer
    from learner.run_dir import RunDir

    cfg = cfg.model_copy(deep=True)
    cfg.cluster.backend, cfg.cluster.local_torch_threads = "local", threads
    run_dir = RunDir(Path(tempfile.mkdtemp(prefix="bench-local-")))
    run_dir.create(cfg)
    rows = Trainer(cfg, run_dir, LocalSystem(cfg), log=lambda *_: None).fit()
    return [r for r in rows if not r.get("final_eval")], peak_rss_mb()


def run_ray(cfg) -> tuple[list[dict], float]:
    import ray

    from learner.driver import RaySystem
    from learner.loop import Trainer
    from learner.main import init_ray, preflight
    from learner.run_dir import RunDir

    preflight(cfg)
    init_ray(cfg)
    run_dir = RunDir(Path(tempfile.mkdtemp(prefix="bench-")))
    run_dir.create(cfg)
    system = RaySystem(cfg)  # the same steps as learner.main.run, keeping the actors to ask their memory
    try:
        rows = Trainer(cfg, run_dir, system, log=lambda *_: None).fit()
        actors = system.samplers + system.rewarders + [system.learner]
        total = peak_rss_mb() + sum(ray.get([a.peak_rss_mb.remote() for a in actors]))  # driver + every actor
    finally:
        system.shutdown()
    return [r for r in rows if not r.get("final_eval")], total


def summarize(rows: list[dict], n_samples: int) -> dict:
    import numpy as np

    body = rows[1:] if len(rows) > 1 else rows
    out = {k: float(np.mean([r[k] for r in body])) for k in ("time_sample", "time_reward", "time_learn", "time_epoch")}
    out["samples_per_s"] = n_samples / out["time_epoch"]
    out["max_logprob_mismatch_s0"] = max(r["logprob_mismatch"] for r in body)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=["tiny", "reference"], default="tiny")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--modes", default="local,ray-s0,ray-s1")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the local loop")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from common.config import load_config

    base = (REFERENCE if args.workload == "reference" else []) + COMMON + [f"train.epochs={args.epochs}"] + args.overrides
    results = {}
    for mode in args.modes.split(","):
        extra = {"local": [], "ray-s0": ["replay.max_staleness=0"], "ray-s1": ["replay.max_staleness=1"]}[mode]
        cfg = load_config("tiny", base + extra)
        t = time.perf_counter()
        rows, mem = run_local(cfg, args.threads) if mode == "local" else run_ray(cfg)
        res = summarize(rows, cfg.train.samples_per_epoch)
        res["peak_rss_mb"] = mem
        res["wall_s"] = time.perf_counter() - t
        results[mode] = res
        print(f"{mode}: " + json.dumps({k: round(v, 4) for k, v in res.items()}), flush=True)

    print(f"\nworkload={args.workload} epochs={args.epochs} (first epoch is warm-up) cpus={os.cpu_count()}")
    print(f"{'mode':8} {'s/epoch':>8} {'sample':>7} {'reward':>7} {'learn':>7} {'img/s':>7} {'peak MB':>8} {'vs local':>8}")
    local = results.get("local", {}).get("time_epoch")
    for mode, r in results.items():
        ratio = f"{r['time_epoch'] / local:.2f}x" if local else "-"
        print(f"{mode:8} {r['time_epoch']:8.2f} {r['time_sample']:7.2f} {r['time_reward']:7.2f} {r['time_learn']:7.2f} "
              f"{r['samples_per_s']:7.2f} {r['peak_rss_mb']:8.0f} {ratio:>8}")
    if args.workload == "reference":
        best = max(r["samples_per_s"] for r in results.values())
        print(f"ddpo-pytorch reference: 2.6 img/s (6.2 s/epoch); best here {best:.2f} img/s = {best / 2.6:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
