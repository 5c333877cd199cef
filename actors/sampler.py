"""SamplerActor: generates rollouts under DiffExp exploration and pushes them to the rollout queue (or, with
cluster.num_reward_actors 0, scores them itself and pushes them to the scored queue)."""

from __future__ import annotations

import time

import torch

from actors.common import ActorProcess, setup_actor
from common.config import RunConfig
from common.rollouts import RolloutGenerator


def rollout_batch_id(epoch: int, seed: int) -> str:
    """A training batch's identity: the same after a restarted sampler samples it again."""
    return f"e{epoch}-s{seed}"


class SamplerActor(ActorProcess):
    """Thin Ray wrapper over RolloutGenerator (create with `ray.remote(SamplerActor).options(...)`)."""

    def __init__(self, cfg: RunConfig, index: int):
        self.index = index
        device = setup_actor(cfg.cluster.sampler)
        self.gen = RolloutGenerator(cfg, device=device)
        self.scorer = None
        if cfg.cluster.num_reward_actors == 0:  # no reward actors: this sampler scores what it draws
            from actors.reward import RewardScorer

            self.scorer = RewardScorer(cfg, device)

    def set_weights(self, version: int, state: dict[str, torch.Tensor]) -> tuple[int, str]:
        """Load the LoRA state of `version` (Ray resolves the shared ObjectRef); answer (version, checksum)."""
        return self.gen.set_weights(version, state)

    def lora_state(self) -> dict[str, torch.Tensor]:
        return self.gen.lora_state()

    def held(self) -> tuple[int, str]:
        """(version, checksum) of the policy this sampler holds (the driver samples with a fresh sampler's
        version 0 before the learner is up)."""
        return self.gen.held()

    def sample(self, queue, prompts: list[str], seeds: list[int], epoch: int, weights: tuple[int, list] | None) -> dict:
        """Sample epoch `epoch`'s training rollouts in sampler batches, putting each batch to `queue` as soon
        as it is done. `weights` = (version, [ObjectRef of the LoRA state]) the rollouts must come from: a
        sampler restarted by Ray after a crash holds its initial weights and loads these first. A sampler
        that scores (no reward actors) puts scored batches, and `queue` is the scored queue."""
        self._hold(weights)
        t0 = time.perf_counter()
        bs = self.gen.cfg.sampling.batch_size
        items, t_reward = 0, 0.0
        for i in range(0, len(prompts), bs):
            batch = self.gen.generate(prompts[i : i + bs], seeds[i : i + bs], explore=True)
            batch.epoch, batch.batch_id = epoch, rollout_batch_id(epoch, seeds[i])
            if self.scorer is not None:
                t1 = time.perf_counter()
                self.scorer.score_rollouts([batch])
                t_reward += time.perf_counter() - t1
            queue.put(batch)
            items += 1
        return {"items": items, "samples": len(prompts), "time_sample": time.perf_counter() - t0 - t_reward,
                "time_reward": t_reward}  # fmt: skip

    def sample_eval(self, prompts: list[str], seeds: list[int], weights: tuple[int, list] | None = None):
        """Evaluation images: plain prompts, constant scale, fixed seeds. Returns the TrajectoryBatch. `weights` as
        for `sample`: a sampler that Ray restarted between the weight sync and this call would otherwise draw
        them from its initial weights (and the evaluation stop on the mixed versions)."""
        self._hold(weights)
        return self.gen.generate(prompts, seeds, explore=False)

    def _hold(self, weights: tuple[int, list] | None) -> None:
        """Load `weights` = (version, [ObjectRef of the LoRA state]) unless that version is held already."""
        if weights is not None and self.gen.version != weights[0]:
            import ray

            self.gen.set_weights(weights[0], ray.get(weights[1][0]))

    def score_batch(self, batch, details: bool = False, evaluation: bool = False):
        """RewardActor.score_batch, for a sampler that scores (cluster.num_reward_actors 0)."""
        if self.scorer is None:
            raise RuntimeError("this sampler does not score: cluster.num_reward_actors > 0 gives reward actors")
        return self.scorer.score_batch(batch, details, evaluation)
