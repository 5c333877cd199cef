"""Whole-process time of short runs, split into start-up and per-epoch time, against ddpo-pytorch.

Each system trains the same workload (ddpo-pytorch's tiny one: `bench/speed.py --workload reference`, a
tiny random SD pipeline at 64x64, 20 DDIM steps, eta 1, CFG 5, 16 samples per epoch in batches of 8,
LoRA r4 on attention, lr 3e-4, JPEG compressibility) for a short and a long number of epochs as a fresh
process, timed from the shell's point of view. Per-epoch time is the marginal (T_long - T_short) /
(long - short) and start-up the rest, T_long - long x per-epoch: import, model load, Ray and actors,
first-epoch warm-up.

    python bench/startup.py --model /path/to/tiny_pipeline_dir --repeats 3 \
        [--ddpo-pytorch /path/to/ddpo-pytorch --ddpo-python /path/to/its/venv/bin/python]

ddpo-pytorch (kvablack/ddpo-pytorch, commit 1958463) runs with `scripts/train.py` and a config file
this script writes next to it (config/diffexp_startup.py: the workload above, fp32, no wandb); its model
directory must hold a slow CLIP tokenizer (vocab.json, merges.txt) for transformers 4.30.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.speed import COMMON, REFERENCE

ROOT = Path(__file__).resolve().parents[1]

DDPO_CONFIG = """import os

from config.base import get_config as base


def get_config():
    config = base()
    config.pretrained.model = os.environ["STARTUP_MODEL"]
    config.logdir = os.environ["STARTUP_LOGDIR"]
    config.num_epochs = int(os.environ["STARTUP_EPOCHS"])
    config.save_freq = 10**6
    config.mixed_precision = "no"
    config.allow_tf32 = False
    config.sample.num_steps = 20
    config.sample.eta = 1.0
    config.sample.guidance_scale = 5.0
    config.sample.batch_size = 8
    config.sample.num_batches_per_epoch = 2
    config.train.batch_size = 8
    config.train.gradient_accumulation_steps = 2
    config.train.learning_rate = 3e-4
    config.reward_fn = "jpeg_compressibility"
    return config
"""


def timed(cmd: list[str], env: dict, cwd: Path) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    dt = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed:\n{(out.stdout + out.stderr)[-3000:]}")
    return dt


COMPILED = ["sampling.compile=inductor", "algorithm.compile=inductor"]  # "local-compiled"


def ours(backend: str, model: str, epochs: int, out_dir: Path, extra: tuple[str, ...] = ()) -> tuple[list[str], dict]:
    sets = [
        *REFERENCE,
        *COMMON,
        f"model.pretrained={model}",
        f"train.epochs={epochs}",
        f"cluster.backend={backend}",
        *extra,
    ]
    cmd = [sys.executable, "-m", "learner.main", "--config", "tiny", "--output", str(out_dir)]
    for s in sets:
        cmd += ["--set", s]
    return cmd, dict(os.environ)


def ddpo(python: str, repo: Path, model: str, epochs: int, out_dir: Path) -> tuple[list[str], dict]:
    (repo / "config" / "diffexp_startup.py").write_text(DDPO_CONFIG)
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(repo), "STARTUP_MODEL": model,
           "STARTUP_LOGDIR": str(out_dir), "STARTUP_EPOCHS": str(epochs)}  # fmt: skip
    acc = str(Path(python).parent / "accelerate")
    return [acc, "launch", "--num_processes", "1", "--mixed_precision", "no", "--cpu", "scripts/train.py",
            "--config", "config/diffexp_startup.py"], env  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", required=True, help="a diffusers pipeline directory (the same for every system)"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--short", type=int, default=2)
    ap.add_argument("--long", type=int, default=10)
    ap.add_argument("--ddpo-pytorch", type=Path, help="a checkout of kvablack/ddpo-pytorch")
    ap.add_argument("--ddpo-python", help="the python of a venv with ddpo-pytorch's requirements")
    ap.add_argument("--work", type=Path, default=Path("/tmp/startup_bench"))
    ap.add_argument("--only", help="comma-separated systems to run: ray, local, local-compiled, ddpo-pytorch")
    args = ap.parse_args()

    systems = {"ours, Ray": lambda e, o: (*ours("ray", args.model, e, o), ROOT),
               "ours, local": lambda e, o: (*ours("local", args.model, e, o), ROOT),
               # torch.compile for the sampler and the learner (inductor's on-disk cache shortens later compiles)
               "ours, local, compiled": lambda e, o: (*ours("local", args.model, e, o, tuple(COMPILED)), ROOT)}  # fmt: skip
    if args.ddpo_pytorch:
        systems["ddpo-pytorch"] = lambda e, o: (
            *ddpo(args.ddpo_python, args.ddpo_pytorch, args.model, e, o),
            args.ddpo_pytorch,
        )
    if args.only:
        keep = {"ray": "ours, Ray", "local": "ours, local", "local-compiled": "ours, local, compiled",
                "ddpo-pytorch": "ddpo-pytorch"}  # fmt: skip
        systems = {keep[k]: systems[keep[k]] for k in args.only.split(",")}
    times: dict[str, dict[int, list[float]]] = {name: {args.short: [], args.long: []} for name in systems}
    for r in range(args.repeats):  # interleaved, so slow drifts of the machine hit every system alike
        for name, make in systems.items():
            for epochs in (args.short, args.long):
                out = args.work / f"{name.replace(', ', '-').replace(' ', '')}-{epochs}-{r}"
                shutil.rmtree(out, ignore_errors=True)  # a new run refuses a directory that holds one
                cmd, env, cwd = make(epochs, out)
                dt = timed(cmd, env, cwd)
                times[name][epochs].append(dt)
                print(f"  {name:13s} {epochs:2d} epochs, run {r + 1}: {dt:6.1f} s", flush=True)

    print(
        f"\n| system | whole process, {args.long} epochs (s) | per epoch (s) | start-up (s) | {args.short} epochs (s) |"
    )
    print("|---|---|---|---|---|")
    rows = {}
    for name, t in times.items():
        lo, hi = statistics.mean(t[args.short]), statistics.mean(t[args.long])
        sd = statistics.stdev(t[args.long]) if len(t[args.long]) > 1 else 0.0
        per = (hi - lo) / (args.long - args.short)
        rows[name] = (hi, per)
        print(f"| {name} | {hi:.1f} +- {sd:.1f} | {per:.2f} | {hi - args.long * per:.1f} | {lo:.1f} |")
    if "ddpo-pytorch" in rows:
        ref_total, ref_per = rows["ddpo-pytorch"]
        for name in [n for n in ("ours, Ray", "ours, local", "ours, local, compiled") if n in rows]:
            total, per = rows[name]
            print(
                f"{name}: whole process {total / ref_total:.2f}x ddpo-pytorch's, per epoch {ref_per / per:.2f}x as fast"
            )


if __name__ == "__main__":
    main()
