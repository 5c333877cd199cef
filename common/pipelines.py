"""Loading diffusion pipelines by name, hub id or local path, and their LoRA adapter.

One small interface, `DiffusionParts`, is all the algorithm code sees: the
frozen modules, the DDIM scheduler, and a few helpers (encode token ids,
decode latents to images in [0, 1]). SD1.x/2.x checkpoints, the built-in
random `tiny` model and the trained `shapes-base` testbed model all go
through `load_pipeline`, i.e. through `from_pretrained` of a saved directory.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from common.config import LoraConfig, ModelConfig

ASSET_DIR = Path(__file__).parent / "assets"
BUILTIN_DIRS = {"shapes-base": ASSET_DIR / "shapes_base"}
BUILTIN_NAMES = ["tiny", *BUILTIN_DIRS]

# Every trainable linear/conv of a small UNet: the tiny random UNet barely responds to attention-only LoRA.
ALL_UNET_MODULES = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "time_emb_proj", "linear_1", "linear_2", "conv_in", "conv_out", "conv",
]  # fmt: skip


class ModelLoadError(ValueError):
    """A model that cannot be loaded, worded as one line naming the fix."""


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cache_dir() -> Path:
    """Where built-in generated models are cached (env DIFFEXP_CACHE, else ~/.cache/diffexp)."""
    return Path(os.environ.get("DIFFEXP_CACHE", Path.home() / ".cache" / "diffexp"))


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A complete StableDiffusionPipeline with random weights from `seed`: 64x64 images, 8x8x4 latents."""
    from common.tokenizer import build_clip_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(model_max_length=32)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=32, projection_dim=64,
        )
    )  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=16, sample_size=64,
    )  # fmt: skip
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def _atomic_save(pipe: StableDiffusionPipeline, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    pipe.save_pretrained(tmp, safe_serialization=True)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race: theirs is complete too
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(cfg: ModelConfig) -> str:
    """A directory or hub id that `from_pretrained` can load for `cfg.pretrained`."""
    name = cfg.pretrained
    if name == "tiny":
        path = cache_dir() / f"tiny-seed{cfg.tiny_seed}"
        if not (path / "model_index.json").is_file():
            _atomic_save(build_tiny_pipeline(cfg.tiny_seed), path)
        return str(path)
    if name in BUILTIN_DIRS:
        path = BUILTIN_DIRS[name]
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"model.pretrained={name!r}: its weights are missing at {path}; reinstall the package")
        return str(path)
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or path.exists() or name.count("/") != 1
    if looks_local:
        if not path.is_dir():
            raise ModelLoadError(
                f"model.pretrained={name!r}: no such directory; give a built-in name "
                f"({', '.join(BUILTIN_NAMES)}), a hub id, or a directory saved with save_pretrained"
            )
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"model.pretrained={name!r}: {path} has no model_index.json; save the pipeline with save_pretrained"
            )
        return str(path)
    return name


def load_pipeline(cfg: ModelConfig) -> StableDiffusionPipeline:
    """Load the pipeline of `cfg` with a DDIM scheduler, frozen, in eval mode, on the CPU."""
    source = resolve_model_path(cfg)
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    # diffusers renamed torch_dtype to dtype in 0.36; keep both working.
    new_api = tuple(int(x) for x in diffusers.__version__.split(".")[:2]) >= (0, 36)
    dtype_kw = {"dtype" if new_api else "torch_dtype": _DTYPES[cfg.dtype]}
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source, revision=cfg.revision, safety_checker=None, requires_safety_checker=False, **dtype_kw
        )
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1 is set: download it first or give a local path)" if offline else ""
        raise ModelLoadError(f"model.pretrained={source!r}: could not be loaded{hint}: {str(err).splitlines()[0]}")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
        module.eval()
    return pipe


@dataclass
class DiffusionParts:
    """The frozen modules of a pipeline and the few operations the algorithms need."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: object
    scheduler: DDIMScheduler

    @classmethod
    def from_pipeline(cls, pipe: StableDiffusionPipeline) -> DiffusionParts:
        return cls(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """[C, h, w] of one latent."""
        s = self.unet.config.sample_size
        return (self.unet.config.in_channels, s, s)

    @torch.no_grad()
    def encode_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] -> per-token text embeddings [B, L, D] (float32)."""
        out = self.text_encoder(input_ids.to(self.text_encoder.device))[0]
        return out.float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> images [B, 3, H, W] in [0, 1]."""
        vae_dtype = next(self.vae.parameters()).dtype
        images = self.vae.decode(latents.to(vae_dtype) / self.vae.config.scaling_factor).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)


def attach_lora(unet: UNet2DConditionModel, cfg: LoraConfig) -> None:
    """Add a trainable LoRA adapter (float32) to `unet`; B starts at zero so the policy starts as the base."""
    from peft import LoraConfig as PeftLoraConfig

    names = {n.rsplit(".", 1)[-1] for n, _ in unet.named_modules()}
    full = {n for n, _ in unet.named_modules()}
    unmatched = [t for t in cfg.target_modules if t not in names and not any(f.endswith("." + t) for f in full)]
    if unmatched:
        raise ModelLoadError(f"lora.target_modules: {unmatched} match no UNet module; e.g. to_q, to_k, to_v, to_out.0")
    with torch.random.fork_rng():
        torch.manual_seed(cfg.init_seed)
        unet.add_adapter(
            PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules),
                           init_lora_weights="gaussian")
        )  # fmt: skip
    for n, p in unet.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
            p.requires_grad_(True)


def load_policy(model: ModelConfig, lora: LoraConfig, device: str = "cpu") -> DiffusionParts:
    """The frozen pipeline plus a fresh LoRA adapter, on `device`: what samplers and the learner hold."""
    pipe = load_pipeline(model)
    attach_lora(pipe.unet, lora)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.to(device)
    return DiffusionParts.from_pipeline(pipe)


def lora_state(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The LoRA tensors of `unet` by parameter name (detached CPU float32 copies)."""
    return {n: p.detach().to("cpu", torch.float32).clone() for n, p in unet.named_parameters() if "lora_" in n}


def load_lora_state(unet: UNet2DConditionModel, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (from `lora_state`) into `unet`'s LoRA parameters; every tensor must match by name."""
    params = {n: p for n, p in unet.named_parameters() if "lora_" in n}
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state))[:3], sorted(set(state) - set(params))[:3]
        raise ValueError(f"LoRA state does not match the adapter (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n].to(p.device, p.dtype))


def lora_checksum(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names and float32 bytes of a LoRA state, in sorted order (16 hex digits)."""
    h = hashlib.sha256()
    for n in sorted(state):
        h.update(n.encode())
        h.update(state[n].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_lora_diffusers(unet: UNet2DConditionModel, directory: str | Path) -> None:
    """Write the LoRA in diffusers format: `pipe.load_lora_weights(directory)` loads it."""
    from peft.utils import get_peft_model_state_dict

    # peft's own key names (lora_A/lora_B) are what diffusers loads natively; its old-format
    # conversion renames attention layers only, which would leave a mixed, unloadable file.
    layers = get_peft_model_state_dict(unet)
    meta = unet.peft_config["default"].to_dict()
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
    try:
        StableDiffusionPipeline.save_lora_weights(
            str(directory), unet_lora_layers=layers, safe_serialization=True, unet_lora_adapter_metadata=meta
        )
    except TypeError:  # older diffusers without adapter metadata: alpha must then equal rank
        StableDiffusionPipeline.save_lora_weights(str(directory), unet_lora_layers=layers, safe_serialization=True)
