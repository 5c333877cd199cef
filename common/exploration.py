"""DiffExp exploration: dynamic CFG-scale schedules and random prompt weighting.

Both are drawn per training rollout from one integer seed, so a trajectory
records the seed and what was drawn (per-step scales, weighted phrases), and
the learner can reproduce its exact conditioning. Evaluation uses
`constant_guidance` and the plain prompt.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from common.config import CfgScheduleConfig, ExplorationConfig, PromptWeightingConfig


# ---------------------------------------------------------------- CFG schedules
def schedule_values(kind: str, low: float, high: float, switch: float, num_steps: int) -> np.ndarray:
    """Guidance scale per denoising step [T], step 0 being the noisiest.

    constant: high everywhere; step: low for the first round(switch*T) steps, then high;
    linear / cosine: from low at step 0 to high at step T-1.
    """
    s = np.arange(num_steps) / max(num_steps - 1, 1)
    if kind == "constant":
        return np.full(num_steps, high, dtype=np.float64)
    if kind == "step":
        n_low = round(switch * num_steps)
        return np.where(np.arange(num_steps) < n_low, low, high).astype(np.float64)
    if kind == "linear":
        return low + (high - low) * s
    if kind == "cosine":
        return low + (high - low) * (1 - np.cos(math.pi * s)) / 2
    raise ValueError(f"exploration.cfg_schedule.kind: unknown schedule {kind!r}; use constant, step, linear, cosine")


def sample_guidance(cfg: CfgScheduleConfig, num_steps: int, rng: np.random.Generator) -> np.ndarray:
    """One rollout's per-step scales [T], with the config's random jitter drawn from `rng`."""
    low, high, switch = cfg.low, cfg.high, cfg.switch
    if cfg.scale_jitter > 0:
        low = max(0.0, low + rng.uniform(-cfg.scale_jitter, cfg.scale_jitter))
        high = max(low, high + rng.uniform(-cfg.scale_jitter, cfg.scale_jitter))
    if cfg.switch_jitter > 0:
        switch = float(np.clip(switch + rng.uniform(-cfg.switch_jitter, cfg.switch_jitter), 0.0, 1.0))
    return schedule_values(cfg.kind, low, high, switch, num_steps)


def constant_guidance(scale: float, num_steps: int) -> np.ndarray:
    """Evaluation (and exploration-off) guidance: `scale` at every step [T]."""
    return np.full(num_steps, float(scale), dtype=np.float64)


# ------------------------------------------------------------ prompt weighting
_EXPLICIT = re.compile(r"\(([^():]+):\s*([0-9]*\.?[0-9]+)\s*\)")
_TOKEN = re.compile(r"\s+|[A-Za-z0-9']+|[^A-Za-z0-9'\s]+")
STOPWORDS = frozenset(
    ["a", "an", "the", "of", "to", "in", "on", "at", "by", "for", "with", "and", "or", "from", "into", "onto", "over", "under", "above", "below", "left", "right", "next", "is", "are", "was", "be", "this", "that", "these", "those", "it", "its", "as", "near", "behind", "beside", "between", "very"]
)


@dataclass
class WeightedPrompt:
    """A prompt as text segments with one weight each; weight 1 means the plain embedding."""

    segments: list[tuple[str, float]]
    picks: list[tuple[str, float]] = field(default_factory=list)  # randomly re-weighted words

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.segments)


def parse_prompt(prompt: str) -> WeightedPrompt:
    """Split a prompt into segments, honouring explicit `(phrase:1.3)` weights."""
    segments: list[tuple[str, float]] = []
    pos = 0
    for m in _EXPLICIT.finditer(prompt):
        if m.start() > pos:
            segments.append((prompt[pos : m.start()], 1.0))
        segments.append((m.group(1), float(m.group(2))))
        pos = m.end()
    if pos < len(prompt):
        segments.append((prompt[pos:], 1.0))
    return WeightedPrompt(segments)


def _is_content(word: str) -> bool:
    return word.isalpha() and len(word) > 1 and word.lower() not in STOPWORDS


def random_weighting(prompt: str, cfg: PromptWeightingConfig, rng: np.random.Generator) -> WeightedPrompt:
    """Pick k content words (outside explicit weights) at random and weight each by w ~ U[low, high]."""
    parsed = parse_prompt(prompt)
    words: list[tuple[str, float]] = []
    for text, w in parsed.segments:
        if w != 1.0:
            words.append((text, w))
        else:
            words.extend((tok, 1.0) for tok in _TOKEN.findall(text))
    candidates = [i for i, (t, w) in enumerate(words) if w == 1.0 and _is_content(t)]
    if not cfg.enabled or cfg.num_phrases == 0 or not candidates or rng.uniform() >= cfg.probability:
        return parsed
    k = min(cfg.num_phrases, len(candidates))
    chosen = sorted(rng.choice(candidates, size=k, replace=False).tolist())
    picks = []
    for i in chosen:
        w = float(rng.uniform(cfg.low, cfg.high))
        words[i] = (words[i][0], w)
        picks.append((words[i][0], w))
    return WeightedPrompt(words, picks)


def tokenize_weighted(tokenizer, wp: WeightedPrompt) -> tuple[list[int], list[float]]:
    """Token ids [L] (BOS, text, EOS, padding; L = tokenizer.model_max_length) and one weight per token.

    Segments are tokenized one by one; CLIP's BPE works within words, so the ids equal
    tokenizer(text) of the whole prompt (a test checks this).
    """
    max_len = int(tokenizer.model_max_length)
    ids: list[int] = []
    weights: list[float] = []
    for text, w in wp.segments:
        seg = tokenizer(text, add_special_tokens=False).input_ids
        ids += seg
        weights += [w] * len(seg)
    ids, weights = ids[: max_len - 2], weights[: max_len - 2]
    ids = [tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id]
    weights = [1.0] + weights + [1.0]
    pad = max_len - len(ids)
    return ids + [tokenizer.pad_token_id] * pad, weights + [1.0] * pad


def apply_token_weights(z: torch.Tensor, z_empty: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Compel-style re-weighting z' = z_empty + w (z - z_empty) per token.

    z [B, L, D] prompt embeddings, z_empty [L, D] or [B, L, D] empty-prompt embeddings, weights [B, L];
    tokens of weight 1 keep z exactly.
    """
    w = weights.unsqueeze(-1).to(z.dtype)
    return torch.where(w == 1.0, z, z_empty + w * (z - z_empty))  # unweighted tokens stay bit-exact


@dataclass
class RolloutPlan:
    """What exploration drew for one rollout: enough to reproduce its conditioning exactly."""

    seed: int
    guidance: list[float]
    prompt: str
    weighted_prompt: WeightedPrompt

    def to_json(self) -> dict:
        return {"seed": self.seed, "prompt": self.prompt, "picks": [[t, w] for t, w in self.weighted_prompt.picks]}


def plan_rollout(
    prompt: str, seed: int, cfg: ExplorationConfig, num_steps: int, base_scale: float, explore: bool
) -> RolloutPlan:
    """Draw one rollout's guidance vector and prompt weighting from `seed` (no exploration if not `explore`)."""
    rng = np.random.default_rng([seed, 0x0D1FFE])
    if explore and cfg.enabled:
        guidance = sample_guidance(cfg.cfg_schedule, num_steps, rng)
        wp = random_weighting(prompt, cfg.prompt_weighting, rng)
    else:
        guidance = constant_guidance(base_scale, num_steps)
        wp = parse_prompt(prompt)
    return RolloutPlan(seed, guidance.tolist(), prompt, wp)
