"""Image-text alignment rewards on a transformers CLIPModel: CLIPScore and PickScore.

Both embed the image (torch preprocessing, rewards/preprocess.py) and the prompt, L2-normalise, and take
the cosine:
- `clipscore`: CLIP ViT-L/14 (`path`, default openai/clip-vit-large-patch14), 100 x cosine; with option
  `w` (e.g. 2.5, Hessel et al.'s CLIPScore) w x max(cosine, 0) instead.
- `pickscore`: PickScore v1 (`path`, default yuvalkirstain/PickScore_v1, a CLIP ViT-H/14 fine-tuned on
  Pick-a-Pic), logit_scale.exp() x cosine, as its authors score; its tokenizer comes from
  `tokenizer_path` (default laion/CLIP-ViT-H-14-laion2B-s32B-b79K, the processor it was trained with)
  or from `path` when that directory holds one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rewards.loading import (
    RewardLoadError,
    TextFeatureCache,
    load_clip_model,
    resolve_source,
    reward_device,
    reward_dtype,
)
from rewards.preprocess import clip_preprocess
from rewards.registry import register_reward


def _features(out) -> torch.Tensor:
    return getattr(out, "pooler_output", out)


class _ClipAlignment:
    name = ""
    differentiable = True
    default_path: str = ""
    default_tokenizer: str | None = None
    expected = "CLIPModel"

    def __init__(self, path: str | None = None, tokenizer_path: str | None = None, device: str | None = None,
                 dtype: str = "auto"):  # fmt: skip
        self.preflight(path=path, tokenizer_path=tokenizer_path)
        self.device = reward_device(device)
        self.dtype = reward_dtype(dtype, self.device)
        source = resolve_source(self.name, "path", path, self.default_path, f"a {self.expected} directory")
        self.model = load_clip_model(self.name, source, self.device, self.dtype, self.expected)
        self.tokenizer = self._tokenizer(source, tokenizer_path)
        self.size = self.model.config.vision_config.image_size
        self._text_cache = TextFeatureCache()

    def _tokenizer(self, source: str, tokenizer_path: str | None):
        from transformers import AutoTokenizer

        has_own = Path(source).is_dir() and any((Path(source) / f).is_file() for f in ("tokenizer.json", "vocab.json"))
        tok_source = tokenizer_path or (source if has_own or not self.default_tokenizer else self.default_tokenizer)
        tok_source = resolve_source(self.name, "tokenizer_path", tok_source, None, "a CLIP tokenizer directory",
                                    hub_file="tokenizer_config.json")  # fmt: skip
        try:
            return AutoTokenizer.from_pretrained(tok_source)
        except (OSError, ValueError) as err:
            raise RewardLoadError(f"reward {self.name!r}: tokenizer {tok_source} is unreadable: {str(err).splitlines()[0]}") from None

    @classmethod
    def preflight(cls, path: str | None = None, tokenizer_path: str | None = None, **_) -> None:
        resolve_source(cls.name, "path", path, cls.default_path, f"a {cls.expected} directory")
        if tokenizer_path is not None:
            resolve_source(cls.name, "tokenizer_path", tokenizer_path, None, "a CLIP tokenizer directory",
                           hub_file="tokenizer_config.json")  # fmt: skip

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """Normalised text embeddings [B, D], cached per prompt (prompts repeat every epoch)."""

        def encode(missing: list[str]) -> torch.Tensor:
            tok = self.tokenizer(missing, padding="max_length", truncation=True, return_tensors="pt",
                                 max_length=min(77, self.tokenizer.model_max_length))  # fmt: skip
            emb = _features(self.model.get_text_features(**{k: v.to(self.device) for k, v in tok.items()}))
            return emb.float() / emb.float().norm(dim=-1, keepdim=True)

        return self._text_cache(prompts, encode)

    def cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = clip_preprocess(images.to(self.device), self.size, dtype=self.dtype)
        img = _features(self.model.get_image_features(pixel_values=x)).float()
        img = img / img.norm(dim=-1, keepdim=True)
        return (img * self.text_features(prompts)).sum(-1)


@register_reward("clipscore")
class ClipScore(_ClipAlignment):
    name = "clipscore"
    default_path = "openai/clip-vit-large-patch14"
    expected = "CLIPModel (CLIP ViT-L/14)"

    def __init__(self, path: str | None = None, tokenizer_path: str | None = None, w: float | None = None,
                 device: str | None = None, dtype: str = "auto"):  # fmt: skip
        super().__init__(path, tokenizer_path, device, dtype)
        self.w = w

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        cos = self.cosine(images, prompts)
        return self.w * cos.clamp(min=0) if self.w is not None else 100.0 * cos


@register_reward("pickscore")
class PickScore(_ClipAlignment):
    name = "pickscore"
    default_path = "yuvalkirstain/PickScore_v1"
    default_tokenizer = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    expected = "CLIPModel (PickScore v1, CLIP ViT-H/14)"

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.model.logit_scale.exp().float() * self.cosine(images, prompts)
