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
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def merge_lora(run: Path, out: Path, checkpoint: str | None = None, tolerance: float = 1e-4, log=print) -> float:
    """Fuse `run`'s checkpoint (the last complete one, or checkpoints/`checkpoint`) into its base model, save it to
    `out`, and return the fused UNet's largest relative output difference from the run's LoRA policy
    (learner.stages.merge_lora, which multi-stage runs use; a refusal here ends the script with its reason)."""
    from common.config import ConfigError
    from learner.run_dir import CheckpointError
    from learner.stages import merge_lora as merge

    try:
        rel = merge(Path(run), Path(out), checkpoint=checkpoint, tolerance=tolerance, log=log)
    except (CheckpointError, ConfigError) as err:
        raise SystemExit(str(err)) from None
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
