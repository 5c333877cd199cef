"""Learned reward models with random weights, in their real architectures and file formats.

Tests and bench/rewards.py build these (nothing can be downloaded there) and load them through the same
code as the real checkpoints. `full=True` gives the published sizes (CLIP ViT-L/14, CLIP ViT-H/14,
open_clip ViT-H-14, ImageReward's BLIP ViT-L/16 + BERT-base), for throughput and memory on a GPU; otherwise a reduced width and depth that a CPU
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


# ImageReward: BLIP ViT-L/16 at 224 px and BERT-base with cross-attention (the package's med_config)
IR_FULL = (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
                patch_size=16),
           dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                max_position_embeddings=512))  # fmt: skip
IR_SMALL = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, image_size=224,
                 patch_size=32),
            dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                 max_position_embeddings=64))  # fmt: skip
def save_bert_tokenizer(directory: str | Path) -> str:
    """A lower-casing WordPiece tokenizer (BertTokenizer files) whose vocabulary covers the shipped prompt
    sets word for word and anything else letter by letter; the stand-in for bert-base-uncased offline."""
    from common.prompts import load_prompts, prompt_set_names

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    words = set()
    for name in prompt_set_names():
        for prompt in load_prompts(name):
            words.update(prompt.lower().replace(",", " , ").replace(".", " . ").split())
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *".,;:!?'\"-()", *chars, *(f"##{c}" for c in chars)]
    vocab += sorted(words - set(vocab))
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}))  # fmt: skip
    return str(directory)


def save_imagereward(path: str | Path, full: bool = False, seed: int = 3) -> str:
    """A random ImageReward.pt in the package's key layout (blip.visual_encoder.*, blip.text_encoder.*, mlp.*,
    with the unused blip.vision_proj / text_proj the published file also holds)."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    from rewards.imagereward import ImageRewardHead, rename_vision

    vcfg, tcfg = IR_FULL if full else IR_SMALL
    torch.manual_seed(seed)
    vision = BlipVisionModel(BlipVisionConfig(**vcfg, layer_norm_eps=1e-6))
    text = BlipTextModel(BlipTextConfig(**tcfg, encoder_hidden_size=vcfg["hidden_size"], is_decoder=True,
                                        bos_token_id=None, eos_token_id=None, sep_token_id=None),
                         add_pooling_layer=False)  # fmt: skip
    head = ImageRewardHead(tcfg["hidden_size"])
    with torch.no_grad():  # variance-preserving weights, so that scores differ from image to image (the
        # library's 0.02 init gives nearly constant scores, under which a wrong key mapping would go unseen)
        for module in (vision, text, head):
            for name, p in module.named_parameters():
                if p.ndim >= 2 and "embedding" not in name:
                    p.normal_(0, p[0].numel() ** -0.5)
                elif "embedding" in name:
                    p.normal_(0, 1.0)
                elif name.endswith("bias"):
                    p.normal_(0, 0.1)
    state = {}
    state.update({f"blip.visual_encoder.{rename_vision(k, False)}": v for k, v in vision.state_dict().items()})
    state.update({f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()})
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(tcfg["max_position_embeddings"])[None]
    state.update({f"mlp.{k}": v for k, v in head.state_dict().items()})
    for name, width in (("vision_proj", vcfg["hidden_size"]), ("text_proj", tcfg["hidden_size"])):
        state[f"blip.{name}.weight"], state[f"blip.{name}.bias"] = torch.randn(256, width) * 0.02, torch.zeros(256)
    torch.save(state, path)
    return str(path)


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
    ir = d / ("ImageReward-full.pt" if full else "ImageReward-small.pt")
    if not ir.is_file():
        save_imagereward(ir, full)
    bert = d / "bert-tokenizer"
    if not (bert / "vocab.txt").is_file():
        save_bert_tokenizer(bert)
    return {
        "aesthetic": {"head_path": str(head), "clip_path": str(clip)},
        "clipscore": {"path": str(clip)},
        "pickscore": {"path": str(pick)},
        "hpsv2": {"path": hps, "arch": arch},
        "imagereward": {"path": str(ir), "tokenizer_path": str(bert)},
    }
