"""The epoch loop, the same for every backend: sync -> evaluate (when due) -> sample, score, learn -> log.

`Trainer` talks to a `System` (the Ray actors in learner/driver.py, or one
local process in learner/local.py) through five calls, and knows epochs,
reward queries, evaluation and checkpoints, not how or where the work runs.
No Ray import here, so the loop runs on machines without Ray.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import torch

from common.config import RunConfig
from common.prompts import load_prompts
from common.rollouts import sample_seeds
from learner.progress import EpochProgress, NoProgress
from learner.run_dir import RunDir

Z95 = 1.959964  # two-sided 95% normal quantile: confidence intervals of evaluation means


class BackendLost(RuntimeError):
    """A part of the backend that holds training state (the learner) died; the run can continue from its
    last complete checkpoint."""


class WeightSyncError(RuntimeError):
    """A sampler does not hold the weights the learner published."""


@dataclass
class EvalResult:
    """Scored evaluation images of one prompt set: images uint8 [N, 3, H, W], rewards [N], reward
    components by name [N] each (e.g. shapes_full), and the policy version that made the images."""

    images: torch.Tensor
    rewards: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    policy_version: int = -1


class EpochInputs(NamedTuple):
    """One epoch's training inputs: a function of (train.seed, epoch) only."""

    prompts: list[str]
    seeds: list[int]
    epoch: int


class System(Protocol):
    """What the loop needs of a backend."""

    sampling_ahead: bool  # the next epoch's rollouts are already being sampled (Ray, max_staleness >= 1)

    def sync_weights(self) -> tuple[int, str]:
        """Make every sampler hold the learner's LoRA; returns (version, checksum), verified."""

    def train_epoch(self, inputs: EpochInputs, next_inputs: EpochInputs | None, progress=None) -> dict:
        """Sample, score and learn on one epoch's prompts and seeds; `next_inputs` may be sampled ahead.
        `progress.update(sampled=, scored=, trained=)` is told the counts as they advance."""

    def evaluate(self, prompts: list[str], seeds: list[int]) -> EvalResult: ...

    def checkpoint_state(self) -> dict: ...

    def restore(self, learner_state: dict, lora: dict) -> None: ...

    def shutdown(self) -> None: ...


def epoch_prompts(prompts: list[str], seed: int, epoch: int, n: int, groups: int = 0) -> list[str]:
    """The epoch's n training prompts, a function of (seed, epoch) only.

    groups = 0: drawn with replacement. groups = k > 0: k distinct prompts (with replacement if there
    are fewer), each repeated n / k times, so per-prompt advantages compare samples of one prompt.
    """
    rng = np.random.default_rng([seed, epoch, 0xBEEF])
    if groups <= 0:
        return [prompts[i] for i in rng.integers(0, len(prompts), n)]
    picks = rng.choice(len(prompts), size=groups, replace=groups > len(prompts))
    return [prompts[i] for i in picks for _ in range(n // groups)]


def mean_ci(values: torch.Tensor) -> tuple[float, float, float]:
    """(mean, population std, 95% CI half-width of the mean) of a 1-D tensor."""
    v = values.double()
    n = v.numel()
    sd = float(v.std(unbiased=True)) if n > 1 else 0.0
    return float(v.mean()), float(v.std(unbiased=False)), Z95 * sd / math.sqrt(n) if n > 1 else 0.0


class Trainer:
    """The epoch loop over a System, writing the run directory."""

    def __init__(self, cfg: RunConfig, run: RunDir, system: System, log=print, progress=False):
        """`progress`: True shows samples generated, scored and trained inside each epoch on stderr
        (learner.progress.EpochProgress); a callable (label, totals) -> progress object takes its place."""
        self.cfg, self.run, self.sys, self.log = cfg, run, system, log
        self.make_progress = EpochProgress if progress is True else (progress or None)
        self.train_prompts = load_prompts(cfg.prompts.train)
        sources = cfg.prompts.eval or [cfg.prompts.train]
        self.eval_sets = []  # (name, prompts repeated images_per_prompt times, fixed seeds)
        for src in sources:
            ps = [
                p
                for p in load_prompts(src)[: cfg.eval.max_prompts]
                for _ in range(cfg.eval.images_per_prompt)
            ]
            self.eval_sets.append((Path(src).stem, ps, sample_seeds(cfg.eval.seed, -1, len(ps))))
        self.epoch = 0
        self.reward_queries = 0
        self.version = 0  # the learner's policy version

    def _epoch_inputs(self, epoch: int) -> EpochInputs:
        t = self.cfg.train
        n = t.samples_per_epoch
        return EpochInputs(epoch_prompts(self.train_prompts, t.seed, epoch, n, t.prompts_per_epoch),
                           sample_seeds(t.seed, epoch, n), epoch)  # fmt: skip

    def evaluate(self, tag: str, keep_images: bool = False) -> dict:
        """Evaluate every set with the current policy; one row of means, stds and 95% CIs.

        The first set is the headline (eval_reward_*); with several sets each is also logged as
        eval_<set>_*. Reward components (e.g. shapes_full) are logged as eval_<set>_<component>_*.

        Evaluation noise is the same every time, so each image can be compared with the same image of the
        base policy (version 0, kept in the run directory): `_change_mean` and `_change_ci95` are the mean
        paired difference from the base and its 95% CI, far tighter than two independent CIs when most
        images do not change.
        """
        row: dict = {"eval_reward_queries": self.reward_queries}
        for i, (name, prompts, seeds) in enumerate(self.eval_sets):
            res = self.sys.evaluate(prompts, seeds)
            if res.policy_version != self.version:
                raise RuntimeError(
                    f"evaluation used policy version {res.policy_version}, the learner is at {self.version}"
                )
            row["eval_policy_version"] = res.policy_version
            scores = {"reward": res.rewards, **{k.replace("/", "_"): v for k, v in res.parts.items()}}
            base = self.run.load_eval_base(name, len(prompts))
            if base is None and res.policy_version == 0:
                self.run.save_eval_base(name, scores)
                # and its images, so that what training did to diversity can be measured on the same noise
                self.run.save_eval_images(f"eval_base_{name}.images", res.images, prompts)
            stats = {k: mean_ci(v) for k, v in scores.items()}
            if base is not None:
                stats.update(
                    {
                        f"{k}_change": mean_ci(v.double() - base[k].double())
                        for k, v in scores.items()
                        if k in base
                    }
                )
            prefixes = (["eval"] if i == 0 else []) + ([f"eval_{name}"] if len(self.eval_sets) > 1 else [])
            for prefix in prefixes:
                for key, (mean, std, ci) in stats.items():
                    row.update({f"{prefix}_{key}_mean": mean, f"{prefix}_{key}_ci95": ci})
                    if key == "reward":
                        row[f"{prefix}_reward_std"] = std
            file_tag = self.run.eval_tag(tag, name, len(self.eval_sets))
            if keep_images:
                self.run.save_eval_images(file_tag, res.images, prompts)
            if self.cfg.output.grid_every:
                self.run.save_grid(res.images, file_tag, nrow=self.cfg.eval.images_per_prompt,
                                   labels=prompts[:: self.cfg.eval.images_per_prompt], scores=res.rewards.tolist())  # fmt: skip
        return row

    def _eval_due(self, epoch: int) -> bool:
        if epoch == 0 and not self.cfg.eval.at_start:
            return False
        return self.cfg.eval.every > 0 and epoch % self.cfg.eval.every == 0

    def checkpoint(self) -> None:
        state = self.sys.checkpoint_state()
        counters = {
            "epoch": self.epoch,
            "reward_queries": self.reward_queries,
            "policy_version": state["learner"]["version"],
        }
        self.run.save_checkpoint(self.epoch, state, counters)

    def restore(self) -> bool:
        """Continue from the run directory's last complete checkpoint, if any."""
        path = self.run.latest_checkpoint()
        if path is None:
            return False
        lora, learner_state, counters = self.run.load_checkpoint(path)
        self.sys.restore(learner_state, lora)
        self.epoch, self.reward_queries = int(counters["epoch"]), int(counters["reward_queries"])
        self.version = int(learner_state["version"])
        self.run.truncate_metrics(self.epoch)
        self.log(f"resumed from {path} (epoch {self.epoch}, {self.reward_queries} reward queries)")
        return True

    def fit(self) -> list[dict]:
        cfg = self.cfg
        overlap = cfg.replay.max_staleness >= 1
        rows = []
        while self.epoch < cfg.train.epochs:
            e = self.epoch
            t0 = time.perf_counter()
            if not self.sys.sampling_ahead:  # samplers must hold the current policy before evaluating
                self.sys.sync_weights()
            eval_row = self.evaluate(f"epoch_{e:04d}") if self._eval_due(e) else {}
            t_eval = time.perf_counter() - t0
            t_start = time.perf_counter()
            ahead = self._epoch_inputs(e + 1) if overlap and e + 1 < cfg.train.epochs else None
            inputs = self._epoch_inputs(e)
            n = len(inputs[0])
            totals = {"sampled": n, "scored": n, "trained": n * cfg.algorithm.inner_epochs}
            label = f"epoch {e + 1}/{cfg.train.epochs}"
            progress = self.make_progress(label, totals) if self.make_progress else NoProgress()
            try:
                m = self.sys.train_epoch(inputs, ahead, progress=progress)
            finally:
                progress.close()
            wall = time.perf_counter() - t_start
            self.reward_queries += m["samples"]
            self.version = m["policy_version"]
            self.epoch += 1
            row = {
                "epoch": e,
                "reward_queries": self.reward_queries,
                "reward_mean": m["reward_mean"],
                "reward_std": m["reward_std"],
                "policy_version": m["policy_version"],
                "dropped_stale": m.get("dropped_stale", 0),
                "dropped_nonfinite": m.get("dropped_nonfinite", 0),
                "staleness_max": m.get("staleness_max", 0),
                "time_sample": m.get("time_sample", 0.0),
                "time_reward": m.get("time_reward", 0.0),
                "time_learn": m.get("time_learn", 0.0),
                "time_epoch": wall,
                "time_eval": t_eval,
                "samples_per_s": m["samples"] / wall if wall > 0 else 0.0,
            }
            # the algorithm's own metrics (DDPO: approx_kl, clipfrac, ratio_mean, logprob_mismatch, ...; AlignProp:
            # loss, grad_norm, truncation_k) and each reward term (reward_<name>_mean), as it reports them
            row.update(
                {
                    k: v
                    for k, v in m.items()
                    if k not in row and k != "samples" and isinstance(v, (int, float))
                }
            )
            row.update(eval_row)
            rows.append(row)
            self.run.log(row)
            self._report(row)
            every = cfg.train.checkpoint_every
            if (every and self.epoch % every == 0) or self.epoch == cfg.train.epochs:
                self.checkpoint()
            self.log(self._progress(row))
            if cfg.output.grid_every and self.epoch % cfg.output.grid_every == 0:
                self.run.plot_reward_curve()
        if cfg.eval.every > 0 and cfg.eval.final:
            self.sys.sync_weights()
            final = {"epoch": self.epoch, "reward_queries": self.reward_queries, "final_eval": True,
                     **self.evaluate(f"epoch_{self.epoch:04d}_final", keep_images=True)}  # fmt: skip
            self.run.log(final)
            self._report(final)
            self.log(
                f"final eval: reward {final['eval_reward_mean']:.4f} +- {final['eval_reward_ci95']:.4f} (95% CI)"
            )
            rows.append(final)
        self.run.plot_reward_curve()
        return rows

    def _report(self, row: dict) -> None:
        """Hand the row to the backend's own monitoring, if it has any (Ray: dashboard metrics)."""
        report = getattr(self.sys, "report", None)
        if report is not None:
            report(row)

    def _progress(self, r: dict) -> str:
        ev = f" eval {r['eval_reward_mean']:+.4f}" if "eval_reward_mean" in r else ""
        algo = (
            f"kl {r['approx_kl']:.2e} clip {r['clipfrac']:.2f} mismatch {r['logprob_mismatch']:.1e}"
            if "approx_kl" in r
            else f"loss {r.get('loss', 0.0):+.4f} grad {r.get('grad_norm', 0.0):.2e}"
        )
        if "update_norm" in r:  # how far the LoRA moved this epoch: the one sign of movement with one step an epoch
            algo += f" upd {r['update_norm']:.1e}"
        return (
            f"epoch {r['epoch'] + 1}/{self.cfg.train.epochs} | queries {r['reward_queries']} | reward "
            f"{r['reward_mean']:+.4f} +- {r['reward_std']:.4f}{ev} | {algo} | v{r['policy_version']} | "
            f"{r['time_epoch']:.1f}s (sample {r['time_sample']:.1f} reward {r['time_reward']:.1f} learn "
            f"{r['time_learn']:.1f}) {r['samples_per_s']:.1f} img/s"
        )
