"""The model interface: all that the algorithms (sampler, learner, exploration, LoRA) see of a diffusion model.

A `DiffusionModel` wraps a loaded diffusers pipeline and offers:

- `condition(prompts)`: the conditioning of (possibly re-weighted) prompts as a `Cond`, a small dict of
  named float32 tensors with the batch first. SD1.x/2.x need one tensor (`prompt_embeds`); SDXL adds its
  pooled text embedding and size/crop `time_ids`. Trajectories carry the dict as it is.
- `negative()`: the classifier-free-guidance negative, batch 1, in the model's own convention.
- `predict(latents, timesteps, cond)`: one UNet call on that conditioning (no guidance mixing).
- `decode(latents)`: images in [0, 1].
- `latent_shape` for `sampling.resolution`, and `save_lora_weights` in the pipeline's own LoRA format.

Prompt weighting (DiffExp's second strategy) happens here, on the per-token embeddings of every text
encoder: z' = z_empty + w (z - z_empty), with each encoder's own empty-prompt embedding. A model family
is one subclass in its own file (`sd.py`, `sdxl.py`) registered by its pipeline class name in
`common.models.MODEL_CLASSES`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import ClassVar

import torch

from common.exploration import WeightedPrompt, apply_token_weights, parse_prompt, tokenize_weighted

Cond = dict[str, torch.Tensor]


class ModelLoadError(ValueError):
    """A model that cannot be loaded or used as configured, worded as one line naming the fix."""


def cond_expand(cond: Cond, n: int) -> Cond:
    """Broadcast a batch-1 conditioning to batch n (views, no copy)."""
    return {k: v.expand(n, *v.shape[1:]) if v.shape[0] == 1 and n != 1 else v for k, v in cond.items()}


def cond_cat(conds: list[Cond]) -> Cond:
    """Concatenate conditionings along the batch."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def cond_index(cond: Cond, idx) -> Cond:
    return {k: v[idx] for k, v in cond.items()}


def cond_to(cond: Cond, device, dtype: torch.dtype | None = None) -> Cond:
    return {k: v.to(device, dtype) if dtype is not None else v.to(device) for k, v in cond.items()}


def check_resolution(resolution, unet_config, vae_config) -> tuple[int, int]:
    """(height, width) of `resolution` (None: the model's native size) for a UNet and VAE with these configs
    (the loaded modules' `.config` or the dicts of their config.json); one line naming the field otherwise."""

    def get(c, key):
        return c[key] if isinstance(c, dict) else getattr(c, key)

    vae = 2 ** (len(get(vae_config, "block_out_channels")) - 1)
    s = get(unet_config, "sample_size")
    native = (s * vae, s * vae) if isinstance(s, int) else (s[0] * vae, s[1] * vae)
    if resolution is None:
        return native
    h, w = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    # the VAE halves the size per block; each UNet down block but the last halves the latent again
    step = vae * 2 ** (len(get(unet_config, "block_out_channels")) - 1)
    if h <= 0 or w <= 0 or h % step or w % step:
        raise ModelLoadError(
            f"sampling.resolution={resolution}: this model needs multiples of {step} "
            f"(VAE x{vae}, UNet x{step // vae}); its native size is {native[0]}x{native[1]}"
        )
    return h, w


class DiffusionModel(ABC):
    """A loaded pipeline seen through the interface the algorithms use (see the module docstring)."""

    family: ClassVar[str] = ""
    pipeline_class_name: ClassVar[str] = ""
    load_kwargs: ClassVar[dict] = {}  # extra from_pretrained arguments of the pipeline class
    cache_size: ClassVar[int] = 4096  # encoded prompts kept per model (all encoders together), least recent out

    def __init__(self, pipe, resolution: int | tuple[int, int] | list[int] | None = None):
        self.pipe = pipe
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.scheduler = pipe.scheduler
        self.encoders: list[tuple[object, torch.nn.Module]] = self._text_encoders(pipe)
        self.height, self.width = self._check_resolution(resolution)
        self._cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self._empty: list[torch.Tensor] | None = None
        # compiled UNets (the same module and weights): for the calls that take no gradient (sampling.compile)
        # and for those that do (algorithm.compile, the learner's)
        self.sampling_unet: torch.nn.Module | None = None
        self.training_unet: torch.nn.Module | None = None

    # ------------------------------------------------------------------ subclass hooks
    @abstractmethod
    def _text_encoders(self, pipe) -> list[tuple[object, torch.nn.Module]]:
        """(tokenizer, text encoder) pairs in the order their states are concatenated."""

    @abstractmethod
    def _run_encoder(self, i: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encoder i on token ids [N, L] -> (per-token states [N, L, D], pooled [N, P] or None), float32."""

    @abstractmethod
    def condition(self, prompts: list[WeightedPrompt]) -> Cond:
        """Conditioning [B, ...] of each (re-weighted) prompt."""

    @abstractmethod
    def negative(self) -> Cond:
        """The CFG negative (empty prompt in the model's convention), batch 1."""

    @abstractmethod
    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        """One UNet call: model output [N, C, h, w] (float32) for latents [N, ...], timesteps [N], cond [N, ...]."""

    # ------------------------------------------------------------------ shared parts
    def compiled_unet(self, backend: str, setting: str) -> torch.nn.Module:
        """torch.compile of the UNet with `backend` (compiled at its first call; the module and its weights
        stay shared); an unknown backend is an error naming `setting`."""
        try:
            return torch.compile(self.unet, backend=backend)
        except Exception as e:
            raise ValueError(f"{setting}={backend!r}: {e}") from e

    def unet_call(self) -> torch.nn.Module:
        """The UNet `predict` calls: a compiled one where set (`sampling_unet` without gradients,
        `training_unet` with them), else the module itself."""
        compiled = self.training_unet if torch.is_grad_enabled() else self.sampling_unet
        return compiled if compiled is not None else self.unet

    @property
    def modules(self) -> list[torch.nn.Module]:
        """Every module of the model (UNet, VAE, text encoders)."""
        return [self.unet, self.vae, *(enc for _, enc in self.encoders)]

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _check_resolution(self, resolution) -> tuple[int, int]:
        return check_resolution(resolution, self.unet.config, self.vae.config)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """[C, h, w] of one latent at the configured resolution."""
        f = self.vae_scale_factor
        return (self.unet.config.in_channels, self.height // f, self.width // f)

    @property
    def max_length(self) -> int:
        return int(self.encoders[0][0].model_max_length)

    @torch.no_grad()
    def _encode(self, i: int, id_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encoder i's (states [B, L, D], pooled [B, P] or None) for token id lists, cached per prompt."""
        missing = list({tuple(ids) for ids in id_lists if (i, tuple(ids)) not in self._cache})
        if missing:
            enc = self.encoders[i][1]
            z, pooled = self._run_encoder(i, torch.tensor(missing, dtype=torch.long, device=enc.device))
            for j, ids in enumerate(missing):
                self._cache[(i, ids)] = (z[j].float().cpu(), None if pooled is None else pooled[j].float().cpu())
        got = []
        for ids in id_lists:
            key = (i, tuple(ids))
            self._cache.move_to_end(key)  # least recently used first
            got.append(self._cache[key])
        while len(self._cache) > self.cache_size:  # bound memory on huge prompt sets; this call's are newest
            self._cache.popitem(last=False)
        z = torch.stack([g[0] for g in got])
        pooled = None if got[0][1] is None else torch.stack([g[1] for g in got])
        return z, pooled

    def empty_states(self) -> list[torch.Tensor]:
        """Each encoder's per-token states [L, D] of the empty prompt (the base of prompt weighting)."""
        if self._empty is None:
            empty = parse_prompt("")
            self._empty = [self._encode(i, [tokenize_weighted(tok, empty)[0]])[0][0] for i, (tok, _) in enumerate(self.encoders)]
        return self._empty

    def encoder_states(self, prompts: list[WeightedPrompt]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per encoder: (weighted per-token states [B, L, D], pooled [B, P] or None), float32 on the CPU.

        The pooled embedding is that of the plain prompt: weights change the token states only.
        """
        out = []
        for i, (tok, _) in enumerate(self.encoders):
            toks = [tokenize_weighted(tok, wp) for wp in prompts]
            z, pooled = self._encode(i, [ids for ids, _ in toks])
            w = torch.tensor([ws for _, ws in toks], dtype=torch.float32)
            if not torch.all(w == 1.0):
                z = apply_token_weights(z, self.empty_states()[i], w)
            out.append((z, pooled))
        return out

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> images [B, 3, H, W] in [0, 1] (float32)."""
        vae_dtype = next(self.vae.parameters()).dtype
        images = self.vae.decode(latents.to(self.vae.device, vae_dtype) / self.vae.config.scaling_factor).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def save_lora_weights(self, directory, layers: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
        """Write UNet LoRA `layers` (peft keys) in the pipeline's own format: `pipe.load_lora_weights` loads it."""
        save_lora_files(type(self.pipe), directory, layers, metadata)


def save_lora_files(pipeline_class, directory, layers: dict[str, torch.Tensor], metadata: dict | None) -> None:
    """`pipeline_class.save_lora_weights` of UNet LoRA `layers`, with adapter metadata where supported."""
    try:
        pipeline_class.save_lora_weights(
            str(directory), unet_lora_layers=layers, safe_serialization=True, unet_lora_adapter_metadata=metadata
        )
    except TypeError:  # older diffusers without adapter metadata: alpha must then equal rank
        pipeline_class.save_lora_weights(str(directory), unet_lora_layers=layers, safe_serialization=True)
