"""Check rewards/imagereward.py against the `image-reward` package's own model, on the same random weights.

The package cannot be a dependency (it pins timm==0.6.13 and fairscale==0.4.13), so it is installed to a
side folder without its dependencies and imported from there, with stand-ins for the parts the score never
runs (fairscale's checkpoint wrapper, the `clip` and `datasets` imports of its other modules, helpers that
transformers 5 moved):

    pip install --no-deps --target /tmp/irref image-reward==1.5 timm==0.6.13
    python bench/imagereward_reference.py --reference /tmp/irref          # reduced size
    python bench/imagereward_reference.py --reference /tmp/irref --full   # ViT-L/16 + BERT-base (~2 GB RAM)

Both models load one random ImageReward.pt (rewards/random_weights.py) and one BERT tokenizer. Printed (JSON):
the largest score difference on identical preprocessed pixels (the model), and on images that each side
preprocesses its own way (the package: PIL bicubic resize of the uint8 image; ours: torch, rewards/preprocess.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def reference_model(site: str, ckpt: str, tokenizer_dir: str, vision_cfg: dict, text_cfg: dict, workdir: Path):
    """The package's ImageReward class, built as its `load` does, with the local tokenizer and med_config."""
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu

    for name in ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer"):
        if not hasattr(mu, name):
            setattr(mu, name, getattr(pu, name, None))
    stubs = {n: types.ModuleType(n) for n in ("fairscale", "fairscale.nn", "fairscale.nn.checkpoint",
                                               "fairscale.nn.checkpoint.checkpoint_activations", "clip")}  # fmt: skip
    stubs["fairscale.nn.checkpoint.checkpoint_activations"].checkpoint_wrapper = lambda module, **_: module
    for pkg, sub in (("ImageReward", "ImageReward"), ("ImageReward.models", "ImageReward/models")):
        stubs[pkg] = types.ModuleType(pkg)  # skip the package __init__s (training and other scores' imports)
        stubs[pkg].__path__ = [str(Path(site) / sub)]
    sys.modules.update(stubs)
    sys.path.insert(0, site)
    import ImageReward.ImageReward as ir
    import ImageReward.models.BLIP.med as med_module
    import torch
    from ImageReward.models.BLIP import blip, blip_pretrain
    from transformers import BertTokenizer

    # transformers 5's weight tying trips over med.py's transformers-4 BertModel; the weights are loaded after
    med_module.BertModel.init_weights = lambda self: None

    def invert_attention_mask(self, mask):  # transformers 4's helper, which med.py calls and 5 removed
        ext = mask[:, None, None, :] if mask.dim() == 2 else mask[:, None, :, :]
        return (1.0 - ext.to(torch.float32)) * torch.finfo(torch.float32).min

    if not hasattr(med_module.BertModel, "invert_attention_mask"):
        med_module.BertModel.invert_attention_mask = invert_attention_mask
    if not hasattr(med_module.BertModel, "get_head_mask"):
        med_module.BertModel.get_head_mask = lambda self, head_mask, n: [None] * n

    def init_tokenizer():
        tok = BertTokenizer.from_pretrained(tokenizer_dir)
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tok.enc_token_id = tok.convert_tokens_to_ids("[ENC]")  # unused by the score
        return tok

    blip.init_tokenizer = blip_pretrain.init_tokenizer = init_tokenizer

    def create_vit(vit, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
        from ImageReward.models.BLIP.vit import VisionTransformer

        width = vision_cfg["hidden_size"]
        return VisionTransformer(img_size=vision_cfg["image_size"], patch_size=vision_cfg["patch_size"], embed_dim=width,
                                 depth=vision_cfg["num_hidden_layers"], num_heads=vision_cfg["num_attention_heads"],
                                 mlp_ratio=vision_cfg["intermediate_size"] / width), width  # fmt: skip

    blip_pretrain.create_vit = create_vit  # the package's own ViT class, at the checkpoint's size
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": text_cfg["hidden_size"], "initializer_range": 0.02,
           "intermediate_size": text_cfg["intermediate_size"], "layer_norm_eps": 1e-12,
           "max_position_embeddings": text_cfg["max_position_embeddings"], "model_type": "bert",
           "num_attention_heads": text_cfg["num_attention_heads"], "num_hidden_layers": text_cfg["num_hidden_layers"],
           "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": text_cfg["vocab_size"], "encoder_width": 768,
           "add_cross_attention": True}  # fmt: skip
    (workdir / "med_config.json").write_text(json.dumps(med))
    model = ir.ImageReward(med_config=str(workdir / "med_config.json"), device="cpu")
    model.mlp = ir.MLP(text_cfg["hidden_size"])  # the package fixes 768 (BERT-base); the reduced model is narrower
    result = model.load_state_dict(torch.load(ckpt, map_location="cpu"), strict=False)
    return model.eval(), result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True, help="folder with image-reward 1.5 and timm 0.6.13 (pip --target)")
    ap.add_argument("--full", action="store_true", help="published sizes (ViT-L/16, BERT-base)")
    ap.add_argument("--images", type=int, default=6)
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from PIL import Image

    from rewards import build_reward
    from rewards.preprocess import clip_preprocess
    from rewards.random_weights import save_bert_tokenizer, save_imagereward

    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="irref-"))
    ckpt = save_imagereward(work / "ImageReward.pt", full=args.full)
    tok = save_bert_tokenizer(work / "bert")
    ours = build_reward("imagereward", path=ckpt, tokenizer_path=tok, device="cpu", dtype="float32")
    ref, load = reference_model(args.reference, ckpt, tok, ours.config["vision"], ours.config["text"], work)
    prompts = ["a cat", "a monkey washing the dishes", "a red circle to the left of a blue square", "an owl riding a bike",
               "a dog", "a horse playing chess"][: args.images]  # fmt: skip
    g = torch.Generator().manual_seed(1)
    images = torch.nn.functional.interpolate(torch.rand(len(prompts), 3, 8, 8, generator=g), size=(512, 512), mode="bilinear")
    images = (images * 255).round() / 255  # what a PNG on disk holds
    with torch.no_grad():
        x = clip_preprocess(images, ours.size)
        ids, mask = ours.tokens(prompts)
        ref_ids = ref.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")

        def ref_score(pixels):
            emb = ref.blip.visual_encoder(pixels)
            out = ref.blip.text_encoder(ref_ids.input_ids, attention_mask=ref_ids.attention_mask, encoder_hidden_states=emb,
                                        encoder_attention_mask=torch.ones(emb.shape[:-1], dtype=torch.long), return_dict=True)  # fmt: skip
            return ((ref.mlp(out.last_hidden_state[:, 0].float()) - ref.mean) / ref.std).squeeze(-1)

        ours_scores = ours(images, prompts)
        same_pixels = ref_score(x)
        pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in images]
        own_pixels = ref_score(torch.stack([ref.preprocess(p) for p in pil]))
    out = {
        "size": "full" if args.full else "reduced",
        "reference_missing_keys": [k for k in load.missing_keys if "position_ids" not in k],
        "tokens_equal": bool(torch.equal(ids, ref_ids.input_ids) and torch.equal(mask, ref_ids.attention_mask)),
        "scores_ours": [round(v, 5) for v in ours_scores.tolist()],
        "scores_reference": [round(v, 5) for v in own_pixels.tolist()],
        "score_std_over_images": round(float(ours_scores.std()), 5),
        "max_diff_same_pixels": float((ours_scores - same_pixels).abs().max()),
        "max_diff_own_preprocessing": float((ours_scores - own_pixels).abs().max()),
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
