"""Scoring throughput and peak memory of each learned reward (random weights, nothing downloaded).

Each reward runs in its own process (as in its own reward actor), scoring batches of 512 px images (the
size SD1.5 produces; preprocessing included) against animal x activity prompts. Prints one JSON document.

    python bench/rewards.py                 # reduced sizes on this CPU
    python bench/rewards.py --full          # published sizes (ViT-L/14, ViT-H/14, BLIP ViT-L/16): a GPU
    python bench/rewards.py --rewards aesthetic,pickscore --batch 32 --reps 3
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
NAMES = ["aesthetic", "clipscore", "pickscore", "hpsv2", "imagereward"]


def one(name: str, args) -> dict:
    import torch

    from common.prompts import load_prompts
    from rewards import build_reward
    from rewards.random_weights import reward_terms

    torch.set_num_threads(args.threads) if args.threads else None
    options = reward_terms(args.weights, args.full)[name]
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    device = args.device
    t = time.perf_counter()
    reward = build_reward(name, device=device, dtype=args.dtype, **options)
    t_load = time.perf_counter() - t
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.interpolate(torch.rand(args.batch, 3, 16, 16, generator=g), size=(512, 512), mode="bilinear")
    prompts = (load_prompts("animals_activities") * 2)[: args.batch]
    if device.startswith("cuda"):
        images = images.to(device)
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        reward(images, prompts)  # warm-up (and the text cache, as in training where prompts repeat)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.reps):
            scores = reward(images, prompts)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t) / args.reps
    out = {"reward": name, "size": "full" if args.full else "reduced", "batch": args.batch, "device": device,
           "img_s": round(args.batch / dt, 1), "load_s": round(t_load, 2),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "rss_before_load_mb": round(base_rss), "finite": bool(torch.isfinite(scores).all())}  # fmt: skip
    if device.startswith("cuda"):
        out["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def main(argv=None) -> list[dict]:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rewards", default=",".join(NAMES))
    ap.add_argument("--full", action="store_true", help="published sizes (a GPU; minutes and GBs on a CPU)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--weights", default=str(Path(tempfile.gettempdir()) / "diffexp-bench-reward-weights"))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args)))
        return []
    results = []
    for name in args.rewards.split(","):
        cmd = [sys.executable, __file__, "--one", name, "--batch", str(args.batch), "--reps", str(args.reps),
               "--threads", str(args.threads), "--device", args.device, "--dtype", args.dtype, "--weights", args.weights]
        cmd += ["--full"] if args.full else []
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            results.append({"reward": name, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"torch": torch.__version__, "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
