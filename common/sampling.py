"""DDIM sampling with per-step log-probs, shared by the sampler and the learner.

`ddim_step_with_logprob` is a pure function of its inputs: the sampler uses it
to draw x_{t-1} ~ N(mean, std^2) and record log p(x_{t-1} | x_t); the learner
calls the same function with `prev_sample` given to recompute that log-prob
under the current policy. `guided_noise_pred` is the one CFG forward both use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from common.ddim_schedule import alphas_on, scheduler_timesteps, step_options
from common.models.base import Cond, DiffusionModel, cond_expand, cond_to

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def ddim_step_with_logprob(
    alphas_cumprod: torch.Tensor,
    final_alpha_cumprod: float,
    num_train_timesteps: int,
    num_steps: int,
    model_output: torch.Tensor,
    timestep: torch.Tensor,
    sample: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    prediction_type: str = "epsilon",
    prev_timestep: torch.Tensor | None = None,
    clip_sample: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_{t-1} with eta > 0 and its Gaussian log-prob.

    model_output, sample, prev_sample, noise: [B, C, h, w]; timestep: [B] long.
    Returns (prev_sample [B, C, h, w], log_prob [B]); the log-prob is the mean over latent
    dimensions (as DDPO does), so PPO ratios stay O(1) whatever the latent size. A drawn prev_sample
    carries gradients to the model output (for reward backpropagation); the log-prob treats the sample
    as data.
    If prev_sample is None it is drawn as mean + std * noise (noise ~ N(0, I) required).
    `prev_timestep` [B] (default: timestep - num_train_timesteps // num_steps; negative: the final alpha)
    makes it a jump over several of the schedule's steps (the coarse deterministic tail, `sampling.tail_steps`).
    `clip_sample`: clip the x_0 prediction to [-clip_sample, clip_sample] (a scheduler's `clip_sample`; see
    `step_options`).
    """
    ac = alphas_cumprod.to(sample.device, torch.float32)
    prev_t = timestep - num_train_timesteps // num_steps if prev_timestep is None else prev_timestep
    shape = (-1,) + (1,) * (sample.ndim - 1)
    a_t = ac[timestep].view(shape)
    a_prev = torch.where(prev_t >= 0, ac[prev_t.clamp(min=0)], torch.full_like(prev_t, final_alpha_cumprod, dtype=ac.dtype))
    a_prev = a_prev.view(shape)
    b_t = 1 - a_t
    out = model_output.float()
    x = sample.float()
    if prediction_type == "epsilon":
        eps = out
        x0 = (x - b_t.sqrt() * eps) / a_t.sqrt()
    elif prediction_type == "v_prediction":
        x0 = a_t.sqrt() * x - b_t.sqrt() * out
        eps = a_t.sqrt() * out + b_t.sqrt() * x
    else:
        raise ValueError(f"prediction_type {prediction_type!r} is not supported (epsilon, v_prediction)")
    if clip_sample is not None:  # diffusers' DDIM step clips x_0 and keeps eps as predicted
        x0 = x0.clamp(-clip_sample, clip_sample)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.clamp(min=1e-20).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    if prev_sample is None:
        if noise is None:
            raise ValueError("ddim_step_with_logprob needs `noise` when `prev_sample` is not given")
        prev_sample = mean + std * noise.to(mean.device, mean.dtype)
    prev_sample = prev_sample.float()
    # the log-prob's gradient flows through the mean only (DDPO); the returned sample keeps its graph, so
    # reward backpropagation (AlignProp) differentiates through the chain with this same function
    if eta == 0:  # deterministic DDIM (reward backpropagation and evaluation only): no density, log-prob 0
        return prev_sample, torch.zeros(prev_sample.shape[0], device=prev_sample.device)
    log_prob = -((prev_sample.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def guided_noise_pred(
    model: DiffusionModel,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    cond: Cond,
    uncond: Cond,
    scale: torch.Tensor,
) -> torch.Tensor:
    """Classifier-free guided prediction, one UNet call on [uncond; cond].

    latents [N, C, h, w], timesteps [N], cond: each tensor [N, ...]; uncond: each [N, ...] or [1, ...];
    scale [N]. Returns eps_u + scale * (eps_c - eps_u), [N, C, h, w] float32.
    """
    n = latents.shape[0]
    device = latents.device
    uncond = cond_expand(cond_to(uncond, device), n)
    both = {k: torch.cat([uncond[k], v.to(device)]) for k, v in cond.items()}
    out = model.predict(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), both)
    eps_u, eps_c = out.chunk(2)
    return eps_u + scale.view(-1, 1, 1, 1).to(out.dtype) * (eps_c - eps_u)


@dataclass
class Rollout:
    """Result of sampling B images: the chain of latents and each step's log-prob."""

    latents: torch.Tensor  # [B, T+1, C, h, w], x_T first
    log_probs: torch.Tensor  # [B, T]
    timesteps: torch.Tensor  # [T]
    final: torch.Tensor | None = None  # [B, C, h, w] x_0 when the recorded chain stops early (a coarse tail)

    @property
    def x0(self) -> torch.Tensor:
        """The finished latents [B, C, h, w]: the chain's last, or the coarse tail's result."""
        return self.latents[:, -1] if self.final is None else self.final


def initial_noise(seeds: list[int], num_steps: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Per-sample noise [B, T+1, *shape] from each sample's own seed (x_T, then one draw per step)."""
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s) % (2**63))
        out.append(torch.randn((num_steps + 1, *shape), generator=g))
    return torch.stack(out)


class LazyNoise:
    """`initial_noise`'s values, drawn step by step as the chain consumes them, so that drawing them on the host
    overlaps the device's work on the steps before instead of delaying the first step (on an H200 drawing the
    whole [16, 51, 4, 64, 64] block first took 0.12 s of a 5 s SD1.5 call).

    Each sample's generator draws its steps in order. torch's CPU normal sampler fills blocks of 16 values, so
    when one step's size is a multiple of 16 this equals `initial_noise`'s single draw (`rollout_noise` checks
    that and falls back to it otherwise)."""

    def __init__(self, seeds: list[int], num_steps: int, shape: tuple[int, ...]):
        self.gens = [torch.Generator().manual_seed(int(s) % (2**63)) for s in seeds]
        self.num_steps, self.step_shape = num_steps, tuple(shape)
        self.drawn: list[torch.Tensor] = []

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.gens), self.num_steps + 1, *self.step_shape)

    def step(self, i: int) -> torch.Tensor:
        """Draw i [B, C, h, w] (0: x_T; i >= 1: step i's noise), on the CPU."""
        while len(self.drawn) <= i:
            self.drawn.append(torch.stack([torch.randn(self.step_shape, generator=g) for g in self.gens]))
        return self.drawn[i]


def rollout_noise(seeds: list[int], num_steps: int, shape: tuple[int, ...]) -> LazyNoise | torch.Tensor:
    """The noise of `sample_rollout`: `initial_noise`'s values, drawn lazily where that gives the same values."""
    if math.prod(shape) % 16 == 0:
        return LazyNoise(seeds, num_steps, shape)
    return initial_noise(seeds, num_steps, shape)


def _noise_on(noise: LazyNoise | torch.Tensor, i: int, device: torch.device) -> torch.Tensor:
    """Draw i [B, C, h, w] of `noise` on `device`; a lazy draw is copied without stalling the device's queue."""
    if isinstance(noise, torch.Tensor):
        return noise[:, i]
    x = noise.step(i)
    if device.type == "cuda":  # from pinned memory the copy is asynchronous (a pageable one may synchronise)
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def denoise(
    model: DiffusionModel,
    cond: Cond,
    uncond: Cond,
    guidance: torch.Tensor,
    noise: torch.Tensor,
    eta: float,
    grad_steps: int = 0,
):
    """The DDIM chain from `noise` [B, T+1, C, h, w] (`initial_noise`: x_T, then one draw per step; or the same
    as `LazyNoise`): yields (x_{t-1} [B, C, h, w], log-prob [B]) step by step.

    guidance [B, T]: per-sample, per-step CFG scales. Gradients flow through the last `grad_steps` steps
    only (the steps before run without a graph): 0 for the samplers, K for AlignProp's truncation. Both
    uses share this one loop, so for the same seeds and weights they produce the same latents.
    """
    sch = model.scheduler
    device = model.device
    num_steps = noise.shape[1] - 1
    ts = scheduler_timesteps(sch, num_steps)
    if isinstance(noise, torch.Tensor):
        noise = noise.to(device)
    cond, uncond, guidance = cond_to(cond, device), cond_to(uncond, device), guidance.to(device)
    x = _noise_on(noise, 0, device)
    final, alphas, options = float(sch.final_alpha_cumprod), alphas_on(sch, device), step_options(sch)
    for i, t in enumerate(ts.tolist()):
        on = i >= num_steps - grad_steps and torch.is_grad_enabled()
        with torch.set_grad_enabled(on):
            tt = torch.full((x.shape[0],), t, dtype=torch.long, device=device)
            eps = guided_noise_pred(model, x, tt, cond, uncond, guidance[:, i])
            x, lp = ddim_step_with_logprob(
                alphas, final, sch.config.num_train_timesteps, num_steps, eps, tt, x, eta,
                noise=_noise_on(noise, i + 1, device), **options,
            )  # fmt: skip
        if not on:
            x = x.detach()
        yield x, lp


@torch.no_grad()
def sample_rollout(
    model: DiffusionModel,
    cond: Cond,
    uncond: Cond,
    guidance: torch.Tensor,
    seeds: list[int],
    num_steps: int,
    eta: float,
    head: int | None = None,
    tail_steps: int = 0,
) -> Rollout:
    """DDIM-sample B latents with per-sample, per-step guidance [B, T], recording the chain and log-probs.

    With `head` < T only the first `head` steps are taken (and recorded) as given; the image is then finished
    from there by `coarse_tail` in `tail_steps` deterministic jumps, and the Rollout's `final` holds it. The
    recorded steps are the same latents and log-probs as the full chain's first `head`.
    """
    sch = model.scheduler
    ts = scheduler_timesteps(sch, num_steps)
    head = num_steps if head is None else head
    if not 1 <= head <= num_steps:
        raise ValueError(f"head={head} must be in [1, num_steps={num_steps}]")
    if head < num_steps and tail_steps < 1:
        raise ValueError(f"a chain cut after {head} of {num_steps} steps needs tail_steps >= 1")
    noise = rollout_noise(seeds, num_steps, model.latent_shape)
    chain = _HostChain((noise.shape[0], head + 1, *noise.shape[2:]), model.device)
    chain.put(0, _noise_on(noise, 0, torch.device("cpu")))  # x_T
    logps, x = [], None
    for i, (x, lp) in enumerate(denoise(model, cond, uncond, guidance, noise, eta)):
        chain.put(i + 1, x)
        logps.append(lp)
        if i + 1 == head:
            break
    final = None
    if head < num_steps:
        final = coarse_tail(model, cond, uncond, guidance, x, ts, head, tail_steps).cpu()
    return Rollout(chain.result(), torch.stack(logps, 1).cpu(), ts[:head], final)


def tail_indices(num_steps: int, start: int, tail_steps: int) -> list[int]:
    """Which of the schedule's steps start..num_steps-1 the coarse tail takes: `tail_steps` of them, evenly
    spaced from `start` (each jumps to the next one taken, the last to x_0)."""
    n = min(tail_steps, num_steps - start)
    return [start + int((num_steps - start) * j / n + 0.5) for j in range(n)]


@torch.no_grad()
def coarse_tail(
    model: DiffusionModel,
    cond: Cond,
    uncond: Cond,
    guidance: torch.Tensor,
    x: torch.Tensor,
    ts: torch.Tensor,
    start: int,
    tail_steps: int,
) -> torch.Tensor:
    """Finish a chain from `x`, the latents before step `start` of the schedule `ts`, in `tail_steps`
    deterministic DDIM jumps (eta 0) at each sample's own guidance for the step a jump starts from.
    For DDPO on the layout steps only (`sampling.tail_steps`): the steps after the trained window need no
    log-probs, so they are finished cheaply (as MixGRPO finishes the steps outside its SDE window with an ODE
    solver); evaluation always samples the whole chain."""
    sch = model.scheduler
    device = model.device
    cond, uncond, guidance = cond_to(cond, device), cond_to(uncond, device), guidance.to(device)
    final, alphas = float(sch.final_alpha_cumprod), alphas_on(sch, device)
    idx = tail_indices(len(ts), start, tail_steps)
    for a, b in zip(idx, idx[1:] + [None]):
        tt = torch.full((x.shape[0],), int(ts[a]), dtype=torch.long, device=device)
        prev = torch.full_like(tt, -1 if b is None else int(ts[b]))
        eps = guided_noise_pred(model, x, tt, cond, uncond, guidance[:, a])
        x, _ = ddim_step_with_logprob(
            alphas, final, sch.config.num_train_timesteps, len(ts), eps, tt, x, 0.0,
            noise=torch.zeros_like(x), prev_timestep=prev, **step_options(sch),
        )  # fmt: skip
    return x


class _HostChain:
    """The chain [B, T+1, C, h, w] on the host, recorded as it is made. On a GPU each step's latents are
    copied into pinned host memory as soon as they exist, one sample at a time (each destination block is
    contiguous, so the copy is asynchronous): the transfer overlaps the next step's UNet call instead of
    following the last step. On an H200 the chain's single copy at the end (53 MB for SD1.5 at batch 16)
    was among the 3% by which the fused sampler trailed the plain pipeline. Elsewhere: stacked at the end."""

    def __init__(self, shape: tuple[int, ...], device: torch.device | str, per_step: bool | None = None):
        """`per_step`: copy each step into a host buffer (default: on a GPU; a test forces it on the CPU)."""
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.per_step = self.cuda if per_step is None else per_step
        self.host = torch.empty(shape, dtype=torch.float32, pin_memory=self.cuda) if self.per_step else None
        self.steps: list[torch.Tensor] = []

    def put(self, i: int, x: torch.Tensor) -> None:
        """Step i's latents [B, C, h, w] (i = 0: x_T)."""
        if not self.per_step:
            self.steps.append(x.to(self.device))
            return
        for b in range(x.shape[0]):
            self.host[b, i].copy_(x[b], non_blocking=True)

    def result(self) -> torch.Tensor:
        if not self.per_step:
            return torch.stack(self.steps, 1).cpu()
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()  # every copy has landed
        return self.host


def recompute_logprobs(
    model: DiffusionModel,
    latents: torch.Tensor,
    next_latents: torch.Tensor,
    timesteps: torch.Tensor,
    cond: Cond,
    uncond: Cond,
    scale: torch.Tensor,
    num_steps: int,
    eta: float,
) -> torch.Tensor:
    """Log-prob [N] of given transitions x_t -> x_{t-1} under the current UNet (with gradients).

    latents, next_latents [N, C, h, w]; timesteps, scale [N]; cond: each tensor [N, ...]. N may mix
    samples and timesteps freely: DDPO's loss is a sum over both, so they batch together.
    """
    sch = model.scheduler
    device = model.device
    latents, next_latents = latents.to(device), next_latents.to(device)
    eps = guided_noise_pred(model, latents, timesteps.to(device), cond, uncond, scale.to(device))
    _, lp = ddim_step_with_logprob(
        alphas_on(sch, device), float(sch.final_alpha_cumprod), sch.config.num_train_timesteps, num_steps, eps,
        timesteps.to(device), latents, eta, prev_sample=next_latents, **step_options(sch),
    )  # fmt: skip
    return lp
