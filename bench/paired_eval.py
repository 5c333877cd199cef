"""Paired evaluation of fine-tuned runs against their base model: the same prompts and the same noise for
both, so the change is measured per image and its CI is that of the mean paired difference (much
narrower than two independent CIs when most images do not change).

    python bench/paired_eval.py runs/sweeps/early4/w02-128-s0 runs/sweeps/early4/w02-128-s1 --images 4

For each run: its config (config.yaml) and its last complete checkpoint's LoRA; evaluation on every set
of `prompts.eval` (first `--max-prompts` prompts x `--images` images, seeds from `eval.seed`), plain
prompts and the constant guidance, as the run's own evaluation does. Prints, per set and reward
component, base -> fine-tuned means and the paired difference with its 95% CI; the base model is
evaluated once per distinct evaluation set. The last lines give the seed mean of each difference with a
t-interval over the runs.

`--base-model MODEL` judges against another model than the runs' own `model.pretrained` (a hub id, a path or a
built-in name, LoRA off): a second stage trained on a fused first stage (bench/two_stage.py) is judged against
the original base, so the change is what both stages bought, on as many images as wanted:

    python bench/paired_eval.py runs/two_stage/second-s? --base-model shapes-base-order --images 16

`--all-checkpoints` judges every checkpoint of each run (a curve of paired changes against reward queries;
train with `train.checkpoint_every` small), and `--base-cache DIR` keeps the base model's scores on disk, so
that several processes evaluating runs of one study compute them once.

`--diversity` (Shapes prompts, `--images` >= 2) also measures how much each prompt's images vary
(common/shapes/diversity.py: position and size spread of the requested objects in px, mean pairwise RMS pixel
distance), for the base and each run on the same noise, and gives the paired change with its 95% CI over
prompts. A run that kept no final images (stopped early) is measured from its checkpoint this way, and at
`--images 16` each prompt's spread rests on 16 images instead of the run's 4:

    python bench/paired_eval.py runs/a-s? runs/b-s? --images 16 --diversity --base-cache runs/judge16/base_cache
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def paired_eval(runs: list[Path], images: int = 4, max_prompts: int = 60, sets: list[str] | None = None,
                all_checkpoints: bool = False, base_cache: Path | None = None, base_model: str | None = None,
                diversity: bool = False, log=print) -> list[dict]:
    """One entry per judged checkpoint: run, checkpoint, reward_queries and, per evaluation set and reward
    component, base and fine-tuned means and the paired difference with its 95% CI over images. With
    `diversity` (Shapes prompts, `images` >= 2), also entry["diversity"][set][metric]: the same over prompts
    of each prompt's diversity (common/shapes/diversity.py) on the same noise."""
    import hashlib

    import torch
    from safetensors.torch import load_file, save_file

    from bench.runs import base_weights
    from common.config import load_config
    from common.prompts import load_prompts
    from common.rollouts import RolloutGenerator, sample_seeds
    from learner.local import local_device
    from learner.run_dir import RunDir
    from rewards.combined import WeightedReward, score_in_batches

    def score(gen, reward, cfg, prompts, seeds) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(per image: reward and its components; per prompt: diversity, when asked for)."""
        out: dict[str, list] = {}
        kept = []
        for i in range(0, len(prompts), 64):
            b = gen.generate(prompts[i : i + 64], seeds[i : i + 64], explore=False)
            total, parts = score_in_batches(reward, b.images_float(), b.prompts, cfg.reward.batch_size, True)
            for k, v in {"reward": total, **parts}.items():
                out.setdefault(k.replace("/", "_"), []).append(v)
            if diversity:
                kept.append(b.images)  # uint8, as the runs keep them
        div = prompt_diversities(torch.cat(kept), prompts) if diversity else {}
        return {k: torch.cat(v).double() for k, v in out.items()}, div

    base_mem: dict = {}
    results = []
    for run_path in runs:
        cfg = load_config(str(run_path / "config.yaml"))
        run = RunDir(run_path)
        ckpts = run.checkpoints()
        if not ckpts:
            raise SystemExit(f"{run_path}: no complete checkpoint")
        if not all_checkpoints:
            ckpts = ckpts[-1:]
        reward = WeightedReward(cfg.eval.reward or cfg.reward)
        gen = RolloutGenerator(cfg, device=local_device(cfg))  # CUDA when there is one, as the run's training
        base_gen, base_name = gen, cfg.model.pretrained
        if base_model is not None and base_model != cfg.model.pretrained:
            base_cfg = cfg.model_copy(deep=True)
            base_cfg.model.pretrained = base_name = base_model
            base_gen = None  # built only if the base's scores are not cached
        for ckpt in ckpts:
            lora, learner_state, counters = run.load_checkpoint(ckpt)
            entry = {"run": str(run_path), "checkpoint": str(ckpt), "reward_queries": counters["reward_queries"],
                     "sets": {}}  # fmt: skip
            for src in sets or cfg.prompts.eval or [cfg.prompts.train]:
                prompts = [p for p in load_prompts(src)[:max_prompts] for _ in range(images)]
                seeds = sample_seeds(cfg.eval.seed, -1, len(prompts))
                key = [base_name, src, images, max_prompts, cfg.eval.seed, cfg.sampling.num_steps,
                       cfg.sampling.guidance_scale, (cfg.eval.reward or cfg.reward).model_dump()]  # fmt: skip
                digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
                cached = base_cache / f"base-{digest}.safetensors" if base_cache else None
                # the base's per-prompt diversity sits beside its scores (a cache from before it lacks it)
                cached_div = cached.with_name(f"base-{digest}.diversity.safetensors") if cached else None
                in_cache = cached is not None and cached.is_file() and (not diversity or cached_div.is_file())
                if digest not in base_mem and in_cache:
                    base_mem[digest] = (load_file(str(cached)), load_file(str(cached_div)) if diversity else {})
                if digest not in base_mem:
                    if base_gen is None:
                        base_gen = RolloutGenerator(base_cfg, device=local_device(base_cfg))
                    base_gen.set_weights(0, base_weights(lora))
                    base_mem[digest] = score(base_gen, reward, cfg, prompts, seeds)
                    if cached is not None:
                        cached.parent.mkdir(parents=True, exist_ok=True)
                        for data, path in zip(base_mem[digest], (cached, cached_div)):
                            if data:
                                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                                save_file(data, str(tmp))
                                tmp.replace(path)  # atomic: a concurrent reader sees a whole file or none
                gen.set_weights(int(learner_state["version"]), lora)
                tuned, tuned_div = score(gen, reward, cfg, prompts, seeds)
                base, base_div = base_mem[digest]
                rows = {}
                for k in tuned:
                    d = tuned[k] - base[k]
                    n = d.numel()
                    rows[k] = {"base": float(base[k].mean()), "tuned": float(tuned[k].mean()), "diff": float(d.mean()),
                               "ci95": 1.96 * float(d.std(unbiased=True)) / math.sqrt(n), "n": n,
                               "changed": float((d != 0).double().mean())}  # fmt: skip
                    log(f"{run_path.name} | {ckpt.name} ({entry['reward_queries']} queries) | {Path(src).stem} | "
                        f"{k}: {rows[k]['base']:.3f} -> {rows[k]['tuned']:.3f} (paired diff {rows[k]['diff']:+.3f} "
                        f"+- {rows[k]['ci95']:.3f}, n={n}, {rows[k]['changed']:.0%} of images changed score)")  # fmt: skip
                entry["sets"][Path(src).stem] = rows
                if diversity:
                    entry.setdefault("diversity", {})[Path(src).stem] = div_rows = paired_diversity(base_div, tuned_div)
                    for k, r in div_rows.items():
                        log(f"{run_path.name} | {ckpt.name} | {Path(src).stem} | diversity {k}: {r['base']:.4g} -> "
                            f"{r['tuned']:.4g} (paired diff over prompts {r['diff']:+.4g} +- {r['ci95']:.4g}, "
                            f"n={r['n']} prompts)")  # fmt: skip
            results.append(entry)
    return results


DIVERSITY = ("position_spread", "size_spread", "pixel_distance")


def prompt_diversities(images, prompts: list[str]) -> dict:
    """Per distinct prompt, in first-seen order, the diversity of its images uint8 [N, 3, H, W]
    (common/shapes/diversity.py; the measure bench/study.py's image_diversity averages): one float64 tensor a
    metric, nan where a prompt's value is undefined (an object found in fewer than two images)."""
    import torch

    from common.shapes.diversity import prompt_diversity

    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    if min(len(ix) for ix in groups.values()) < 2:
        raise SystemExit("diversity needs at least 2 images a prompt (--images)")
    per = [prompt_diversity(images[torch.tensor(ix)].float() / 255, p) for p, ix in groups.items()]
    return {k: torch.tensor([getattr(d, k) for d in per], dtype=torch.float64) for k in DIVERSITY}


def paired_diversity(base: dict, tuned: dict) -> dict[str, dict]:
    """Per metric: the base's and the tuned model's mean over prompts, and the mean paired difference with its 95%
    CI over the prompts where both are defined (n); and every prompt's value at both ends (nan: undefined), so
    that two runs can be paired prompt by prompt."""
    rows = {}
    for k in DIVERSITY:
        ok = ~(base[k].isnan() | tuned[k].isnan())
        b, t = base[k][ok], tuned[k][ok]
        d, n = t - b, int(ok.sum())
        ci = 1.96 * float(d.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
        rows[k] = {"base": float(b.mean()), "tuned": float(t.mean()), "diff": float(d.mean()), "ci95": ci, "n": n,
                   "per_prompt_base": base[k].tolist(), "per_prompt_tuned": tuned[k].tolist()}  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--images", type=int, default=4, help="images per prompt")
    ap.add_argument("--max-prompts", type=int, default=60)
    ap.add_argument("--sets", default="", help="comma-separated prompt sets (default: each run's prompts.eval)")
    ap.add_argument("--all-checkpoints", action="store_true", help="judge every checkpoint, not only the last")
    ap.add_argument("--base-cache", type=Path, help="folder keeping the base model's scores between processes")
    ap.add_argument("--base-model", help="judge against this model (LoRA off), not the runs' model.pretrained")
    ap.add_argument("--diversity", action="store_true",
                    help="also each prompt's diversity (Shapes prompts), paired over prompts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    results = paired_eval(args.runs, args.images, args.max_prompts, args.sets.split(",") if args.sets else None,
                          args.all_checkpoints, args.base_cache, args.base_model, args.diversity,
                          log=lambda m: print(m, flush=True))  # fmt: skip
    from bench.runs import seed_mean_ci

    finals = {r["run"]: r for r in results}  # each run's last judged checkpoint
    if len(finals) > 1:
        print("\nseed mean of the paired differences at each run's last checkpoint (95% t-interval over runs):")
        first = next(iter(finals.values()))
        for s in first["sets"]:
            for k in first["sets"][s]:
                ds = [r["sets"][s][k]["diff"] for r in finals.values() if s in r["sets"]]
                m = sum(ds) / len(ds)
                sd = math.sqrt(sum((x - m) ** 2 for x in ds) / (len(ds) - 1)) if len(ds) > 1 else 0.0
                print(f"{s} | {k}: {m:+.3f} +- {T95.get(len(ds) - 1, 2.0) * sd / math.sqrt(len(ds)):.3f} "
                      f"(runs: {', '.join(f'{x:+.3f}' for x in ds)})")
        for s, metrics in first.get("diversity", {}).items():
            for k in metrics:
                ds = [r["diversity"][s][k]["diff"] for r in finals.values() if s in r.get("diversity", {})]
                m, half = seed_mean_ci(ds)
                print(f"{s} | diversity {k}: {m:+.4g} +- {half:.4g} (runs: {', '.join(f'{x:+.4g}' for x in ds)})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))



if __name__ == "__main__":
    main()
