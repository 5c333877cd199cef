"""LearnerActor: owns the DDPO learner, pulls scored rollouts, publishes LoRA weights."""

from __future__ import annotations

import time

import ray
import torch

from actors.common import peak_rss_mb, setup_actor
from common.config import RunConfig
from common.trajectory import TrajectoryBatch
from learner.algorithm import make_algorithm


def split_stale(batches: list[TrajectoryBatch], version: int, max_staleness: int):
    """(fresh batches, number of stale samples): a batch is stale if made more than
    `max_staleness` policy versions before `version`."""
    fresh = [b for b in batches if version - b.policy_version <= max_staleness]
    dropped = sum(len(b) for b in batches if version - b.policy_version > max_staleness)
    return fresh, dropped


class LearnerActor:
    """Thin Ray wrapper over the algorithm's learner (create with `ray.remote(LearnerActor).options(...)`)."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.learner = make_algorithm(cfg, device=setup_actor(cfg.cluster.learner))

    def publish(self) -> tuple[int, list, str]:
        """One ray.put of the current LoRA state: (version, [ObjectRef], checksum)."""
        version, state = self.learner.weights()
        return version, [ray.put(state)], self.learner.checksum()

    def peak_rss_mb(self) -> float:
        return peak_rss_mb()

    def lora_state(self):
        return self.learner.weights()[1]

    def progress(self) -> int:
        """Samples trained so far in the running update (answered while train_items runs: the actor is
        created with max_concurrency=2)."""
        return self.learner.progress

    def join_group(self, world: int, rank: int, group: str) -> int:
        return self.learner.join_group(world, rank, group)

    def take_items(self, scored_queue, num_items: int, timeout: float = 600.0) -> list:
        """Take `num_items` scored entries (entry id, [ObjectRef]) off the queue, unacknowledged."""
        self.learner.progress = 0
        got: list = []
        while len(got) < num_items:
            part = scored_queue.get(num_items - len(got), timeout)
            if not part:
                raise TimeoutError(f"learner: no scored rollouts arrived within {timeout:.0f} s")
            got += part
        return got

    def train_items(self, scored_queue, num_items: int, timeout: float = 600.0) -> dict:
        """Take `num_items` scored batches, drop stale ones, run the DDPO update on the rest, acknowledge."""
        got = self.take_items(scored_queue, num_items, timeout)
        metrics = self.train_got(got)
        scored_queue.ack([e for e, _ in got])
        return metrics

    def train_got(self, got: list) -> dict:
        """The DDPO update on taken entries (every data-parallel learner is given the same entries and
        runs its share of the minibatches)."""
        self.learner.progress = 0
        t0 = time.perf_counter()
        batches = ray.get([item[0] for _, item in got])
        # arrival order depends on which sampler finished first; train in seed order so runs are reproducible
        batches.sort(key=lambda b: (b.plans[0]["seed"], b.batch_id))
        version = self.learner.version
        fresh, dropped = split_stale(batches, version, self.cfg.replay.max_staleness)
        if fresh:
            metrics = self.learner.train(TrajectoryBatch.concat(fresh))
        else:
            metrics = {"policy_version": version}
        rewards = torch.cat([b.rewards for b in batches])  # every scored sample, trained on or not
        metrics.update(
            dropped_stale=dropped,
            trained_samples=sum(len(b) for b in fresh),
            reward_mean=float(rewards.mean()),
            reward_std=float(rewards.std(unbiased=False)),
            staleness_max=max((version - b.policy_version for b in fresh), default=0),
            time_learn=time.perf_counter() - t0,
        )
        return metrics

    def train_prompts(self, prompts: list[str], seeds: list[int]) -> dict:
        """AlignProp: sample, score and backpropagate in the learner itself (the samplers serve evaluation)."""
        t0 = time.perf_counter()
        m = self.learner.train_prompts(prompts, seeds)
        m.update(dropped_stale=0, staleness_max=0, time_learn=time.perf_counter() - t0)
        return m

    def checksum(self) -> str:
        return self.learner.checksum()

    def checkpoint_state(self) -> dict:
        return self.learner.checkpoint_state()

    def restore(self, learner_state: dict, lora: dict) -> str:
        self.learner.load_state_dict(learner_state, lora)
        return self.learner.checksum()
