"""Diversity of Shapes samples for one prompt: how much the layout varies, not just whether it is right.

For N samples of one caption the metric reports, in pixels of a 64x64 image:
  position_spread: the standard deviation over samples of each requested object's centroid (x and y),
                   averaged over the two axes and the caption's objects (samples where it was found);
  size_spread:     the standard deviation of each object's size, sqrt(area) in px, averaged over objects;
and pixel_distance: the mean pairwise RMS difference between samples, images in [0, 1] (0 = identical).
Objects are found with the hard detector (common/shapes/detect.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from common.shapes.detect import detect_hard
from common.shapes.scenes import parse_caption


@dataclass(frozen=True)
class Diversity:
    """Spreads in pixels; pixel_distance is an RMS in [0, 1] units; found_fraction over objects x samples."""

    position_spread: float
    size_spread: float
    pixel_distance: float
    found_fraction: float
    n_samples: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def pairwise_pixel_distance(images: torch.Tensor) -> float:
    """Mean over pairs i < j of the RMS pixel difference of images float [N, 3, H, W] in [0, 1]."""
    n = images.shape[0]
    if n < 2:
        raise ValueError(f"pairwise pixel distance needs at least 2 samples (got {n})")
    flat = images.reshape(n, -1).double()
    d = torch.cdist(flat, flat) / flat.shape[1] ** 0.5
    return float(d[torch.triu_indices(n, n, offset=1).unbind(0)].mean())


def _std(x: torch.Tensor) -> float:
    return float(x.std(unbiased=True)) if x.numel() >= 2 else float("nan")


def prompt_diversity(images: torch.Tensor, prompt: str) -> Diversity:
    """Diversity of samples images float [N, 3, H, W] in [0, 1] (N >= 2), all drawn for `prompt`.

    An object found in fewer than 2 samples contributes nan spreads (reported, not hidden).
    """
    caption = parse_caption(prompt)
    n = images.shape[0]
    pos, size, found = [], [], []
    for obj in caption.objects:
        det = detect_hard(images, [obj.colour] * n, [obj.shape] * n)
        ok = det.found > 0
        found.append(ok.float().mean())
        pos.append((_std(det.cx[ok]) + _std(det.cy[ok])) / 2)
        size.append(_std(det.area[ok].sqrt()))
    return Diversity(
        position_spread=sum(pos) / len(pos),
        size_spread=sum(size) / len(size),
        pixel_distance=pairwise_pixel_distance(images),
        found_fraction=float(sum(found) / len(found)),
        n_samples=n,
    )


def mean_diversity(per_prompt: list[Diversity]) -> dict[str, float]:
    """Average of per-prompt diversities, ignoring nan spreads; n_samples is the total."""
    out: dict[str, float] = {}
    for key in ("position_spread", "size_spread", "pixel_distance", "found_fraction"):
        vals = torch.tensor([getattr(d, key) for d in per_prompt], dtype=torch.float64)
        vals = vals[~vals.isnan()]
        out[key] = float(vals.mean()) if vals.numel() else float("nan")
    out["n_samples"] = float(sum(d.n_samples for d in per_prompt))
    return out
