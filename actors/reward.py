"""RewardActor: scores rollouts in batches and pushes them to the scored queue."""

from __future__ import annotations

import time

import ray
import torch

from actors.common import peak_rss_mb, setup_actor
from common.config import RunConfig
from common.trajectory import TrajectoryBatch
from rewards.combined import WeightedReward, score_in_batches


class RewardActor:
    """Thin Ray wrapper over WeightedReward (create with `ray.remote(RewardActor).options(...)`)."""

    def __init__(self, cfg: RunConfig, index: int):
        device = setup_actor(cfg.cluster.reward)
        self.index = index
        self.cfg = cfg
        self.reward = WeightedReward(cfg.reward, device=device)  # learned rewards load their models once, here
        self.eval_reward = WeightedReward(cfg.eval.reward, device=device) if cfg.eval.reward else self.reward
        self.term_sums: dict[str, float] = {}

    def ready(self) -> int:
        return self.index

    def peak_rss_mb(self) -> float:
        return peak_rss_mb()

    def _score(self, batches: list[TrajectoryBatch]) -> list[TrajectoryBatch]:
        big = TrajectoryBatch.concat(batches) if len(batches) > 1 else batches[0]
        total, parts = self.score_batch(big)
        for name, v in parts.items():  # each term's raw score, summed for the epoch's per-term means
            self.term_sums[name] = self.term_sums.get(name, 0.0) + float(v.sum())
        out, start = [], 0
        for b in batches:
            b.rewards = total[start : start + len(b)].clone()
            start += len(b)
            out.append(b)
        return out

    def score_items(self, rollout_queue, scored_queue, num_items: int, timeout: float = 600.0) -> dict:
        """Take `num_items` rollout batches from `rollout_queue`, score them,
        push each to `scored_queue`, acknowledge them."""
        t_busy = 0.0
        done = samples = 0
        self.term_sums = {}
        while done < num_items:
            got = rollout_queue.get(num_items - done, timeout)
            if not got:
                raise TimeoutError(f"reward actor {self.index}: no rollouts arrived within {timeout:.0f} s")
            t0 = time.perf_counter()
            batches = ray.get([item[0] for _, item in got])
            for b in self._score(batches):
                scored_queue.put([ray.put(b)])
                samples += len(b)
            rollout_queue.ack([e for e, _ in got])
            t_busy += time.perf_counter() - t0
            done += len(got)
        return {"items": done, "samples": samples, "time_reward": t_busy, "term_sums": dict(self.term_sums)}

    def score_batch(self, batch: TrajectoryBatch, details: bool = False, evaluation: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(rewards [B], per-term scores [B] by name, plus components with `details`) of training or
        evaluation images, in calls of at most reward.batch_size images."""
        reward = self.eval_reward if evaluation else self.reward
        return score_in_batches(reward, batch.images_float(), batch.prompts, self.cfg.reward.batch_size, details)
