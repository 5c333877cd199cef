"""Rollout generation: prompts and seeds in, a TrajectoryBatch out (no Ray here).

`RolloutGenerator` holds a frozen pipeline plus the LoRA adapter. The Ray
SamplerActor is a thin wrapper around it, and the single-process loop uses it
directly, so both run exactly the same code.
"""

from __future__ import annotations

import torch

from common.config import RunConfig
from common.config_algorithm import window_steps
from common.exploration import plan_rollout
from common.pipelines import fused_lora, load_lora_state, load_policy, lora_checksum, lora_state
from common.sampling import sample_rollout
from common.trajectory import TrajectoryBatch


def sample_seeds(base_seed: int, epoch: int, count: int, offset: int = 0) -> list[int]:
    """Deterministic per-sample seeds for one epoch's rollouts."""
    g = torch.Generator().manual_seed((base_seed * 1_000_003 + epoch * 7919 + 17) % (2**63))
    seeds = torch.randint(0, 2**62, (offset + count,), generator=g).tolist()
    return seeds[offset:]


class RolloutGenerator:
    """Samples trajectories with DiffExp exploration from the current LoRA policy."""

    def __init__(self, cfg: RunConfig, device: str = "cpu", model=None):
        """`model`: a loaded policy to share (the local backend samples with the learner's modules)."""
        self.cfg = cfg
        self.model = model if model is not None else load_policy(cfg.model, cfg.lora, device, cfg.sampling.resolution)
        if cfg.sampling.channels_last:  # convolution weights (and so their outputs) in NHWC
            self.model.unet.to(memory_format=torch.channels_last)
        if cfg.sampling.compile:
            self.model.sampling_unet = self.model.compiled_unet(cfg.sampling.compile, "sampling.compile")
        self.version = 0
        # sampling.tail_steps: training rollouts stop recording where DDPO's trained window ends
        self.head = None
        if cfg.sampling.tail_steps:
            a = cfg.algorithm
            self.head = window_steps(cfg.sampling.num_steps, a.timestep_window, a.timestep_fraction)[0][-1] + 1

    def set_weights(self, version: int, state: dict[str, torch.Tensor]) -> tuple[int, str]:
        """Load LoRA `state` as policy `version`; answer with the version and a checksum of what is now held."""
        load_lora_state(self.model.unet, state)
        self.version = version
        return self.held()

    def held(self) -> tuple[int, str]:
        """(version, checksum) of the policy held now; a fresh generator holds version 0, the seeded initial LoRA."""
        return self.version, lora_checksum(lora_state(self.model.unet))

    def lora_state(self) -> dict[str, torch.Tensor]:
        return lora_state(self.model.unet)

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], explore: bool = True, on_batch=None) -> TrajectoryBatch:
        """Sample one trajectory per (prompt, seed); exploration only if `explore` (training rollouts).
        `on_batch(samples_done)` is called after each sampler batch (progress). With `sampling.fuse_lora` the
        LoRA is folded into the UNet's weights for the call (the local backend's learner shares these modules,
        so they are unfolded before it returns)."""
        if not self.cfg.sampling.fuse_lora:
            return self._generate(prompts, seeds, explore, on_batch)
        with fused_lora(self.model.unet):
            return self._generate(prompts, seeds, explore, on_batch)

    def _generate(self, prompts: list[str], seeds: list[int], explore: bool, on_batch) -> TrajectoryBatch:
        s = self.cfg.sampling
        out = []
        for i in range(0, len(prompts), s.batch_size):
            ps, ss = prompts[i : i + s.batch_size], seeds[i : i + s.batch_size]
            plans = [plan_rollout(p, sd, self.cfg.exploration, s.num_steps, s.guidance_scale, explore) for p, sd in zip(ps, ss)]
            cond = self.model.condition([p.weighted_prompt for p in plans])
            guidance = torch.tensor([p.guidance for p in plans], dtype=torch.float32)
            head = self.head if explore else None
            roll = sample_rollout(self.model, cond, self.model.negative(), guidance, ss, s.num_steps, s.eta,
                                  head=head, tail_steps=s.tail_steps or 0)  # fmt: skip
            # quantised on the device: a quarter of the bytes cross to the host
            images = self.model.decode(roll.x0.to(self.model.device))
            images = (images * 255).round().to(torch.uint8).cpu()
            out.append(
                TrajectoryBatch(
                    prompts=list(ps), plans=[p.to_json() for p in plans], latents=roll.latents,
                    log_probs=roll.log_probs, timesteps=roll.timesteps, cond=cond,
                    guidance=guidance[:, : roll.timesteps.shape[0]],  # the recorded steps'
                    images=images, policy_version=self.version, evaluation=not explore,
                )
            )
            if on_batch is not None:
                on_batch(i + len(ps))
        return TrajectoryBatch.concat(out) if len(out) > 1 else out[0]
