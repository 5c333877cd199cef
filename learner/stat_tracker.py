"""Per-prompt reward normalisation (DDPO's advantage estimate)."""

from __future__ import annotations

from collections import deque

import numpy as np


class PerPromptStatTracker:
    """Advantage = (reward - mean) / std over the last `buffer_size` rewards of the same prompt.

    Until a prompt has `min_count` rewards, the mean and std of the whole current batch are used.
    """

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        """Add this batch's rewards [B] and return their advantages [B]."""
        rewards = np.asarray(rewards, dtype=np.float64)
        adv = np.empty_like(rewards)
        batch_mean, batch_std = rewards.mean(), rewards.std() + 1e-6
        for prompt in dict.fromkeys(prompts):
            idx = np.array([i for i, p in enumerate(prompts) if p == prompt])
            buf = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buf.extend(rewards[idx].tolist())
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = np.mean(buf), np.std(buf) + 1e-6
            adv[idx] = (rewards[idx] - mean) / std
        return adv

    def stats(self) -> dict[str, float]:
        n = [len(b) for b in self.buffers.values()]
        return {"tracked_prompts": len(n), "mean_buffer": float(np.mean(n)) if n else 0.0}

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "buffers": {p: list(b) for p, b in self.buffers.items()}}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {p: deque(v, maxlen=self.buffer_size) for p, v in state["buffers"].items()}
