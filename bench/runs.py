"""Launching many training runs and reading their results: the common part of bench/sweep.py and bench/study.py.

Every run is the real CLI (`python -m learner.main`) on the local backend, in its own run directory,
as a subprocess with a fixed torch thread count, so that P runs share P x T cores evenly. A run whose
directory already holds a final evaluation is not run again (sweeps and studies resume).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # t(0.975, df)


@dataclass
class RunSpec:
    name: str  # directory name under the output folder
    config: str  # preset or YAML path
    overrides: list[str] = field(default_factory=list)


def is_done(path: Path) -> bool:
    m = path / "metrics.jsonl"
    return m.is_file() and any(json.loads(x).get("final_eval") for x in m.read_text().splitlines() if x.strip())


def run_pool(jobs: list[tuple[str, list[str], Path]], parallel: int, env: dict, log=print) -> list[str]:
    """Run (name, command, log file) jobs as subprocesses from the project root, `parallel` at a time;
    returns the names of those that failed."""
    todo = list(jobs)
    running: list[tuple[str, subprocess.Popen, float, Path]] = []
    failed = []
    while todo or running:
        while todo and len(running) < parallel:
            name, cmd, logpath = todo.pop(0)
            logpath.parent.mkdir(parents=True, exist_ok=True)
            with open(logpath, "w") as logf:  # the child keeps its own copy of the descriptor
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT)
            running.append((name, proc, time.time(), logpath))
            log(f"started {name}: {' '.join(cmd[2:])}")
        time.sleep(2)
        for item in list(running):
            name, p, t0, logpath = item
            if p.poll() is not None:
                running.remove(item)
                status = "done" if p.returncode == 0 else f"FAILED (exit {p.returncode}, see {logpath})"
                if p.returncode:
                    failed.append(name)
                log(f"{status}: {name} in {time.time() - t0:.0f} s")
    return failed


def launch_all(specs: list[RunSpec], out: Path, parallel: int, threads: int, log=print) -> None:
    """Run every spec not yet done, `parallel` at a time, each with `threads` torch threads."""
    out.mkdir(parents=True, exist_ok=True)
    todo = [s for s in specs if not is_done(out / s.name)]
    log(f"{len(specs) - len(todo)} of {len(specs)} runs already done; running {len(todo)}, {parallel} at a time")
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"), OMP_NUM_THREADS=str(threads))
    jobs = []
    for s in todo:
        d = out / s.name
        if d.exists():  # an unfinished earlier attempt: start it over
            shutil.rmtree(d)
        cmd = [sys.executable, "-m", "learner.main", "--config", s.config, "--output", str(d),
               "--set", "cluster.backend=local", "--set", f"cluster.local_torch_threads={threads}",
               "--set", "output.tensorboard=false"]  # fmt: skip
        for o in s.overrides:
            cmd += ["--set", o]
        jobs.append((s.name, cmd, out / f"{s.name}.log"))
    failed = run_pool(jobs, parallel, env, log)
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed: {', '.join(failed)}")


def last_checkpoint(run_path: Path) -> tuple:
    """(config, checkpoint path, LoRA state, learner state, counters) of a finished run's last complete
    checkpoint; stops with the run's path when it has none."""
    from common.config import load_config
    from learner.run_dir import RunDir

    cfg = load_config(str(run_path / "config.yaml"))
    run = RunDir(run_path)
    ckpt = run.latest_checkpoint()
    if ckpt is None:
        raise SystemExit(f"{run_path}: no complete checkpoint")
    return (cfg, ckpt, *run.load_checkpoint(ckpt))


def base_weights(lora: dict) -> dict:
    """The same LoRA state with every B factor zeroed: the adapters contribute nothing, i.e. the base model."""
    return {k: v.new_zeros(v.shape) if "lora_B" in k else v for k, v in lora.items()}


def read_rows(path: Path) -> list[dict]:
    m = path / "metrics.jsonl"
    return [json.loads(x) for x in m.read_text().splitlines() if x.strip()] if m.is_file() else []


def chain_rows(first: list[dict], second: list[dict]) -> list[dict]:
    """The metric rows of two stages as one run (a second stage trained on the first's fused model,
    bench/two_stage.py): the second's reward queries, its evaluations' too, offset by the first's last, and its
    evaluation of the fused model before any update (the first's final policy, so a repeat of the first's
    last evaluation) dropped, so that its evaluation curve continues the first's."""
    if not first:
        return list(second)
    offset = first[-1]["reward_queries"]
    out = list(first)
    for r in second:
        r = dict(r, reward_queries=r["reward_queries"] + offset)
        if "eval_reward_queries" in r:
            if r.get("eval_policy_version", 1) == 0:
                r = {k: v for k, v in r.items() if not k.startswith("eval_")}
            else:
                r["eval_reward_queries"] += offset
        out.append(r)
    return out


def eval_curve(rows: list[dict], key: str) -> list[tuple[int, float, float]]:
    """(reward queries, mean, 95% CI half-width) of evaluation metric `key` (e.g. eval_shapes_full)."""
    return [(r.get("eval_reward_queries", r["reward_queries"]), r[key + "_mean"], r.get(key + "_ci95", 0.0))
            for r in rows if key + "_mean" in r]  # fmt: skip


def seed_mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean over seeds and the 95% CI half-width of that mean (Student t; 0 for one seed)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T95.get(n - 1, 1.96) * sd / math.sqrt(n)
