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

Arms of a study, each a set of two-stage pairs, compare seed by seed on the same images: `--arm
LABEL=FIRST_GLOB,SECOND_GLOB` per arm (runs matched by their -s<N> suffix) prints each arm's pairs and their
summary over seeds, and `--versus LABEL` each other arm's change minus LABEL's, image by image within a seed
(CI over images) and over the shared seeds (t-interval):

    python bench/stage_changes.py --arm "plain=runs/two_stage/first-s?,runs/two_stage/second-s?" \
        --arm "diffexp=runs/two_stage_diffexp/first-s?,runs/two_stage_diffexp/second-s?" --versus plain

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

PLOT_COLUMNS = ("full", "relation", "shapes", "extra", "held-out full")


def paired_scores(first: Path, second: Path) -> dict[str, dict[str, tuple]]:
    """Per evaluation set and metric: (the first run's base scores, the second run's final scores), image i of
    both the same prompt and noise."""
    from common.config import load_config
    from learner.run_dir import RunDir
    from learner.stages import protocol_difference
    from rewards.combined import WeightedReward

    c1, c2 = (load_config(str(Path(r) / "config.yaml")) for r in (first, second))
    diff = protocol_difference(c1, c2)
    if diff:
        raise SystemExit(f"{second}: {diff} as in {first}; the runs' evaluations are not paired")
    merged = Path(c2.model.pretrained) / "merged_from.json"
    if merged.is_file() and Path(json.loads(merged.read_text())["run"]).resolve() != Path(first).resolve():
        raise SystemExit(f"{second} starts from {c2.model.pretrained}, merged from "
                         f"{json.loads(merged.read_text())['run']}, not from {first}")  # fmt: skip
    reward = WeightedReward(c2.eval.reward or c2.reward)
    first_run, second_run = RunDir(first), RunDir(second)
    out: dict[str, dict[str, tuple]] = {}
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
        out[src] = {k: (base[k].double(), v.double()) for k, v in scores.items() if k in base}
    return out


def stage_changes(first: Path, second: Path, scores: dict | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Per evaluation set and metric: base (first run's base), final (second run's final images), the paired
    difference's mean, its 95% CI (normal, over images) and n. `scores`: the pair's `paired_scores`, if known."""
    from learner.loop import mean_ci

    out: dict[str, dict[str, dict[str, float]]] = {}
    for src, rows in (scores or paired_scores(first, second)).items():
        out[src] = {}
        for k, (base, final) in rows.items():
            diff, _, ci95 = mean_ci(final - base)
            out[src][k] = {"base": float(base.mean()), "final": float(final.mean()), "diff": diff, "ci95": ci95,
                           "n": final.numel()}  # fmt: skip
    return out


def arm_difference(a: tuple[Path, Path], b: tuple[Path, Path], scored: dict | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Two arms' two-stage pairs of one seed, evaluated on the same images: per set and metric, the mean over
    images of b's paired change minus a's (b's final minus a's final where both first stages scored the same
    base), its 95% CI over images, and n. `scored`: pairs' `paired_scores` already computed, by pair."""
    from common.config import load_config
    from learner.loop import mean_ci
    from learner.stages import protocol_difference

    ca, cb = (load_config(str(Path(x[1]) / "config.yaml")) for x in (a, b))
    diff = protocol_difference(ca, cb)
    if diff:
        raise SystemExit(f"{b[1]}: {diff} as in {a[1]}; the arms are not paired")
    scored = scored if scored is not None else {}
    sa, sb = (scored.get(x) or paired_scores(*x) for x in (a, b))
    out: dict[str, dict[str, dict[str, float]]] = {}
    for src in sa:
        for k in sa[src]:
            if k not in sb.get(src, {}):
                continue
            (base_a, final_a), (base_b, final_b) = sa[src][k], sb[src][k]
            if base_a.shape != base_b.shape:
                raise SystemExit(f"{b[1]}: {base_b.numel()} {src} images, {a[1]} has {base_a.numel()}; not paired")
            diff, _, ci95 = mean_ci((final_b - base_b) - (final_a - base_a))
            out.setdefault(src, {})[k] = {"diff": diff, "ci95": ci95, "n": base_a.numel()}
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


def arm_pairs(spec: str) -> tuple[str, dict[int, tuple[Path, Path]]]:
    """'LABEL=FIRST_GLOB,SECOND_GLOB' -> (label, {seed: (first, second)}), runs matched by their -s<N> suffix."""
    import glob
    import re

    label, sep, globs = spec.partition("=")
    parts = globs.split(",")
    if not sep or not label or len(parts) != 2:
        raise SystemExit(f"--arm {spec!r}: expected LABEL=FIRST_GLOB,SECOND_GLOB (runs named ...-s<seed>)")

    def by_seed(pattern: str) -> dict[int, Path]:
        runs = {}
        for p in glob.glob(pattern):
            m = re.search(r"-s(\d+)$", p.rstrip("/"))
            if m and Path(p, "config.yaml").is_file():
                runs[int(m.group(1))] = Path(p)
        return runs

    firsts, seconds = by_seed(parts[0]), by_seed(parts[1])
    seeds = sorted(set(firsts) & set(seconds))
    if not seeds:
        raise SystemExit(f"--arm {label}: no seed has both a first ({parts[0]}) and a second ({parts[1]}) stage")
    return label, {s: (firsts[s], seconds[s]) for s in seeds}


def versus(arms: dict[str, dict[int, tuple[Path, Path]]], ref: str, scored: dict | None = None) -> dict[str, dict]:
    """Each other arm against `ref`, seed by seed on the seeds both have: per seed the same-image difference of
    the two-stage changes (`arm_difference`), and over seeds its mean with the t-interval (`over_pairs`)."""
    out = {}
    for label, pairs in arms.items():
        shared = sorted(set(pairs) & set(arms[ref]))
        if label == ref or not shared:
            continue
        per_seed = {s: arm_difference(arms[ref][s], pairs[s], scored) for s in shared}
        out[label] = {"seeds": shared, "per_seed": per_seed,
                      "over_seeds": over_pairs(list(per_seed.values())) if len(shared) > 1 else None}  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="*", help="FIRST SECOND [SECOND...]: second stages of one first")
    ap.add_argument("--pair", type=Path, nargs=2, action="append", default=[], metavar=("FIRST", "SECOND"))
    ap.add_argument("--arm", action="append", default=[], metavar="LABEL=FIRST_GLOB,SECOND_GLOB",
                    help="an arm's two-stage pairs, matched by the -s<N> seed suffix (repeat per arm)")
    ap.add_argument("--versus", metavar="LABEL", help="with --arm: every other arm minus this one, same seed, same images")
    ap.add_argument("--plot", type=Path, help="PNG: per-pair changes of the first stage and of both, per metric")
    ap.add_argument("--plot-columns", default=",".join(PLOT_COLUMNS))
    args = ap.parse_args(argv)
    if args.arm:
        return main_arms(ap, args)
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


def main_arms(ap: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    if args.runs or args.pair or args.plot:
        ap.error("--arm takes the place of FIRST SECOND, --pair and --plot")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    arms = dict(arm_pairs(a) for a in args.arm)
    if args.versus is not None and args.versus not in arms:
        ap.error(f"--versus {args.versus!r}: no such arm; the arms are {', '.join(arms)}")
    scored = {pair: paired_scores(*pair) for pairs in arms.values() for pair in pairs.values()}  # scored once
    for label, pairs in arms.items():
        results = [stage_changes(*pairs[s], scores=scored[pairs[s]]) for s in pairs]
        print(f"arm {label}, seeds {list(pairs)}, both stages over the base (paired over images, 95% CI):")
        for s, r in zip(pairs, results):
            print("\n".join(report(r, prefix=f"  seed {s} ")))
        if len(results) > 1:
            print("\n".join(report_over(over_pairs(results), unit="seed")))
    compared = versus(arms, args.versus, scored) if args.versus is not None else {}
    for label, res in compared.items():
        print(f"{label} - {args.versus}, same seed, same images (95% CI over images):")
        for s, r in res["per_seed"].items():
            print("\n".join(f"  seed {s} {src} {k}: {x['diff']:+.3f} +- {x['ci95']:.3f} (n={x['n']})"
                            for src, rows in r.items() for k, x in rows.items()))  # fmt: skip
        if res["over_seeds"]:
            print("\n".join(report_over(res["over_seeds"], unit="seed")))
    return compared


if __name__ == "__main__":
    main()
