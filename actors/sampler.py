"""SamplerActor: generates rollouts under DiffExp exploration and pushes them to the rollout queue."""

from __future__ import annotations

import time

import ray
import torch

from actors.common import peak_rss_mb, setup_actor
from common.config import RunConfig
from common.rollouts import RolloutGenerator


class SamplerActor:
    """Thin Ray wrapper over RolloutGenerator (create with `ray.remote(SamplerActor).options(...)`)."""

    def __init__(self, cfg: RunConfig, index: int):
        self.index = index
        self.gen = RolloutGenerator(cfg, device=setup_actor(cfg.cluster.sampler))

    def ready(self) -> int:
        return self.index

    def peak_rss_mb(self) -> float:
        return peak_rss_mb()

    def set_weights(self, version: int, state: dict[str, torch.Tensor]) -> tuple[int, str]:
        """Load the LoRA state of `version` (Ray resolves the shared ObjectRef); answer (version, checksum)."""
        return self.gen.set_weights(version, state)

    def lora_state(self) -> dict[str, torch.Tensor]:
        return self.gen.lora_state()

    def sample(self, queue, prompts: list[str], seeds: list[int]) -> dict:
        """Sample training rollouts in sampler batches, pushing each batch to `queue` as soon as it is done."""
        t0 = time.perf_counter()
        bs = self.gen.cfg.sampling.batch_size
        items = 0
        for i in range(0, len(prompts), bs):
            batch = self.gen.generate(prompts[i : i + bs], seeds[i : i + bs], explore=True)
            queue.put([ray.put(batch)])
            items += 1
        return {"items": items, "samples": len(prompts), "time_sample": time.perf_counter() - t0}

    def sample_eval(self, prompts: list[str], seeds: list[int]):
        """Evaluation images: plain prompts, constant scale, fixed seeds. Returns the TrajectoryBatch."""
        return self.gen.generate(prompts, seeds, explore=False)
