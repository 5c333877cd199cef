"""Is the Shapes base model's relation order learnable at all? Two probes of `shapes-base` at 20 DDIM steps,
guidance 5, eta 0 (bench/shapes_quality.py's sampler), on the `shapes_pairs` prompts:

  per-prompt  K images per prompt: each prompt's rate of the right relation among images whose two objects
              were both found. If the order were a per-prompt rule (always the first-named object on the left,
              say), the rates would sit near 0 and 1; if it is a coin flip per image, they spread only as
              binomial noise around the mean (std sqrt(p(1-p)/K)).
  supervised  continue the base model's own training (epsilon loss on ground-truth pair scenes, UNet and text
              encoder, every weight trainable, AdamW, 10% caption dropout) for --minutes, and score K images
              per prompt before and every --every minutes. Direct supervision is the strongest signal there
              is: if it does not move the order in the budget, no reward fine-tuning of the same size will.

    HF_HUB_OFFLINE=1 python bench/shapes_order.py per-prompt --k 16
    HF_HUB_OFFLINE=1 python bench/shapes_order.py supervised --minutes 30 --every 10 --lr 3e-4 --k 8 [--save DIR]

Both print JSON lines; the second's rows are also written to --json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.shapes_quality import sample
from common.shapes.detect import score_scenes
from common.shapes.prompt_sets import SHAPES_PROMPT_SETS


def order_figures(images: torch.Tensor, prompts: list[str]) -> dict:
    """Full success, objects right, relation right (over all images and over those with both objects found)."""
    s = score_scenes(images, prompts)
    d0, d1 = s.detections
    found = (d0.found * d1.found).bool()
    rel = s.relation_ok.float()
    return {
        "n": len(prompts),
        "full": float((s.objects_ok * s.relation_ok).float().mean()),
        "objects": float(s.objects_ok.float().mean()),
        "relation": float(rel.mean()),
        "relation_found": float(rel[found].mean()) if found.any() else float("nan"),
        "score": float(s.score.mean()),
    }


def per_prompt(pipe, prompts: list[str], k: int, seed: int) -> dict:
    allp = [p for p in prompts for _ in range(k)]
    images = sample(pipe, allp, 5.0, seed, 20)
    s = score_scenes(images, allp)
    d0, d1 = s.detections
    found = (d0.found * d1.found).bool().view(len(prompts), k)
    rel = s.relation_ok.bool().view(len(prompts), k)
    rates = torch.tensor([float(r[f].float().mean()) for r, f in zip(rel, found) if f.any()])
    p = float(rates.mean())
    hist = torch.histc(rates, bins=5, min=0.0, max=1.0).int().tolist()
    return {
        **order_figures(images, allp),
        "prompts": len(rates),
        "per_prompt_mean": p,
        "per_prompt_std": float(rates.std(unbiased=False)),
        "binomial_std": math.sqrt(p * (1 - p) / k),
        "histogram_0-1_in_5_bins": hist,
    }


def supervised(pipe, prompts: list[str], args) -> list[dict]:
    from common.shapes.scenes import generate_scenes

    vae, te, unet, sched, tok = pipe.vae, pipe.text_encoder, pipe.unet, pipe.scheduler, pipe.tokenizer
    imgs_np, caps = generate_scenes(args.scenes, args.seed + 7, 1.0)
    images = torch.from_numpy(imgs_np).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        dists = [vae.encode(images[i : i + 256].float() / 127.5 - 1).latent_dist for i in range(0, len(images), 256)]
    means, stds = torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])
    uniq = sorted(set(caps))
    index = {c: i for i, c in enumerate(uniq)}
    ids = tok(uniq + [""], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids  # fmt: skip
    cap_idx, empty = torch.tensor([index[c] for c in caps]), len(uniq)
    params = list(unet.parameters()) + list(te.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    alphas, sf = sched.alphas_cumprod, vae.config.scaling_factor
    gen = torch.Generator().manual_seed(args.seed + 3)
    allp = [p for p in prompts for _ in range(args.k)]

    def evaluate(step: int, minutes: float) -> dict:
        unet.eval(), te.eval()
        row = {"step": step, "minutes": round(minutes, 1), **order_figures(sample(pipe, allp, 5.0, args.seed, 20), allp)}
        unet.train(), te.train()
        print(json.dumps(row), flush=True)
        return row

    rows = [evaluate(0, 0.0)]
    t0, step, next_eval = time.perf_counter(), 0, args.every * 60
    while True:
        elapsed = time.perf_counter() - t0  # evaluation time counts against the budget
        if elapsed >= next_eval or elapsed >= args.minutes * 60:
            rows.append(evaluate(step, elapsed / 60))
            next_eval += args.every * 60
            if elapsed >= args.minutes * 60:
                if args.save:
                    pipe.save_pretrained(str(args.save))
                return rows
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 50)
        idx = torch.randint(0, len(caps), (args.batch,), generator=gen)
        z = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * sf
        rows_ = cap_idx[idx].clone()
        rows_[torch.rand(args.batch, generator=gen) < 0.1] = empty
        t = torch.randint(0, sched.config.num_train_timesteps, (args.batch,), generator=gen)
        noise = torch.randn(z.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        pred = unet(a.sqrt() * z + (1 - a).sqrt() * noise, t, encoder_hidden_states=te(ids[rows_])[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % 100 == 0:
            print(f"step {step} loss {float(loss.detach()):.4f} {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("probe", choices=["per-prompt", "supervised"])
    ap.add_argument("--model", default="shapes-base")
    ap.add_argument("--k", type=int, default=16, help="images per shapes_pairs prompt")
    ap.add_argument("--seed", type=int, default=1234, help="sampling noise (and data/batches of the supervised probe)")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--every", type=float, default=10.0, help="minutes between evaluations")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--scenes", type=int, default=16000, help="ground-truth pair scenes to train on")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--save", type=Path, default=None, help="supervised: save the trained pipeline (fp32) here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from common.config import ModelConfig
    from common.pipelines import load_pipeline

    pipe = load_pipeline(ModelConfig(pretrained=args.model))
    prompts = SHAPES_PROMPT_SETS["shapes_pairs"]()
    out = per_prompt(pipe, prompts, args.k, args.seed) if args.probe == "per-prompt" else supervised(pipe, prompts, args)
    if args.probe == "per-prompt":
        print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
