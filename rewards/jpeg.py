"""DDPO's JPEG compressibility tasks: reward = -(JPEG size in kB), or +size for incompressibility."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from rewards.registry import register_reward


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """JPEG file size in kB of each image [B, 3, H, W] in [0, 1] -> [B] float32."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for img in arr:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(img)).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


@register_reward("jpeg_compressibility")
class JpegCompressibility:
    """Higher for images that compress well: minus the JPEG size in kB."""

    name = "jpeg_compressibility"
    differentiable = False

    def __init__(self, quality: int = 95):
        self.quality = quality

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return -jpeg_size_kb(images, self.quality)


@register_reward("jpeg_incompressibility")
class JpegIncompressibility:
    """Higher for images that compress badly: the JPEG size in kB."""

    name = "jpeg_incompressibility"
    differentiable = False

    def __init__(self, quality: int = 95):
        self.quality = quality

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return jpeg_size_kb(images, self.quality)
