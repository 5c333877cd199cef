"""LearnerActor: owns the DDPO learner, pulls scored rollouts, publishes LoRA weights."""

from __future__ import annotations

import time

import ray
import torch

from actors.common import ActorProcess, setup_actor
from common.config import RunConfig
from common.trajectory import TrajectoryBatch
from learner.algorithm import make_algorithm
from rewards.combined import drop_nonfinite


def split_stale(batches: list[TrajectoryBatch], version: int, max_staleness: int):
    """(fresh batches, number of stale samples): a batch is stale if made more than
    `max_staleness` policy versions before `version`."""
    fresh = [b for b in batches if version - b.policy_version <= max_staleness]
    dropped = sum(len(b) for b in batches if version - b.policy_version > max_staleness)
    return fresh, dropped


class LearnerActor(ActorProcess):
    """Thin Ray wrapper over the algorithm's learner (create with `ray.remote(LearnerActor).options(...)`)."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.learner = make_algorithm(cfg, device=setup_actor(cfg.cluster.learner))
        self.consumer = "learner"

    def publish(self) -> tuple[int, list, str]:
        """One ray.put of the current LoRA state: (version, [ObjectRef], checksum)."""
        version, state = self.learner.weights()
        return version, [ray.put(state)], self.learner.checksum()

    def lora_state(self):
        return self.learner.weights()[1]

    def progress(self) -> int:
        """Samples trained so far in the running update (answered while train_items runs: the actor is
        created with max_concurrency=2)."""
        return self.learner.progress

    def join_group(self, world: int, rank: int, group: str) -> int:
        return self.learner.join_group(world, rank, group)

    def take_items(self, scored_queue, num_items: int, epoch: int, timeout: float = 600.0) -> list:
        """Take epoch `epoch`'s `num_items` scored entries (entry id, TrajectoryBatch), unacknowledged: first
        any this learner was given before and did not acknowledge, then new ones."""
        self.learner.progress = 0
        got: list = scored_queue.pending(self.consumer, epoch)[:num_items]
        while len(got) < num_items:
            part = scored_queue.get(num_items - len(got), timeout, self.consumer, epoch)
            if not part:
                raise TimeoutError(
                    f"learner: no scored rollouts of epoch {epoch} arrived within {timeout:.0f} s"
                )
            got += part
        self.taken_ids = [e for e, _ in got]
        return got

    def ack_taken(self, scored_queue) -> int:
        """Acknowledge the entries of the last take_items (data-parallel: after every learner has updated)."""
        return scored_queue.ack(self.taken_ids)

    def train_items(self, scored_queue, num_items: int, epoch: int, timeout: float = 600.0) -> dict:
        """Take epoch `epoch`'s `num_items` scored batches, drop stale ones, update on the rest, acknowledge."""
        got = self.take_items(scored_queue, num_items, epoch, timeout)
        metrics = self.train_got(got)
        scored_queue.ack([e for e, _ in got])
        return metrics

    def train_got(self, got: list) -> dict:
        """The DDPO update on taken entries (every data-parallel learner is given the same entries and
        runs its share of the minibatches). Reward metrics count every scored sample, trained on or not."""
        self.learner.progress = 0
        t0 = time.perf_counter()
        batches = [b for _, b in got]
        # arrival order depends on which sampler finished first: batches in a fixed order keep the reward
        # metrics' float sums reproducible; the update itself sees samples in seed order
        # (in_seed_order below), as on the local backend
        batches.sort(key=lambda b: (b.plans[0]["seed"], b.batch_id))
        samples = sum(len(b) for b in batches)
        batches, nonfinite = drop_nonfinite(batches, batches[0].epoch)
        version = self.learner.version
        fresh, dropped = split_stale(batches, version, self.cfg.replay.max_staleness)
        before = self.learner.snapshot()
        if fresh:
            metrics = self.learner.train(TrajectoryBatch.concat(fresh).in_seed_order())
        else:
            metrics = {"policy_version": version}
        metrics.update(self.learner.update_size(before))
        rewards = torch.cat([b.rewards for b in batches])
        for name in batches[0].reward_terms:  # each reward term on its own, beside the sum
            metrics[f"reward_{name}_mean"] = float(torch.cat([b.reward_terms[name] for b in batches]).mean())
        metrics.update(
            samples=samples,
            dropped_stale=dropped,
            dropped_nonfinite=nonfinite,
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
        before = self.learner.snapshot()
        m = self.learner.train_prompts(prompts, seeds)
        m.update(self.learner.update_size(before))
        m.update(dropped_stale=0, staleness_max=0, time_learn=time.perf_counter() - t0)
        return m

    def checksum(self) -> str:
        return self.learner.checksum()

    def checkpoint_state(self) -> dict:
        return self.learner.checkpoint_state()

    def restore(self, learner_state: dict, lora: dict) -> str:
        self.learner.load_state_dict(learner_state, lora)
        return self.learner.checksum()
