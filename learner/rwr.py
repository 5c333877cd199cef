"""Reward-weighted regression (RWR) on the samplers' rollouts: the DDPO paper's other estimator.

Black et al. (2023) compare DDPO with RWR: fine-tune the diffusion model's own denoising loss on its
samples, each weighted by its reward. It needs no log-probs: each scored sample's final latent x_0 is
noised again at a random training timestep t, and the loss is the weighted noise-prediction error

    L = sum_i w_i |eps_theta(sqrt(a_t) x0_i + sqrt(1 - a_t) eps, t, c_i) - eps|^2 / sum_i w_i.

The weights come from the same per-prompt advantages as DDPO's (the learner's stat tracker):

- `exp`: w = exp(A / temperature) (RWR);
- `filter`: w = 1 for the samples whose advantage exceeds `min_advantage`, else 0 (sparse RWR: a
  rejection-sampling fine-tune on the better samples of each prompt, which skips the rest entirely).

`min_reward` also drops every sample below an absolute reward, and `uncond_fraction` trains that share
of the pairs with the CFG negative instead of the prompt (caption dropout). With `guided` the regressed
prediction is the classifier-free guided one, eps_u + s (eps_c - eps_u) at the sampling scale s (or
`guided_scale`): the samples came from that denoiser, so fitting it, rather than the conditional branch
alone (which guidance then extrapolates further at sampling time), trains the policy that samples next.
On Shapes the first shrinks eps_c - eps_u and the second grows it (docs/results.md). With `ema_decay` the
module holds an exponential moving average of the trained weights between updates (what the samplers get and
checkpoints keep), and the raw weights are swapped back in for the next update.

Its gradient is a supervised regression target per sample, so its variance does not grow with the
policy-gradient noise of the stochastic DDIM steps, which is what keeps DDPO flat on Shapes at CPU
batch sizes (docs/results.md). `algorithm.timestep_window` restricts the noise levels as it restricts
DDPO's steps: (0, 0.5) draws t from the noisier half, where a composition's layout is decided.
Conditioning: the plain prompt the reward judged (default), or the trajectory's own re-weighted
conditioning (`condition: sampled`).
"""

from __future__ import annotations

import numpy as np
import torch

from common.config import RunConfig
from common.exploration import parse_prompt
from common.sampling import guided_noise_pred
from common.trajectory import TrajectoryBatch
from learner.ddpo import DDPOLearner


def rwr_weights(adv: torch.Tensor, weighting: str, temperature: float, min_advantage: float) -> torch.Tensor:
    """Per-sample weights [B] from advantages [B], normalised to mean 1 over the kept (w > 0) samples."""
    if not torch.isfinite(adv).any():  # every sample excluded (min_reward)
        return torch.zeros_like(adv)
    if weighting == "exp":
        w = torch.exp((adv - adv.max()) / temperature)  # shift for stability; normalised below
    else:
        w = (adv > min_advantage).float()
    kept = w > 0
    if kept.any():
        w = w / w[kept].mean()
    return w


class RWRLearner(DDPOLearner):
    """Reward-weighted denoising loss on LoRA weights (shares DDPO's advantage tracker and checkpoints)."""

    uses_rollouts = True

    def __init__(self, cfg: RunConfig, device: str = "cpu", model=None):
        super().__init__(cfg, device, model)
        sch = self.model.scheduler
        if sch.config.prediction_type != "epsilon":
            raise ValueError(
                f"algorithm.name=rwr needs an epsilon-prediction model (this scheduler's prediction_type is "
                f"{sch.config.prediction_type!r})"
            )
        self.alphas_cumprod = sch.alphas_cumprod.float()
        n = sch.config.num_train_timesteps
        lo, hi = cfg.algorithm.timestep_window  # fractions of the denoising chain, 0 = the noisiest step
        self.raw: list[torch.Tensor] | None = (
            None  # ema_decay > 0: the trained weights while the EMA is published
        )
        self.ema: list[torch.Tensor] | None = None
        first = round(n * (1 - hi))
        self.t_range = (first, max(round(n * (1 - lo)), first + 1))

    def noisy(self, x0: torch.Tensor, n_t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t [m*n_t, ...], t [m*n_t], eps) for each x0 repeated n_t times, t and eps from the learner's RNG."""
        x0 = x0.repeat_interleave(n_t, 0)
        t = torch.randint(self.t_range[0], self.t_range[1], (x0.shape[0],), generator=self.rng)
        eps = torch.randn(x0.shape, generator=self.rng)
        a = self.alphas_cumprod[t].view(-1, *([1] * (x0.dim() - 1)))
        return a.sqrt() * x0 + (1 - a).sqrt() * eps, t, eps

    @torch.no_grad()
    def targets(self, batch: TrajectoryBatch, kept: torch.Tensor) -> torch.Tensor:
        """x0 [B, C, h, w] to regress on: the final latents, or (target=reencode) the kept images encoded again
        by the VAE, one posterior draw each from the learner's RNG (rows not kept stay as they were)."""
        x0 = batch.latents[:, -1].clone()
        if self.cfg.algorithm.rwr.target == "reencode" and len(kept):
            vae = self.model.vae
            dtype = next(vae.parameters()).dtype
            images = batch.images[kept].to(self.model.device, dtype) / 127.5 - 1.0
            post = vae.encode(images).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=self.rng).to(post.mean)
            x0[kept] = (z * vae.config.scaling_factor).float().cpu()
        return x0

    # ------------------------------------------------------------------ EMA
    def _step(self) -> float:
        d = self.cfg.algorithm.rwr.ema_decay
        if d > 0 and self.ema is None:  # the average starts at the weights before the first update
            self.ema = [p.detach().clone() for p in self.params]
        norm = super()._step()
        if d > 0:
            with torch.no_grad():
                for e, p in zip(self.ema, self.params):
                    e.mul_(d).add_(p.detach(), alpha=1 - d)
        return norm

    @torch.no_grad()
    def _swap_in_raw(self) -> None:
        if self.raw is not None:
            for p, r in zip(self.params, self.raw):
                p.copy_(r)
            self.raw = None

    @torch.no_grad()
    def _publish_ema(self) -> None:
        if self.ema is not None:
            self.raw = [p.detach().clone() for p in self.params]
            for p, e in zip(self.params, self.ema):
                p.copy_(e)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rwr_raw": self.raw, "rwr_ema": self.ema}

    def load_state_dict(self, state: dict, lora: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state, lora)
        self.raw, self.ema = state.get("rwr_raw"), state.get("rwr_ema")

    def train(self, batch: TrajectoryBatch, on_progress=None) -> dict[str, float]:
        """`inner_epochs` passes of the weighted denoising loss over the kept samples of a scored batch."""
        a, r = self.cfg.algorithm, self.cfg.algorithm.rwr
        if batch.rewards is None:
            raise ValueError("RWRLearner.train needs a scored batch (rewards is None)")
        adv, info = self.advantages(batch)
        if r.min_reward is not None:  # an absolute bar on top of the relative one
            adv = torch.where(batch.rewards >= r.min_reward, adv, torch.full_like(adv, -float("inf")))
        w = rwr_weights(adv, r.weighting, r.temperature, r.min_advantage)
        kept = torch.nonzero(w > 0).flatten()
        if r.condition == "plain":
            cond = self.model.condition([parse_prompt(p) for p in batch.prompts])
        else:
            cond = batch.cond
        x0_all = self.targets(batch, kept)
        self._swap_in_raw()
        unet = self.model.unet
        unet.train()
        losses, grad_norms = [], []
        done = 0
        self.progress = 0
        for _ in range(a.inner_epochs):
            perm = kept[torch.randperm(len(kept), generator=self.rng)]

            def run(idx: torch.Tensor, owned: bool, step_samples: int) -> None:
                xt, t, eps = self.noisy(
                    x0_all[idx], r.timesteps_per_sample
                )  # drawn on every learner: in step
                drop = torch.rand(len(t), generator=self.rng) < r.uncond_fraction  # caption dropout
                if not owned:
                    return
                rows = idx.repeat_interleave(r.timesteps_per_sample)
                c = {k: v[rows].clone() for k, v in cond.items()}
                if drop.any():
                    for k, v in self.uncond.items():
                        c[k][drop] = v.to(c[k].device, c[k].dtype).expand(int(drop.sum()), *v.shape[1:])
                c = {k: v.to(self.model.device) for k, v in c.items()}
                dev = self.model.device
                if r.guided:  # the policy's own denoiser: both halves of the CFG pair, at the sampling scale
                    s = r.guided_scale if r.guided_scale is not None else self.cfg.sampling.guidance_scale
                    scale = torch.full((len(t),), float(s))
                    pred = guided_noise_pred(self.model, xt.to(dev), t.to(dev), c, self.uncond, scale)
                else:
                    pred = self.model.predict(xt.to(dev), t.to(dev), c)
                mse = ((pred.float() - eps.to(pred.device)) ** 2).flatten(1).mean(1)
                wl = w[rows].to(pred.device) * mse
                # the mean over an optimizer step's (sample, t) pairs, as DDPO's loss is (the step's samples,
                # not the nominal minibatch_size x gradient_accumulation: a last step may hold fewer)
                share = self.step_share(a.minibatch_size, step_samples)
                (wl.sum() * share / (a.minibatch_size * r.timesteps_per_sample * a.gradient_accumulation)).backward()
                losses.append(float(wl.detach().mean()))

            chunks = [
                perm[start : start + a.minibatch_size] for start in range(0, len(perm), a.minibatch_size)
            ]
            norms, done = self._accumulation_pass(chunks, run, on_progress, done)
            grad_norms += norms
        unet.eval()
        self._publish_ema()
        self.version += 1
        out = {
            "loss": float(np.mean(losses)) if losses else 0.0,
            "grad_norm": float(np.mean(grad_norms)) if grad_norms else 0.0,
            "kept_frac": len(kept) / max(len(batch), 1),
            "weight_max": float(w.max()) if len(w) else 0.0,  # a large max = a few samples dominate
            "policy_version": self.version,
        }
        out.update(info)
        return out
