"""The paired half of the study (bench/study.py --paired, --pool): every checkpoint judged against the base
model on the same images (bench/paired_eval.py), curves of the change per arm and seed, each arm's queries to
reach the plain arm's final change with a seed bootstrap, and pooling of studies run in different sessions."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.runs import ROOT, run_pool, seed_mean_ci


def reach(curve: list[tuple[int, float, float]], target: float) -> float | None:
    """Reward queries at which a curve first reaches `target` (linear between evaluation points), or None."""
    for (q0, y0, _), (q1, y1, _) in itertools.pairwise(curve):
        if y0 >= target:
            return float(q0)
        if y1 >= target:
            return q0 + (q1 - q0) * (target - y0) / (y1 - y0)
    return float(curve[0][0]) if len(curve) == 1 and curve[0][1] >= target else None


def run_paired(out: Path, names: list[str], images: int, prompts: int, sets: str, parallel: int, threads: int,
               log=print) -> None:
    """bench/paired_eval.py --all-checkpoints on every run whose paired.json does not yet cover its last
    checkpoint. The first runs alone, so that the base model's scores are computed once and cached."""
    import os

    from learner.run_dir import RunDir

    def covered(run: Path) -> bool:
        last = RunDir(run).latest_checkpoint()
        f = run / "paired.json"
        if not f.is_file():
            return False
        # judged where its checkpoints were, and moved here without them (device_check.sh packs them apart)
        return last is None or any(e["checkpoint"] == str(last) for e in json.loads(f.read_text()))

    jobs = []
    for n in names:
        if covered(out / n):
            continue
        cmd = [sys.executable, str(ROOT / "bench" / "paired_eval.py"), str(out / n), "--all-checkpoints",
               "--images", str(images), "--max-prompts", str(prompts), "--threads", str(threads),
               "--base-cache", str(out / "paired_base"), "--json", str(out / n / "paired.json")]  # fmt: skip
        if sets:
            cmd += ["--sets", sets]
        jobs.append((f"paired {n}", cmd, out / f"{n}.paired.log"))
    log(f"paired evaluation: {len(names) - len(jobs)} of {len(names)} runs already judged; judging {len(jobs)}")
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"), OMP_NUM_THREADS=str(threads))
    failed = run_pool(jobs[:1], 1, env, log) + run_pool(jobs[1:], parallel, env, log)
    if failed:
        raise RuntimeError(f"{len(failed)} paired evaluation(s) failed: {', '.join(failed)}")


def reach_bootstrap(target_runs: list[list[tuple]], arm_runs: list[list[tuple]], n: int = 2000,
                    seed: int = 0) -> dict:
    """Queries at which the arm's seed-mean curve reaches the plain arm's seed-mean final value, with a
    percentile bootstrap over seeds (both arms resampled). Curves are lists of (queries, value, ...) at the
    same query points. `reached` is the fraction of resamples in which the curve gets there at all."""
    import random

    rng = random.Random(seed)

    def mean_curve(curves):
        return [(curves[0][j][0], sum(c[j][1] for c in curves) / len(curves), 0.0) for j in range(len(curves[0]))]

    def one(targets, curves):
        t = sum(c[-1][1] for c in targets) / len(targets)
        return reach(mean_curve(curves), t)

    point = one(target_runs, arm_runs)
    boots = [one([rng.choice(target_runs) for _ in target_runs], [rng.choice(arm_runs) for _ in arm_runs])
             for _ in range(n)]  # fmt: skip
    got = sorted(b for b in boots if b is not None)
    ci = (got[int(0.025 * (len(got) - 1))], got[int(0.975 * (len(got) - 1))]) if got else None
    return {"queries": point, "ci95": ci, "reached": len(got) / n}


def collect_paired(out: Path, arms: list[str], seeds: list[int], metrics: list[str]) -> dict:
    """Per-seed curves of the paired change from the base model (0 at 0 queries), per arm, set and metric,
    read from each run's paired.json (bench/paired_eval.py --all-checkpoints)."""
    res: dict = {"arms": {}, "metrics": metrics, "sets": []}
    for arm in arms:
        a: dict = {}
        for s in seeds:
            f = out / f"{arm}-s{s}" / "paired.json"
            if not f.is_file():
                continue
            entries = sorted(json.loads(f.read_text()), key=lambda e: e["reward_queries"])
            for st in entries[0]["sets"]:
                if st not in res["sets"]:
                    res["sets"].append(st)
                for m in metrics:
                    if m not in entries[0]["sets"][st]:
                        continue
                    curve = [(0, 0.0, 0.0)] + [(e["reward_queries"], e["sets"][st][m]["diff"], e["sets"][st][m]["ci95"])
                                               for e in entries]  # fmt: skip
                    v = a.setdefault(f"{st}:{m}", {"per_seed": [], "seeds": []})
                    v["per_seed"].append(curve)
                    v["seeds"].append(s)
        res["arms"][arm] = a
    return res


def summarise_paired(res: dict) -> dict:
    """Mean over seeds with Student-t CIs of every curve in `res` (from collect_paired or pool_paired), and
    each arm's queries to reach the plain arm's final mean change."""
    for a in res["arms"].values():
        for v in a.values():
            n = min(len(c) for c in v["per_seed"])
            v["per_seed"] = [c[:n] for c in v["per_seed"]]
            v["mean"] = [(v["per_seed"][0][j][0], *seed_mean_ci([c[j][1] for c in v["per_seed"]])) for j in range(n)]
    for key in res["arms"].get("plain", {}):
        target = res["arms"]["plain"][key]["mean"][-1][1]
        for a in res["arms"].values():
            v = a.get(key)
            if v is None:
                continue
            hits = [reach(c, target) for c in v["per_seed"]]
            got = [h for h in hits if h is not None]
            v["reach_target"] = target
            v["reach"] = {"reached": len(got), "of": len(hits), "queries": seed_mean_ci(got) if got else None,
                          "mean_curve": reach_bootstrap(res["arms"]["plain"][key]["per_seed"], v["per_seed"])}  # fmt: skip
    return res


def analyse_paired(out: Path, arms: list[str], seeds: list[int], metrics: list[str]) -> dict:
    """Curves of the paired change from the base model per arm, set and metric: per seed, and mean over seeds
    with Student-t CIs; each arm's queries to reach the plain arm's final mean change."""
    return summarise_paired(collect_paired(out, arms, seeds, metrics))


def pool_paired(files: list[Path]) -> dict:
    """One analysis over the seeds of several studies' paired.json files (for example seeds 0-4 from one
    session and 5-9 from another). They must share the protocol and the query points, and no arm may have
    the same seed twice; anything else is refused with the file that differs."""
    pooled: dict = {"arms": {}, "metrics": [], "sets": [], "pooled_from": [str(f) for f in files]}
    protocol = None
    for f in files:
        if not Path(f).is_file():
            raise SystemExit(f"--pool: {f} does not exist (give the paired.json that bench/study.py --paired wrote)")
        r = json.loads(Path(f).read_text())
        if "arms" not in r or not all("seeds" in v for a in r["arms"].values() for v in a.values()):
            raise SystemExit(f"--pool: {f} has no per-seed labels; re-run `bench/study.py --analyse-only --paired` "
                             "on its study directory to rewrite it")
        p = {k: v for k, v in r.get("protocol", {}).items() if k != "seeds"}
        if protocol is None:
            protocol = p
        elif p != protocol:
            diff = sorted(k for k in set(p) | set(protocol) if p.get(k) != protocol.get(k))
            raise SystemExit(f"--pool: {f} was run under another protocol ({', '.join(diff)} differ from "
                             f"{files[0]}); pool only studies run with the same config and overrides")
        pooled["metrics"] += [m for m in r["metrics"] if m not in pooled["metrics"]]
        pooled["sets"] += [s for s in r["sets"] if s not in pooled["sets"]]
        for arm, a in r["arms"].items():
            for key, v in a.items():
                dst = pooled["arms"].setdefault(arm, {}).setdefault(key, {"per_seed": [], "seeds": []})
                dup = set(dst["seeds"]) & set(v["seeds"])
                if dup:
                    raise SystemExit(f"--pool: {f} repeats seed(s) {sorted(dup)} of arm {arm}; each seed may "
                                     "come from one file only")
                qs = [c[0] for c in v["per_seed"][0]]
                if dst["per_seed"] and [c[0] for c in dst["per_seed"][0]][: len(qs)] != qs[: len(dst["per_seed"][0])]:
                    raise SystemExit(f"--pool: {f} has checkpoints at {qs} queries for {arm} {key}, the other "
                                     f"file(s) at {[c[0] for c in dst['per_seed'][0]]}")
                dst["per_seed"] += v["per_seed"]
                dst["seeds"] += v["seeds"]
    pooled["protocol"] = dict(protocol or {}, seeds={a: sorted(next(iter(v.values()))["seeds"])
                                                     for a, v in pooled["arms"].items()})  # fmt: skip
    return summarise_paired(pooled)


def markdown_paired(res: dict) -> str:
    lines = []
    for st in res["sets"]:
        for m in res["metrics"]:
            key = f"{st}:{m}"
            if not any(key in a for a in res["arms"].values()):
                continue
            qs = [q for q, *_ in next(a[key] for a in res["arms"].values() if key in a)["mean"][1:]]
            lines += [f"### {st}: {m}, change from the base model (paired)", "",
                      "| arm | " + " | ".join(f"{q} queries" for q in qs) + " | queries to reach the plain arm's "
                      "final: mean curve [bootstrap 95% CI] (resamples reaching it) | per seed: mean ± CI (seeds "
                      "reaching it) |", "|" + "---|" * (len(qs) + 3)]  # fmt: skip
            for arm, a in res["arms"].items():
                v = a.get(key)
                if v is None:
                    continue
                cells = [f"{y:+.3f} ± {c:.3f}" for _, y, c in v["mean"][1:]]
                r = v.get("reach", {})
                if v.get("reach_target", 1.0) <= 0:
                    rt = pt = "n/a: the plain arm's final change is not above zero"
                else:
                    mc = r.get("mean_curve", {})
                    rt = "never" if mc.get("queries") is None else f"{mc['queries']:.0f}"
                    if mc.get("ci95"):
                        rt += f" [{mc['ci95'][0]:.0f}, {mc['ci95'][1]:.0f}]"
                    rt += f" ({mc.get('reached', 0):.0%} of resamples)"
                    rq = r.get("queries")
                    pt = (f"{rq[0]:.0f} ± {rq[1]:.0f}" if rq else "never") + f" ({r.get('reached', 0)}/{r.get('of', 0)})"
                lines.append(f"| {arm} | " + " | ".join(cells) + f" | {rt} | {pt} |")
            lines.append("")
    lines.append("(± is the 95% CI over seeds, Student t; the bootstrap resamples seeds of both arms.)")
    return "\n".join(lines) + "\n"


def plot_curves(res: dict, keys: list[str], path: Path, title, suptitle: str, paired: bool = False,
                marks: dict[float, str] | None = None) -> None:
    """One panel per key of `res["arms"][arm]`: each arm's seed-mean curve against reward queries with its 95%
    CI. `paired` curves are changes from the base model: a zero line, and the arms offset slightly. `marks`:
    dashed vertical lines at these reward queries, labelled (e.g. where a second stage starts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(2, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), dpi=100, squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for i, (arm, a) in enumerate(res["arms"].items()):
            if key in a:
                q, y, c = zip(*a[key]["mean"])
                dx = 4 * (i - 1.5) if paired else 0.0
                ax.errorbar([x + dx for x in q], y, yerr=c, marker="o", capsize=3, label=arm)
        if paired:
            ax.axhline(0.0, color="grey", lw=0.8)
        for x, label in (marks or {}).items():
            ax.axvline(x, color="grey", ls="--", lw=0.8)
            ax.annotate(label, (x, 0.02), xycoords=("data", "axes fraction"), fontsize=7, color="grey",
                        xytext=(3, 0), textcoords="offset points")  # fmt: skip
        ax.set_title(title(key), fontsize=9)
        ax.set_xlabel("reward queries (training images scored)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_paired(res: dict, path: Path) -> None:
    keys = [f"{st}:{m}" for m in res["metrics"][:2] for st in res["sets"][:2]]
    keys = [k for k in keys if any(k in a for a in res["arms"].values())]
    if keys:
        plot_curves(res, keys, path, lambda k: f"{k.replace(':', ': ')} (paired change from the base model)",
                    "paired evaluation of every checkpoint: mean over seeds, 95% CI (arms offset slightly)",
                    paired=True)  # fmt: skip


def write_paired(pres: dict, out: Path, header: str) -> None:
    """paired.json (everything, per-seed curves included: small enough to keep beside the docs, and what
    --pool reads), paired.md and paired.png in `out`."""
    (out / "paired.json").write_text(json.dumps(pres, indent=1))
    pmd = header + "\n\n" + markdown_paired(pres)
    (out / "paired.md").write_text(pmd)
    plot_paired(pres, out / "paired.png")
    print(pmd)
