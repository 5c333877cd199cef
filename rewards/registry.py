"""The reward registry: one protocol for every reward, looked up by name.

A reward is a class with class attributes `name` and `differentiable`, a
constructor that takes keyword options, and
`__call__(images float[B,3,H,W] in [0,1], prompts list[str]) -> float[B]`.

A reward may also define `score_details(images, prompts) -> (float[B], {name: float[B]})`: the same
score plus per-image components (e.g. which parts of a caption an image satisfies). They are logged
beside the score, so that a reward rising for the wrong reason shows up in its parts.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Protocol, TypeVar

import torch


class Reward(Protocol):
    name: str
    differentiable: bool

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor: ...


_REGISTRY: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register_reward(name: str) -> Callable[[T], T]:
    """Class decorator adding a reward class to the registry under `name`."""

    def deco(cls: T) -> T:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"reward name {name!r} is registered twice")
        _REGISTRY[name] = cls
        return cls

    return deco


def reward_names() -> list[str]:
    """Names of every registered reward, sorted."""
    return sorted(_REGISTRY)


def differentiable_rewards() -> list[str]:
    """Names of the rewards whose scores have gradients (what AlignProp can use)."""
    return [n for n in reward_names() if getattr(_REGISTRY[n], "differentiable", False)]


def reward_options(name: str) -> list[str]:
    """The keyword options the reward `name` accepts."""
    params = inspect.signature(_REGISTRY[name].__init__).parameters
    return [p for p, v in params.items() if p != "self" and v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)]


def check_reward(name: str, options: dict) -> None:
    """Validate a reward term without loading any model: the name, each option's name, and (for rewards
    with a `preflight` classmethod) that its files exist or its hub ids are reachable. Raises
    RewardLoadError with one line naming the fix."""
    from rewards.loading import RewardLoadError

    if name not in _REGISTRY:
        raise RewardLoadError(f"reward.terms: unknown reward {name!r}; known rewards: {', '.join(reward_names())}")
    accepted = reward_options(name)
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise RewardLoadError(
            f"reward.terms: reward {name!r} has no option {unknown[0]!r}; its options: {', '.join(accepted) or 'none'}"
        )
    preflight = getattr(_REGISTRY[name], "preflight", None)
    if preflight is not None:
        preflight(**options)


def build_reward(name: str, device: str | None = None, **options) -> Reward:
    """Instantiate the reward registered as `name` with keyword `options` (and `device`, where it takes one)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown reward {name!r}; known rewards: {', '.join(reward_names())}")
    check_reward(name, options)
    if device is not None and "device" in reward_options(name) and "device" not in options:
        options = {**options, "device": device}
    return _REGISTRY[name](**options)
