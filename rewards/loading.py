"""Finding and loading learned reward weights: local files first, the hub when it is reachable.

Every learned reward names its weights by options (`path`, `clip_path`, `head_path`, ...) in
`reward.terms[].options`. A local file or directory is used as is; a hub id is used only when the hub
is reachable or the id is already in the local Hugging Face cache. With HF_HUB_OFFLINE=1 and neither,
`preflight` stops the run before any actor starts, with one line naming the reward, the option and the
file to supply. Nothing here downloads at import time.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch


class RewardLoadError(ValueError):
    """A reward that cannot be built as configured, worded as one line naming the option and the fix."""


def _looks_like_hub_id(value: str) -> bool:
    return value.count("/") == 1 and not value.startswith((".", "/", "~")) and not Path(value).exists()


def _hub_cached(repo_id: str, filename: str = "config.json") -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename), str)


def resolve_source(reward: str, option: str, value: str | None, default: str | None, what: str,
                   hub_file: str = "config.json", kind: str = "dir") -> str:  # fmt: skip
    """A local path or hub id for `option` of `reward`; raises RewardLoadError with the fix if unusable.

    `what` names the thing to supply (e.g. "a CLIPModel directory saved with save_pretrained"); `kind` is
    "dir" or "file" for local paths.
    """
    source = value or default
    if source is None:
        raise RewardLoadError(f"reward {reward!r}: option {option} is required: give {what}")
    if not _looks_like_hub_id(source):
        p = Path(source).expanduser()
        if not p.exists() or (kind == "file" and not p.is_file()) or (kind == "dir" and not p.is_dir()):
            raise RewardLoadError(f"reward {reward!r}: option {option}={source!r}: no such {kind}; give {what}")
        return str(p)
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not _hub_cached(source, hub_file):
        raise RewardLoadError(
            f"reward {reward!r}: option {option}={source!r} is a hub id, but HF_HUB_OFFLINE=1 and it is not in the "
            f"local cache; set {option} to a local path ({what})"
        )
    return source


def hub_file(source: str, filename: str) -> str:
    """A file of a hub repo (downloaded on first use) or the path itself if local."""
    if not _looks_like_hub_id(source):
        return source
    from huggingface_hub import hf_hub_download

    return hf_hub_download(source, filename)


def reward_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def reward_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """float32 on the CPU; `auto` is float16 on a GPU (bf16 where asked)."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in ("float32", "float16", "bfloat16"):
        raise RewardLoadError(f"reward option dtype={dtype!r}: use auto, float32, float16 or bfloat16")
    return getattr(torch, dtype)


def load_torch_state(reward: str, option: str, path: str) -> dict:
    """The state dict in a torch file (or under its "state_dict" key); RewardLoadError if unreadable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same error to a user
        raise RewardLoadError(f"reward {reward!r}: {option}={path!r} is unreadable ({err.__class__.__name__})") from None
    if not isinstance(state, dict):
        raise RewardLoadError(f"reward {reward!r}: {option}={path!r} holds a {type(state).__name__}, not a state dict")
    return state.get("state_dict", state)


def load_state_strict(module: torch.nn.Module, state: dict, reward: str, path: str, expected: str) -> None:
    """load_state_dict that names the expected architecture when the file holds another one."""
    missing, unexpected = [], []
    try:
        result = module.load_state_dict(state, strict=False)
        missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    except RuntimeError as err:  # shape mismatches
        raise RewardLoadError(
            f"reward {reward!r}: {path} does not fit {expected} ({str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err})"
        ) from None
    if missing or unexpected:
        raise RewardLoadError(
            f"reward {reward!r}: {path} is not a {expected} checkpoint (missing {missing[:2]}, unexpected {unexpected[:2]})"
        )


def load_clip_model(reward: str, source: str, device: torch.device, dtype: torch.dtype, expected: str):
    """transformers CLIPModel from a directory or hub id, frozen, on `device` in `dtype`."""
    from transformers import CLIPModel

    import transformers

    transformers.utils.logging.set_verbosity_error()
    try:
        model, info = CLIPModel.from_pretrained(source, dtype=dtype, output_loading_info=True)
    except (OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else repr(err)
        raise RewardLoadError(f"reward {reward!r}: {source} is not a loadable {expected}: {first}") from None
    missing = [k for k in info.get("missing_keys", []) if "position_ids" not in k]
    bad = missing or info.get("mismatched_keys")
    if type(model.config).__name__ != "CLIPConfig" or bad:
        raise RewardLoadError(
            f"reward {reward!r}: {source} is not a {expected} checkpoint ({type(model.config).__name__}; "
            f"missing {list(missing)[:2]}, mismatched {list(info.get('mismatched_keys') or [])[:2]})"
        )
    return model.to(device).eval().requires_grad_(False)


class TextFeatureCache:
    """Text embeddings cached per prompt (prompts repeat every epoch), at most `size` of them, the least recently
    used dropped first: a run over a huge prompt set keeps its memory bounded on the reward's device."""

    def __init__(self, size: int = 4096):
        self.size = size
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __call__(self, prompts: list[str], encode: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
        """[B, D] for `prompts`; `encode(missing prompts)` -> [M, D] for those not cached."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self.entries]
        if missing:
            self.entries.update(zip(missing, encode(missing)))
        out = []
        for p in prompts:
            self.entries.move_to_end(p)
            out.append(self.entries[p])
        while len(self.entries) > self.size:  # this call's prompts are the newest: never dropped before use
            self.entries.popitem(last=False)
        return torch.stack(out)
