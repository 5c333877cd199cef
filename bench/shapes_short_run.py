"""A short AlignProp run on Shapes through the real epoch loop: does the evaluation reward rise?

The suite's evaluation-based learning test (tests/test_shapes_learning.py) runs `short_run` with the settings
measured here: the default preset (`shapes_quick`: AlignProp through all 10 DDIM steps, `shapes_soft` at
rel_scale 8, evaluation by the hard `shapes` detector) on the local backend, EPOCHS epochs of PROMPTS
`shapes_pairs` prompts x 1 image, evaluated before and after on EVAL `shapes_pairs` prompts x 2 images with
the same noise (the loop's own paired change from the base policy's images); one optimizer step per MB
prompts.

    THREADS=2 python bench/shapes_short_run.py 0 1 2 3 4          # the test's settings (SHORT), 5 seeds
    EPOCHS=6 PROMPTS=16 EVAL=24 LR=5e-4 MB=8 python bench/shapes_short_run.py 0 1
    JSON=out.json python bench/shapes_short_run.py 0                 # also write the figures per seed

Per seed it prints the evaluation reward (mean hard score) before and after, the paired change with its 95%
CI, and the change in full success. Measured: docs/results.md, "A Shapes learning test for the suite".
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

SHORT = {"epochs": 6, "prompts": 16, "eval_prompts": 24, "lr": 5e-4, "minibatch": 4}  # the suite test's settings


def short_run(seed: int, epochs: int = SHORT["epochs"], prompts: int = SHORT["prompts"],
              eval_prompts: int = SHORT["eval_prompts"], lr: float = SHORT["lr"], minibatch: int = SHORT["minibatch"],
              out: Path | None = None) -> dict[str, float]:  # fmt: skip
    """Train `shapes_quick` for `epochs` x `prompts` prompts on the local backend; returns the final evaluation's
    figures: reward (mean hard score) before and after, its paired change and 95% CI, the full-success change."""
    from common.config import load_config
    from learner.local import LocalSystem
    from learner.loop import Trainer
    from learner.run_dir import RunDir

    cfg = load_config("shapes_quick", [
        "cluster.backend=local", f"train.seed={seed}", f"train.epochs={epochs}",
        f"train.samples_per_epoch={prompts}", f"train.prompts_per_epoch={prompts}", f"algorithm.learning_rate={lr}",
        f"algorithm.minibatch_size={minibatch}",
        "prompts.eval=[shapes_pairs]", f"eval.max_prompts={eval_prompts}", "eval.images_per_prompt=2",
        f"eval.every={epochs + 1}", "train.checkpoint_every=0", "output.grid_every=0", "output.tensorboard=false",
    ])  # fmt: skip
    run = RunDir(Path(out or tempfile.mkdtemp(prefix="shapes-short-")))
    run.create(cfg)
    rows = Trainer(cfg, run, LocalSystem(cfg), log=lambda *_: None).fit()
    start = next(r for r in rows if "eval_reward_mean" in r and not r.get("final_eval"))
    final = rows[-1]
    return {
        "before": start["eval_reward_mean"], "after": final["eval_reward_mean"],
        "change": final["eval_reward_change_mean"], "change_ci95": final["eval_reward_change_ci95"],
        "full_before": start["eval_shapes_full_mean"], "full_change": final["eval_shapes_full_change_mean"],
        "train_reward_first": rows[0]["reward_mean"], "train_reward_last": rows[-2]["reward_mean"],
    }  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    env = {"epochs": ("EPOCHS", int), "prompts": ("PROMPTS", int), "eval_prompts": ("EVAL", int), "lr": ("LR", float),
           "minibatch": ("MB", int)}
    kw = {k: cast(os.environ[name]) if name in os.environ else SHORT[k] for k, (name, cast) in env.items()}
    print(f"settings: {kw}", flush=True)
    results = {}
    for sd in map(int, sys.argv[1:]):
        r = results[sd] = short_run(sd, **kw)
        if "JSON" in os.environ:  # after every seed, so a killed run keeps what it measured
            Path(os.environ["JSON"]).write_text(json.dumps(results, indent=1))
        print(f"seed {sd}: eval reward {r['before']:.3f} -> {r['after']:.3f} (change {r['change']:+.3f} +- "
              f"{r['change_ci95']:.3f}); full success {r['full_before']:.3f} {r['full_change']:+.3f}; "
              f"training reward {r['train_reward_first']:.3f} -> {r['train_reward_last']:.3f}", flush=True)  # fmt: skip
