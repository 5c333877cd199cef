"""Before/after grid of a fine-tuned run against its base model: the same prompts and noise for both.

    python bench/before_after.py runs/study_ap/plain-s0 --prompts 8 --images 3 --out docs/img/shapes_before_after.png

Each row is one evaluation prompt (labelled on the left): first `--images` images of the base model, then the same
noise through the run's last checkpoint. Every image carries its evaluation reward (`eval.reward`, else the
training reward) in its lower left corner. Prints the mean reward of both halves. Prompts are spread evenly over
the first evaluation set, noise seeds are the run's evaluation seeds.

`--base-model MODEL` draws the left half from another model (a hub id, a path or a built-in name, LoRA off) than
the run's own `model.pretrained`: a second stage trained on a fused first stage (bench/two_stage.py) shown against
the original base, i.e. what both stages did:

    python bench/before_after.py runs/two_stage/second-s0 --base-model shapes-base-order --out both_stages.png
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> dict:
    """Write the grid; returns both halves' per-image rewards (`base`, `tuned`, prompt-major) and `base_model`."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--images", type=int, default=3, help="images per prompt and model")
    ap.add_argument("--set", dest="prompt_set", default="", help="prompt set (default: the run's first eval set)")
    ap.add_argument("--base-model", help="the left half from this model (LoRA off), not the run's model.pretrained")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from bench.runs import base_weights, last_checkpoint
    from common.prompts import load_prompts
    from common.rollouts import RolloutGenerator, sample_seeds
    from learner.run_dir import RunDir
    from rewards.combined import WeightedReward, score_in_batches

    cfg, ckpt, lora, learner_state, _ = last_checkpoint(args.run)
    src = args.prompt_set or (cfg.prompts.eval or [cfg.prompts.train])[0]
    pool = load_prompts(src)
    step = max(1, len(pool) // args.prompts)
    chosen = pool[::step][: args.prompts]
    prompts = [p for p in chosen for _ in range(args.images)]
    seeds = sample_seeds(cfg.eval.seed, -1, len(prompts))
    gen = RolloutGenerator(cfg)
    base_gen, base_name = gen, cfg.model.pretrained
    if args.base_model and args.base_model != cfg.model.pretrained:
        base_cfg = cfg.model_copy(deep=True)
        base_cfg.model.pretrained = base_name = args.base_model
        base_gen = RolloutGenerator(base_cfg)
    reward = WeightedReward(cfg.eval.reward or cfg.reward)

    def sample(g) -> tuple[torch.Tensor, torch.Tensor]:
        b = g.generate(prompts, seeds, explore=False)
        images = b.images_float()
        return images, score_in_batches(reward, images, prompts, cfg.reward.batch_size)[0]

    base_gen.set_weights(0, base_weights(lora))
    base, base_r = sample(base_gen)
    gen.set_weights(int(learner_state["version"]), lora)
    tuned, tuned_r = sample(gen)
    n = args.images
    rows, scores = [], []
    for i in range(len(chosen)):
        sl = slice(i * n, (i + 1) * n)
        rows += [base[sl], tuned[sl]]
        scores += base_r[sl].tolist() + tuned_r[sl].tolist()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = RunDir(tmp)
        scratch.samples_dir.mkdir()
        grid = scratch.save_grid(torch.cat(rows), "grid", nrow=2 * n, labels=chosen, scores=scores)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(grid, args.out)
    print(f"{args.run} ({ckpt.name}) on {Path(src).stem}, {len(prompts)} images each: reward base ({base_name}) "
          f"{float(base_r.mean()):.3f} -> tuned {float(tuned_r.mean()):.3f}; grid: left {n} base, right {n} tuned -> {args.out}")
    return {"base": base_r, "tuned": tuned_r, "base_model": base_name, "prompts": prompts}


if __name__ == "__main__":
    main()
