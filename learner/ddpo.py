"""The DDPO learner: PPO-clipped policy gradient over DDIM steps, on LoRA weights (no Ray here).

It recomputes each trajectory's log-probs with the trajectory's own per-step
CFG scales and conditioning, through the same `recompute_logprobs` /
`ddim_step_with_logprob` code the sampler used, so on-policy ratios are
exactly 1 up to float error. Timesteps of a minibatch go through the UNet
together: DDPO's loss sums over samples and timesteps, so batching them gives
the same gradient as a loop, with fewer, larger forward passes.
"""

from __future__ import annotations

import numpy as np
import torch

from common.config import RunConfig, window_steps
from common.models.base import cond_index
from common.sampling import recompute_logprobs
from common.trajectory import TrajectoryBatch
from learner.algorithm import LoRALearner
from learner.stat_tracker import PerPromptStatTracker


def ppo_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clipped loss (mean over elements) and its diagnostics; all inputs [N]."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        info = {
            "approx_kl": 0.5 * ((log_prob - old_log_prob) ** 2).mean(),
            "clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "ratio_mean": ratio.mean(),
            "logprob_mismatch": (log_prob - old_log_prob).abs().max(),
        }
    return loss, info


class DDPOLearner(LoRALearner):
    """DDPO on the samplers' rollouts: the LoRA learner plus the per-prompt advantage tracker."""

    uses_rollouts = True

    def __init__(self, cfg: RunConfig, device: str = "cpu", model=None):
        super().__init__(cfg, device, model)
        a = cfg.algorithm
        self.tracker = PerPromptStatTracker(a.stat_tracking.buffer_size, a.stat_tracking.min_count)

    # ---------------------------------------------------------------- advantages
    def advantages(self, batch: TrajectoryBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-prompt normalised, clipped advantages [B] and how many prompts had zero reward spread."""
        rewards = batch.rewards.numpy().astype(np.float64)
        if self.cfg.algorithm.stat_tracking.per_prompt:
            adv = self.tracker.update(batch.prompts, rewards)
        else:
            adv = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
        groups: dict[str, list[float]] = {}
        for p, r in zip(batch.prompts, rewards):
            groups.setdefault(p, []).append(r)
        zero = [np.std(v) == 0 for v in groups.values() if len(v) > 1]
        m = self.cfg.algorithm.adv_clip_max
        adv_t = torch.from_numpy(np.clip(adv, -m, m)).float()
        return adv_t, {"zero_std_frac": float(np.mean(zero)) if zero else 0.0}

    # -------------------------------------------------------------------- update
    def train(self, batch: TrajectoryBatch, on_progress=None) -> dict[str, float]:
        """Run `inner_epochs` PPO passes over a scored batch; returns the epoch's diagnostics.

        `on_progress(samples_done)` is called after each minibatch, counting samples over all inner epochs.

        `logprob_mismatch` and `ratio_mean` come from the first minibatch, before the
        epoch's first optimizer step: with max_staleness 0 they must be 0 and 1 up to float error.
        """
        a = self.cfg.algorithm
        if batch.rewards is None:
            raise ValueError("DDPOLearner.train needs a scored batch (rewards is None)")
        adv, info = self.advantages(batch)
        b, t = batch.log_probs.shape
        # over the configured chain: with sampling.tail_steps the rollouts record only its first steps
        window, t_train = window_steps(self.cfg.sampling.num_steps, a.timestep_window, a.timestep_fraction)
        if window[-1] >= t:
            raise ValueError(
                f"the batch records {t} steps but algorithm.timestep_window {list(a.timestep_window)} of "
                f"sampling.num_steps={self.cfg.sampling.num_steps} trains up to step {window[-1] + 1}: the "
                "rollouts were sampled with another sampling.num_steps or timestep_window"
            )
        window_t = torch.tensor(window)
        unet = self.model.unet
        unet.train()
        sums = {"approx_kl": 0.0, "clipfrac": 0.0, "ratio_mean": 0.0, "loss": 0.0}
        n_mb = 0
        first: dict[str, float] = {}
        grad_norms = []
        done = 0
        self.progress = 0
        for _ in range(a.inner_epochs):
            perm = torch.randperm(b, generator=self.rng)
            steps = torch.stack(
                [window_t[torch.randperm(len(window), generator=self.rng)[:t_train]] for _ in range(b)]
            )  # [B, T']

            def run(idx: torch.Tensor, owned: bool, step_samples: int, steps: torch.Tensor = steps) -> None:
                nonlocal n_mb, first
                if not owned:
                    return
                share = self.step_share(len(idx), step_samples)
                mb_info = self._minibatch_backward(batch, adv, idx, steps[idx], share)
                if not first:  # before the epoch's first optimizer step: must be on-policy
                    first = {
                        "logprob_mismatch": mb_info["logprob_mismatch"],
                        "ratio_mean": mb_info["ratio_mean"],
                    }
                for k in sums:
                    sums[k] += mb_info[k]
                n_mb += 1

            chunks = [perm[start : start + a.minibatch_size] for start in range(0, b, a.minibatch_size)]
            norms, done = self._accumulation_pass(chunks, run, on_progress, done)
            grad_norms += norms
        unet.eval()
        self.version += 1
        out = {k: v / max(n_mb, 1) for k, v in sums.items()}
        out["ratio_mean_all"] = out.pop(
            "ratio_mean"
        )  # over the whole epoch; ratio_mean is the first minibatch's
        out.update(first)
        out.update(info)
        out["grad_norm"] = float(np.mean(grad_norms)) if grad_norms else 0.0
        out["policy_version"] = self.version
        return out

    def _minibatch_backward(
        self, batch: TrajectoryBatch, adv: torch.Tensor, idx: torch.Tensor, steps: torch.Tensor, share: float = 1.0
    ) -> dict[str, float]:
        """Forward and backward of one minibatch's (sample, timestep) pairs, in UNet calls bounded by
        `timestep_chunk` and `max_unet_batch`; each call's loss is weighted by its share of the pairs, so
        the accumulated gradient equals that of one call over all of them. The minibatch's loss, a mean over
        its pairs, is backpropagated times `share / gradient_accumulation` (`step_share`)."""
        a = self.cfg.algorithm
        m, t_train = steps.shape
        chunk = a.timestep_chunk or t_train
        per_call = max(1, a.max_unet_batch // 2) if a.max_unet_batch else m * t_train  # CFG doubles each pair
        total = m * t_train
        acc = {"approx_kl": 0.0, "clipfrac": 0.0, "ratio_mean": 0.0, "loss": 0.0, "logprob_mismatch": 0.0}
        for c0 in range(0, t_train, chunk):
            j_block = steps[:, c0 : c0 + chunk]  # [m, c]
            rows_block = idx.unsqueeze(1).expand(-1, j_block.shape[1])
            rows_all, j_all = rows_block.flatten(), j_block.flatten()  # sample-major pairs
            for p0 in range(0, rows_all.numel(), per_call):
                rows, j = rows_all[p0 : p0 + per_call], j_all[p0 : p0 + per_call]
                lat = batch.latents[rows, j]
                nxt = batch.latents[rows, j + 1]
                cond = cond_index(batch.cond, rows)
                lp = recompute_logprobs(
                    self.model, lat, nxt, batch.timesteps[j], cond, self.uncond, batch.guidance[rows, j],
                    self.cfg.sampling.num_steps, self.cfg.sampling.eta,
                )  # fmt: skip
                loss, info = ppo_loss(
                    lp, batch.log_probs[rows, j].to(lp.device), adv[rows].to(lp.device), a.clip_range
                )
                weight = rows.numel() / total
                (loss * weight * share / a.gradient_accumulation).backward()
                acc["loss"] += float(loss.detach()) * weight
                for k in ("approx_kl", "clipfrac", "ratio_mean"):
                    acc[k] += float(info[k]) * weight
                acc["logprob_mismatch"] = max(acc["logprob_mismatch"], float(info["logprob_mismatch"]))
        return acc

    def state_dict(self) -> dict:
        return {**super().state_dict(), "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict, lora: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state, lora)
        self.tracker.load_state_dict(state["tracker"])
