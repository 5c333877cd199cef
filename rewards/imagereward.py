"""ImageReward v1.0 (Xu et al., 2023): BLIP's ViT-L/16 image encoder, a BERT-base text encoder that
cross-attends to the image tokens, and an MLP on the [CLS] output, normalised by the published mean and std.

The `image-reward` package pins timm==0.6.13 and fairscale==0.4.13, which would downgrade what this
project and Ray use, so its forward is written here on transformers' BLIP modules (`BlipVisionModel`,
`BlipTextModel` with cross-attention), loading the package's own checkpoint unchanged:

- `path`: ImageReward.pt (the THUDM/ImageReward hub repo), a state dict with keys
  `blip.visual_encoder.*` (timm-style ViT: cls_token, pos_embed, patch_embed.proj, blocks.N.{norm1, attn.qkv,
  attn.proj, norm2, mlp.fc1, mlp.fc2}, norm), `blip.text_encoder.*` (BLIP's med BERT, the same names as
  transformers' BlipTextModel) and `mlp.layers.{0,2,4,6,7}` (768 -> 1024 -> 128 -> 64 -> 16 -> 1, no
  activations). Unused keys of the file (`blip.vision_proj`, `blip.text_proj`, position-id buffers) are
  ignored, as the package's non-strict load ignores them; anything else missing or unexpected is refused.
- `tokenizer_path`: a bert-base-uncased tokenizer directory (default the hub's google-bert/bert-base-uncased,
  which the package loads by its old name);
  prompts are padded and truncated to 35 tokens, as the package scores.

Sizes are read from the checkpoint's shapes (width, depth, patch and image size, vocabulary); heads are
width / 64 (ViT-L: 16, BERT-base: 12), so the same code loads the published file and the reduced random
ones the tests build. Images are preprocessed in torch as the package's transform does (resize 224,
bicubic; centre crop; CLIP mean and std: rewards/preprocess.py). Scores are roughly -2..2 (standardised
over the authors' data); differentiable in the pixels.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from rewards.aesthetic import AestheticHead
from rewards.loading import (
    RewardLoadError,
    hub_file,
    load_torch_state,
    resolve_source,
    reward_device,
    reward_dtype,
)
from rewards.preprocess import clip_preprocess
from rewards.registry import register_reward

IR_REPO, IR_FILE = "THUDM/ImageReward", "ImageReward.pt"
BERT_TOKENIZER = "google-bert/bert-base-uncased"  # the package loads "bert-base-uncased", the same repo
IR_MEAN, IR_STD = 0.16717362830052426, 1.0333394966054072  # the package's score normalisation
MAX_TOKENS = 35  # the package tokenizes prompts to 35 tokens
HEAD_DIM = 64
EXPECTED = "ImageReward (BLIP ViT-L/16 + BERT-base with cross-attention + MLP head)"
# keys of the published file that the score does not use (the package loads with strict=False)
_IGNORED = re.compile(r"^blip\.(vision_proj|text_proj)\.|position_ids$")

# BLIP's timm-style ViT names (ImageReward.pt) and transformers' BlipVisionModel names; {} is a block number
VISION_NAMES = [
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.", "embeddings.patch_embedding."),
    ("blocks.{}.norm1.", "encoder.layers.{}.layer_norm1."),
    ("blocks.{}.norm2.", "encoder.layers.{}.layer_norm2."),
    ("blocks.{}.attn.qkv.", "encoder.layers.{}.self_attn.qkv."),
    ("blocks.{}.attn.proj.", "encoder.layers.{}.self_attn.projection."),
    ("blocks.{}.mlp.", "encoder.layers.{}.mlp."),
    ("norm.", "post_layernorm."),
]


def rename_vision(key: str, to_transformers: bool = True) -> str:
    """One ViT key from the package's names to transformers' (or back)."""
    for blip, hf in VISION_NAMES:
        src, dst = (blip, hf) if to_transformers else (hf, blip)
        new, n = re.subn("^" + re.escape(src).replace(r"\{\}", r"(\d+)"), dst.replace("{}", r"\1"), key)
        if n:
            return new
    return key


# ImageReward's MLP is the improved-aesthetic-predictor's head (same layers, same dropout slots, no activations)
ImageRewardHead = AestheticHead


def split_checkpoint(state: dict, where: str) -> tuple[dict, dict, dict]:
    """ImageReward.pt's state dict -> (BlipVisionModel, BlipTextModel, head) state dicts, renamed.

    Raises RewardLoadError naming the expected architecture when the file holds another model."""
    vision, text, head, other = {}, {}, {}, []
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or _IGNORED.search(key):
            continue
        if key.startswith("blip.visual_encoder."):
            vision[rename_vision(key.removeprefix("blip.visual_encoder."))] = value
        elif key.startswith("blip.text_encoder."):
            text[key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp."):
            head[key.removeprefix("mlp.")] = value
        else:
            other.append(key)
    needed = ["embeddings.class_embedding", "embeddings.position_embedding", "embeddings.patch_embedding.weight"]
    missing = [f"blip.visual_encoder ({k})" for k in needed if k not in vision]
    missing += ["blip.text_encoder.embeddings.word_embeddings.weight"] * ("embeddings.word_embeddings.weight" not in text)
    missing += ["mlp.layers.0.weight"] * ("layers.0.weight" not in head)
    if missing or other:
        raise RewardLoadError(
            f"reward 'imagereward': {where} is not an {EXPECTED} checkpoint (missing {missing[:2]}, unexpected {other[:2]})"
        )
    return vision, text, head


def architecture(vision: dict, text: dict) -> tuple[dict, dict]:
    """BlipVisionConfig and BlipTextConfig keyword arguments read from the checkpoint's shapes."""
    width = vision["embeddings.class_embedding"].shape[-1]
    patch = vision["embeddings.patch_embedding.weight"].shape[-1]
    grid = round((vision["embeddings.position_embedding"].shape[1] - 1) ** 0.5)
    depth = 1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers."))
    v = dict(hidden_size=width, intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
             num_hidden_layers=depth, num_attention_heads=max(1, width // HEAD_DIM), image_size=grid * patch,
             patch_size=patch, layer_norm_eps=1e-6, hidden_act="gelu")  # fmt: skip
    vocab, hidden = text["embeddings.word_embeddings.weight"].shape
    layers = 1 + max(int(k.split(".")[2]) for k in text if k.startswith("encoder.layer."))
    t = dict(vocab_size=vocab, hidden_size=hidden, encoder_hidden_size=width,
             intermediate_size=text["encoder.layer.0.intermediate.dense.weight"].shape[0], num_hidden_layers=layers,
             num_attention_heads=max(1, hidden // HEAD_DIM),
             max_position_embeddings=text["embeddings.position_embeddings.weight"].shape[0], layer_norm_eps=1e-12,
             hidden_act="gelu", is_decoder=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
             bos_token_id=None, eos_token_id=None, sep_token_id=None, pad_token_id=0)  # fmt: skip
    return v, t


def _load_strict(module: nn.Module, state: dict, part: str, where: str) -> None:
    try:
        result = module.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as err:  # a shape that does not fit
        detail = next((ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()), str(err))
        raise RewardLoadError(f"reward 'imagereward': {where} does not fit {EXPECTED} ({part}: {detail})") from None
    missing = [k for k in result.missing_keys if "position_ids" not in k]
    if missing or result.unexpected_keys:
        raise RewardLoadError(
            f"reward 'imagereward': {where} is not an {EXPECTED} checkpoint ({part}: missing {missing[:2]}, "
            f"unexpected {list(result.unexpected_keys)[:2]})"
        )
    for name, buf in list(module.named_buffers()):  # built on the meta device; position ids are not in the file
        if buf.is_meta:
            if not name.endswith("position_ids"):  # a transformers version with buffers this code does not know
                raise RuntimeError(f"imagereward: buffer {name} is not in the checkpoint and has no known value")
            owner, _, leaf = name.rpartition(".")
            value = torch.arange(buf.shape[-1]).expand(buf.shape).clone()
            module.get_submodule(owner).register_buffer(leaf, value, persistent=False)


@register_reward("imagereward")
class ImageReward:
    name = "imagereward"
    differentiable = True

    def __init__(self, path: str | None = None, tokenizer_path: str | None = None, device: str | None = None,
                 dtype: str = "auto"):  # fmt: skip
        import transformers
        from transformers import (
            AutoTokenizer,
            BlipTextConfig,
            BlipTextModel,
            BlipVisionConfig,
            BlipVisionModel,
        )

        transformers.utils.logging.set_verbosity_error()
        self.preflight(path=path, tokenizer_path=tokenizer_path)
        self.device = reward_device(device)
        self.dtype = reward_dtype(dtype, self.device)
        source = resolve_source(self.name, "path", path, IR_REPO, f"the ImageReward checkpoint file ({IR_FILE})",
                                hub_file=IR_FILE, kind="file")  # fmt: skip
        ckpt = hub_file(source, IR_FILE)
        state = load_torch_state(self.name, "path", ckpt)
        vision_sd, text_sd, head_sd = split_checkpoint(state, ckpt)
        try:
            vcfg, tcfg = architecture(vision_sd, text_sd)
        except (KeyError, ValueError) as err:  # a truncated file: a layer's tensors are missing
            raise RewardLoadError(f"reward 'imagereward': {ckpt} is not an {EXPECTED} checkpoint (missing {err})") from None
        with torch.device("meta"):  # no random init, no second copy: the checkpoint's tensors become the weights
            self.vision = BlipVisionModel(BlipVisionConfig(**vcfg))
            self.text = BlipTextModel(BlipTextConfig(**tcfg), add_pooling_layer=False)
            self.head = ImageRewardHead(tcfg["hidden_size"])
        _load_strict(self.vision, vision_sd, "image encoder", ckpt)
        _load_strict(self.text, text_sd, "text encoder", ckpt)
        _load_strict(self.head, head_sd, "MLP head", ckpt)
        for m, dt in ((self.vision, self.dtype), (self.text, self.dtype), (self.head, torch.float32)):
            m.to(self.device, dt).eval().requires_grad_(False)
        self.size = vcfg["image_size"]
        self.config = {"vision": vcfg, "text": tcfg}
        tok = resolve_source(self.name, "tokenizer_path", tokenizer_path, BERT_TOKENIZER,
                             "a bert-base-uncased tokenizer directory", hub_file="vocab.txt")  # fmt: skip
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tok)
        except (OSError, ValueError) as err:
            first = str(err).splitlines()[0] if str(err) else repr(err)
            raise RewardLoadError(f"reward 'imagereward': tokenizer_path={tok!r} is unreadable: {first}") from None
        if len(self.tokenizer) > tcfg["vocab_size"]:
            raise RewardLoadError(
                f"reward 'imagereward': tokenizer_path={tok!r} has {len(self.tokenizer)} tokens but the checkpoint's "
                f"text encoder has {tcfg['vocab_size']}; give the bert-base-uncased tokenizer"
            )
        self._tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def preflight(cls, path: str | None = None, tokenizer_path: str | None = None, **_) -> None:
        """Check the files before any actor starts (no model is loaded)."""
        resolve_source(cls.name, "path", path, IR_REPO, f"the ImageReward checkpoint file ({IR_FILE})",
                       hub_file=IR_FILE, kind="file")  # fmt: skip
        resolve_source(cls.name, "tokenizer_path", tokenizer_path, BERT_TOKENIZER,
                       "a bert-base-uncased tokenizer directory", hub_file="vocab.txt")  # fmt: skip

    def tokens(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) [B, 35], cached per prompt (prompts repeat every epoch)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._tokens]
        if missing:
            tok = self.tokenizer(missing, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
            self._tokens.update((p, (i, m)) for p, i, m in zip(missing, tok["input_ids"], tok["attention_mask"]))
        ids, mask = zip(*(self._tokens[p] for p in prompts))
        return torch.stack(ids).to(self.device), torch.stack(mask).to(self.device)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """[B] ImageReward scores (float32); differentiable in `images` unless called under no_grad."""
        x = clip_preprocess(images.to(self.device), self.size, dtype=self.dtype)
        image_tokens = self.vision(pixel_values=x).last_hidden_state
        ids, mask = self.tokens(prompts)
        out = self.text(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_tokens,
                        encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long, device=self.device),
                        is_decoder=False)  # fmt: skip
        features = out.last_hidden_state[:, 0].float()
        return ((self.head(features) - IR_MEAN) / IR_STD).squeeze(-1)
