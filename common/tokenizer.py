"""An offline CLIP tokenizer built from open_clip's shipped BPE vocabulary.

The model hub is out of reach in tests and in the default run, so the tiny
models need a real `transformers.CLIPTokenizer` that can be built from files
that ship inside a pip package: open_clip carries CLIP's BPE merges
(`bpe_simple_vocab_16e6.txt.gz`). The vocabulary it yields (49,408 tokens) is
the one SD1.x's tokenizer uses, so the same ids come out for the same text.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer

CLIP_VOCAB_SIZE = 49408
# CLIP keeps the first 48,894 merges of the file (vocab = 256 bytes x2 + merges + 2 specials).
_NUM_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for raw bytes, in CLIP's order (printable ranges first)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def _bpe_merges_path() -> Path:
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"open_clip's BPE vocabulary is missing at {path}; reinstall open_clip_torch")
    return path


def write_clip_tokenizer_files(save_dir: str | Path) -> Path:
    """Write vocab.json and merges.txt for a CLIPTokenizer into `save_dir`."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    with gzip.open(_bpe_merges_path()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : 1 + _NUM_MERGES]
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == CLIP_VOCAB_SIZE, len(tokens)
    (save_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (save_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return save_dir


def build_clip_tokenizer(save_dir: str | Path | None = None, model_max_length: int = 77) -> CLIPTokenizer:
    """A real CLIPTokenizer (vocab 49,408) built offline; saved with save_pretrained if `save_dir` is given."""
    with tempfile.TemporaryDirectory() as tmp:
        files = write_clip_tokenizer_files(tmp)
        # transformers >= 5 takes the vocabulary and merges themselves; older releases take file paths.
        try:
            tok = CLIPTokenizer(
                vocab=json.loads((files / "vocab.json").read_text()),
                merges=[tuple(m.split()) for m in (files / "merges.txt").read_text().split("\n")[1:] if m],
                model_max_length=model_max_length,
            )
        except TypeError:
            tok = CLIPTokenizer(
                vocab_file=str(files / "vocab.json"),
                merges_file=str(files / "merges.txt"),
                model_max_length=model_max_length,
            )
    if save_dir is not None:
        tok.save_pretrained(str(save_dir))
    return tok


def build_byte_level_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIPTokenizer with CLIP's byte alphabet and no BPE merges (514 tokens): for benchmarks on machines
    without open_clip's vocabulary file. Each character becomes a token, so sequences are longer than
    CLIP's; the text encoders built beside it may keep CLIP's vocabulary size."""
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    try:
        return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)
    except TypeError:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
            (Path(tmp) / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
            return CLIPTokenizer(vocab_file=f"{tmp}/vocab.json", merges_file=f"{tmp}/merges.txt",
                                 model_max_length=model_max_length)  # fmt: skip
