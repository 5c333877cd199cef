"""Stable Diffusion XL: two text encoders, a pooled text embedding and size/crop micro-conditioning.

Conditioning, as `StableDiffusionXLPipeline` builds it:
- `prompt_embeds` [B, L, D1 + D2]: the penultimate hidden states of both encoders, concatenated;
- `text_embeds` [B, P]: the pooled, projected embedding of the second encoder;
- `time_ids` [B, 6]: (original height, width, crop top, left, target height, width); we generate at the
  configured resolution, uncropped, so it is (H, W, 0, 0, H, W).
The negative is zeros for both text tensors when the pipeline says `force_zeros_for_empty_prompt` (SDXL
base does), else the encoded empty prompt. The VAE runs in float32 when it would run in float16 and its
config says `force_upcast` (SDXL's VAE overflows in float16).
"""

from __future__ import annotations

import torch

from common.exploration import WeightedPrompt
from common.models.base import Cond, DiffusionModel, ModelLoadError


class StableDiffusionXL(DiffusionModel):
    family = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"

    def __init__(self, pipe, resolution=None):
        if pipe.text_encoder is None or pipe.text_encoder_2 is None:
            raise ModelLoadError(
                "model.pretrained: this SDXL pipeline lacks a text encoder (a refiner?); give an SDXL base model"
            )
        super().__init__(pipe, resolution)
        if self.vae.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False):
            self.vae.to(torch.float32)

    def _text_encoders(self, pipe):
        return [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]

    def _run_encoder(self, i, ids):
        out = self.encoders[i][1](ids, output_hidden_states=True)
        pooled = out[0] if out[0].ndim == 2 else None  # CLIPTextModelWithProjection's text_embeds
        return out.hidden_states[-2].float(), None if pooled is None else pooled.float()

    def time_ids(self, n: int) -> torch.Tensor:
        h, w = self.height, self.width
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).expand(n, 6).clone()

    def condition(self, prompts: list[WeightedPrompt]) -> Cond:
        (z1, _), (z2, pooled) = self.encoder_states(prompts)
        return {"prompt_embeds": torch.cat([z1, z2], dim=-1), "text_embeds": pooled, "time_ids": self.time_ids(len(prompts))}

    def negative(self) -> Cond:
        if getattr(self.pipe.config, "force_zeros_for_empty_prompt", True):
            d = sum(enc.config.hidden_size for _, enc in self.encoders)
            return {
                "prompt_embeds": torch.zeros(1, self.max_length, d),
                "text_embeds": torch.zeros(1, self.encoders[1][1].config.projection_dim),
                "time_ids": self.time_ids(1),
            }
        from common.exploration import parse_prompt

        return self.condition([parse_prompt("")])

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        dtype = self.unet.dtype
        added = {"text_embeds": cond["text_embeds"].to(dtype), "time_ids": cond["time_ids"].to(dtype)}
        return self.unet_call()(
            latents.to(dtype), timesteps, encoder_hidden_states=cond["prompt_embeds"].to(dtype), added_cond_kwargs=added
        ).sample.float()
