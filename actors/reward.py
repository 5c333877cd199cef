"""RewardActor: scores rollouts in batches and pushes them to the scored queue."""

from __future__ import annotations

import time

import torch

from actors.common import ActorProcess, setup_actor
from common.config import RunConfig
from common.trajectory import TrajectoryBatch
from rewards.combined import WeightedReward, score_in_batches


class RewardScorer:
    """The training and evaluation rewards of one process: a reward actor's, or a sampler's that scores its own
    batches (cluster.num_reward_actors 0)."""

    def __init__(self, cfg: RunConfig, device: str):
        self.cfg = cfg
        self.reward = WeightedReward(cfg.reward, device=device)  # learned rewards load their models once, here
        self.eval_reward = WeightedReward(cfg.eval.reward, device=device) if cfg.eval.reward else self.reward

    def score_rollouts(self, batches: list[TrajectoryBatch]) -> list[TrajectoryBatch]:
        """Set each batch's rewards and per-term scores (reward_terms), scoring them together."""
        big = TrajectoryBatch.concat(batches) if len(batches) > 1 else batches[0]
        total, parts = score_in_batches(self.reward, big.images_float(), big.prompts, self.cfg.reward.batch_size,
                                        keep_nonfinite=True)  # the learner drops and counts them  # fmt: skip
        start = 0
        for b in batches:
            b.rewards = total[start : start + len(b)].clone()
            b.reward_terms = {k: v[start : start + len(b)].clone() for k, v in parts.items()}
            start += len(b)
        return batches

    def score_batch(self, batch: TrajectoryBatch, details: bool = False, evaluation: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(rewards [B], per-term scores [B] by name, plus components with `details`) of training or
        evaluation images, in calls of at most reward.batch_size images."""
        reward = self.eval_reward if evaluation else self.reward
        return score_in_batches(reward, batch.images_float(), batch.prompts, self.cfg.reward.batch_size, details)


class RewardActor(ActorProcess):
    """Thin Ray wrapper over WeightedReward (create with `ray.remote(RewardActor).options(...)`)."""

    def __init__(self, cfg: RunConfig, index: int):
        device = setup_actor(cfg.cluster.reward)
        self.index = index
        self.cfg = cfg
        self.scorer = RewardScorer(cfg, device)

    def score_epoch(self, rollout_queue, scored_queue, epoch: int, num_items: int, timeout: float = 600.0,
                    claim_after_s: float = 120.0) -> dict:  # fmt: skip
        """Score epoch `epoch`'s rollout batches until the scored queue holds all `num_items` of them.

        Several reward actors share the work (whoever gets an entry scores it). A restarted actor first
        takes back the entries it had been given and not acknowledged; entries another consumer left
        pending for `claim_after_s` are taken over. A batch scored twice is put once (idempotent put)."""
        consumer = f"reward-{self.index}"
        per_call = max(1, self.cfg.reward.batch_size // self.cfg.sampling.batch_size)  # entries scored together
        t_busy, scored = 0.0, 0
        got = rollout_queue.pending(consumer, epoch)
        last = time.monotonic()
        while True:
            if not got:
                if scored_queue.puts(epoch) >= num_items:
                    break
                got = rollout_queue.get(per_call, 1.0, consumer, epoch)
                if not got:
                    got = rollout_queue.claim(consumer, claim_after_s, per_call)
                if not got:
                    if time.monotonic() - last > timeout:
                        raise TimeoutError(f"reward actor {self.index}: no rollouts of epoch {epoch} arrived within {timeout:.0f} s")
                    continue
            t0 = time.perf_counter()
            for b in self.scorer.score_rollouts([b for _, b in got]):
                scored_queue.put(b)
                scored += len(b)
            rollout_queue.ack([e for e, _ in got])
            t_busy += time.perf_counter() - t0
            last, got = time.monotonic(), []
        return {"samples_scored": scored, "time_reward": t_busy}

    def score_batch(self, batch: TrajectoryBatch, details: bool = False, evaluation: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.scorer.score_batch(batch, details, evaluation)
