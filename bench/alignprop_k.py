"""AlignProp's cost against the truncation K: seconds per update and peak memory, one process per K.

    python bench/alignprop_k.py                         # tiny model, K in 1, 2, 5, 10, 20
    python bench/alignprop_k.py --config shapes --ks 1,5,20 --set algorithm.gradient_checkpointing=true

Each K runs `--updates` AlignProp updates of `algorithm.minibatch_size x gradient_accumulation` samples
(after one warm-up) in a fresh process and reports seconds per sample and the process's peak RSS (CPU) or
peak CUDA memory. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one(args) -> dict:
    import torch

    from common.config import load_config
    from common.prompts import load_prompts
    from learner.alignprop import AlignPropLearner

    torch.set_num_threads(args.threads)
    k = args.one
    cfg = load_config(args.config, ["algorithm.name=alignprop", "reward.terms=[{name: shapes_soft}]",
                                    "prompts.train=shapes_pairs", f"algorithm.alignprop.truncation=[{k},{k}]", *args.set])  # fmt: skip
    learner = AlignPropLearner(cfg)
    n = cfg.algorithm.minibatch_size * cfg.algorithm.gradient_accumulation
    prompts = (load_prompts("shapes_pairs") * 4)[:n]
    learner.train_prompts(prompts, list(range(n)))  # warm-up
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for u in range(args.updates):
        learner.train_prompts(prompts, list(range(n * (u + 1), n * (u + 2))))
    dt = (time.perf_counter() - t) / (args.updates * n)
    out = {"k": k, "s_per_sample": round(dt, 3), "samples_per_update": n,
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}  # fmt: skip
    if torch.cuda.is_available():
        out["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--ks", default="1,2,5,10,20")
    ap.add_argument("--updates", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one(args)))
        return
    rows = []
    for k in args.ks.split(","):
        cmd = [sys.executable, __file__, "--one", k, "--config", args.config, "--updates", str(args.updates),
               "--threads", str(args.threads)] + [x for s in args.set for x in ("--set", s)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"k": int(k), "error": proc.stderr.strip().splitlines()[-1:]})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
