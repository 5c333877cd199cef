"""The training algorithm's configuration section (`algorithm.*`): DDPO's and AlignProp's knobs.

Re-exported by common.config, where the whole run's configuration (`RunConfig`) is assembled.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from common.config_base import _Strict


class StatTrackerConfig(_Strict):
    per_prompt: bool = Field(True, description="Normalise rewards per prompt (DDPO) instead of per batch.")
    buffer_size: int = Field(32, ge=1, description="Rewards kept per prompt (most recent).")
    min_count: int = Field(
        8, ge=1, description="Below this many rewards for a prompt, the batch's mean and std are used."
    )

    @model_validator(mode="after")
    def _reachable(self) -> StatTrackerConfig:
        if self.per_prompt and self.min_count > self.buffer_size:
            raise ValueError(
                f"min_count ({self.min_count}) exceeds buffer_size ({self.buffer_size}): a prompt never has that many "
                "rewards kept, so its own statistics would never be used"
            )
        return self


class AlignPropConfig(_Strict):
    truncation: tuple[int, int] = Field(
        (1, 1),
        description="[k_min, k_max]: gradients flow through the last K denoising steps, K ~ U{k_min..k_max} per "
        "minibatch (AlignProp's randomized truncation); equal bounds fix K. Larger K reaches the early steps, "
        "where a composition's layout is decided, at the cost of memory (use gradient_checkpointing) and time.",
    )
    loss: Literal["reward", "target"] = Field(
        "reward", description="reward: minimise -coeff x reward; target: minimise |target - reward|."
    )
    coeff: float = Field(1.0, gt=0, description="Scale of the reward loss.")
    target: float | None = Field(None, description="For loss=target: the reward to aim at.")

    @model_validator(mode="after")
    def _check(self) -> AlignPropConfig:
        lo, hi = self.truncation
        if not 1 <= lo <= hi:
            raise ValueError(f"truncation must be [k_min, k_max] with 1 <= k_min <= k_max (got {list(self.truncation)})")
        if self.loss == "target" and self.target is None:
            raise ValueError("loss=target needs a target reward (alignprop.target)")
        return self


class RWRConfig(_Strict):
    weighting: Literal["exp", "filter"] = Field(
        "filter",
        description="exp: weight each sample by exp(advantage / temperature) (RWR); filter: train only on the "
        "samples whose per-prompt advantage exceeds min_advantage, with equal weights (sparse RWR).",
    )
    temperature: float = Field(1.0, gt=0, description="exp weighting: the advantage scale (lower = greedier).")
    min_advantage: float = Field(0.0, description="filter weighting: the advantage a sample must exceed.")
    min_reward: float | None = Field(
        None, description="Also drop every sample whose reward is below this (e.g. 1.0: only fully correct images)."
    )
    target: Literal["latent", "reencode"] = Field(
        "latent",
        description="latent: regress on each rollout's final latent; reencode: on a draw from the VAE posterior "
        "of its decoded image (the distribution the model was pre-trained on, and the image the reward saw).",
    )
    ema_decay: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="0: off. Otherwise the policy the samplers get (and checkpoints hold) is an exponential moving "
        "average of the trained LoRA weights, updated after every optimizer step with this decay; the raw weights "
        "go on training. Pre-training of diffusion models samples from such an average too. RWR only: it needs no "
        "log-probs of the sampling policy.",
    )
    uncond_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Fraction of the (sample, t) pairs trained with the CFG negative instead of the prompt, as "
        "caption dropout does in pre-training: the unconditional prediction follows the conditional one, so "
        "guidance at sampling time does not compound what the conditional branch learned from guided samples.",
    )
    timesteps_per_sample: int = Field(
        4, ge=1, description="Noise levels drawn per kept sample per pass (each one UNet forward; two with guided)."
    )
    guided: bool = Field(
        False,
        description="Regress the classifier-free guided prediction eps_u + s (eps_c - eps_u), at the sampler's "
        "sampling.guidance_scale s, instead of the conditional one: the denoiser trained is the one the policy "
        "samples with, so guidance does not compound what the conditional branch learned from guided samples "
        "(two UNet passes per pair). Excludes uncond_fraction.",
    )
    guided_scale: float | None = Field(
        None,
        gt=0,
        description="guided=true: the scale of the regressed prediction; None = sampling.guidance_scale. 1 is the "
        "conditional branch (plain RWR). On Shapes fitting at the sampling scale shrank eps_c - eps_u and the conditional "
        "branch alone grew it; no scale from 1 to 5 improved the model there (docs/results.md).",
    )
    condition: Literal["plain", "sampled"] = Field(
        "plain",
        description="plain: regress on the plain prompt's conditioning (what the reward judged); sampled: on the "
        "trajectory's own, possibly re-weighted, conditioning.",
    )

    @model_validator(mode="after")
    def _check(self) -> RWRConfig:
        if self.guided and self.uncond_fraction > 0:
            raise ValueError(
                "guided=true trains the unconditional branch through the guided prediction already; set "
                f"uncond_fraction=0 (got {self.uncond_fraction:g})"
            )
        if self.guided_scale is not None and not self.guided:
            raise ValueError("guided_scale applies to the guided prediction; set guided=true or drop guided_scale")
        return self


class AlgorithmConfig(_Strict):
    @field_validator("timestep_window")
    @classmethod
    def _window(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= v[0] < v[1] <= 1.0:
            raise ValueError(f"must be [start, end) with 0 <= start < end <= 1 (got {list(v)})")
        return v

    name: Literal["ddpo", "alignprop", "rwr"] = Field(
        "ddpo",
        description="ddpo: policy gradient on the samplers' rollouts. alignprop: the learner samples with "
        "gradients and backpropagates a differentiable reward through the last K steps (algorithm.alignprop). "
        "rwr: reward-weighted regression, the denoising loss on the rollouts' final images weighted by their "
        "advantages (algorithm.rwr).",
    )
    alignprop: AlignPropConfig = Field(default_factory=AlignPropConfig)
    rwr: RWRConfig = Field(default_factory=RWRConfig)
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw",
        description="adamw (DDPO's choice) or sgd with momentum adam_betas[0]. AdamW moves every LoRA weight by "
        "~learning_rate per step whatever its gradient's size; SGD's steps follow the gradient's size.",
    )
    learning_rate: float = Field(3e-4, gt=0, description="Learning rate of the LoRA weights.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas (sgd: momentum = the first).")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient-norm clip before each optimizer step.")
    clip_range: float = Field(1e-4, gt=0, description="PPO ratio clip epsilon (DDPO uses 1e-4).")
    adv_clip_max: float = Field(5.0, gt=0, description="Advantages are clipped to [-adv_clip_max, adv_clip_max].")
    timestep_fraction: float = Field(
        1.0, gt=0, le=1, description="Fraction of each trajectory's steps trained on (random per sample)."
    )
    timestep_window: tuple[float, float] = Field(
        (0.0, 1.0),
        description="Fractions [start, end) of the denoising steps (0 = the noisiest, first step) that training "
        "draws its timesteps from; timestep_fraction then picks among these. (0, 0.5) trains only the early "
        "steps, where the layout is decided: half the learner's cost, and no gradient noise from steps that "
        "barely change a composition reward.",
    )
    inner_epochs: int = Field(1, ge=1, description="Passes over each epoch's samples.")
    minibatch_size: int = Field(8, ge=1, description="Samples per gradient-accumulation microbatch.")
    gradient_accumulation: int = Field(
        2, ge=1, description="Microbatches per optimizer step (effective batch = minibatch_size x this)."
    )
    timestep_chunk: int = Field(
        0, ge=0, description="Timesteps per UNet forward in training (0 = all at once; lower to save memory)."
    )
    max_unet_batch: int = Field(
        0,
        ge=0,
        description="Memory bound of the update: at most this many images per UNet call, counting both halves "
        "of each CFG pair (so a minibatch of 8 samples x 10 timesteps is 160). 0 = no bound. The (sample, "
        "timestep) pairs of a minibatch are split into calls of at most max_unet_batch / 2; the gradient is "
        "the same (DDPO's loss is a sum over them).",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute UNet activations in the backward pass: much less memory, more compute."
    )
    compile: str | None = Field(
        None,
        description="torch.compile backend for the learner's UNet calls that take gradients (e.g. 'inductor'; "
        "None: eager). The first update compiles (forward and backward; train and eval mode are two graphs).",
    )
    stat_tracking: StatTrackerConfig = Field(default_factory=StatTrackerConfig)


def window_steps(num_steps: int, window: tuple[float, float], fraction: float) -> tuple[list[int], int]:
    """(indices of the denoising steps inside `window`, how many of them each sample trains on).
    Step indices count from the noisiest step (0); at least one step is kept."""
    def at(f: float) -> int:  # one rounding for both ends (half up; 0.29 * 100 = 28.999... is step 29), so
        return math.floor(f * num_steps + 0.5)  # [0, w) and [w, 1) split the chain without sharing a step

    lo = min(at(window[0]), num_steps - 1)
    hi = max(lo + 1, at(window[1]))
    idx = list(range(lo, hi))
    return idx, max(1, int(len(idx) * fraction))
