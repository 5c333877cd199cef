"""The Ray system and the driver loop: sample -> score -> learn -> broadcast, one epoch at a time.

With replay.max_staleness 0 every epoch is strictly on-policy: weights are
synced and verified, then samplers, reward actors and the learner run as a
pipeline through the replay queues. With max_staleness >= 1 the next epoch's
sampling is launched before the learner trains, so sampling overlaps learning
and trajectories are at most one version old.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import ray

from actors.replay import make_queue
from actors.reward import RewardActor
from actors.sampler import SamplerActor
from common.config import ActorResources, RunConfig
from common.prompts import load_prompts
from common.rollouts import sample_seeds
from learner.actor import LearnerActor
from learner.run_dir import RunDir


class WeightSyncError(RuntimeError):
    """A sampler does not hold the weights the learner published."""


def _opts(r: ActorResources, wait_policy: str) -> dict:
    env = {"OMP_WAIT_POLICY": wait_policy, "OMP_NUM_THREADS": str(r.torch_threads)}
    return {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus, "runtime_env": {"env_vars": env}}


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


def _split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


class RaySystem:
    """The actors and queues of one run."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        c = cfg.cluster
        w = c.omp_wait_policy
        self.rollout_q = make_queue(cfg.replay.backend)
        self.scored_q = make_queue(cfg.replay.backend)
        sampler_cls, reward_cls = ray.remote(SamplerActor), ray.remote(RewardActor)
        self.samplers = [sampler_cls.options(**_opts(c.sampler, w)).remote(cfg, i) for i in range(c.num_samplers)]
        self.rewarders = [reward_cls.options(**_opts(c.reward, w)).remote(cfg, i) for i in range(c.num_reward_actors)]
        self.learner = ray.remote(LearnerActor).options(**_opts(c.learner, w)).remote(cfg)
        ray.get([a.ready.remote() for a in self.samplers + self.rewarders] + [self.learner.publish.remote()])

    def shutdown(self) -> None:
        """Stop every actor of this run (the Ray cluster itself stays up)."""
        for a in self.samplers + self.rewarders + [self.learner, self.rollout_q.actor, self.scored_q.actor]:
            ray.kill(a)

    def sync_weights(self) -> tuple[int, str]:
        """Broadcast the learner's LoRA (one ray.put) and verify every sampler's version and checksum."""
        version, (ref,), checksum = ray.get(self.learner.publish.remote())
        answers = ray.get([s.set_weights.remote(version, ref) for s in self.samplers])
        for i, (v, c) in enumerate(answers):
            if v != version or c != checksum:
                raise WeightSyncError(
                    f"sampler {i} holds version {v} checksum {c}, learner published {version} checksum {checksum}"
                )
        return version, checksum

    def launch_sampling(self, prompts: list[str], seeds: list[int]) -> tuple[list, list, int]:
        """Start samplers and reward actors on one epoch; returns (sampler futures, reward futures, items)."""
        bs = self.cfg.sampling.batch_size
        futs, start, items = [], 0, 0
        for s, n in zip(self.samplers, _split(len(prompts), len(self.samplers))):
            if n:
                futs.append(s.sample.remote(self.rollout_q, prompts[start : start + n], seeds[start : start + n]))
                items += math.ceil(n / bs)
            start += n
        rfuts = [
            r.score_items.remote(self.rollout_q, self.scored_q, k)
            for r, k in zip(self.rewarders, _split(items, len(self.rewarders)))
            if k
        ]
        return futs, rfuts, items

    def evaluate(self, prompts: list[str], seeds: list[int]):
        """Evaluation batches (plain prompts, constant scale) from the samplers, scored by the reward actors."""
        futs, start = [], 0
        for s, n in zip(self.samplers, _split(len(prompts), len(self.samplers))):
            if n:
                futs.append(s.sample_eval.remote(prompts[start : start + n], seeds[start : start + n]))
            start += n
        scores = [self.rewarders[i % len(self.rewarders)].score_batch.remote(f) for i, f in enumerate(futs)]
        return ray.get(futs), ray.get(scores)


class Trainer:
    """The epoch loop over a RaySystem, writing the run directory."""

    def __init__(self, cfg: RunConfig, run: RunDir, system: RaySystem, log=print):
        self.cfg, self.run, self.sys, self.log = cfg, run, system, log
        self.train_prompts = load_prompts(cfg.prompts.train)
        sources = cfg.prompts.eval or [cfg.prompts.train]
        self.eval_sets = []  # (name, prompts repeated images_per_prompt times, fixed seeds)
        for src in sources:
            ps = [p for p in load_prompts(src)[: cfg.eval.max_prompts] for _ in range(cfg.eval.images_per_prompt)]
            self.eval_sets.append((Path(src).stem, ps, sample_seeds(cfg.eval.seed, -1, len(ps))))
        self.epoch = 0
        self.reward_queries = 0

    def _epoch_inputs(self, epoch: int) -> tuple[list[str], list[int]]:
        n = self.cfg.train.samples_per_epoch
        t = self.cfg.train
        return epoch_prompts(self.train_prompts, t.seed, epoch, n, t.prompts_per_epoch), sample_seeds(t.seed, epoch, n)

    def _evaluate(self, tag: str) -> dict:
        import torch

        row: dict = {"eval_reward_queries": self.reward_queries}
        for i, (name, prompts, seeds) in enumerate(self.eval_sets):
            batches, scores = self.sys.evaluate(prompts, seeds)
            r = torch.cat(scores)
            mean, std = float(r.mean()), float(r.std(unbiased=False))
            if i == 0:
                row.update(eval_reward_mean=mean, eval_reward_std=std)
            if len(self.eval_sets) > 1:
                row.update({f"eval_{name}_reward_mean": mean, f"eval_{name}_reward_std": std})
            if self.cfg.output.grid_every:
                images = torch.cat([b.images for b in batches])
                suffix = f"_{name}" if len(self.eval_sets) > 1 else ""
                self.run.save_grid(images, tag + suffix, nrow=self.cfg.eval.images_per_prompt * 4)
        return row

    def _eval_due(self, epoch: int) -> bool:
        return self.cfg.eval.every > 0 and epoch % self.cfg.eval.every == 0

    def checkpoint(self) -> None:
        state = ray.get(self.sys.learner.checkpoint_state.remote())
        counters = {"epoch": self.epoch, "reward_queries": self.reward_queries, "policy_version": state["learner"]["version"]}
        self.run.save_checkpoint(self.epoch, state, counters)

    def restore(self) -> bool:
        """Continue from the run directory's last complete checkpoint, if any."""
        path = self.run.latest_checkpoint()
        if path is None:
            return False
        lora, learner_state, counters = self.run.load_checkpoint(path)
        ray.get(self.sys.learner.restore.remote(learner_state, lora))
        self.epoch, self.reward_queries = int(counters["epoch"]), int(counters["reward_queries"])
        self.run.truncate_metrics(self.epoch)
        self.log(f"resumed from {path} (epoch {self.epoch}, {self.reward_queries} reward queries)")
        return True

    def fit(self) -> list[dict]:
        cfg = self.cfg
        overlap = cfg.replay.max_staleness >= 1
        rows = []
        next_launch = None
        while self.epoch < cfg.train.epochs:
            e = self.epoch
            t0 = time.perf_counter()
            eval_row = self._evaluate(f"epoch_{e:04d}") if self._eval_due(e) else {}
            t_eval = time.perf_counter() - t0
            t_start = time.perf_counter()
            if next_launch is None:
                self.sys.sync_weights()
                next_launch = self.sys.launch_sampling(*self._epoch_inputs(e))
            futs, rfuts, items = next_launch
            next_launch = None
            if overlap:  # wait until this epoch's rollouts are out of the samplers, then start the next epoch's
                sample_stats = ray.get(futs)
                if e + 1 < cfg.train.epochs:
                    next_launch = self.sys.launch_sampling(*self._epoch_inputs(e + 1))
            learn = self.sys.learner.train_items.remote(self.sys.scored_q, items)
            if not overlap:
                sample_stats = ray.get(futs)
            reward_stats = ray.get(rfuts)
            m = ray.get(learn)
            if overlap and next_launch is not None:
                self.sys.sync_weights()  # queued behind the running sample calls; applies to epoch e+2
            wall = time.perf_counter() - t_start
            scored = sum(r["samples"] for r in reward_stats)
            self.reward_queries += scored
            self.epoch += 1
            row = {
                "epoch": e,
                "reward_queries": self.reward_queries,
                "reward_mean": m["reward_mean"],
                "reward_std": m["reward_std"],
                "approx_kl": m.get("approx_kl", 0.0),
                "clipfrac": m.get("clipfrac", 0.0),
                "ratio_mean": m.get("ratio_mean_first", 1.0),
                "ratio_mean_all": m.get("ratio_mean", 1.0),
                "logprob_mismatch": m.get("logprob_mismatch", 0.0),
                "loss": m.get("loss", 0.0),
                "grad_norm": m.get("grad_norm", 0.0),
                "zero_std_frac": m.get("zero_std_frac", 0.0),
                "policy_version": m["policy_version"],
                "dropped_stale": m["dropped_stale"],
                "staleness_max": m["staleness_max"],
                "time_sample": max(s["time_sample"] for s in sample_stats),
                "time_reward": sum(r["time_reward"] for r in reward_stats),
                "time_learn": m["time_learn"],
                "time_epoch": wall,
                "time_eval": t_eval,
                "samples_per_s": scored / wall if wall > 0 else 0.0,
                **eval_row,
            }
            rows.append(row)
            self.run.log(row)
            every = cfg.train.checkpoint_every
            if (every and self.epoch % every == 0) or self.epoch == cfg.train.epochs:
                self.checkpoint()
            self.log(self._progress(row))
            if cfg.output.grid_every and self.epoch % cfg.output.grid_every == 0:
                self.run.plot_reward_curve()
        if cfg.eval.every > 0:
            self.sys.sync_weights()
            final = {"epoch": self.epoch, "reward_queries": self.reward_queries, "final_eval": True,
                     **self._evaluate(f"epoch_{self.epoch:04d}_final")}  # fmt: skip
            self.run.log(final)
            self.log(f"final eval: reward {final['eval_reward_mean']:.4f} +- {final['eval_reward_std']:.4f}")
            rows.append(final)
        self.run.plot_reward_curve()
        return rows

    def _progress(self, r: dict) -> str:
        ev = f" eval {r['eval_reward_mean']:+.4f}" if "eval_reward_mean" in r else ""
        return (
            f"epoch {r['epoch'] + 1}/{self.cfg.train.epochs} | queries {r['reward_queries']} | reward "
            f"{r['reward_mean']:+.4f} +- {r['reward_std']:.4f}{ev} | kl {r['approx_kl']:.2e} clip {r['clipfrac']:.2f} "
            f"mismatch {r['logprob_mismatch']:.1e} | v{r['policy_version']} | {r['time_epoch']:.1f}s "
            f"(sample {r['time_sample']:.1f} reward {r['time_reward']:.1f} learn {r['time_learn']:.1f}) "
            f"{r['samples_per_s']:.1f} img/s"
        )
