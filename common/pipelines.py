"""Loading diffusion pipelines by name, hub id or local path, and their LoRA adapter.

`load_model` reads the pipeline class from `model_index.json`, loads the pipeline with a DDIM
scheduler and wraps it in its `DiffusionModel` family (common/models): all the algorithm code sees.
SD1.x/2.x and SDXL checkpoints, the built-in random `tiny` and `tiny-sdxl` models and the trained
`shapes-base` testbed model all go through the same `from_pretrained` path of a saved directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from common.config import LoraConfig, ModelConfig
from common.models import DiffusionModel, ModelLoadError, model_class

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

# diffusers, transformers and peft are imported where they are used: the Ray driver and the replay queues
# import this module's names but never build a model, and those imports cost seconds of start-up per process.

ASSET_DIR = Path(__file__).parent / "assets"
# shapes-base-order: shapes-base continued with the auxiliary relation loss (548 steps), so that it knows the
# relation order partly (docs/shapes.md, "Teaching the base model the order").
BUILTIN_DIRS = {"shapes-base": ASSET_DIR / "shapes_base", "shapes-base-order": ASSET_DIR / "shapes_base_order"}
BUILTIN_NAMES = ["tiny", "tiny-sdxl", *BUILTIN_DIRS]

# Every trainable linear/conv of a small UNet: the tiny random UNet barely responds to attention-only LoRA.
ALL_UNET_MODULES = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "time_emb_proj", "linear_1", "linear_2", "conv_in", "conv_out", "conv",
]  # fmt: skip

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cache_dir() -> Path:
    """Where built-in generated models are cached (env DIFFEXP_CACHE, else ~/.cache/diffexp)."""
    return Path(os.environ.get("DIFFEXP_CACHE", Path.home() / ".cache" / "diffexp"))


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A complete StableDiffusionPipeline with random weights from `seed`: 64x64 images, 8x8x4 latents."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

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


def build_tiny_sdxl_pipeline(seed: int = 0):
    """A complete StableDiffusionXLPipeline with random weights from `seed`, shaped like SDXL at toy size.

    Two CLIP text encoders (the second with a projection, as SDXL's OpenCLIP bigG), a UNet whose
    cross-attention takes both encoders' states concatenated and whose `text_time` addition embedding
    takes the pooled text embedding plus six size/crop ids; 64x64 images, 8x8x4 latents.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from common.tokenizer import build_clip_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(model_max_length=32)
    tokenizer_2 = build_clip_tokenizer(model_max_length=32)
    tokenizer_2.pad_token = "!"  # SDXL's second tokenizer pads with "!" rather than end-of-text
    common = dict(vocab_size=len(tokenizer), intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=32, hidden_act="gelu")  # fmt: skip
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, projection_dim=32, **common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=64, projection_dim=48, **common))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32 + 64, attention_head_dim=(2, 4), norm_num_groups=16, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 48,
        transformer_layers_per_block=(1, 2),
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=16, sample_size=64, scaling_factor=0.13025, force_upcast=True,
    )  # fmt: skip
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
    )  # fmt: skip
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )  # fmt: skip


BUILTIN_BUILDERS = {"tiny": build_tiny_pipeline, "tiny-sdxl": build_tiny_sdxl_pipeline}


def _atomic_save(pipe, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    _quiet_libraries()  # no "Writing model shards" bar before a run's first line
    pipe.save_pretrained(tmp, safe_serialization=True)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race: theirs is complete too
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(cfg: ModelConfig) -> str:
    """A directory or hub id that `from_pretrained` can load for `cfg.pretrained`."""
    name = cfg.pretrained
    if name in BUILTIN_BUILDERS:
        path = cache_dir() / f"{name}-seed{cfg.tiny_seed}"
        if not (path / "model_index.json").is_file():
            _atomic_save(BUILTIN_BUILDERS[name](cfg.tiny_seed), path)
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


def check_model_configs(source: str, resolution) -> None:
    """The checks of `sampling.resolution` and of the scheduler that loading the model makes, from a local model's
    config files alone (before a run directory exists); a hub id is checked when it loads."""
    from common.models.base import check_resolution

    scheduler = Path(source) / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        _check_scheduler(source, json.loads(scheduler.read_text()))
    configs = [Path(source) / part / "config.json" for part in ("unet", "vae")]
    if resolution is None or not all(c.is_file() for c in configs):
        return
    check_resolution(resolution, *(json.loads(c.read_text()) for c in configs))


def _check_scheduler(source: str, config) -> None:
    from common.ddim_schedule import check_scheduler

    try:
        check_scheduler(config)
    except ValueError as err:
        raise ModelLoadError(f"model.pretrained={source!r}: {err}") from None


def pipeline_class_name(source: str, revision: str | None = None) -> str:
    """`_class_name` of the pipeline saved at `source` (a directory or hub id), from its model_index.json."""
    local = Path(source) / "model_index.json"
    try:
        if local.is_file():
            return str(json.loads(local.read_text())["_class_name"])
        # huggingface_hub, not diffusers: the Ray driver checks this and builds no model
        from huggingface_hub import hf_hub_download

        return str(json.loads(Path(hf_hub_download(source, "model_index.json", revision=revision)).read_text())[
            "_class_name"])  # fmt: skip
    except Exception as err:  # noqa: BLE001 - missing, unreachable, gated or malformed: one line each way
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1 is set: download it first or give a local path)" if offline else ""
        first = str(err).splitlines()[0] if str(err) else repr(err)
        raise ModelLoadError(f"model.pretrained={source!r}: no readable model_index.json{hint}: {first}") from None


def _quiet_libraries() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def load_pipeline(cfg: ModelConfig):
    """Load the diffusers pipeline of `cfg` (its class from model_index.json) with a DDIM scheduler, frozen,
    in eval mode, on the CPU. An unsupported pipeline class raises ModelLoadError naming the supported ones."""
    source = resolve_model_path(cfg)
    class_name = pipeline_class_name(source, cfg.revision)
    family = model_class(class_name)
    import diffusers

    _quiet_libraries()
    # diffusers renamed torch_dtype to dtype in 0.36; keep both working.
    new_api = tuple(int(x) for x in diffusers.__version__.split(".")[:2]) >= (0, 36)
    dtype_kw = {"dtype" if new_api else "torch_dtype": _DTYPES[cfg.dtype]}
    try:
        pipe = getattr(diffusers, class_name).from_pretrained(source, revision=cfg.revision, **family.load_kwargs, **dtype_kw)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1 is set: download it first or give a local path)" if offline else ""
        raise ModelLoadError(f"model.pretrained={source!r}: could not be loaded{hint}: {str(err).splitlines()[0]}")
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    _check_scheduler(source, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
            module.eval()
    return pipe


def load_model(cfg: ModelConfig, resolution=None) -> DiffusionModel:
    """The model of `cfg` behind the DiffusionModel interface, at `resolution` (None: its native size)."""
    pipe = load_pipeline(cfg)
    return model_class(type(pipe).__name__)(pipe, resolution)


def attach_lora(unet: UNet2DConditionModel, cfg: LoraConfig) -> None:
    """Add a trainable LoRA adapter (float32) to `unet`; B starts at zero so the policy starts as the base."""
    from peft import LoraConfig as PeftLoraConfig

    names = {n.rsplit(".", 1)[-1] for n, _ in unet.named_modules()}
    full = {n for n, _ in unet.named_modules()}
    unmatched = [t for t in cfg.target_modules if t not in names and not any(f.endswith("." + t) for f in full)]
    if unmatched:
        raise ModelLoadError(f"lora.target_modules: {unmatched} match no UNet module of this model; e.g. to_q, to_k, to_v, to_out.0")
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


def load_policy(model: ModelConfig, lora: LoraConfig, device: str = "cpu", resolution=None) -> DiffusionModel:
    """The frozen model plus a fresh LoRA adapter, on `device`: what samplers and the learner hold."""
    m = load_model(model, resolution)
    attach_lora(m.unet, lora)
    for module in m.modules:
        module.to(device)
    return m


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


@contextlib.contextmanager
def fused_lora(unet: UNet2DConditionModel):
    """Run `unet` with each LoRA layer folded into its base weight: W0 + scaling * B @ A, computed in float32
    and cast to W0's dtype, with the adapters off. Afterwards the original W0 tensors are put back (swapped,
    never subtracted, so nothing drifts) and the adapters and their requires_grad flags are as before."""
    from peft.tuners.lora import LoraLayer

    saved = []
    try:
        with torch.no_grad():
            for m in unet.modules():
                if not isinstance(m, LoraLayer) or m.disable_adapters or m.merged:
                    continue
                active = [a for a in m.active_adapters if a in m.lora_A]
                if not active:
                    continue
                base = m.get_base_layer()
                grads = [(p, p.requires_grad) for p in m.parameters() if p is not base.weight]
                w0 = base.weight.data
                fused = w0.float()
                for a in active:
                    fused = fused + m.get_delta_weight(a).float()
                saved.append((m, base, w0, grads))
                base.weight.data = fused.to(w0.dtype)
                m.enable_adapters(False)
        yield unet
    finally:
        for m, base, w0, grads in reversed(saved):
            base.weight.data = w0
            m.enable_adapters(True)
            for p, flag in grads:
                p.requires_grad_(flag)


def lora_checksum(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names and float32 bytes of a LoRA state, in sorted order (16 hex digits)."""
    h = hashlib.sha256()
    for n in sorted(state):
        h.update(n.encode())
        h.update(state[n].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def unet_lora_export(unet: UNet2DConditionModel) -> tuple[dict[str, torch.Tensor], dict]:
    """The UNet's LoRA as diffusers loads it natively, and its adapter metadata (so alpha != rank loads right).

    peft's own key names (lora_A/lora_B) are what diffusers loads; its old-format conversion renames
    attention layers only, which would leave a mixed, unloadable file.
    """
    from peft.utils import get_peft_model_state_dict

    layers = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    meta = unet.peft_config["default"].to_dict()
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
    return layers, meta


def save_lora_diffusers(model: DiffusionModel, directory: str | Path) -> None:
    """Write the LoRA in the model's own diffusers format: `pipe.load_lora_weights(directory)` loads it."""
    layers, meta = unet_lora_export(model.unet)
    model.save_lora_weights(directory, layers, meta)
