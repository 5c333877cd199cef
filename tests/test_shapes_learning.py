"""Fine-tuning makes the pretrained Shapes model better: a short AlignProp run of the default preset, through
the real epoch loop, raises the evaluation reward (the hard `shapes` detector on fixed evaluation noise)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_short_alignprop_run_raises_the_evaluation_reward(tmp_path):
    # Measured first (bench/shapes_short_run.py at its SHORT settings: `shapes_quick` on the local backend, 6
    # epochs x 16 shapes_pairs prompts, one optimizer step per 4 prompts, lr 5e-4, 96 reward queries; evaluation
    # 24 prompts x 2 images before and after). Seeds 0-7, one thread: eval reward change +0.250, +0.288, +0.188,
    # +0.226, +0.267, +0.243, +0.142, +0.222 (every 95% CI above 0, the lowest lower bound +0.063); full success
    # 0.021 -> +0.104 to +0.333. Seed 0 with two threads: +0.212 +- 0.087. Float sums differ with the thread
    # count, so the margins below hold for every measured seed, not just this one.
    # Its own process, with OpenMP's default wait policy: OMP_WAIT_POLICY=PASSIVE (which only the suite's Ray
    # actors get, but a caller's shell may set) doubles the time of two-thread torch here (145 s against 75 s).
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = tmp_path / "short.json"
    env.update(THREADS="2", JSON=str(out))
    proc = subprocess.run([sys.executable, "bench/shapes_short_run.py", "0"], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())["0"]
    assert r["before"] < 0.5, r  # the 10-step base model is poor: room to rise
    assert r["change"] > 0.10, r
    assert r["change"] - r["change_ci95"] > 0.0, r  # the paired change is significant on these 48 images
    assert r["full_change"] > 0.08, r
