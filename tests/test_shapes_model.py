"""The shipped Shapes base model: loads by directory and by name, samples what the prompt asks for."""

from __future__ import annotations

import json

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from common.config import ModelConfig
from common.pipelines import BUILTIN_DIRS, load_pipeline
from rewards import build_reward

SHAPES_DIR = BUILTIN_DIRS["shapes-base"]


def test_weights_ship_small_as_safetensors_with_their_recipe() -> None:
    files = [f for f in SHAPES_DIR.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 40 * 2**20
    weights = [f for f in files if f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert len(weights) == 3 and all(f.suffix == ".safetensors" for f in weights)
    recipe = json.loads((SHAPES_DIR / "train_config.json").read_text())
    assert {"seed", "vae_steps", "unet_steps", "n_images"} <= set(recipe)


def test_loads_with_plain_from_pretrained_like_a_hub_model() -> None:
    pipe = StableDiffusionPipeline.from_pretrained(str(SHAPES_DIR))
    assert isinstance(pipe.vae, AutoencoderKL) and isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.scheduler, DDIMScheduler)
    assert isinstance(pipe.tokenizer, CLIPTokenizer) and len(pipe.tokenizer) == 49408
    # fp16 files, but a plain load gives one dtype throughout (fp32: fast on CPUs).
    assert {pipe.vae.dtype, pipe.unet.dtype, pipe.text_encoder.dtype} == {torch.float32}
    with torch.no_grad():
        latents = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)


def test_loads_by_name_and_samples_the_prompted_objects() -> None:
    pipe = load_pipeline(ModelConfig(pretrained="shapes-base"))
    by_dir = StableDiffusionPipeline.from_pretrained(str(SHAPES_DIR))
    key = "conv_in.weight"
    assert torch.equal(pipe.unet.state_dict()[key], by_dir.unet.state_dict()[key])
    prompts = [
        "a red circle",
        "a blue square",
        "a yellow triangle",
        "a green circle",
        "a purple square",
        "an orange triangle",
    ]
    with torch.no_grad():
        out = pipe(
            prompts,
            num_inference_steps=10,
            guidance_scale=5.0,
            height=64,
            width=64,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        )
    images = out.images.float()
    assert images.shape == (6, 3, 64, 64) and torch.isfinite(images).all()
    # The number that matters: the model draws the asked-for colour and shape (base success ~0.9 at 20 steps).
    assert build_reward("shapes")(images, prompts).mean() >= 0.75
