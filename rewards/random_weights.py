"""Learned reward models with random weights, in their real architectures and file formats.

Tests and bench/rewards.py build these (nothing can be downloaded there) and load them through the same
code as the real checkpoints. `full=True` gives the published sizes (CLIP ViT-L/14, CLIP ViT-H/14,
open_clip ViT-H-14), for throughput and memory on a GPU; otherwise a reduced width and depth that a CPU
runs in milliseconds. The aesthetic head is small enough to be full size always.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SMALL_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=77)  # fmt: skip
SMALL_VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2)  # fmt: skip
# published configs (openai/clip-vit-large-patch14; laion/CLIP-ViT-H-14, PickScore's base)
L14 = (dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77),
       dict(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
            num_attention_heads=16), 768)  # fmt: skip
H14 = (dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            max_position_embeddings=77, hidden_act="gelu"),
       dict(image_size=224, patch_size=14, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
            num_attention_heads=16, hidden_act="gelu"), 1024)  # fmt: skip
SMALL_OPEN_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
                   "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}  # fmt: skip


def save_clip(directory: str | Path, size: str = "small", projection_dim: int = 768, seed: int = 0) -> str:
    """A random transformers CLIPModel with a CLIP tokenizer, saved with save_pretrained.
    size: small (reduced; `projection_dim` kept so heads fit), l14 or h14 (published sizes)."""
    from transformers import CLIPConfig, CLIPModel

    from common.tokenizer import build_clip_tokenizer

    if size == "small":
        text, vision, proj = SMALL_TEXT, SMALL_VISION, projection_dim
    else:
        text, vision, proj = {"l14": L14, "h14": H14}[size]
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj)).save_pretrained(directory)
    build_clip_tokenizer(directory, model_max_length=77)
    return str(directory)


def save_aesthetic_head(path: str | Path, dim: int = 768, seed: int = 1) -> str:
    from rewards.aesthetic import AestheticHead

    torch.manual_seed(seed)
    torch.save(AestheticHead(dim).state_dict(), path)
    return str(path)


def save_hps(directory: str | Path, full: bool = False, seed: int = 2) -> tuple[str, str]:
    """(checkpoint path, open_clip arch) of a random HPS-style checkpoint ({"state_dict": ...})."""
    import open_clip

    directory = Path(directory)
    arch = "ViT-H-14"
    if not full:
        arch = "hps-random-small"
        (directory / f"{arch}.json").write_text(json.dumps(SMALL_OPEN_CLIP))
        open_clip.add_model_config(str(directory / f"{arch}.json"))
    path = directory / "HPS_v2.1_compressed.pt"
    if not path.is_file():
        torch.manual_seed(seed)
        model = open_clip.create_model(arch, pretrained=None)
        torch.save({"state_dict": model.state_dict()}, path)
    return str(path), arch


def reward_terms(directory: str | Path, full: bool = False) -> dict[str, dict]:
    """Options of every learned reward on random weights saved under `directory` (built on first use)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    small, big = ("l14", "h14") if full else ("small", "small")
    clip = d / f"clip-{small}"
    if not (clip / "config.json").is_file():
        save_clip(clip, small)
    pick = d / f"clip-{big}"
    if not (pick / "config.json").is_file():
        save_clip(pick, big)
    head = d / "aesthetic_head.pth"
    if not head.is_file():
        save_aesthetic_head(head)
    hps_dir = d / ("hps-full" if full else "hps-small")
    hps_dir.mkdir(exist_ok=True)
    hps, arch = save_hps(hps_dir, full)
    return {
        "aesthetic": {"head_path": str(head), "clip_path": str(clip)},
        "clipscore": {"path": str(clip)},
        "pickscore": {"path": str(pick)},
        "hpsv2": {"path": hps, "arch": arch},
    }
