"""Quality figures of the Shapes testbed: the detector on ground truth, the base model, guidance vs diversity.

    HF_HUB_OFFLINE=1 python bench/shapes_quality.py [--model shapes-base] [--grids /tmp/shapes_grids]

Prints, and writes as JSON to --json:
  detector: mean hard/soft score on generated scenes; scores against deliberately wrong captions
            (wrong colour, wrong shape, swapped relation); relation success against a wrong relation word;
  base model at constant guidance (--guidance, 20 DDIM steps, eta 0): single-object success on shapes_single,
            full success on shapes_pairs and shapes_pairs_heldout, relation success with the right word
            and with the opposite word (the chance level of the relation check on these layouts);
  the guidance table: mean reward, full success and diversity on shapes_pairs at guidance 1, 3, 5, 7.5;
  Spearman correlation of shapes_soft with shapes on all model samples.
Sample grids (rows: prompts, columns: samples) are saved as PNGs under --grids.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from common.shapes.detect import colour_labels, score_scenes
from common.shapes.diversity import mean_diversity, prompt_diversity
from common.shapes.prompt_sets import SHAPES_PROMPT_SETS
from common.shapes.scenes import (
    CORRUPTIONS,
    OPPOSITE_RELATION,
    corrupt_caption,
    generate_scenes,
    parse_caption,
)


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation of two [N] tensors, ties given their average rank."""

    def ranks(v: torch.Tensor) -> torch.Tensor:
        v = v.double()
        order = v.argsort()
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for val in v.unique():  # average ranks over ties
            m = v == val
            r[m] = r[m].mean()
        return r

    return float(torch.corrcoef(torch.stack([ranks(x), ranks(y)]))[0, 1])


def opposite_prompts(prompts: list[str]) -> list[str]:
    """The same pair captions with the opposite relation word."""
    out = []
    for p in prompts:
        c = parse_caption(p)
        out.append(f"{c.objects[0].phrase} {OPPOSITE_RELATION[c.relation]} {c.objects[1].phrase}")
    return out


def perpendicular_prompts(prompts: list[str], which: int) -> list[str]:
    """The same pair captions with one (which = 0 or 1) of the two relation words on the other axis."""
    out = []
    for p in prompts:
        c = parse_caption(p)
        horizontal = c.relation in ("to the left of", "to the right of")
        word = (("above", "below") if horizontal else ("to the left of", "to the right of"))[which]
        out.append(f"{c.objects[0].phrase} {word} {c.objects[1].phrase}")
    return out


def background_chroma(images: torch.Tensor) -> float:
    """Mean chroma (max - min channel, [0, 1] units) of the pixels that no colour claims: the colour cast of
    the background (0 for the generator's grey)."""
    chroma = images.amax(dim=1) - images.amin(dim=1)
    return float(chroma[colour_labels(images) < 0].mean())


def bench_detector(n: int, seed: int) -> dict:
    imgs_np, caps = generate_scenes(n, seed, pair_fraction=0.5, exclude_heldout=False)
    imgs = torch.from_numpy(imgs_np).permute(0, 3, 1, 2).float() / 255
    hard = score_scenes(imgs, caps)
    soft = score_scenes(imgs, caps, soft=True)
    out: dict = {
        "n": n,
        "ground_truth_hard_mean": float(hard.score.mean()),
        "ground_truth_full_success": float((hard.score == 1).float().mean()),
        "ground_truth_soft_mean": float(soft.score.mean()),
    }
    rng = np.random.default_rng(seed + 1)
    is_pair = [parse_caption(c).relation is not None for c in caps]
    for kind in CORRUPTIONS:
        idx = [i for i in range(n) if is_pair[i] or kind != "swapped_relation"]
        wrong = [corrupt_caption(caps[i], kind, rng).text for i in idx]
        s = score_scenes(imgs[idx], wrong)
        out[kind] = {
            "n": len(idx),
            "mean": float(s.score.mean()),
            "full_success": float((s.score == 1).float().mean()),
        }
    pidx = [i for i in range(n) if is_pair[i]]
    s = score_scenes(imgs[pidx], opposite_prompts([caps[i] for i in pidx]))
    out["relation_ok_with_opposite_word"] = float(s.relation_ok.mean())
    return out


@torch.no_grad()
def sample(pipe, prompts: list[str], guidance: float, seed: int, steps: int, batch: int = 64) -> torch.Tensor:
    """Images float [N, 3, 64, 64] in [0, 1] for prompts (one image each), seeded per batch."""
    out = []
    for i in range(0, len(prompts), batch):
        gen = torch.Generator().manual_seed(seed + i)
        res = pipe(
            prompts[i : i + batch],
            num_inference_steps=steps,
            guidance_scale=guidance,
            eta=0.0,
            height=64,
            width=64,
            output_type="pt",
            generator=gen,
        )
        out.append(res.images.float().cpu())
    return torch.cat(out)


def save_grid(images: torch.Tensor, cols: int, path: Path, scale: int = 3) -> None:
    """Save images [N, 3, 64, 64] in [0, 1] as a grid PNG, `cols` per row, 1-px white gutters."""
    from PIL import Image

    n = images.shape[0]
    rows = (n + cols - 1) // cols
    grid = torch.ones(3, rows * 65 + 1, cols * 65 + 1)
    for k in range(n):
        r, c = divmod(k, cols)
        grid[:, 1 + r * 65 : 1 + r * 65 + 64, 1 + c * 65 : 1 + c * 65 + 64] = images[k]
    arr = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST).save(path)


def summarize(images: torch.Tensor, prompts: list[str]) -> dict:
    hard = score_scenes(images, prompts)
    pair = [parse_caption(p).relation is not None for p in prompts]
    out = {
        "n": len(prompts),
        "mean_reward": float(hard.score.mean()),
        "full_success": float((hard.score == 1).float().mean()),
        "objects_ok": float(hard.objects_ok.mean()),
    }
    if all(pair):
        opp = score_scenes(images, opposite_prompts(prompts))
        out["relation_ok"] = float(hard.relation_ok.mean())
        out["relation_ok_opposite_word"] = float(opp.relation_ok.mean())
        # Relation among samples whose two objects were both found: the check's own rate.
        both = (hard.detections[0].found * hard.detections[1].found) > 0
        perp = [score_scenes(images, perpendicular_prompts(prompts, w)).relation_ok.mean() for w in (0, 1)]
        out["relation_ok_perpendicular_word"] = float(sum(perp) / 2)
        out["relation_ok_given_found"] = float(hard.relation_ok[both].mean())
        out["relation_ok_opposite_given_found"] = float(opp.relation_ok[both].mean())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes-base", help="built-in name or a save_pretrained directory")
    p.add_argument("--guidance", type=float, default=5.0, help="constant guidance for the success figures")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument(
        "--single-repeats", type=int, default=6, help="samples per shapes_single prompt (18 prompts)"
    )
    p.add_argument("--pair-repeats", type=int, default=2, help="samples per shapes_pairs prompt (60 prompts)")
    p.add_argument("--heldout-repeats", type=int, default=3, help="samples per heldout prompt (40 prompts)")
    p.add_argument("--table-prompts", type=int, default=16, help="shapes_pairs prompts in the guidance table")
    p.add_argument("--table-samples", type=int, default=8, help="samples per prompt in the guidance table")
    p.add_argument("--detector-n", type=int, default=1000, help="generated scenes for the detector figures")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grids", default="/tmp/shapes_grids", help="directory for the sample grid PNGs")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    res: dict = {"args": vars(args)}

    res["detector"] = bench_detector(args.detector_n, args.seed)
    print("detector:", json.dumps(res["detector"], indent=1), flush=True)

    from common.config import ModelConfig
    from common.pipelines import load_pipeline

    pipe = load_pipeline(ModelConfig(pretrained=args.model))
    grids = Path(args.grids)
    g = args.guidance
    all_imgs, all_prompts = [], []

    single = [q for q in SHAPES_PROMPT_SETS["shapes_single"]() for _ in range(args.single_repeats)]
    imgs = sample(pipe, single, g, args.seed, args.steps)
    res["single"] = summarize(imgs, single)
    save_grid(imgs, args.single_repeats, grids / f"single_g{g:g}.png")
    all_imgs.append(imgs)
    all_prompts += single
    print(f"shapes_single @ g={g:g}:", res["single"], flush=True)

    for name, reps in (("shapes_pairs", args.pair_repeats), ("shapes_pairs_heldout", args.heldout_repeats)):
        prompts = [q for q in SHAPES_PROMPT_SETS[name]() for _ in range(reps)]
        imgs = sample(pipe, prompts, g, args.seed + 1, args.steps)
        res[name] = summarize(imgs, prompts)
        save_grid(imgs[: 16 * reps], reps * 4, grids / f"{name}_g{g:g}.png")
        all_imgs.append(imgs)
        all_prompts += prompts
        print(f"{name} @ g={g:g}:", res[name], flush=True)

    table = []
    prompts = SHAPES_PROMPT_SETS["shapes_pairs"]()[: args.table_prompts]
    for scale in (1.0, 3.0, 5.0, 7.5):
        batch = [q for q in prompts for _ in range(args.table_samples)]
        imgs = sample(pipe, batch, scale, args.seed + 2, args.steps)
        row = {"guidance": scale, **summarize(imgs, batch)}
        k = args.table_samples
        row.update(
            mean_diversity([prompt_diversity(imgs[i * k : (i + 1) * k], q) for i, q in enumerate(prompts)])
        )
        row["background_chroma"] = background_chroma(imgs)
        table.append(row)
        save_grid(imgs[: 8 * k], k, grids / f"pairs_table_g{scale:g}.png")
        all_imgs.append(imgs)
        all_prompts += batch
        print(f"guidance {scale:g}:", row, flush=True)
    res["guidance_table"] = table

    res["background_chroma_ground_truth"] = background_chroma(
        torch.from_numpy(generate_scenes(64, args.seed)[0]).permute(0, 3, 1, 2).float() / 255
    )
    imgs = torch.cat(all_imgs)
    hard = score_scenes(imgs, all_prompts).score
    soft = score_scenes(imgs, all_prompts, soft=True).score
    res["spearman_soft_vs_hard"] = {"n": len(all_prompts), "rho": spearman(soft, hard)}
    print("spearman soft vs hard:", res["spearman_soft_vs_hard"], flush=True)

    print(
        "\n| guidance | mean reward | full success | relation ok | position spread (px) | size spread (px) "
        "| pixel distance | background chroma |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['guidance']:g} | {r['mean_reward']:.3f} | {r['full_success']:.3f} | {r['relation_ok']:.3f} | "
            f"{r['position_spread']:.2f} | {r['size_spread']:.2f} | {r['pixel_distance']:.3f} | "
            f"{r['background_chroma']:.3f} |"
        )
    res["seconds"] = time.time() - t0
    print(f"\ndone in {res['seconds']:.0f} s; grids in {grids}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
