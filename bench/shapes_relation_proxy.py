"""Does the soft relation (what AlignProp optimises) rise where the hard one (what the evaluation counts) does
not? Base model against a run's last checkpoint on the same fresh images of every `shapes_pairs` prompt.

    python bench/shapes_relation_proxy.py runs/study_ap/plain-s0 --images 2

Prints, for base and tuned: the hard relation rate, both objects found, the relation given both found, the soft
relation (`rel_scale`), soft and hard scores and objects right; then both relations' changes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--images", type=int, default=2, help="images per prompt")
    ap.add_argument("--rel-scale", type=float, default=8.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from bench.runs import base_weights, last_checkpoint
    from common.prompts import load_prompts
    from common.rollouts import RolloutGenerator, sample_seeds
    from common.shapes.detect import score_scenes

    cfg, _, lora, state, _ = last_checkpoint(args.run)
    prompts = [p for p in load_prompts("shapes_pairs") for _ in range(args.images)]
    seeds = sample_seeds(cfg.eval.seed + 7, -1, len(prompts))  # not the evaluation's noise
    gen = RolloutGenerator(cfg)

    def stats(tag: str):
        ims = torch.cat([gen.generate(prompts[i : i + 16], seeds[i : i + 16], explore=False).images_float()
                         for i in range(0, len(prompts), 16)])  # fmt: skip
        h = score_scenes(ims, prompts)
        s = score_scenes(ims, prompts, soft=True, rel_scale=args.rel_scale)
        both = h.detections[0].found * h.detections[1].found
        print(f"{tag}: hard relation {h.relation_ok.mean():.3f} | both found {both.mean():.3f} | relation given both "
              f"{h.relation_ok.sum() / both.sum():.3f} | soft relation {s.relation_ok.mean():.3f} | soft score "
              f"{s.score.mean():.3f} | hard score {h.score.mean():.3f} | objects right {h.objects_ok.mean():.3f}",
              flush=True)  # fmt: skip
        return h, s

    gen.set_weights(0, base_weights(lora))
    hb, sb = stats("base ")
    gen.set_weights(int(state["version"]), lora)
    ht, st = stats("tuned")
    print(f"{len(prompts)} images: hard relation change {(ht.relation_ok - hb.relation_ok).mean():+.3f}, "
          f"soft relation change {(st.relation_ok - sb.relation_ok).mean():+.3f}")


if __name__ == "__main__":
    main()
