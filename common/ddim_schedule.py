"""The DDIM schedule that a model's scheduler config describes, as diffusers' DDIMScheduler reads it: the
timesteps of a chain, the step's options, the alphas table on a device, and which configs the DDIM step with
log-prob (common/sampling.py) can reproduce."""

from __future__ import annotations

import numpy as np
import torch

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def ddim_timesteps(
    num_train_timesteps: int, num_steps: int, steps_offset: int = 1, spacing: str = "leading"
) -> torch.Tensor:
    """The DDIM timesteps of `num_steps` steps, noisiest first: [T] long, as diffusers' DDIMScheduler spaces them
    (`timestep_spacing`: 'leading', SD1.x/SDXL's; 'trailing', which starts at the last training step (SD-Turbo,
    zero-terminal-SNR models); 'linspace'). Each step goes to t - num_train_timesteps // num_steps, as diffusers'."""
    if spacing == "leading":
        ratio = num_train_timesteps // num_steps
        ts = (np.arange(num_steps) * ratio).round()[::-1].copy().astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)).astype(np.int64) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1].copy().astype(np.int64)
    else:
        raise ValueError(f"timestep_spacing {spacing!r} is not supported ({', '.join(TIMESTEP_SPACINGS)})")
    return torch.from_numpy(ts)


def scheduler_timesteps(scheduler, num_steps: int) -> torch.Tensor:
    """`ddim_timesteps` for a loaded DDIM scheduler's config."""
    c = scheduler.config
    return ddim_timesteps(c.num_train_timesteps, num_steps, c.steps_offset, c.get("timestep_spacing", "leading"))


def step_options(scheduler) -> dict:
    """The keyword options of `ddim_step_with_logprob` that a scheduler's config sets: the model's prediction type
    and, where `clip_sample` is on, the range its x_0 prediction is clipped to (as diffusers' DDIM step does)."""
    c = scheduler.config
    return {"prediction_type": c.prediction_type,
            "clip_sample": float(c.clip_sample_range) if c.get("clip_sample", False) else None}  # fmt: skip


def check_scheduler(config) -> None:
    """A scheduler config this DDIM step reproduces, or a ValueError in one line naming what it does not."""
    if config.get("thresholding", False):
        raise ValueError("its scheduler sets thresholding=true (dynamic thresholding of x_0, for pixel-space models), "
                         "which the DDIM step with log-prob does not implement")  # fmt: skip
    spacing = config.get("timestep_spacing", "leading")
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(
            f"its scheduler's timestep_spacing {spacing!r} is not supported ({', '.join(TIMESTEP_SPACINGS)})"
        )
    if config.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction"):
        raise ValueError(f"its scheduler's prediction_type {config.get('prediction_type')!r} is not supported "
                         "(epsilon, v_prediction)")  # fmt: skip


def alphas_on(scheduler, device: torch.device | str) -> torch.Tensor:
    """The scheduler's alphas_cumprod as float32 on `device`, copied there once and kept on the scheduler.

    A copy from host memory to a GPU synchronises the stream (PyTorch waits for it to finish), so moving the
    table at every DDIM step, as `ddim_step_with_logprob` would, stalled the GPU once a step."""
    key, source = str(torch.device(device)), scheduler.alphas_cumprod
    cache = scheduler.__dict__.setdefault("_alphas_on", {})
    if key not in cache or cache[key][0] is not source:  # a replaced table is copied afresh
        cache[key] = (source, source.to(device, torch.float32))
    return cache[key][1]
