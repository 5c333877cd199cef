"""HPS v2.1 (Human Preference Score): an open_clip ViT-H-14 fine-tuned on human preferences.

Loaded through open_clip (the `hpsv2` package pins pytest and protobuf versions that break this
project): the architecture is built without weights (`arch`, default ViT-H-14) and the HPS checkpoint
(`path`, e.g. HPS_v2.1_compressed.pt from the xswu/HPSv2 hub repo; a dict with `state_dict`, or the state
dict itself) is loaded into it. The score is the cosine of the normalised image and text embeddings, as
the package scores (about 0.2-0.35 for real images).
"""

from __future__ import annotations

import torch

from rewards.loading import (
    RewardLoadError,
    TextFeatureCache,
    hub_file,
    load_state_strict,
    load_torch_state,
    resolve_source,
    reward_device,
    reward_dtype,
)  # fmt: skip
from rewards.preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess
from rewards.registry import register_reward

HPS_REPO, HPS_FILE = "xswu/HPSv2", "HPS_v2.1_compressed.pt"


@register_reward("hpsv2")
class HPSv2:
    name = "hpsv2"
    differentiable = True

    def __init__(self, path: str | None = None, arch: str = "ViT-H-14", device: str | None = None, dtype: str = "auto"):
        import open_clip

        self.preflight(path=path, arch=arch)
        self.device = reward_device(device)
        self.dtype = reward_dtype(dtype, self.device)
        source = resolve_source(self.name, "path", path, HPS_REPO, f"the HPS checkpoint file ({HPS_FILE})",
                                hub_file=HPS_FILE, kind="file")  # fmt: skip
        ckpt_file = hub_file(source, HPS_FILE)
        model = open_clip.create_model(arch, pretrained=None)
        state = load_torch_state(self.name, "path", ckpt_file)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        load_state_strict(model, state, self.name, ckpt_file, f"open_clip {arch}")
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(arch)
        cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        size = model.visual.image_size
        self.size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.mean, self.std = tuple(cfg.get("mean", CLIP_MEAN)), tuple(cfg.get("std", CLIP_STD))
        self._text_cache = TextFeatureCache()

    @classmethod
    def preflight(cls, path: str | None = None, arch: str = "ViT-H-14", **_) -> None:
        import open_clip

        if arch not in open_clip.list_models():
            raise RewardLoadError(f"reward 'hpsv2': option arch={arch!r} is not an open_clip architecture (HPS v2.1 is ViT-H-14)")
        resolve_source(cls.name, "path", path, HPS_REPO, f"the HPS checkpoint file ({HPS_FILE})", hub_file=HPS_FILE,
                       kind="file")  # fmt: skip

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        def encode(missing: list[str]) -> torch.Tensor:
            return self.model.encode_text(self.tokenizer(missing).to(self.device), normalize=True).float()

        return self._text_cache(prompts, encode)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = clip_preprocess(images.to(self.device), self.size, self.mean, self.std, dtype=self.dtype)
        img = self.model.encode_image(x, normalize=True).float()
        return (img * self.text_features(prompts)).sum(-1)
