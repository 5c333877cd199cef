"""Fuse a run's LoRA into its base model and save the result as a new model directory.

A second training stage (another algorithm, reward or preset) can then start from what the first learned:

    python bench/merge_lora.py runs/ddpo-run --out models/after-ddpo          # the last complete checkpoint
    python bench/merge_lora.py runs/ddpo-run --checkpoint step_14 --out DIR
    python -m learner.main --config shapes_order --set model.pretrained=models/after-ddpo

The LoRA is loaded in the model's own diffusers format (`pipe.load_lora_weights` on the checkpoint's
`pytorch_lora_weights.safetensors`), fused into the UNet's weights and unloaded, and the pipeline is saved with
`save_pretrained` (atomically: a failed save leaves no half-written directory). Before saving, the fused UNet's
output is checked against the run's own policy (base + LoRA as the learner held it) on random inputs; the
relative difference is printed, and above `--tolerance` nothing is written. `merged_from.json` in the new
directory names the run and checkpoint. The new model's evaluations start from the first stage's policy, so a
second stage's paired changes are relative to it; both stages share the evaluation noise (`eval.seed`), so their
per-image means compare with the first stage's base directly.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def merge_lora(run: Path, out: Path, checkpoint: str | None = None, tolerance: float = 1e-4, log=print) -> float:
    """Fuse `run`'s checkpoint (the last complete one, or checkpoints/`checkpoint`) into its base model, save it to
    `out`, and return the fused UNet's largest relative output difference from the run's LoRA policy."""
    from common.config import load_config
    from common.pipelines import load_lora_state, load_pipeline, load_policy
    from learner.run_dir import RunDir

    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise SystemExit(f"{run}: not a run directory (no config.yaml)")
    if out.exists():
        raise SystemExit(f"{out} exists: give a new directory (nothing is overwritten)")
    cfg = load_config(str(run / "config.yaml"))
    rd = RunDir(run)
    ckpts = rd.checkpoints()
    if checkpoint is not None:
        ckpts = [p for p in ckpts if p.name == checkpoint]
    if not ckpts:
        names = ", ".join(p.name for p in rd.checkpoints()) or "none"
        raise SystemExit(f"{run}: no complete checkpoint {checkpoint or ''} (complete: {names})")
    ckpt = ckpts[-1]
    lora, learner_state, counters = rd.load_checkpoint(ckpt)

    policy = load_policy(cfg.model, cfg.lora)  # what the learner held: base + LoRA in our keys
    c = policy.unet.config
    if getattr(c, "addition_embed_type", None) == "text_time":  # before the second load and the fuse
        raise SystemExit("merge_lora: SDXL-shaped UNets are not supported yet (the check needs their added conditions)")
    load_lora_state(policy.unet, lora)
    pipe = load_pipeline(cfg.model)
    pipe.load_lora_weights(str(ckpt))
    pipe.fuse_lora()
    pipe.unload_lora_weights()

    g = torch.Generator().manual_seed(0)
    size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
    x = torch.randn(4, c.in_channels, size, size, generator=g)
    t = torch.tensor([999, 700, 300, 10])
    cond = torch.randn(4, 8, c.cross_attention_dim, generator=g)
    with torch.no_grad():
        want = policy.unet(x, t, encoder_hidden_states=cond).sample
        got = pipe.unet(x, t, encoder_hidden_states=cond).sample
    rel = float((got - want).abs().max() / want.abs().max())
    log(f"{run} {ckpt.name} (reward queries {counters.get('reward_queries')}, version {learner_state['version']}): "
        f"fused UNet vs LoRA policy, max relative difference {rel:.2e}")  # fmt: skip
    if not rel <= tolerance:
        raise SystemExit(f"fused UNet differs from the run's policy by {rel:.2e} > {tolerance:.0e}: nothing written")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    try:  # everything into a temporary folder, renamed last: no half-written model directory
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "merged_from.json").write_text(json.dumps(
            {"run": str(run), "checkpoint": ckpt.name, "base": cfg.model.pretrained,
             "reward_queries": counters.get("reward_queries"), "max_relative_difference": rel}, indent=1))  # fmt: skip
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out}: use --set model.pretrained={out}")
    return rel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--checkpoint", help="a checkpoint's folder name, e.g. step_14 (default: the last complete one)")
    ap.add_argument("--tolerance", type=float, default=1e-4)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    merge_lora(args.run, args.out, args.checkpoint, args.tolerance)


if __name__ == "__main__":
    main()
