"""Start-up of two (or more) source trees side by side, interleaved: when the first log line appears, when the
first epoch is done, and the whole process, on ddpo-pytorch's tiny workload (bench/speed.py's REFERENCE).

Each tree runs as `python -m learner.main` with PYTHONPATH set to the tree (Ray's actor processes inherit it),
so an old commit checked out with `git worktree add /tmp/old COMMIT` is measured against the working tree in
one session, with the machine's slow drifts hitting both alike:

    python bench/startup_trees.py --model /path/to/tiny_pipeline_dir --tree old=/tmp/old --tree new=. \
        --repeats 3 --epochs 2 --backend ray

A tree can also be one layout of the same code: `--tree two=. --tree one=. --set one:cluster.num_samplers=1`
gives the tree named `one` that override (repeat --set for more).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.startup import ours


def one_run(root: Path, model: str, epochs: int, backend: str, out: Path, sets: list[str] = ()) -> dict[str, float]:
    """Seconds from launch to the first log line ('run ...'), to epoch 1's summary line, and to exit."""
    cmd, env = ours(backend, model, epochs, out)  # the command bench/startup.py times
    for s in sets:
        cmd += ["--set", s]
    shutil.rmtree(out, ignore_errors=True)
    env.update(PYTHONPATH=str(root), PYTHONUNBUFFERED="1")  # unbuffered: each line is timed as it is printed
    t0 = time.perf_counter()
    marks: dict[str, float] = {}
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail = []
    for line in proc.stdout:
        t = time.perf_counter() - t0
        tail = (tail + [line])[-20:]
        if line.startswith("run ") and "first line" not in marks:
            marks["first line"] = t
        if line.startswith("epoch 1/") and "|" in line and "epoch 1 done" not in marks:
            marks["epoch 1 done"] = t
    proc.wait()
    marks["whole process"] = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{root}: learner.main failed:\n{''.join(tail)}")
    return marks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a diffusers pipeline directory (the same for every tree)")
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH of a source tree; give two or more")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--backend", default="ray", choices=["ray", "local"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/startup_trees"))
    ap.add_argument("--set", action="append", default=[], metavar="NAME:KEY=VALUE",
                    help="a config override for the tree NAME only")  # fmt: skip
    args = ap.parse_args()
    trees = {}
    for t in args.tree:
        name, _, path = t.partition("=")
        if not path or not (Path(path) / "learner" / "main.py").is_file():
            raise SystemExit(f"--tree {t!r}: give NAME=PATH of a checkout of this project")
        trees[name] = Path(path).resolve()
    sets: dict[str, list[str]] = {n: [] for n in trees}
    for s in args.set:
        name, _, override = s.partition(":")
        if name not in trees or "=" not in override:
            raise SystemExit(f"--set {s!r}: give NAME:KEY=VALUE with NAME one of the trees {sorted(trees)}")
        sets[name].append(override)
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in trees}
    for r in range(args.repeats):
        for name, root in trees.items():
            m = one_run(root, str(Path(args.model).resolve()), args.epochs, args.backend, args.work / f"{name}-{r}",
                        sets[name])  # fmt: skip
            runs[name].append(m)
            print(f"  {name} run {r + 1}: " + ", ".join(f"{k} {v:.1f} s" for k, v in m.items()), flush=True)
    keys = list(next(iter(runs.values()))[0])
    print(f"\n| tree | {' | '.join(k + ' (s)' for k in keys)} |")
    print("|---|" + "---|" * len(keys))
    for name, ms in runs.items():
        cells = []
        for k in keys:
            xs = [m[k] for m in ms if k in m]
            sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
            cells.append(f"{statistics.mean(xs):.1f} +- {sd:.1f}")
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
