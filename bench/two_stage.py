"""A two-stage fine-tune per seed: stage 1, its LoRA fused into a new model, stage 2 from that model, and what
both stages together gained over the original base, paired image by image and summarised over seeds.

One run can do the same by itself (a config's `stages:`, learner/stages.py; `--config shapes_two_stage`); this
script runs each stage as its own run, with per-stage overrides (`--first-set`, `--second-set`), for studies
whose arms differ in one stage.

The Shapes recipe that raises full success most (docs/results.md, "Large-batch DDPO moves the order"): DDPO
with one 480-sample step an epoch moves the relation order (`shapes_order_ddpo`), then AlignProp repairs the
objects (`shapes_order`). For each seed S, under OUT:

    first-sS/    stage 1: learner.main --config FIRST --set train.seed=S
    merged-sS/   stage 1's last complete checkpoint (or --checkpoint) fused into its base (bench/merge_lora.py)
    second-sS/   stage 2: learner.main --config SECOND --set model.pretrained=OUT/merged-sS --set train.seed=S
    summary.json the paired changes over the original base per seed and over seeds (bench/stage_changes.py),
                 for these seeds and any others done under OUT with the same settings (seeds launched as
                 separate processes side by side end with one summary)
    stages.png   per metric, each seed's change after stage 1 and after both, with the mean and its 95% CI

    python bench/two_stage.py --out runs/two_stage --seeds 0,1,2 --threads 2
    python bench/two_stage.py --out runs/x --first shapes_order_ddpo --first-set train.epochs=8 \
        --first-set train.checkpoint_every=8 --first-set eval.every=8 --seeds 0

Re-running the same command skips the stages already done (a finished run, an existing merged model), so an
interrupted study resumes; an unfinished run is started over. Runs use the local backend (bench/runs.py),
one at a time: two on two cores slow each other more than they gain. Both stages must share the evaluation
protocol (stage_changes refuses otherwise, naming the field).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.runs import RunSpec, is_done, launch_all


def stage_dirs(out: Path, seed: int) -> tuple[Path, Path, Path]:
    return out / f"first-s{seed}", out / f"merged-s{seed}", out / f"second-s{seed}"


def arm_settings(run: Path, stage: str) -> dict:
    """A stage's resolved config without what differs between the seeds of one arm: the seed, where the run
    wrote, how many threads it had, and (stage 2) which seed's fused model it started from."""
    from common.config import read_config_source

    c = read_config_source(str(run / "config.yaml"))
    for section, key in (("train", "seed"), ("output", "dir")):
        c.get(section, {}).pop(key, None)
    c.pop("cluster", None)
    if stage == "second":
        c.get("model", {}).pop("pretrained", None)
    return c


def seeds_of_the_same_arm(out: Path, seed: int) -> list[int]:
    """Every seed under OUT whose two stages are done with the same settings as `seed`'s: seeds of one arm
    launched side by side (one `--seeds S` process each) summarise together, whichever finishes last."""
    ref = {stage: arm_settings(d, stage) for stage, d in zip(("first", "second"), stage_dirs(out, seed)[::2])}
    found = []
    for first in out.glob("first-s*"):
        tail = first.name[len("first-s"):]
        if not tail.isdigit():
            continue
        other = int(tail)
        _, _, second = stage_dirs(out, other)
        if not (is_done(first) and is_done(second)):
            continue
        if arm_settings(first, "first") == ref["first"] and arm_settings(second, "second") == ref["second"]:
            found.append(other)
    return sorted(found)


def run_seed(args: argparse.Namespace, seed: int, log=print) -> tuple[Path, Path]:
    """Run (or resume) one seed's two stages; returns (first run, second run)."""
    from bench.merge_lora import merge_lora

    first, merged, second = stage_dirs(args.out, seed)
    seed_set = [f"train.seed={seed}"]
    launch_all([RunSpec(first.name, args.first, args.common + args.first_set + seed_set)], args.out, 1,
               args.threads, log=log)  # fmt: skip
    if not (merged / "merged_from.json").is_file():  # merge_lora writes atomically: the file means complete
        rel = merge_lora(first, merged, checkpoint=args.checkpoint, log=log)
        log(f"seed {seed}: merged {first.name} into {merged} (policy reproduced to {rel:.1e} relative)")
    pretrained = [f"model.pretrained={merged.resolve()}"]
    launch_all([RunSpec(second.name, args.second, args.common + args.second_set + pretrained + seed_set)],
               args.out, 1, args.threads, log=log)  # fmt: skip
    return first, second


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--first", default="shapes_order_ddpo", help="stage 1's preset or YAML")
    ap.add_argument("--second", default="shapes_order", help="stage 2's preset or YAML")
    ap.add_argument("--set", dest="common", action="append", default=[], help="override for both stages")
    ap.add_argument("--first-set", action="append", default=[], help="override for stage 1")
    ap.add_argument("--second-set", action="append", default=[], help="override for stage 2")
    ap.add_argument("--checkpoint", default=None, help="stage 1's checkpoint to fuse (default: its last)")
    ap.add_argument("--seeds", default="0", help="comma-separated train.seed values")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if any(o.startswith("model.pretrained=") for o in args.second_set + args.common):
        ap.error("stage 2's model.pretrained is stage 1's fused model; set stage 1's with --first-set")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    pairs = []
    for seed in seeds:
        pairs.append(run_seed(args, seed))
        if not all(is_done(p) for p in pairs[-1]):
            raise SystemExit(f"seed {seed}: a stage did not finish (see {args.out}/*-s{seed}.log)")

    from bench.stage_changes import (
        PLOT_COLUMNS,
        columns,
        over_pairs,
        plot_stages,
        report,
        report_over,
        stage_changes,
    )

    others = [s for s in seeds_of_the_same_arm(args.out, seeds[0]) if s not in seeds]
    if others:
        print(f"also summarising seeds {', '.join(map(str, others))}: done under {args.out} with the same settings")
        seeds = sorted(seeds + others)
        pairs = [stage_dirs(args.out, s)[::2] for s in seeds]
    per_seed = {}
    for seed, (first, second) in zip(seeds, pairs):
        per_seed[seed] = stage_changes(first, second)
        print("\n".join(report(per_seed[seed], prefix=f"seed {seed} ")))
    summary = {"first": args.first, "second": args.second, "common": args.common, "first_set": args.first_set,
               "second_set": args.second_set, "checkpoint": args.checkpoint,
               "per_seed": {str(s): v for s, v in per_seed.items()}}  # fmt: skip
    if len(seeds) > 1:
        summary["over_seeds"] = over_pairs(list(per_seed.values()))
        print("\n".join(report_over(summary["over_seeds"], unit="seed")))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    if any(c in columns(r) for r in per_seed.values() for c in PLOT_COLUMNS):  # a Shapes evaluation
        plot_stages(pairs, list(per_seed.values()), args.out / "stages.png", list(PLOT_COLUMNS))
        print(f"wrote {args.out / 'stages.png'}")
    return summary


if __name__ == "__main__":
    main()
