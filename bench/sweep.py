"""A logged hyperparameter sweep: each arm is one set of --set overrides, run on the local backend, summarised
as a markdown table of evaluation metrics at the start and the end (with 95% CIs).

    python bench/sweep.py --out runs/sweeps/lr --config shapes --set train.epochs=20 \
        --arm "lr3e-4: algorithm.learning_rate=3e-4" --arm "lr1e-3: algorithm.learning_rate=1e-3" \
        --parallel 2 --threads 1

`--metric` names the evaluation metric of the table (default eval_shapes_full: the Shapes full-success
rate on the first evaluation set); `--also` adds more (e.g. eval_shapes_pairs_heldout_shapes_full).
Re-running the same command skips finished runs and rewrites the table (OUT/summary.md, summary.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.runs import RunSpec, eval_curve, launch_all, read_rows


def parse_arm(text: str) -> tuple[str, list[str]]:
    label, _, rest = text.partition(":")
    if not rest.strip() and "=" in label:
        raise SystemExit(f"--arm {text!r}: expected 'label: key=value key=value'")
    return label.strip(), rest.split()


def summarise(out: Path, arms: list[tuple[str, list[str]]], seeds: list[int], metrics: list[str]) -> list[dict]:
    table = []
    for label, overrides in arms:
        for seed in seeds:
            rows = read_rows(out / f"{label}-s{seed}")
            epochs = [r for r in rows if not r.get("final_eval")]
            if not rows:
                continue
            entry = {"arm": label, "seed": seed, "overrides": " ".join(overrides), "epochs": len(epochs),
                     "queries": epochs[-1]["reward_queries"] if epochs else 0}  # fmt: skip
            for m in metrics:
                c = eval_curve(rows, m)
                if c:
                    entry[m] = {"start": c[0][1:], "end": c[-1][1:], "curve": c}
            for k in ("approx_kl", "clipfrac", "grad_norm", "reward_mean", "time_epoch"):
                vals = [r[k] for r in epochs if k in r]
                entry[k] = sum(vals) / len(vals) if vals else float("nan")
            table.append(entry)
    return table


def markdown(table: list[dict], metrics: list[str]) -> str:
    head = ["arm", "seed", "queries"] + [f"{m} start -> end (95% CI)" for m in metrics] + [
        "change", "mean approx_kl", "mean clipfrac", "s/epoch", "overrides"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in table:
        cells = [e["arm"], str(e["seed"]), str(e["queries"])]
        for m in metrics:
            if m in e:
                (s, sc), (f, fc) = e[m]["start"], e[m]["end"]
                cells.append(f"{s:.3f} ± {sc:.3f} -> {f:.3f} ± {fc:.3f}")
            else:
                cells.append("-")
        m0 = metrics[0]
        cells.append(f"{e[m0]['end'][0] - e[m0]['start'][0]:+.3f}" if m0 in e else "-")
        cells += [f"{e['approx_kl']:.1e}", f"{e['clipfrac']:.3f}", f"{e['time_epoch']:.1f}", f"`{e['overrides']}`"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--config", default="shapes")
    ap.add_argument("--set", dest="common", action="append", default=[], help="override for every arm")
    ap.add_argument("--arm", action="append", required=True, help="'label: key=value key=value'")
    ap.add_argument("--seeds", default="0", help="comma-separated train.seed values")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--metric", default="eval_shapes_full")
    ap.add_argument("--also", action="append", default=[])
    args = ap.parse_args()

    arms = [parse_arm(a) for a in args.arm]
    seeds = [int(s) for s in args.seeds.split(",")]
    specs = [RunSpec(f"{label}-s{seed}", args.config, args.common + ov + [f"train.seed={seed}"])
             for label, ov in arms for seed in seeds]  # fmt: skip
    launch_all(specs, args.out, args.parallel, args.threads)
    metrics = [args.metric] + args.also
    table = summarise(args.out, arms, seeds, metrics)
    (args.out / "summary.json").write_text(json.dumps({"common": args.common, "runs": table}, indent=1))
    md = f"common overrides: `{' '.join(args.common)}`\n\n" + markdown(table, metrics)
    (args.out / "summary.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
