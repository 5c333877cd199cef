"""Rewards by name: `build_reward(name, **options)`; every reward maps (images [B,3,H,W] in [0,1], prompts) -> [B]."""

from rewards import aesthetic, clip_alignment, hpsv2, imagereward, jpeg  # noqa: F401  (register themselves)
from rewards.loading import RewardLoadError
from rewards.registry import Reward, build_reward, check_reward, register_reward, reward_names, reward_options

try:  # the Shapes testbed's rewards
    from rewards import shapes  # noqa: F401
except ImportError:  # pragma: no cover - absent only while the testbed is being built
    pass

__all__ = ["Reward", "RewardLoadError", "build_reward", "check_reward", "register_reward", "reward_names", "reward_options"]
