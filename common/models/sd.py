"""Stable Diffusion 1.x/2.x (and the built-in `tiny` and `shapes-base` models): one CLIP text encoder."""

from __future__ import annotations

import torch

from common.exploration import WeightedPrompt
from common.models.base import Cond, DiffusionModel


class StableDiffusion(DiffusionModel):
    """Conditioning: `prompt_embeds` [B, L, D], the text encoder's last hidden states; negative: the empty prompt."""

    family = "sd"
    pipeline_class_name = "StableDiffusionPipeline"
    load_kwargs = {"safety_checker": None, "requires_safety_checker": False}

    def _text_encoders(self, pipe):
        return [(pipe.tokenizer, pipe.text_encoder)]

    def _run_encoder(self, i, ids):
        return self.encoders[i][1](ids)[0].float(), None

    def condition(self, prompts: list[WeightedPrompt]) -> Cond:
        return {"prompt_embeds": self.encoder_states(prompts)[0][0]}

    def negative(self) -> Cond:
        return {"prompt_embeds": self.empty_states()[0].unsqueeze(0)}

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        dtype = self.unet.dtype
        return self.unet_call()(latents.to(dtype), timesteps, encoder_hidden_states=cond["prompt_embeds"].to(dtype)).sample.float()
