"""AlignProp: backpropagate a differentiable reward through the sampling chain into the LoRA weights.

The learner samples each minibatch itself, with DiffExp exploration inside the differentiable chain (each
rollout's per-step CFG scales and prompt weighting, drawn from its seed exactly as the samplers draw
them), through the same `guided_noise_pred` and `ddim_step_with_logprob` as DDPO. Gradients flow through
the last K denoising steps only (K ~ U{k_min..k_max} per minibatch, AlignProp's randomized truncation;
the steps before run without a graph), then through the VAE decode and the differentiable reward.
Loss: -coeff x reward, or |target - reward|. LoRA only, grad-norm clipping, gradient checkpointing of the
UNet with `algorithm.gradient_checkpointing`. Reward queries: every image scored for training.
"""

from __future__ import annotations

import numpy as np
import torch

from common.config import RunConfig
from common.exploration import plan_rollout
from common.sampling import denoise, initial_noise
from learner.algorithm import LoRALearner
from rewards.combined import WeightedReward


def sample_with_grad(model, cond, uncond, guidance: torch.Tensor, seeds: list[int], num_steps: int, eta: float,
                     k: int) -> torch.Tensor:  # fmt: skip
    """Final latents [B, C, h, w] of the samplers' DDIM chain (`denoise`), with gradients through the last `k` steps."""
    x = None
    for x, _ in denoise(
        model, cond, uncond, guidance, initial_noise(seeds, num_steps, model.latent_shape), eta, grad_steps=k
    ):
        pass
    return x


class AlignPropLearner(LoRALearner):
    uses_rollouts = False

    def __init__(self, cfg: RunConfig, device: str = "cpu", model=None, reward: WeightedReward | None = None):
        super().__init__(cfg, device, model)
        self.reward = (
            reward if reward is not None else WeightedReward(cfg.reward, device=str(self.model.device))
        )
        if not self.reward.differentiable:
            bad = [name for name, _, r in self.reward.terms if not r.differentiable]
            raise ValueError(f"algorithm.name=alignprop needs differentiable rewards; {bad} are not")

    def truncation(self) -> int:
        lo, hi = self.cfg.algorithm.alignprop.truncation
        return int(torch.randint(lo, hi + 1, (1,), generator=self.rng))

    def loss(self, reward: torch.Tensor) -> torch.Tensor:
        ap = self.cfg.algorithm.alignprop
        if ap.loss == "target":
            return (ap.target - reward).abs().mean()
        return -ap.coeff * reward.mean()

    def minibatch_loss(
        self, prompts: list[str], seeds: list[int], k: int
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(loss, rewards [m] detached, per-term scores) of one minibatch sampled with gradients through k steps."""
        s = self.cfg.sampling
        plans = [
            plan_rollout(p, sd, self.cfg.exploration, s.num_steps, s.guidance_scale, True)
            for p, sd in zip(prompts, seeds)
        ]
        cond = self.model.condition([p.weighted_prompt for p in plans])
        guidance = torch.tensor([p.guidance for p in plans], dtype=torch.float32)
        latents = sample_with_grad(self.model, cond, self.uncond, guidance, seeds, s.num_steps, s.eta, k)
        images = self.model.decode(latents)
        total, parts = self.reward.differentiable_total(images, prompts)
        return self.loss(total), total.detach().cpu(), parts

    def train_prompts(self, prompts: list[str], seeds: list[int], on_progress=None) -> dict[str, float]:
        """One epoch: minibatches of the prompts, sampled and scored with gradients, gradient accumulation,
        grad-norm clipping. Returns the metrics the loop logs (reward_mean/std over the training images)."""
        a = self.cfg.algorithm
        unet = self.model.unet
        unet.train()
        rewards, losses, ks = [], [], []
        terms: dict[str, list[torch.Tensor]] = {}
        self.progress = 0

        def run(rows: range, owned: bool, step_samples: int) -> None:
            k = self.truncation()  # drawn on every learner, so the draws stay in step
            if not owned:
                return
            loss, r, parts = self.minibatch_loss(
                prompts[rows.start : rows.stop], seeds[rows.start : rows.stop], k
            )
            (loss * self.step_share(len(rows), step_samples) / a.gradient_accumulation).backward()
            rewards.append(r)
            losses.append(float(loss.detach()))
            ks.append(k)
            for name, v in parts.items():
                terms.setdefault(name, []).append(v)

        n = len(prompts)
        chunks = [range(start, min(start + a.minibatch_size, n)) for start in range(0, n, a.minibatch_size)]
        grad_norms, _ = self._accumulation_pass(chunks, run, on_progress)
        unet.eval()
        self.version += 1
        r = torch.cat(rewards) if rewards else torch.zeros(0)
        out = {
            "samples": len(prompts), "reward_mean": float(r.mean()), "reward_std": float(r.std(unbiased=False)),
            "loss": float(np.mean(losses)), "grad_norm": float(np.mean(grad_norms)), "truncation_k": float(np.mean(ks)),
            "trained_samples": int(r.numel()), "policy_version": self.version,
        }  # fmt: skip
        out.update({f"reward_{name}_mean": float(torch.cat(v).mean()) for name, v in terms.items()})
        out["rewards"] = r  # this learner's share (data-parallel runs combine them); not logged
        return out
