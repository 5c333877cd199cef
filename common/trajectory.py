"""The trajectory batch that travels sampler -> reward -> learner, and its safe byte format.

Bytes are a safetensors file (tensors) whose header metadata holds one JSON
document (prompts, exploration plans, version): bytes from a queue or a shared
store are untrusted input and never reach pickle.
"""

from __future__ import annotations

import json
import struct
import uuid
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

_TENSORS = ("latents", "log_probs", "timesteps", "guidance", "images", "rewards")
_COND = "cond."  # conditioning tensors travel as cond.<name>
_TERMS = "reward."  # each reward term's raw score travels as reward.<name> once scored
_MAX_HEADER = 100 * 1024 * 1024


@dataclass
class TrajectoryBatch:
    """B rollouts of T DDIM steps.

    latents [B, T+1, C, h, w] float32 (x_T first); log_probs [B, T] float32 (sampler's);
    timesteps [T] int64; guidance [B, T] float32 (per-step CFG scales used); cond: the model's named
    conditioning tensors, each [B, ...] float32 (the exact, possibly re-weighted, text conditioning: one
    `prompt_embeds` for SD, plus `text_embeds` and `time_ids` for SDXL); images [B, 3, H, W] uint8;
    rewards [B] float32 once scored, and reward_terms (each term's raw score [B] by name). epoch: the
    training epoch (round) the batch was sampled for, so queues never mix one epoch's entries with the
    next; batch_id: the batch's identity, deterministic for training rollouts (epoch and first seed), so a
    batch sampled or scored twice after an actor restart is put into a queue once.
    """

    prompts: list[str]
    plans: list[dict]
    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    guidance: torch.Tensor
    cond: dict[str, torch.Tensor]
    images: torch.Tensor
    policy_version: int
    rewards: torch.Tensor | None = None
    batch_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    evaluation: bool = False
    epoch: int = -1
    reward_terms: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def validate(self) -> TrajectoryBatch:
        """Check shapes and dtypes agree; raise ValueError naming the field otherwise."""
        b = len(self.prompts)
        t = self.timesteps.shape[0]
        expect = {
            "latents": (self.latents, (b, t + 1), torch.float32),
            "log_probs": (self.log_probs, (b, t), torch.float32),
            "guidance": (self.guidance, (b, t), torch.float32),
            "images": (self.images, (b, 3), torch.uint8),
        }
        if self.rewards is not None:
            expect["rewards"] = (self.rewards, (b,), torch.float32)
        if not isinstance(self.cond, dict) or not self.cond:
            raise ValueError("trajectory field cond: expected a non-empty dict of named conditioning tensors")
        for k, v in self.cond.items():
            expect[f"cond.{k}"] = (v, (b,), torch.float32)
        for k, v in self.reward_terms.items():
            expect[f"reward.{k}"] = (v, (b,), torch.float32)
        for name, (x, prefix, dtype) in expect.items():
            if tuple(x.shape[: len(prefix)]) != prefix or x.dtype != dtype:
                raise ValueError(f"trajectory field {name}: shape {tuple(x.shape)} {x.dtype}, expected {prefix}... {dtype}")
        if len(self.plans) != b:
            raise ValueError(f"trajectory field plans: {len(self.plans)} entries for {b} prompts")
        return self

    def images_float(self) -> torch.Tensor:
        """Images [B, 3, H, W] float32 in [0, 1]."""
        return self.images.float() / 255.0

    def to_bytes(self) -> bytes:
        tensors = {k: getattr(self, k).contiguous() for k in _TENSORS if getattr(self, k) is not None}
        tensors.update({_COND + k: v.contiguous() for k, v in self.cond.items()})
        tensors.update({_TERMS + k: v.contiguous() for k, v in self.reward_terms.items()})
        meta = {
            "epoch": self.epoch,
            "prompts": self.prompts,
            "plans": self.plans,
            "policy_version": self.policy_version,
            "batch_id": self.batch_id,
            "evaluation": self.evaluation,
        }
        return st_save(tensors, metadata={"trajectory": json.dumps(meta)})

    @classmethod
    def from_bytes(cls, data: bytes) -> TrajectoryBatch:
        """Parse bytes written by `to_bytes`; raise ValueError on anything malformed."""
        if len(data) < 8:
            raise ValueError("trajectory bytes: too short to hold a safetensors header")
        (n,) = struct.unpack("<Q", data[:8])
        if n > min(_MAX_HEADER, len(data) - 8):
            raise ValueError("trajectory bytes: header length is out of range")
        try:
            header = json.loads(data[8 : 8 + n])
            meta = json.loads(header["__metadata__"]["trajectory"])
            tensors = st_load(data)
        except Exception as err:  # noqa: BLE001 - any parse failure of untrusted bytes is the same error
            raise ValueError(f"trajectory bytes: malformed ({err.__class__.__name__}: {err})") from None
        missing = [k for k in _TENSORS if k != "rewards" and k not in tensors]
        cond = {k[len(_COND) :]: v for k, v in tensors.items() if k.startswith(_COND)}
        if not cond:
            missing.append(_COND + "*")
        if missing:
            raise ValueError(f"trajectory bytes: missing tensors {missing}")
        return cls(
            prompts=[str(p) for p in meta["prompts"]],
            plans=list(meta["plans"]),
            policy_version=int(meta["policy_version"]),
            batch_id=str(meta["batch_id"]),
            evaluation=bool(meta.get("evaluation", False)),
            epoch=int(meta.get("epoch", -1)),
            cond=cond,
            reward_terms={k[len(_TERMS) :]: v for k, v in tensors.items() if k.startswith(_TERMS)},
            **{k: tensors.get(k) for k in _TENSORS},
        ).validate()

    def select(self, idx: torch.Tensor) -> TrajectoryBatch:
        """The samples at indices `idx` (1-D, long), as a new batch with the same identity and epoch."""
        ids = idx.tolist()
        opt = (lambda x: None if x is None else x[idx])
        return TrajectoryBatch(
            prompts=[self.prompts[i] for i in ids], plans=[self.plans[i] for i in ids], latents=self.latents[idx],
            log_probs=self.log_probs[idx], timesteps=self.timesteps, guidance=self.guidance[idx],
            cond={k: v[idx] for k, v in self.cond.items()}, images=self.images[idx], policy_version=self.policy_version,
            rewards=opt(self.rewards), batch_id=self.batch_id, evaluation=self.evaluation, epoch=self.epoch,
            reward_terms={k: v[idx] for k, v in self.reward_terms.items()},
        )  # fmt: skip

    def in_seed_order(self) -> TrajectoryBatch:
        """The same samples sorted by their noise seed (`plans[i]["seed"]`; stable). Both backends train on an
        epoch in this order, so the update does not depend on how the epoch was split into sampler batches or
        which sampler finished first: the same seeds give the same weights on Ray and in one process."""
        order = sorted(range(len(self)), key=lambda i: int(self.plans[i]["seed"]))
        if order == list(range(len(self))):
            return self
        return self.select(torch.tensor(order, dtype=torch.long))

    @staticmethod
    def concat(batches: list[TrajectoryBatch]) -> TrajectoryBatch:
        """One batch of all samples (same T and shapes); policy_version is the oldest one."""
        def cat(name):
            xs = [getattr(b, name) for b in batches]
            return None if any(x is None for x in xs) else torch.cat(xs)

        return TrajectoryBatch(
            prompts=[p for b in batches for p in b.prompts],
            plans=[p for b in batches for p in b.plans],
            latents=cat("latents"), log_probs=cat("log_probs"), timesteps=batches[0].timesteps,
            guidance=cat("guidance"), cond={k: torch.cat([b.cond[k] for b in batches]) for k in batches[0].cond},
            images=cat("images"),
            policy_version=min(b.policy_version for b in batches), rewards=cat("rewards"),
            evaluation=batches[0].evaluation, epoch=batches[0].epoch if len({b.epoch for b in batches}) == 1 else -1,
            reward_terms={k: torch.cat([b.reward_terms[k] for b in batches]) for k in batches[0].reward_terms
                          if all(k in b.reward_terms for b in batches)},
        )  # fmt: skip
