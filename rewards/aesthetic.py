"""The LAION aesthetic predictor: CLIP ViT-L/14 image embeddings, L2-normalised, into a small MLP head.

This is the reward of DDPO's and AlignProp's aesthetic task and of the DiffExp paper's first experiment.
Weights: a transformers `CLIPModel` (`clip_path`, default the hub's openai/clip-vit-large-patch14) and the
head's state dict (`head_path`, the improved-aesthetic-predictor's sac+logos+ava1-l14-linearMSE.pth: keys
layers.{0,2,4,6,7}.{weight,bias}; the head has no activations, as published). Scores are roughly 1-10.
"""

from __future__ import annotations

import torch
from torch import nn

from rewards.loading import (
    load_clip_model, load_state_strict, load_torch_state, resolve_source, reward_device, reward_dtype,
)  # fmt: skip
from rewards.preprocess import clip_preprocess
from rewards.registry import register_reward

CLIP_L14 = "openai/clip-vit-large-patch14"


class AestheticHead(nn.Module):
    """768 -> 1024 -> 128 -> 64 -> 16 -> 1, linear, with the published dropout slots (inactive in eval)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@register_reward("aesthetic")
class AestheticScore:
    name = "aesthetic"
    differentiable = True

    def __init__(self, head_path: str | None = None, clip_path: str | None = None, device: str | None = None,
                 dtype: str = "auto"):  # fmt: skip
        self.preflight(head_path=head_path, clip_path=clip_path)
        self.device = reward_device(device)
        self.dtype = reward_dtype(dtype, self.device)
        clip = resolve_source(self.name, "clip_path", clip_path, CLIP_L14, "a CLIPModel directory (CLIP ViT-L/14)")
        self.clip = load_clip_model(self.name, clip, self.device, self.dtype, "CLIPModel (CLIP ViT-L/14)")
        dim = self.clip.config.projection_dim
        self.head = AestheticHead(dim)
        state = load_torch_state(self.name, "head_path", head_path)
        load_state_strict(self.head, state, self.name, head_path, f"aesthetic MLP head ({dim} -> 1024 -> 128 -> 64 -> 16 -> 1)")
        self.head.to(self.device, self.dtype).eval().requires_grad_(False)
        self.size = self.clip.config.vision_config.image_size

    @classmethod
    def preflight(cls, head_path: str | None = None, clip_path: str | None = None, **_) -> None:
        """Check the files before any actor starts (no model is loaded)."""
        resolve_source(cls.name, "head_path", head_path, None,
                       "the MLP head's .pth file (sac+logos+ava1-l14-linearMSE.pth)", kind="file")  # fmt: skip
        resolve_source(cls.name, "clip_path", clip_path, CLIP_L14, "a CLIPModel directory (CLIP ViT-L/14)")

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """[B] aesthetic scores (float32); differentiable in `images` unless called under no_grad."""
        x = clip_preprocess(images.to(self.device), self.size, dtype=self.dtype)
        emb = self.clip.get_image_features(pixel_values=x)
        emb = getattr(emb, "pooler_output", emb)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return self.head(emb).squeeze(-1).float()
