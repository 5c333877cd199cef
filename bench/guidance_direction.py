"""How large the guidance direction is, and how much of it carries the relation's order, for a base model and runs.

For the first N `shapes_pairs` prompts, one base-model sample each is noised again at a few timesteps t, and
for the base policy and each run's last checkpoint this prints, relative to |eps_u|:

- |D| = |eps_c - eps_u|: the direction classifier-free guidance amplifies (the conditional branch's pull);
- |D(caption) - D(mirror)| = |eps_c - eps_mirror|: the part of it that depends on the order of the pair
  (the caption with left/right or above/below swapped).

Session 27 (docs/results.md): RWR that regresses the conditional branch on guided samples grows both;
regressing the guided prediction at the sampling scale shrinks both, and the order is lost.

    python bench/guidance_direction.py runs/sweeps/ob_rwr/full-w01-s0 runs/sweeps/ob_rwrg/g-i1-s0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run directories; the first's config gives the base model")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--timesteps", default="900,700,400,100")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from bench.runs import base_weights
    from bench.shapes_order import order_variants
    from common.config import load_config
    from common.exploration import parse_prompt
    from common.prompts import load_prompts
    from common.rollouts import RolloutGenerator
    from learner.run_dir import RunDir

    torch.set_num_threads(args.threads)
    cfg = load_config(str(args.runs[0] / "config.yaml"))
    gen = RolloutGenerator(cfg)
    prompts = load_prompts("shapes_pairs")[: args.prompts]
    first = RunDir(args.runs[0])
    lora0, _, _ = first.load_checkpoint(first.checkpoints()[-1])
    gen.set_weights(0, base_weights(lora0))
    x0 = gen.generate(prompts, list(range(len(prompts))), explore=False).latents[:, -1]
    m = gen.model
    ac = m.scheduler.alphas_cumprod.float()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    ts = [int(t) for t in args.timesteps.split(",")]

    @torch.no_grad()
    def stats(label: str) -> None:
        c = m.condition([parse_prompt(p) for p in prompts])
        cm = m.condition([parse_prompt(order_variants(p)["swapped"]) for p in prompts])
        u = {k: v.expand(len(prompts), *v.shape[1:]) for k, v in m.negative().items()}
        cells = []
        for t in ts:
            tt = torch.full((len(prompts),), t)
            xt = ac[t].sqrt() * x0 + (1 - ac[t]).sqrt() * eps
            ec, em, eu = m.predict(xt, tt, c), m.predict(xt, tt, cm), m.predict(xt, tt, u)
            cells.append(f"t={t}: |D| {float((ec - eu).norm() / eu.norm()):.4f} order {float((ec - em).norm() / eu.norm()):.4f}")
        print(f"{label:<28} " + " | ".join(cells), flush=True)

    stats("base")
    for r in args.runs:
        rd = RunDir(r)
        lora, state, counters = rd.load_checkpoint(rd.checkpoints()[-1])
        gen.set_weights(int(state["version"]), lora)
        stats(f"{r.name}@{counters['reward_queries']}")


if __name__ == "__main__":
    main()
