"""The paired changes a run logged at its last evaluation, per run and as a t-interval over seeds.

Every in-run evaluation logs, for each metric, the change from the base policy on the same images with its
95% CI over images (`eval_<metric>_change_mean` / `_change_ci95`, learner/loop.py). This reads them from
each run's metrics.jsonl and prints one line per run and, for each group of two or more runs (the seeds of
one arm), the mean change with its 95% t-interval over runs (t with n - 1 degrees of freedom):

    python bench/run_changes.py "runs/sweeps/ob_aprw/rw067-s?" "runs/sweeps/ob_aprw/rw067-diffexp-s?"

`--diversity` also measures the diversity of each run's final evaluation images of its first evaluation set
(bench/study.py's diversity_at_end: per-prompt position spread in px and mean pairwise RMS pixel distance; the
runs of one protocol share the evaluation noise, so arms compare on the same noise). Runs keep no images of the
base policy, so this compares arms, not a run with its base.
"""

from __future__ import annotations

import argparse
import glob
import json
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


def final_diversity(run: Path) -> dict[str, float]:
    """bench/study.py's diversity_at_end of the run, the DIVERSITY metrics only."""
    from bench.study import diversity_at_end

    div = diversity_at_end(run)
    if not div:
        raise SystemExit(f"{run}: no final evaluation images in samples/ (was the run stopped before its end?)")
    return {k: div[k] for k in DIVERSITY}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("groups", nargs="+", help="a glob of run directories per group (quote it)")
    ap.add_argument("--diversity", action="store_true", help="also the change in diversity of the final images")
    args = ap.parse_args(argv)
    for pattern in args.groups:
        runs = sorted(Path(p) for p in glob.glob(pattern))
        if not runs:
            raise SystemExit(f"no run directory matches {pattern!r}")
        per: dict[str, list[float]] = {}
        for run in runs:
            queries, changes = last_changes(run)
            cells = []
            for name, (m, ci) in changes.items():
                per.setdefault(name, []).append(m)
                cells.append(f"{name} {m:+.3f} +- {ci:.3f}")
            if args.diversity:
                for key, v in final_diversity(run).items():
                    per.setdefault(key, []).append(v)
                    cells.append(f"{key} {v:.4g}")
            print(f"{run} ({queries} queries): " + " | ".join(cells))
        if len(runs) > 1:
            cells = []
            for name, v in per.items():
                if len(v) == len(runs):
                    mean, half = seed_mean_ci(v)
                    cells.append(f"{name} {mean:.4g} +- {half:.2g}" if name in DIVERSITY
                                 else f"{name} {mean:+.3f} +- {half:.3f}")
            print(f"  {pattern}, {len(runs)} runs (t-interval): " + " | ".join(cells))


if __name__ == "__main__":
    sys.exit(main())
