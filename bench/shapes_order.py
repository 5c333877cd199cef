"""Is the Shapes base model's relation order learnable at all? Two probes of `shapes-base` at 20 DDIM steps,
guidance 5, eta 0 (bench/shapes_quality.py's sampler), on the `shapes_pairs` prompts:

  per-prompt  K images per prompt: each prompt's rate of the right relation among images whose two objects
              were both found. If the order were a per-prompt rule (always the first-named object on the left,
              say), the rates would sit near 0 and 1; if it is a coin flip per image, they spread only as
              binomial noise around the mean (std sqrt(p(1-p)/K)). --guidance G scores images at CFG scale G.
  supervised  continue the base model's own training (epsilon loss on ground-truth pair scenes, UNet and text
              encoder, every weight trainable, AdamW, 10% caption dropout) for --minutes, and score K images
              per prompt before and every --every minutes. Direct supervision is the strongest signal there
              is: if it does not move the order in the budget, no reward fine-tuning of the same size will.
              --bidirectional first drops the text encoder's causal mask (same weights, SiglipTextModel);
              --hi-noise-weight W weights high-noise examples up to W times (the x0 error, clamped);
              --aux-relation W adds W x a cross-entropy naming the relation word from the mean text state;
              --only CAPTION... trains on scenes of those captions alone and scores them (memorise).
  loss-gap    the denoiser's epsilon loss on --scenes ground-truth pair scenes under the true caption, its
              paraphrase, the swapped order and the empty caption, per timestep, with the same noise: a
              model that uses the order has loss(swapped) > loss(true). Forward passes only, ~1 min.

    HF_HUB_OFFLINE=1 python bench/shapes_order.py per-prompt --k 16
    HF_HUB_OFFLINE=1 python bench/shapes_order.py supervised --minutes 30 --every 10 --lr 3e-4 --k 8 [--save DIR]
    HF_HUB_OFFLINE=1 python bench/shapes_order.py loss-gap --model shapes-base --scenes 1024
    HF_HUB_OFFLINE=1 python bench/shapes_order.py supervised --scenes 2000 --k 32 --minutes 12 --every 3 \
        --only "a red circle to the left of a blue square" "a blue square to the left of a red circle"

Each prints JSON; --json also writes the result (the supervised probe's rows) to a file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

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


def per_prompt(pipe, prompts: list[str], k: int, seed: int, guidance: float = 5.0) -> dict:
    allp = [p for p in prompts for _ in range(k)]
    images = sample(pipe, allp, guidance, seed, 20)
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


def bidirectional_text_encoder(te):
    """The same weights as CLIPTextModel `te` in a SiglipTextModel: CLIP's text transformer without its causal
    mask, so that every token state sees the whole caption (the relation word comes after the first object).
    With a causal mask passed in, it reproduces `te` exactly; the pooled head is new and unused by SD."""
    from transformers import SiglipTextConfig, SiglipTextModel

    if isinstance(te, SiglipTextModel):
        return te
    c = te.config
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "hidden_act", "layer_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id")  # fmt: skip
    out = SiglipTextModel(SiglipTextConfig(**{k: getattr(c, k) for k in keys}, projection_size=c.hidden_size))
    missing, unexpected = out.load_state_dict(te.state_dict(), strict=False)
    if unexpected or set(missing) != {"head.weight", "head.bias"}:
        raise RuntimeError(f"text encoder conversion: missing {missing}, unexpected {unexpected}")
    return out.to(te.dtype)


def order_variants(caption: str) -> dict[str, str]:
    """A pair caption as it is (`true`), paraphrased (objects swapped and the relation word reversed: the same
    layout), with its order swapped (the relation word reversed: the mirror layout) and `empty`."""
    from common.shapes.scenes import OPPOSITE_RELATION, Caption, parse_caption

    c = parse_caption(caption)
    if c.relation is None:
        raise ValueError(f"order_variants needs a two-object caption, got {caption!r}")
    opposite = OPPOSITE_RELATION[c.relation]
    return {
        "true": c.text,
        "paraphrase": Caption((c.objects[1], c.objects[0]), opposite).text,
        "swapped": Caption(c.objects, opposite).text,
        "empty": "",
    }


@torch.no_grad()
def loss_gap(pipe, n: int, seed: int, timesteps: tuple[int, ...] = (100, 300, 500, 700, 900)) -> dict:
    """Does the denoiser use the order? On n fresh ground-truth pair scenes, with the same noise for every
    caption, the epsilon loss under the true caption, its paraphrase (objects swapped, relation word
    reversed: the same layout), the swapped order (the relation word reversed: the mirror layout) and the
    empty caption, per timestep. A model that binds each object to its side has loss(swapped) > loss(true);
    one that knows only the axis has them equal. The gap is paired per image (mean, 95% CI, share > 0)."""
    from common.shapes.scenes import generate_scenes

    vae, te, unet, sched, tok = pipe.vae, pipe.text_encoder, pipe.unet, pipe.scheduler, pipe.tokenizer
    imgs_np, caps = generate_scenes(n, seed + 11, 1.0)
    images = torch.from_numpy(imgs_np).permute(0, 3, 1, 2).float() / 127.5 - 1
    z0 = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, n, 256)])
    z0 = z0 * vae.config.scaling_factor
    per_caption = [order_variants(c) for c in caps]
    variants = {k: [v[k] for v in per_caption] for k in ("true", "paraphrase", "swapped", "empty")}

    def states(texts: list[str]) -> torch.Tensor:
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids  # fmt: skip
        return torch.cat([te(ids[i : i + 256])[0] for i in range(0, n, 256)])

    cond = {k: states(v) for k, v in variants.items()}
    gen = torch.Generator().manual_seed(seed + 13)
    out: dict = {"n": n}
    for t in timesteps:
        noise = torch.randn(z0.shape, generator=gen)
        a = sched.alphas_cumprod[t]
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        tt = torch.full((n,), t)
        losses = {}
        for k, c in cond.items():
            pred = torch.cat([unet(zt[i : i + 128], tt[i : i + 128], encoder_hidden_states=c[i : i + 128]).sample
                              for i in range(0, n, 128)])  # fmt: skip
            losses[k] = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        gap = losses["swapped"] - losses["true"]
        row = {k: round(float(v.mean()), 5) for k, v in losses.items()}
        row["gap_swapped"] = round(float(gap.mean()), 5)
        row["gap_swapped_ci"] = round(1.96 * float(gap.std()) / math.sqrt(n), 5)
        row["gap_swapped_share_pos"] = round(float((gap > 0).float().mean()), 3)
        row["gap_paraphrase"] = round(float((losses["paraphrase"] - losses["true"]).mean()), 5)
        row["gap_empty"] = round(float((losses["empty"] - losses["true"]).mean()), 5)
        out[f"t{t}"] = row
    return out


def supervised(pipe, prompts: list[str], args) -> list[dict]:
    from common.shapes.scenes import RELATIONS, generate_scenes
    from common.shapes.train_base import relation_aux_loss, relation_targets

    vae, te, unet, sched, tok = pipe.vae, pipe.text_encoder, pipe.unet, pipe.scheduler, pipe.tokenizer
    if args.only:  # memorise: scenes of these captions only, in turn, and score them alone
        import numpy as np

        from common.shapes.scenes import make_scene

        rng = np.random.default_rng(args.seed + 7)
        drawn = [make_scene(args.only[i % len(args.only)], rng) for i in range(args.scenes)]
        imgs_np, caps = np.stack([d.image for d in drawn]), [d.caption.text for d in drawn]
        prompts = [d.caption.text for d in drawn[: len(args.only)]]
    else:
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
    # --aux-relation: a linear head on the mean text state names the relation word (cross-entropy), so that the
    # text encoder keeps "left" apart from "right" and "above" from "below" (docs/results.md, session 24).
    rel_of = relation_targets(uniq + [""])
    head = torch.nn.Linear(te.config.hidden_size, len(RELATIONS))
    params = list(unet.parameters()) + list(te.parameters()) + (list(head.parameters()) if args.aux_relation else [])
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
        states = te(ids[rows_])[0]
        pred = unet(a.sqrt() * z + (1 - a).sqrt() * noise, t, encoder_hidden_states=states).sample
        # weight (1 - a) / a turns the epsilon error into the x0 error; clamped to [1, W] it leaves low noise as
        # it was and raises high noise, where the layout (and so the order) is decided, up to W times.
        w = ((1 - a) / a).clamp(1.0, args.hi_noise_weight).view(-1)
        loss = (((pred - noise) ** 2).mean(dim=(1, 2, 3)) * w).mean() / w.mean()
        aux = relation_aux_loss(head, states, rel_of[rows_]) if args.aux_relation else None
        if aux is not None:  # captions dropped for CFG have no relation
            loss = loss + args.aux_relation * aux[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % 100 == 0:
            print(f"step {step} loss {float(loss.detach()):.4f} {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("probe", choices=["per-prompt", "supervised", "loss-gap"])
    ap.add_argument("--model", default="shapes-base")
    ap.add_argument("--k", type=int, default=16, help="images per shapes_pairs prompt")
    ap.add_argument("--seed", type=int, default=1234, help="sampling noise (and data/batches of the supervised probe)")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--every", type=float, default=10.0, help="minutes between evaluations")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--scenes", type=int, default=16000, help="ground-truth pair scenes to train on")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hi-noise-weight", type=float, default=1.0,
                    help="supervised: weight each example's epsilon loss by (1-a)/a clamped to [1, W] (1: plain)")
    ap.add_argument("--bidirectional", action="store_true",
                    help="drop the text encoder's causal mask (same weights, as a SiglipTextModel) before probing")
    ap.add_argument("--aux-relation", type=float, default=0.0,
                    help="supervised: weight of a cross-entropy that names the relation word from the text states")
    ap.add_argument("--only", nargs="+", default=None, metavar="CAPTION",
                    help="supervised: train on scenes of these pair captions only and score them alone (memorise)")
    ap.add_argument("--prompts", default="shapes_pairs", choices=["shapes_pairs", "shapes_pairs_heldout"],
                    help="the prompt set to score (per-prompt, supervised)")
    ap.add_argument("--guidance", type=float, default=5.0, help="per-prompt: the CFG scale of the scored images")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--save", type=Path, default=None, help="supervised: save the trained pipeline (fp32) here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from common.config import ModelConfig
    from common.pipelines import load_pipeline

    pipe = load_pipeline(ModelConfig(pretrained=args.model))
    if args.bidirectional:
        pipe.text_encoder = bidirectional_text_encoder(pipe.text_encoder)
    prompts = SHAPES_PROMPT_SETS[args.prompts]()
    if args.probe == "loss-gap":
        out = loss_gap(pipe, args.scenes, args.seed)
    elif args.probe == "per-prompt":
        out = {"guidance": args.guidance, **per_prompt(pipe, prompts, args.k, args.seed, args.guidance)}
    else:
        out = supervised(pipe, prompts, args)
    if args.probe != "supervised":
        print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
