"""The local backend of the epoch loop: sampler, reward and learner in this one process, no Ray.

For machines without Ray (the GPU bench box), debugging, sweeps and studies: it runs exactly the
classes the Ray actors wrap (RolloutGenerator, WeightedReward, DDPOLearner), in the same order, so a
local run and a Ray run with max_staleness 0 train on the same rollouts. The sampler shares the
learner's modules (one copy of the model in memory), so a weight sync only moves the version tag.
"""

from __future__ import annotations

import time

import torch

from common.config import RunConfig
from common.rollouts import RolloutGenerator
from learner.algorithm import make_algorithm
from learner.loop import EpochInputs, EvalResult, WeightSyncError
from learner.progress import NoProgress
from rewards.combined import WeightedReward, drop_nonfinite, score_in_batches


def local_device(cfg: RunConfig) -> str:
    """cluster.local_device, with 'auto' meaning CUDA when there is one."""
    d = cfg.cluster.local_device
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return d


class LocalSystem:
    """Sample -> score -> learn in one process (implements learner.loop.System)."""

    sampling_ahead = False

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        if cfg.cluster.local_torch_threads:
            torch.set_num_threads(cfg.cluster.local_torch_threads)
        device = local_device(cfg)
        self.reward = WeightedReward(cfg.reward, device=device)
        self.eval_reward = WeightedReward(cfg.eval.reward, device=device) if cfg.eval.reward else self.reward
        extra = (
            {"reward": self.reward} if cfg.algorithm.name == "alignprop" else {}
        )  # one copy of a learned reward
        self.learner = make_algorithm(cfg, device=device, **extra)
        self.gen = RolloutGenerator(cfg, device=device, model=self.learner.model)

    def sync_weights(self) -> tuple[int, str]:
        if self.gen.model is not self.learner.model:  # the sync below relies on the shared modules
            raise WeightSyncError("the local sampler does not share the learner's modules")
        self.gen.version = self.learner.version
        return self.learner.version, self.learner.checksum()

    def train_epoch(self, inputs: EpochInputs, next_inputs=None, progress=None) -> dict:
        prompts, seeds = inputs.prompts, inputs.seeds
        progress = progress or NoProgress()
        t0 = time.perf_counter()
        before = self.learner.snapshot()
        if not self.learner.uses_rollouts:  # AlignProp: the learner samples and scores with gradients
            m = self.learner.train_prompts(
                prompts, seeds, lambda n: progress.update(sampled=n, scored=n, trained=n)
            )
            m.pop("rewards")
            m.update(self.learner.update_size(before))
            m.update(
                dropped_stale=0,
                staleness_max=0,
                time_sample=0.0,
                time_reward=0.0,
                time_learn=time.perf_counter() - t0,
            )
            return m
        batch = self.gen.generate(prompts, seeds, explore=True, on_batch=lambda n: progress.update(sampled=n))
        t1 = time.perf_counter()
        batch.rewards, batch.reward_terms = score_in_batches(self.reward, batch.images_float(), batch.prompts,
                                                             self.cfg.reward.batch_size, keep_nonfinite=True)  # fmt: skip
        progress.update(scored=len(batch))
        samples = len(batch)
        (batch,), nonfinite = drop_nonfinite([batch], inputs.epoch)
        t2 = time.perf_counter()
        m = self.learner.train(batch.in_seed_order(), on_progress=lambda n: progress.update(trained=n))
        m.update(self.learner.update_size(before))
        m.update(
            {f"reward_{name}_mean": float(v.mean()) for name, v in batch.reward_terms.items()}
        )  # each term
        m.update(
            samples=samples, dropped_stale=0, dropped_nonfinite=nonfinite, staleness_max=0, trained_samples=len(batch),
            reward_mean=float(batch.rewards.mean()), reward_std=float(batch.rewards.std(unbiased=False)),
            time_sample=t1 - t0, time_reward=t2 - t1, time_learn=time.perf_counter() - t2,
        )  # fmt: skip
        return m

    def evaluate(self, prompts: list[str], seeds: list[int]) -> EvalResult:
        batch = self.gen.generate(prompts, seeds, explore=False)
        total, parts = score_in_batches(
            self.eval_reward, batch.images_float(), batch.prompts, self.cfg.reward.batch_size, True
        )
        return EvalResult(batch.images, total, parts, batch.policy_version)

    def checkpoint_state(self) -> dict:
        return self.learner.checkpoint_state()

    def restore(self, learner_state: dict, lora: dict) -> None:
        self.learner.load_state_dict(learner_state, lora)

    def shutdown(self) -> None:
        pass
