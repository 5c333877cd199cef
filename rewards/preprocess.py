"""CLIP-style image preprocessing in torch: on the reward's device, differentiable, batched.

Matches the reference processors (transformers' `CLIPImageProcessor`, open_clip's eval transform, which
ImageReward's `_transform` repeats step for step): resize
the shorter side to `size` (bicubic, antialiased), centre-crop `size` x `size`, normalise with the CLIP
mean and std. The references work on uint8 images through PIL, which rounds to grey levels and
uses the bicubic kernel with a = -0.5 where torch uses a = -0.75. Measured against both references
(tests/test_learned_rewards.py, normalised units, where one grey level is about 0.015): on smooth images
max 0.017 and mean 0.005 at every size (the references' rounding); downsampling noise from 512 px max
0.07; upsampling pure noise (64 px -> 224) max 0.35, mean 0.006 (the kernels differ). Real generated
images are smooth and larger than 224 px.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(
    images: torch.Tensor, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """images [B, 3, H, W] in [0, 1] -> normalised [B, 3, size, size] (gradients flow through)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    x = images.float()
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        # bicubic overshoots; the references resize uint8 images, which clamps to the pixel range
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top : top + size, left : left + size]
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    out = (x - m) / s
    return out.to(dtype) if dtype is not None else out
