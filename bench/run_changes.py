"""The paired changes a run logged at its last evaluation, per run and as a t-interval over seeds.

Every in-run evaluation logs, for each metric, the change from the base policy on the same images with its
95% CI over images (`eval_<metric>_change_mean` / `_change_ci95`, learner/loop.py). This reads them from
each run's metrics.jsonl and prints one line per run and, for each group of two or more runs (the seeds of
one arm), the mean change with its 95% t-interval over runs (t with n - 1 degrees of freedom):

    python bench/run_changes.py "runs/sweeps/ob_aprw/rw067-s?" "runs/sweeps/ob_aprw/rw067-diffexp-s?"

`--diversity` also measures the diversity of each run's final evaluation images of its first evaluation set
(bench/study.py's diversity_at_end: per-prompt position spread in px and mean pairwise RMS pixel distance; the
runs of one protocol share the evaluation noise, so arms compare on the same noise), and of the base policy's
images on that noise where the run kept them (runs since session 28), as "base -> final".

`--judged FILE` (bench/paired_eval.py --diversity --json FILE, repeatable) takes each run's diversity from that
judgement instead: its images generated afresh from the run's last checkpoint, the base's on the same noise, so a
run stopped before its final evaluation is measured too, on as many images a prompt as were judged.

`--versus LABEL` also prints each other group minus that group, run by run on the seeds both have (matched by
the run directories' -s<N> suffix), with the t-interval over those seeds: the same-seed comparison of arms.

`--plot PNG` draws one panel per column named in `--plot-columns`: each group's runs as dots and their mean
with the 95% t-interval, each group labelled as given ('plain=runs/sweeps/x/ap-s?') or by its glob without the
directory and the seed suffix.
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.runs import seed_mean_ci

COLUMNS = (
    ("full", "eval_shapes_pairs_shapes_full"),
    ("relation", "eval_shapes_pairs_shapes_relation"),
    ("shapes", "eval_shapes_pairs_shapes_shapes"),
    ("extra", "eval_shapes_pairs_shapes_extra"),
    ("reward", "eval_shapes_pairs_reward"),
    ("held-out full", "eval_shapes_pairs_heldout_shapes_full"),
    ("held-out relation", "eval_shapes_pairs_heldout_shapes_relation"),
)


def last_changes(run: Path) -> tuple[int, dict[str, tuple[float, float]]]:
    """(reward queries, {column: (change, ci95)}) of the run's last evaluation that logged paired changes."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if any(k.endswith("_change_mean") for k in r)]
    if not evals:
        raise SystemExit(f"{run}: no evaluation with paired changes in metrics.jsonl")
    last = evals[-1]
    out = {name: (last[k + "_change_mean"], last[k + "_change_ci95"]) for name, k in COLUMNS
           if k + "_change_mean" in last}  # fmt: skip
    return int(last.get("eval_reward_queries", -1)), out


DIVERSITY = ("position_spread", "pixel_distance")


def final_diversity(run: Path) -> dict[str, tuple[float | None, float]]:
    """{metric: (base, final)}: the diversity (bench/study.py's image_diversity) of the run's final evaluation
    images of its first evaluation set, and of the base policy's images of that set and noise when the run
    kept them (samples/eval_base_<set>.images.safetensors; runs before that was kept: None)."""
    from bench.study import image_diversity

    samples = run / "samples"
    finals = sorted(samples.glob("*_final*.safetensors"))
    if not finals:
        raise SystemExit(f"{run}: no final evaluation images in samples/ (was the run stopped before its end?)")
    final = image_diversity(finals[0])
    if "_final_" in finals[0].name:  # several evaluation sets: the file names the set
        set_name = finals[0].name.split("_final_", 1)[1].removesuffix(".safetensors")
        kept = [samples / f"eval_base_{set_name}.images.safetensors"]
    else:  # one evaluation set
        kept = sorted(samples.glob("eval_base_*.images.safetensors"))
    base = image_diversity(kept[0]) if len(kept) == 1 and kept[0].is_file() else {}
    return {k: (base.get(k), final[k]) for k in DIVERSITY}


def judged_diversity(files: list[Path]) -> dict[Path, dict[str, tuple[float | None, float]]]:
    """{run path (resolved): {metric: (base, final)}} from bench/paired_eval.py --diversity JSON files: each run's
    last judged checkpoint, its first evaluation set (as final_diversity), base and final over the prompts where
    both are defined."""
    out = {}
    for f in files:
        for entry in json.loads(Path(f).read_text()):
            if not entry.get("diversity"):
                raise SystemExit(f"{f}: {entry['run']} was judged without --diversity")
            first = next(iter(entry["diversity"].values()))
            out[Path(entry["run"]).resolve()] = {k: (first[k]["base"], first[k]["tuned"]) for k in DIVERSITY}
    return out


def interval_cell(col: str, mean: float, half: float, difference: bool = False) -> str:
    """One 'column mean +- half' cell: rates to 3 decimals; diversity to 3-4 digits, signed when it is a change
    or a `difference` of two arms."""
    if col in DIVERSITY and not difference:
        return f"{col} {mean:.4g} +- {half:.2g}"
    if col in DIVERSITY or col.endswith(" change"):
        return f"{col} {mean:+.3g} +- {half:.2g}"
    return f"{col} {mean:+.3f} +- {half:.3f}"


def group_label(pattern: str) -> str:
    """'runs/sweeps/ob_aprw/rw067-diffexp-s?' -> 'rw067-diffexp'."""
    name = Path(pattern).name
    for tail in ("-s?", "-s*", "-s[0-9]", "*"):
        if name.endswith(tail) and len(name) > len(tail):
            return name[: -len(tail)]
    return name


def plot(groups: dict[str, dict[str, list[float]]], columns: list[str], path: Path) -> None:
    """One panel per column: each group's per-run values as dots and their mean with the 95% t-interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns) + 1, 3.4), squeeze=False)
    for ax, col in zip(axes[0], columns):
        for i, (label, per) in enumerate(groups.items()):
            vals = per.get(col, [])
            if not vals:
                continue
            ax.scatter([i] * len(vals), vals, s=14, color="0.55", zorder=2)
            if len(vals) > 1:
                mean, half = seed_mean_ci(vals)
                ax.errorbar([i + 0.15], [mean], yerr=[half], fmt="o", color="C0", capsize=4, zorder=3)
        if col not in DIVERSITY:
            ax.axhline(0, color="0.3", lw=0.8)
        ax.set_xticks(range(len(groups)), list(groups), rotation=30, ha="right", fontsize=8)
        ax.set_title(col if col in DIVERSITY or col.endswith(" change") else f"{col}: change from base", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("groups", nargs="+",
                    help="a glob of run directories per group (quote it), optionally labelled: 'plain=runs/x/ap-s?'")
    ap.add_argument("--diversity", action="store_true", help="also the change in diversity of the final images")
    ap.add_argument("--judged", type=Path, action="append", default=[],
                    help="with --diversity: take it from this bench/paired_eval.py --diversity --json file")
    ap.add_argument("--versus", metavar="LABEL",
                    help="also each other group minus this group, run by run on the seeds they share (the -s<N> "
                    "suffix), with the t-interval over those seeds")
    ap.add_argument("--plot", type=Path, help="write a PNG of the chosen columns per group")
    ap.add_argument("--plot-columns", default="full,held-out full",
                    help="comma-separated column names for --plot (e.g. 'full,held-out full,pixel_distance')")
    args = ap.parse_args(argv)
    diversity_columns = list(DIVERSITY) + [f"{d} change" for d in DIVERSITY]
    known = [name for name, _ in COLUMNS] + diversity_columns
    columns = [c.strip() for c in args.plot_columns.split(",") if c.strip()]
    bad = [c for c in columns if c not in known]
    if args.plot and bad:
        raise SystemExit(f"--plot-columns: unknown column(s) {bad}; known: {', '.join(known)}")
    if args.plot and any(c in diversity_columns for c in columns) and not args.diversity:
        raise SystemExit("--plot-columns names a diversity column; add --diversity")
    if args.judged and not args.diversity:
        raise SystemExit("--judged gives the diversity; add --diversity")
    judged = judged_diversity(args.judged) if args.judged else None
    groups: dict[str, dict[str, list[float]]] = {}
    by_seed: dict[str, dict[int, dict[str, float]]] = {}  # label -> seed -> column -> value
    for arg in args.groups:
        label, sep, pattern = arg.partition("=")
        if not sep or "/" in label:  # no label given (or an '=' inside the path)
            label, pattern = "", arg
        label = label or group_label(pattern)
        runs = sorted(Path(p) for p in glob.glob(pattern))
        if not runs:
            raise SystemExit(f"no run directory matches {pattern!r}")
        per: dict[str, list[float]] = {}
        for run in runs:
            queries, changes = last_changes(run)
            cells, this = [], {}
            for name, (m, ci) in changes.items():
                this[name] = m
                cells.append(f"{name} {m:+.3f} +- {ci:.3f}")
            if args.diversity:
                if judged is not None and run.resolve() not in judged:
                    raise SystemExit(f"{run}: not in {', '.join(map(str, args.judged))}; judge it with "
                                     f"bench/paired_eval.py {run} --diversity --json FILE")
                div = judged[run.resolve()] if judged is not None else final_diversity(run)
                for key, (b, v) in div.items():
                    this[key] = v
                    if b is None:
                        cells.append(f"{key} {v:.4g}")
                    else:
                        this[f"{key} change"] = v - b
                        cells.append(f"{key} {b:.4g} -> {v:.4g}")
            print(f"{run} ({queries} queries): " + " | ".join(cells))
            for k, v in this.items():
                per.setdefault(k, []).append(v)
            seed = re.search(r"-s(\d+)$", run.name)
            if seed:
                by_seed.setdefault(label, {})[int(seed.group(1))] = this
        if len(runs) > 1:
            cells = []
            for name, v in per.items():
                if len(v) == len(runs):
                    cells.append(interval_cell(name, *seed_mean_ci(v)))
            print(f"  {label} ({pattern}, {len(runs)} runs, t-interval): " + " | ".join(cells))
        groups[label] = per
    if args.versus:
        if args.versus not in groups:
            raise SystemExit(f"--versus {args.versus!r}: no such group; the groups are {', '.join(groups)}")
        ref = by_seed.get(args.versus, {})
        for name, runs_by_seed in by_seed.items():
            shared = sorted(set(ref) & set(runs_by_seed))
            if name == args.versus or len(shared) < 2:
                continue
            cells = []
            for col in ref[shared[0]]:
                if all(col in ref[s] and col in runs_by_seed[s] for s in shared):
                    mean, half = seed_mean_ci([runs_by_seed[s][col] - ref[s][col] for s in shared])
                    cells.append(interval_cell(col, mean, half, difference=True))
            print(f"  {name} - {args.versus}, same seed (seeds {shared}, t-interval): " + " | ".join(cells))
    if args.plot:
        plot(groups, columns, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    sys.exit(main())
