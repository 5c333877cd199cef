"""The paired change of a two-stage fine-tune from the first stage's base model, image by image.

A second stage starts from the first stage's LoRA fused into a new model (bench/merge_lora.py), so its own
logged changes (`eval_*_change`) are relative to the first stage's policy. What was gained over the original
base needs the first run's base scores (`samples/eval_base_<set>.safetensors`) paired with the second run's
final images (`samples/epoch_*_final_<set>.safetensors`), which this script scores with the second run's
evaluation reward. Both runs must share the evaluation protocol (the same prompts, images per prompt, noise,
steps and guidance), so that image i is the same prompt and noise in both; a difference is an error naming
the field.

    python bench/stage_changes.py runs/first-stage runs/second-stage [more second stages of the same first]

Seeds of a two-stage recipe each have their own first stage: name each pair with `--pair FIRST SECOND`. With
two or more pairs it also prints, per evaluation set and metric, the mean change over the pairs with its 95%
t-interval over pairs, and each pair's change in units of its own standard error over images (the form of
the Shapes bar: every seed's gain above 2 SE):

    python bench/stage_changes.py --pair runs/a-s0 runs/b-s0 --pair runs/a-s1 runs/b-s1 --pair runs/a-s2 runs/b-s2

`--plot PNG` draws one panel per metric (full, relation, shapes, extra, held-out full: `--plot-columns`), with
each pair's change as a dot and the mean with its 95% t-interval over pairs, for the first stage alone (its
last logged paired change) and for both stages together: what the second stage added, seed by seed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROTOCOL = ("prompts.eval", "eval.seed", "eval.images_per_prompt", "eval.max_prompts", "sampling.num_steps",
            "sampling.guidance_scale", "sampling.eta", "sampling.resolution")  # fmt: skip


PLOT_COLUMNS = ("full", "relation", "shapes", "extra", "held-out full")


def _field(cfg, dotted: str):
    v = cfg
    for part in dotted.split("."):
        v = getattr(v, part)
    return v.model_dump() if hasattr(v, "model_dump") else v


def stage_changes(first: Path, second: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Per evaluation set and metric: base (first run's base), final (second run's final images), the paired
    difference's mean, its 95% CI (normal, over images) and n."""
    from common.config import load_config
    from learner.loop import mean_ci
    from learner.run_dir import RunDir
    from rewards.combined import WeightedReward

    c1, c2 = (load_config(str(Path(r) / "config.yaml")) for r in (first, second))
    for f in PROTOCOL:
        if _field(c1, f) != _field(c2, f):
            raise SystemExit(f"{second}: {f} is {_field(c2, f)!r}, {first} has {_field(c1, f)!r}; "
                             "the runs' evaluation images are not paired")  # fmt: skip
    r1, r2 = (c.eval.reward or c.reward for c in (c1, c2))
    if r1.model_dump()["terms"] != r2.model_dump()["terms"]:  # the batch size does not change a score
        raise SystemExit(f"{second}: its evaluation reward differs from {first}'s; the scores do not compare")
    merged = Path(c2.model.pretrained) / "merged_from.json"
    if merged.is_file() and Path(json.loads(merged.read_text())["run"]).resolve() != Path(first).resolve():
        raise SystemExit(f"{second} starts from {c2.model.pretrained}, merged from "
                         f"{json.loads(merged.read_text())['run']}, not from {first}")  # fmt: skip
    reward = WeightedReward(r2)
    first_run, second_run = RunDir(first), RunDir(second)
    out: dict[str, dict[str, dict[str, float]]] = {}
    sources = c2.prompts.eval or [c2.prompts.train]
    for src in sources:
        base_file = first_run.samples_dir / f"eval_base_{src}.safetensors"
        final = second_run.final_eval_images(src, len(sources))
        if not base_file.is_file() or final is None:
            missing = base_file if not base_file.is_file() else f"{second}/samples/{RunDir.eval_tag('epoch_*_final', src, len(sources))}"
            raise SystemExit(f"missing {missing} (runs keep them since session 28)")
        images, prompts = RunDir.load_eval_images(final)
        base = first_run.load_eval_base(src, len(prompts))
        if base is None:
            raise SystemExit(f"{base_file}: not the {len(prompts)} per-image scores of {final.name}")
        total, parts = reward(images.float() / 255, prompts, details=True)
        scores = {"reward": total, **{k.replace("/", "_"): v for k, v in parts.items()}}
        out[src] = {}
        for k, v in scores.items():
            if k in base:
                diff, _, ci95 = mean_ci(v.double() - base[k].double())
                out[src][k] = {"base": float(base[k].double().mean()), "final": float(v.double().mean()),
                               "diff": diff, "ci95": ci95, "n": v.numel()}  # fmt: skip
    return out


def _sign(x: float) -> float:
    return (x > 0) - (x < 0)


def over_pairs(results: list[dict[str, dict[str, dict[str, float]]]]) -> dict[str, dict[str, dict]]:
    """Per evaluation set and metric that every pair has: the mean change over pairs, its 95% t-interval over
    pairs, and each pair's change divided by its own standard error over images (ci95 / 1.96)."""
    from bench.runs import seed_mean_ci
    from learner.loop import Z95

    out: dict[str, dict[str, dict]] = {}
    for src in results[0]:
        for k in results[0][src]:
            rows = [r.get(src, {}).get(k) for r in results]
            if any(r is None for r in rows):
                continue
            mean, half = seed_mean_ci([r["diff"] for r in rows])
            ses = [r["diff"] / (r["ci95"] / Z95) if r["ci95"] > 0 else _sign(r["diff"]) * math.inf for r in rows]
            out.setdefault(src, {})[k] = {"mean": mean, "ci95": half, "n": len(rows), "in_se": ses}
    return out


def report(result: dict[str, dict[str, dict[str, float]]], prefix: str = "  ") -> list[str]:
    """One line per evaluation set and metric of a `stage_changes` result."""
    return [f"{prefix}{src} {k}: {r['base']:.3f} -> {r['final']:.3f}, change {r['diff']:+.3f} +- {r['ci95']:.3f} "
            f"(n={r['n']})" for src, rows in result.items() for k, r in rows.items()]  # fmt: skip


def report_over(over: dict[str, dict[str, dict]], unit: str = "pair") -> list[str]:
    """An `over_pairs` summary, one line per evaluation set and metric."""
    n = next((r["n"] for rows in over.values() for r in rows.values()), 0)
    lines = [f"over the {n} {unit}s (mean change, 95% t-interval over {unit}s; each {unit}'s change in its SEs):"]
    for src, rows in over.items():
        for k, r in rows.items():
            ses = ", ".join(f"{x:+.1f}" for x in r["in_se"])
            lines.append(f"  {src} {k}: {r['mean']:+.3f} +- {r['ci95']:.3f}; per {unit} {ses} SE"
                         f"{' (all above 2)' if min(r['in_se']) > 2 else ''}")  # fmt: skip
    return lines


def columns(result: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """A result's changes under bench/run_changes.py's column names: 'full', 'relation', ..., 'held-out full'."""
    out = {}
    for src, rows in result.items():
        prefix = "held-out " if src.endswith("_heldout") else ""
        for k, r in rows.items():
            if k.startswith("shapes_"):  # a detector component: 'shapes_full' -> 'full', 'shapes_shapes' -> 'shapes'
                out[prefix + k.removeprefix("shapes_")] = r["diff"]
            elif k == "reward":  # a reward term's own total (the term `shapes`) is not a column: it is the reward
                out[prefix + k] = r["diff"]
    return out


def plot_stages(pairs: list[tuple[Path, Path]], results: list[dict], path: Path, cols: list[str]) -> None:
    """The first stage's own last paired changes and both stages' totals, per pair, one panel per column."""
    from bench.run_changes import last_changes, plot

    groups: dict[str, dict[str, list[float]]] = {"first stage": {}, "both stages": {}}
    for (first, _), result in zip(pairs, results):
        for col, (diff, _) in last_changes(Path(first))[1].items():
            groups["first stage"].setdefault(col, []).append(diff)
        for col, diff in columns(result).items():
            groups["both stages"].setdefault(col, []).append(diff)
    cols = [c for c in cols if any(c in g for g in groups.values())]
    if not cols:
        raise SystemExit(f"none of the plot's columns is in these runs' evaluation (have: {sorted(groups['both stages'])})")
    plot(groups, cols, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="*", help="FIRST SECOND [SECOND...]: second stages of one first")
    ap.add_argument("--pair", type=Path, nargs=2, action="append", default=[], metavar=("FIRST", "SECOND"))
    ap.add_argument("--plot", type=Path, help="PNG: per-pair changes of the first stage and of both, per metric")
    ap.add_argument("--plot-columns", default=",".join(PLOT_COLUMNS))
    args = ap.parse_args(argv)
    if len(args.runs) == 1:
        ap.error("name a second stage after the first, or use --pair FIRST SECOND")
    pairs = [(args.runs[0], s) for s in args.runs[1:]] + [tuple(p) for p in args.pair]
    if not pairs:
        ap.error("name FIRST SECOND, or --pair FIRST SECOND")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = []
    for first, second in pairs:
        print(f"{second} against the base of {first} (paired over images, 95% CI):")
        results.append(stage_changes(first, second))
        print("\n".join(report(results[-1])))
    if len(results) > 1:
        print("\n".join(report_over(over_pairs(results))))
    if args.plot:
        plot_stages(pairs, results, args.plot, args.plot_columns.split(","))
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
