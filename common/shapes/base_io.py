"""The Shapes base model's parts: fresh modules with the testbed's sizes, and saving/exporting the pipeline.

Split from train_base so that the trainer stays one file of training stages.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

TEXT_MAX_LENGTH = 16


def build_models(tokenizer_vocab: int, pad_id: int) -> tuple:
    """Fresh (vae, text_encoder, unet, scheduler) with the testbed's sizes (see docs/shapes.md)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=tokenizer_vocab,
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=TEXT_MAX_LENGTH,
            projection_dim=128,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=pad_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128,
        attention_head_dim=8,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    return vae, text_encoder, unet, scheduler


def save_pipeline(path: Path, vae, text_encoder, unet, scheduler, tokenizer, fp16: bool, meta: dict) -> None:
    """save_pretrained a StableDiffusionPipeline (no safety checker) to path, plus train_config.json."""
    from diffusers import StableDiffusionPipeline

    # Every module in one dtype: a mixed fp16/fp32 directory fails in a plain from_pretrained(path).
    te, un, va = copy.deepcopy(text_encoder), copy.deepcopy(unet), copy.deepcopy(vae)
    if fp16:
        te, un, va = te.half(), un.half(), va.half()
    pipe = StableDiffusionPipeline(
        vae=va,
        text_encoder=te,
        tokenizer=tokenizer,
        unet=un,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(path), safe_serialization=True)
    # transformers loads a model in the dtype its config names; diffusers loads fp32. Name fp32 so that a
    # plain from_pretrained(path) gives one dtype (fp32, fast on CPUs) from the fp16 files.
    te_config = path / "text_encoder" / "config.json"
    cfg = json.loads(te_config.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = "float32"
    te_config.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (path / "train_config.json").write_text(json.dumps(meta, indent=2) + "\n")


def export_pipeline(src: Path, dst: Path, fp16: bool = True) -> None:
    """Re-save the pipeline saved at src (and its train_config.json) to dst, all modules fp16 if fp16."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(src), torch_dtype=torch.float32)
    meta = (
        json.loads((src / "train_config.json").read_text()) if (src / "train_config.json").is_file() else {}
    )
    save_pipeline(dst, pipe.vae, pipe.text_encoder, pipe.unet, pipe.scheduler, pipe.tokenizer, fp16, meta)
    print(f"exported {src} -> {dst} (fp16={fp16})", flush=True)
