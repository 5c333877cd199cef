"""The sample-efficiency study: one algorithm (the config's: DDPO, AlignProp, ...) with and without DiffExp's two
exploration strategies, at equal reward-query budgets, several seeds each, on the local backend (no Ray: the same
script runs on a GPU box).

Arms (everything else is the base config's):
  plain     exploration off (constant guidance, plain prompts): the algorithm alone
  cfg       the dynamic CFG-scale schedule only
  weights   random prompt weighting only (constant guidance)
  diffexp   both strategies

Outputs in --out: one run directory per arm and seed, study.json, study.md (tables) and study.png (evaluation
metric against reward queries, mean over seeds with 95% CIs, one panel per evaluation set).

    python bench/study.py --out runs/study --seeds 0,1,2 --set train.epochs=12 --parallel 2 --threads 1

`--paired` also judges every checkpoint of every run against the base model on a large paired evaluation
(bench/paired_eval.py: --paired-prompts prompts x --paired-images images per evaluation set, the same noise
for base and fine-tuned), and writes paired.json, paired.md and paired.png: the change from the base model
against reward queries, and the queries each arm needs to reach the plain arm's final change, read from
these curves. The in-run evaluation is small (it costs training time); the paired curves are what to read
"queries to reach" from. Train with `--set train.checkpoint_every=K` for curve points every K epochs.

Studies grow by seeds across sessions and machines: the paired.json written to --out keeps every seed's
curves, and `--pool A/paired.json --pool B/paired.json --out C` analyses the seeds of both as one study
(refused if their protocols, query points or seeds clash). docs/data/ keeps the reported studies' files.

`--two-stage ARM=DIR` (repeated) analyses bench/two_stage.py studies the same way, nothing run: each seed's first
stage and second stage as one curve (the second's reward queries after the first's; its evaluation of the fused
model, a repeat of the first's last, dropped), diversity from the second stage's final images:

    python bench/study.py --out runs/two_stage_study --two-stage plain=runs/two_stage_plain \
        --two-stage cfg=runs/two_stage_cfg --two-stage weights=runs/two_stage_weights

The protocol (arms, budget, seeds, evaluation) is fixed by these arguments; report whatever it gives.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.runs import RunSpec, chain_rows, eval_curve, is_done, launch_all, read_rows, seed_mean_ci
from bench.study_paired import analyse_paired, plot_curves, pool_paired, reach, run_paired, write_paired

ARMS: dict[str, list[str]] = {
    "plain": ["exploration.enabled=false"],
    "cfg": ["exploration.enabled=true", "exploration.prompt_weighting.enabled=false"],
    "weights": ["exploration.enabled=true", "exploration.cfg_schedule.kind=constant"],
    "diffexp": ["exploration.enabled=true"],
}


def image_diversity(file: Path) -> dict[str, float]:
    """Mean per-prompt diversity of the evaluation images in one samples file (RunDir's safetensors), and the
    fraction of those images with an extra object; {} when no prompt has two images."""
    import torch

    from common.shapes.detect import extra_objects
    from common.shapes.diversity import mean_diversity, prompt_diversity
    from learner.run_dir import RunDir

    images, prompts = RunDir.load_eval_images(file)
    images = images.float() / 255
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    per = [prompt_diversity(images[torch.tensor(ix)], p) for p, ix in groups.items() if len(ix) >= 2]
    if not per:
        return {}
    return {**mean_diversity(per), "extra_objects": float(extra_objects(images, prompts).mean())}


def diversity_at_end(run: Path) -> dict[str, float]:
    """image_diversity of the final evaluation images of the run's first evaluation set (recomputed here, so
    every run is measured alike)."""
    files = sorted((run / "samples").glob("*_final*.safetensors"))
    return image_diversity(files[0]) if files else {}


def analyse(out: Path, arms: list[str], seeds: list[int], metrics: list[str], run_dir=None, rows_of=None) -> dict:
    """Per arm and metric: each seed's evaluation curve, the seed-mean curve with its 95% CI, the queries to
    reach the plain arm's final, and each seed's final minus the plain arm's final of the same seed (same
    prompts and noise, so the seed's own variation cancels). `run_dir(arm, seed)` is where a run lives
    (default out/ARM-sSEED), `rows_of(arm, seed)` its metric rows (default: that directory's)."""
    run_dir = run_dir or (lambda arm, s: out / f"{arm}-s{s}")
    rows_of = rows_of or (lambda arm, s: read_rows(run_dir(arm, s)))
    res: dict = {"arms": {}, "metrics": metrics}
    first = rows_of(arms[0], seeds[0])
    for arm in arms:
        runs = {s: rows_of(arm, s) for s in seeds}
        a: dict = {}
        for m in metrics:
            base = [p for p in eval_curve(first, m) if p[0] == 0][:1]  # the shared evaluation of the base model
            curves = {s: eval_curve(rows, m) for s, rows in runs.items() if rows}
            curves = {s: c if c and c[0][0] == 0 else base + c for s, c in curves.items()}
            if not curves:
                continue
            points = []
            for j in range(min(len(c) for c in curves.values())):
                q = next(iter(curves.values()))[j][0]
                mean, ci = seed_mean_ci([c[j][1] for c in curves.values()])
                points.append((q, mean, ci))
            a[m] = {"seeds": list(curves), "per_seed": list(curves.values()), "mean": points}
        divs = [diversity_at_end(run_dir(arm, s)) for s in seeds]
        divs = [d for d in divs if d]
        if divs:
            keys = ("position_spread", "pixel_distance", "extra_objects")
            a["diversity_end"] = {k: seed_mean_ci([d[k] for d in divs]) for k in keys}
        res["arms"][arm] = a
    # reward queries each arm needs to reach the plain arm's final evaluation value (mean over its seeds)
    for m in metrics:
        if m not in res["arms"].get("plain", {}):
            continue
        plain = res["arms"]["plain"][m]
        target = plain["mean"][-1][1]
        plain_end = {s: c[-1] for s, c in zip(plain["seeds"], plain["per_seed"])}
        for arm in arms:
            a = res["arms"][arm].get(m)
            if arm == "plain" or a is None:
                continue
            same = [(c[-1][1] - plain_end[s][1]) for s, c in zip(a["seeds"], a["per_seed"])
                    if s in plain_end and c[-1][0] == plain_end[s][0]]  # fmt: skip
            if same:
                a["minus_plain"] = {"per_seed": same, "mean": seed_mean_ci(same)}
        for arm in arms:
            if m not in res["arms"][arm]:
                continue
            hits = [reach(c, target) for c in res["arms"][arm][m]["per_seed"]]
            got = [h for h in hits if h is not None]
            res["arms"][arm][m]["reach_target"] = target
            res["arms"][arm][m]["reach"] = {"reached": len(got), "of": len(hits),
                                            "queries": seed_mean_ci(got) if got else None}  # fmt: skip
    return res


def markdown(res: dict) -> str:
    lines = []
    for m in res["metrics"]:
        head = "| arm | start | end | change | end minus plain's, same seed | queries to reach the plain arm's final |"
        lines += [f"### {m}", "", head, "|---|---|---|---|---|---|"]
        for arm, a in res["arms"].items():
            if m not in a:
                continue
            (_, s, sc), (q1, e, ec) = a[m]["mean"][0], a[m]["mean"][-1]
            per = [c[-1][1] - c[0][1] for c in a[m]["per_seed"]]
            ch, chc = seed_mean_ci(per)
            r = a[m].get("reach", {})
            rq = r.get("queries")
            if "reach" not in a[m]:
                reach_txt = ""
            elif a[m].get("reach_target", float("inf")) <= s:
                reach_txt = "n/a: the plain arm's final is not above the base model"
            elif rq:
                reach_txt = f"{rq[0]:.0f} ± {rq[1]:.0f} ({r['reached']}/{r['of']})"
            else:
                reach_txt = f"never (0/{r.get('of', 0)})"
            mp = a[m].get("minus_plain")
            mp_txt = (f"{mp['mean'][0]:+.3f} ± {mp['mean'][1]:.3f} ({' / '.join(f'{d:+.3f}' for d in mp['per_seed'])})"
                      if mp else "")  # fmt: skip
            lines.append(f"| {arm} | {s:.3f} ± {sc:.3f} | {e:.3f} ± {ec:.3f} (at {q1} queries) | {ch:+.3f} ± {chc:.3f} "
                         f"| {mp_txt} | {reach_txt} |")  # fmt: skip
        lines.append("")
    if any("diversity_end" in a for a in res["arms"].values()):
        lines += ["### the final policy's images (first evaluation set): diversity and extra objects", "",
                  "| arm | position spread (px) | pixel distance | images with an extra object |", "|---|---|---|---|"]  # fmt: skip
        for arm, a in res["arms"].items():
            d = a.get("diversity_end")
            if d:
                (p, pc), (x, xc), (e, ec) = d["position_spread"], d["pixel_distance"], d["extra_objects"]
                lines.append(f"| {arm} | {p:.2f} ± {pc:.2f} | {x:.3f} ± {xc:.3f} | {e:.3f} ± {ec:.3f} |")
    lines.append("\n(± is the 95% CI over seeds, Student t.)")
    return "\n".join(lines) + "\n"


TITLES = {"eval_shapes_full": "training prompts: full success", "eval_reward": "training prompts: reward",
          "eval_shapes_pairs_heldout_shapes_full": "held-out prompts: full success",
          "eval_shapes_pairs_heldout_reward": "held-out prompts: reward"}  # fmt: skip


def plot(res: dict, path: Path, marks: dict[float, str] | None = None) -> None:
    plot_curves(res, res["metrics"][:4], path, lambda k: TITLES.get(k, k), "evaluation: mean over seeds, 95% CI",
                marks=marks)  # fmt: skip


def analyse_two_stage(args: argparse.Namespace) -> dict:
    """--two-stage: each arm's both stages as one evaluation curve per seed, analysed as a study's arms."""
    dirs: dict[str, Path] = {}
    for spec in args.two_stage:
        label, sep, d = spec.partition("=")
        if not sep or not label or not d:
            raise SystemExit(f"--two-stage {spec!r}: expected ARM=DIR, e.g. plain=runs/two_stage_plain")
        dirs[label] = Path(d)
    seeds = [int(s) for s in args.seeds.split(",")]
    missing = [f"{d}/{st}-s{s}" for d in dirs.values() for s in seeds for st in ("first", "second")
               if not is_done(d / f"{st}-s{s}")]  # fmt: skip
    if missing:
        raise SystemExit(f"--two-stage: not finished (no final evaluation): {', '.join(missing)}; finish them with "
                         "bench/two_stage.py or choose --seeds")  # fmt: skip
    arms = list(dirs)
    res = analyse(args.out, arms, seeds, args.metrics.split(","), run_dir=lambda a, s: dirs[a] / f"second-s{s}",
                  rows_of=lambda a, s: chain_rows(read_rows(dirs[a] / f"first-s{s}"), read_rows(dirs[a] / f"second-s{s}")))  # fmt: skip
    res["protocol"] = {"two_stage": {a: str(d) for a, d in dirs.items()}, "seeds": seeds}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "study.json").write_text(json.dumps(res, indent=1))
    md = (f"two stages per seed (bench/two_stage.py), seeds {seeds}: "
          + ", ".join(f"{a} = `{d}`" for a, d in dirs.items()) + "\n\n" + markdown(res))  # fmt: skip
    (args.out / "study.md").write_text(md)
    stage2 = sorted({read_rows(dirs[a] / f"first-s{s}")[-1]["reward_queries"] for a in arms for s in seeds})
    plot(res, args.out / "study.png", {q: "stage 2" for q in stage2})
    print(md)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--config", default="shapes")
    ap.add_argument("--set", dest="common", action="append", default=[], help="override for every arm")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--metrics", default="eval_shapes_full,eval_shapes_pairs_heldout_shapes_full,eval_reward,"
                    "eval_shapes_pairs_heldout_reward,eval_shapes_colours,eval_shapes_shapes,eval_shapes_relation",
                    help="evaluation metrics to tabulate; the first four are plotted")
    ap.add_argument("--paired", action="store_true", help="also judge every checkpoint on a paired evaluation")
    ap.add_argument("--paired-images", type=int, default=4, help="paired evaluation: images per prompt")
    ap.add_argument("--paired-prompts", type=int, default=60, help="paired evaluation: prompts per set")
    ap.add_argument("--paired-sets", default="", help="paired evaluation: prompt sets (default: prompts.eval)")
    ap.add_argument("--paired-metrics", default="reward,shapes_full,shapes_colours,shapes_shapes,shapes_relation,"
                    "shapes_extra", help="reward components to tabulate; the first two are plotted")
    ap.add_argument("--analyse-only", action="store_true")
    ap.add_argument("--pool", action="append", default=[], type=Path, metavar="PAIRED_JSON",
                    help="pool the seeds of several studies' paired.json (same protocol) into one paired analysis "
                    "in --out; nothing is run")
    ap.add_argument("--two-stage", action="append", default=[], metavar="ARM=DIR",
                    help="analyse bench/two_stage.py studies instead (nothing is run): per seed, DIR/first-sS and "
                    "DIR/second-sS as one curve (the second's queries follow the first's); the reference arm must be "
                    "called plain; writes study.json, study.md and study.png to --out")
    args = ap.parse_args()
    if args.two_stage:
        analyse_two_stage(args)
        return
    if args.pool:
        args.out.mkdir(parents=True, exist_ok=True)
        pres = pool_paired(args.pool)
        write_paired(pres, args.out, f"pooled from {', '.join(map(str, args.pool))}; seeds per arm "
                     f"{pres['protocol']['seeds']}")  # fmt: skip
        return

    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown arm(s) {unknown}; known: {', '.join(ARMS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    if not args.analyse_only:
        # Every run starts from the same base model and evaluates with the same prompts and noise, so the
        # evaluation before the first update is identical: only the first run computes it.
        specs = [RunSpec(f"{arm}-s{s}", args.config, args.common + ARMS[arm] + [f"train.seed={s}"]
                         + ([] if (arm, s) == (arms[0], seeds[0]) else ["eval.at_start=false"]))
                 for s in seeds for arm in arms]  # fmt: skip
        launch_all(specs, args.out, args.parallel, args.threads)
    res = analyse(args.out, arms, seeds, args.metrics.split(","))
    res["protocol"] = {"config": args.config, "common": args.common, "arms": {a: ARMS[a] for a in arms}, "seeds": seeds}
    (args.out / "study.json").write_text(json.dumps(res, indent=1))
    md = f"protocol: `--config {args.config} {' '.join('--set ' + c for c in args.common)}`, seeds {seeds}\n\n" + markdown(res)
    (args.out / "study.md").write_text(md)
    plot(res, args.out / "study.png")
    print(md)
    if args.paired:
        names = [f"{arm}-s{s}" for s in seeds for arm in arms]
        if not args.analyse_only:
            run_paired(args.out, names, args.paired_images, args.paired_prompts, args.paired_sets, args.parallel,
                       args.threads)  # fmt: skip
        pres = analyse_paired(args.out, arms, seeds, args.paired_metrics.split(","))
        pres["protocol"] = dict(res["protocol"], paired={"images": args.paired_images, "prompts": args.paired_prompts,
                                                         "sets": args.paired_sets})  # fmt: skip
        write_paired(pres, args.out, f"paired evaluation: {args.paired_prompts} prompts x {args.paired_images} "
                     f"images per set, every checkpoint against the base model; seeds {seeds}")  # fmt: skip


if __name__ == "__main__":
    main()
