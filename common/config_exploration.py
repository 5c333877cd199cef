"""The exploration section (`exploration.*`): DiffExp's guidance schedule and random prompt weighting.

Re-exported by common.config, where the whole run's configuration (`RunConfig`) is assembled.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from common.config_base import _Strict


class CfgScheduleConfig(_Strict):
    kind: Literal["constant", "step", "linear", "cosine"] = Field(
        "step",
        description="Shape of the guidance scale over denoising steps: constant (= high), step (low before "
        "`switch`, high after), linear or cosine (low at the first step to high at the last).",
    )
    low: float = Field(1.0, ge=0.0, description="Scale in the early, noisy steps (layout diversity).")
    high: float = Field(5.0, ge=0.0, description="Scale in the late steps (fidelity); must be >= low.")
    switch: float = Field(
        0.4, ge=0.0, le=1.0, description="For kind=step: fraction of the steps spent at `low` before `high`."
    )
    scale_jitter: float = Field(
        0.0, ge=0.0, description="Per-sample uniform jitter +-scale_jitter added to low and high (clamped >= 0)."
    )
    switch_jitter: float = Field(
        0.0, ge=0.0, le=0.5, description="Per-sample uniform jitter +-switch_jitter of the switch fraction."
    )

    @model_validator(mode="after")
    def _order(self) -> CfgScheduleConfig:
        if self.high < self.low:
            raise ValueError(f"high must be >= low (got {self.high} < {self.low})")
        return self


class PromptWeightingConfig(_Strict):
    enabled: bool = Field(True, description="Randomly re-weight content words of each training prompt.")
    num_phrases: int = Field(1, ge=0, description="k: how many content words get a random weight per rollout.")
    low: float = Field(0.5, ge=0.0, description="Lower bound of the weight w ~ U[low, high].")
    high: float = Field(1.5, ge=0.0, description="Upper bound of the weight; must be >= low.")
    probability: float = Field(
        1.0, ge=0.0, le=1.0, description="Chance that a rollout is re-weighted at all (else the plain prompt)."
    )

    @model_validator(mode="after")
    def _order(self) -> PromptWeightingConfig:
        if self.high < self.low:
            raise ValueError(f"high must be >= low (got {self.high} < {self.low})")
        return self


class ExplorationConfig(_Strict):
    enabled: bool = Field(True, description="DiffExp exploration for training rollouts (never for evaluation).")
    cfg_schedule: CfgScheduleConfig = Field(default_factory=CfgScheduleConfig)
    prompt_weighting: PromptWeightingConfig = Field(default_factory=PromptWeightingConfig)
