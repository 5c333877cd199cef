"""Train the Shapes base model: a complete tiny StableDiffusionPipeline on procedural Shapes scenes.

Stages, each printed as it runs:
  1. data:   n seeded scenes (common.shapes.scenes), uint8 [N, 64, 64, 3] with captions;
  2. vae:    AutoencoderKL, 64x64x3 images -> 8x8x4 latents (MSE + tiny KL);
  3. encode: all images to latent means/stds; scaling_factor = 1 / std of the latents;
  4. unet:   CLIPTextModel + UNet2DConditionModel, epsilon loss, 10% caption dropout (for CFG), EMA.
The EMA pipeline is saved every --ckpt-minutes to WORK/ckpt, at the end in fp32 to WORK/final_fp32 and to
--out (StableDiffusionPipeline.save_pretrained, safetensors; all modules fp16 unless --fp32: load it with
torch_dtype=torch.float32 on a CPU, where fp16 is ~10x slower). --export-from DIR re-saves a saved fp32
pipeline to --out in fp16 without training. --init-from DIR continues a saved pipeline (VAE frozen, stages
3-4 only); --aux-relation W adds a cross-entropy that names the relation word from the mean text state, without
which the text encoder merges "left" with "right" and the order is never learned (docs/results.md, session 24);
--keep-ckpts keeps every checkpoint as WORK/ckpt-STEP. The stage lengths are step
counts; when --vae-steps / --unet-steps are not given they are derived from the --minutes wall-clock budget
after timing a few steps, and the steps used are written to OUT/train_config.json so that a rerun with
them is exact up to floating-point non-determinism.

    python -m common.shapes.train_base --out common/assets/shapes_base --seed 0 --minutes 75
    python -m common.shapes.train_base --out DIR --init-from common/assets/shapes_base --aux-relation 0.1 ...
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common.shapes.base_io import TEXT_MAX_LENGTH, build_models, export_pipeline, save_pipeline
from common.shapes.scenes import RELATIONS, generate_scenes, parse_caption


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to peak, then cosine decay to 10% of peak at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _log(msg: str, t0: float) -> None:
    print(f"[{(time.time() - t0) / 60:6.1f} min] {msg}", flush=True)


def _steps_for(budget_s: float, step_fn, probe_steps: int = 8) -> tuple[int, float]:
    """Time probe_steps calls of step_fn (after one warm-up) and return (steps that fit budget_s, s/step)."""
    step_fn(0)
    t = time.time()
    for i in range(probe_steps):
        step_fn(i + 1)
    per = (time.time() - t) / probe_steps
    return max(50, int(budget_s / per)), per


def train_vae(args, images: torch.Tensor, t0: float, budget_s: float):
    from diffusers import AutoencoderKL

    vae = build_models(49408, 49407)[0]
    n = images.shape[0]
    gen = torch.Generator().manual_seed(args.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)

    def batch() -> torch.Tensor:
        idx = torch.randint(0, n, (args.vae_batch,), generator=gen)
        return images[idx].float() / 127.5 - 1.0

    def step(i: int, total: int = 10**9) -> float:
        for g in opt.param_groups:
            g["lr"] = lr_at(i, total, args.vae_lr, 100)
        x = batch()
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        loss = F.mse_loss(rec, x) + args.vae_kl * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        return float(loss.detach())

    total = args.vae_steps
    if total is None:
        total, per = _steps_for(budget_s, step)
        _log(f"vae: {per:.2f} s/step -> {total} steps in {budget_s / 60:.1f} min", t0)
        # The timing steps trained the VAE; restart from fresh weights so the run is defined by `total`.
        # (The shipped model's VAE predates this reset: it also had the 9 timing steps.)
        torch.manual_seed(args.seed)
        vae.load_state_dict(build_models(49408, 49407)[0].state_dict())
        opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
        gen.manual_seed(args.seed + 1)
    ema_loss, t_last = None, time.time()
    for i in range(total):
        loss = step(i, total)
        ema_loss = loss if ema_loss is None else 0.98 * ema_loss + 0.02 * loss
        if (i + 1) % args.log_every == 0 or i + 1 == total:
            psnr = 10 * math.log10(4.0 / max(ema_loss, 1e-8))
            dt = (time.time() - t_last) / args.log_every
            t_last = time.time()
            _log(f"vae step {i + 1}/{total} loss {ema_loss:.5f} (~{psnr:.1f} dB) {dt:.2f} s/step", t0)
    vae.eval()
    assert isinstance(vae, AutoencoderKL)
    return vae, total


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent means and stds [N, 4, 8, 8] of uint8 images [N, 3, 64, 64]."""
    means, stds = [], []
    for i in range(0, images.shape[0], batch):
        d = vae.encode(images[i : i + batch].float() / 127.5 - 1.0).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def relation_targets(captions: list[str]) -> torch.Tensor:
    """Index in RELATIONS of each caption's relation word, -1 for a single object (or an empty caption)."""
    rels = [parse_caption(c).relation if c else None for c in captions]
    return torch.tensor([RELATIONS.index(r) if r else -1 for r in rels], dtype=torch.long)


def relation_aux_loss(head: torch.nn.Module, states: torch.Tensor, labels: torch.Tensor):
    """--aux-relation's loss: cross-entropy of a linear head naming the relation word from the mean text state.

    labels: RELATIONS index per row, -1 where there is none (a single object, a dropped caption). Returns
    (loss, accuracy), or None when no row has a relation. Without this loss the text encoder merges "left" with
    "right" (and "above" with "below") and the UNet cannot learn the order (docs/results.md, session 24).
    """
    keep = labels >= 0
    if not bool(keep.any()):
        return None
    logits = head(states[keep].mean(dim=1))
    acc = float((logits.argmax(-1) == labels[keep]).float().mean())
    return F.cross_entropy(logits, labels[keep]), acc


def train_unet(
    args, latents, stds, captions, vae, tokenizer, work: Path, out: Path, t0: float, budget_s, meta, init=None
):
    """Train text encoder + UNet (fresh, or continued from init = (text_encoder, unet, scheduler))."""

    def fresh() -> tuple:
        if init is not None:
            return tuple(copy.deepcopy(m) for m in init)
        return build_models(len(tokenizer), tokenizer.pad_token_id)[1:]

    text_encoder, unet, scheduler = fresh()
    n_params = sum(p.numel() for p in unet.parameters()), sum(p.numel() for p in text_encoder.parameters())
    _log(f"unet {n_params[0] / 1e6:.2f}M params, text encoder {n_params[1] / 1e6:.2f}M params", t0)
    uniq = sorted(set(captions))
    cap_index = {c: i for i, c in enumerate(uniq)}
    ids_table = tokenizer(
        uniq + [""],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    empty_row = len(uniq)
    cap_idx = torch.tensor([cap_index[c] for c in captions])
    gen = torch.Generator().manual_seed(args.seed + 2)
    # --aux-relation: a linear head on the mean text state names the relation word (cross-entropy). Without it
    # the text encoder merges "left" with "right" (and "above" with "below"), and the UNet cannot learn the
    # order at all (docs/results.md, session 24). The head is dropped after training.
    rel_of = torch.cat([relation_targets(uniq), torch.tensor([-1])])
    head = torch.nn.Linear(text_encoder.config.hidden_size, len(RELATIONS))
    params = list(unet.parameters()) + list(text_encoder.parameters())
    if args.aux_relation:
        params += list(head.parameters())
    for p in params:
        p.requires_grad_(True)
    text_encoder.train(), unet.train()
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    for p in list(ema_unet.parameters()) + list(ema_te.parameters()):
        p.requires_grad_(False)
    alphas = scheduler.alphas_cumprod
    sf = vae.config.scaling_factor
    n = latents.shape[0]

    aux_acc: list[float] = []  # the relation head's accuracy per step since the last log line

    def step(i: int, total: int = 10**9) -> float:
        for g in opt.param_groups:
            g["lr"] = lr_at(i, total, args.lr, args.warmup)
        idx = torch.randint(0, n, (args.batch,), generator=gen)
        z = (latents[idx] + stds[idx] * torch.randn(latents[idx].shape, generator=gen)) * sf
        rows = cap_idx[idx].clone()
        rows[torch.rand(args.batch, generator=gen) < args.caption_dropout] = empty_row
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), generator=gen)
        noise = torch.randn(z.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z + (1 - a).sqrt() * noise
        cond = text_encoder(ids_table[rows])[0]
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        labels = rel_of[rows]
        aux = relation_aux_loss(head, cond, labels) if args.aux_relation else None
        if aux is not None:
            aux_acc.append(aux[1])
            loss = loss + args.aux_relation * aux[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss.detach())

    @torch.no_grad()
    def ema_update(i: int) -> None:
        d = min(args.ema, (1 + i) / (10 + i))
        for src, dst in ((unet, ema_unet), (text_encoder, ema_te)):
            for p, q in zip(src.parameters(), dst.parameters()):
                q.mul_(d).add_(p.detach(), alpha=1 - d)

    total = args.unet_steps
    if total is None:
        total, per = _steps_for(budget_s, step)
        _log(f"unet: {per:.2f} s/step -> {total} steps in {budget_s / 60:.1f} min", t0)
        # The timing steps trained the model; restart from fresh weights so the run is defined by `total`.
        text_encoder2, unet2, _ = fresh()
        head.reset_parameters()
        unet.load_state_dict(unet2.state_dict())
        text_encoder.load_state_dict(text_encoder2.state_dict())
        ema_unet.load_state_dict(unet2.state_dict())
        ema_te.load_state_dict(text_encoder2.state_dict())
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
        gen.manual_seed(args.seed + 2)
    meta["unet_steps"] = total
    ema_loss, t_last, t_ckpt = None, time.time(), time.time()
    aux_acc.clear()
    for i in range(total):
        loss = step(i, total)
        ema_update(i)
        ema_loss = loss if ema_loss is None else 0.98 * ema_loss + 0.02 * loss
        if (i + 1) % args.log_every == 0 or i + 1 == total:
            dt = (time.time() - t_last) / args.log_every
            t_last = time.time()
            eta = dt * (total - i - 1) / 60
            _log(
                f"unet step {i + 1}/{total} loss {ema_loss:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{dt:.2f} s/step eta {eta:.1f} min"
                + (
                    f" relation-head acc {sum(aux_acc) / max(1, len(aux_acc)):.2f}"
                    if args.aux_relation
                    else ""
                ),
                t0,
            )
            aux_acc.clear()
        if time.time() - t_ckpt > args.ckpt_minutes * 60:
            t_ckpt = time.time()
            save_pipeline(
                work / (f"ckpt-{i + 1}" if args.keep_ckpts else "ckpt"),
                vae,
                ema_te,
                ema_unet,
                scheduler,
                tokenizer,
                False,
                {**meta, "ckpt_step": i + 1},
            )
            _log(f"checkpoint (EMA, fp32) at step {i + 1} -> {work}", t0)
    save_pipeline(work / "final_fp32", vae, ema_te, ema_unet, scheduler, tokenizer, False, meta)
    save_pipeline(out, vae, ema_te, ema_unet, scheduler, tokenizer, not args.fp32, meta)
    _log(f"saved final EMA pipeline to {out} (fp16={not args.fp32}) and {work / 'final_fp32'}", t0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for the final pipeline (save_pretrained)")
    p.add_argument("--work", default="/tmp/shapes_train", help="scratch: dataset cache, VAE, checkpoints")
    p.add_argument("--seed", type=int, default=0, help="seeds the data, the weights and the batches")
    p.add_argument("--n-images", type=int, default=40_000, help="training scenes")
    p.add_argument("--pair-fraction", type=float, default=0.5, help="fraction of two-object scenes")
    p.add_argument("--minutes", type=float, default=75.0, help="wall-clock budget for all stages")
    p.add_argument("--vae-minutes", type=float, default=14.0, help="part of --minutes for the VAE")
    p.add_argument("--vae-steps", type=int, default=None, help="VAE steps (default: from --vae-minutes)")
    p.add_argument("--unet-steps", type=int, default=None, help="UNet steps (default: the rest of --minutes)")
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-kl", type=float, default=1e-6, help="KL weight (small: a near-deterministic AE)")
    p.add_argument("--batch", type=int, default=64, help="UNet batch")
    p.add_argument("--lr", type=float, default=6e-4, help="peak AdamW lr for UNet and text encoder")
    p.add_argument("--warmup", type=int, default=200, help="lr warm-up steps")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    p.add_argument("--caption-dropout", type=float, default=0.1, help="P(empty caption), for CFG")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--ckpt-minutes", type=float, default=10.0, help="EMA checkpoint period")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--fp32", action="store_true", help="save --out in fp32 (default: fp16 UNet/text encoder)")
    p.add_argument("--export-from", default=None, help="only re-save this fp32 pipeline dir to --out (fp16)")
    p.add_argument("--reuse-vae", action="store_true", help="reuse WORK/vae if present (resume)")
    p.add_argument(
        "--init-from",
        default=None,
        help="continue from this saved pipeline (its VAE, text encoder and UNet); skips the VAE stage",
    )
    p.add_argument(
        "--aux-relation",
        type=float,
        default=0.0,
        help="weight of an auxiliary cross-entropy that names the relation word from the mean text state "
        "(0: off; 0.1 teaches the order, docs/results.md)",
    )
    p.add_argument("--keep-ckpts", action="store_true", help="keep every checkpoint as WORK/ckpt-STEP")
    return p.parse_args(argv)


def _check_init_from(path: Path) -> None:
    if not (path / "model_index.json").is_file():
        raise SystemExit(
            f"--init-from {path}: no model_index.json there; give a save_pretrained pipeline directory"
        )


def _load_init(path: Path, meta: dict, t0: float) -> tuple:
    """(vae, (text_encoder, unet, scheduler), tokenizer) of a saved pipeline, in fp32, to continue training
    (main has checked the directory with _check_init_from before generating data)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path), torch_dtype=torch.float32)
    cfg = path / "train_config.json"
    meta["init_config"] = json.loads(cfg.read_text()) if cfg.is_file() else None
    meta["vae_steps"] = 0
    _log(
        f"init: continuing from {path} (VAE kept frozen, scaling_factor {pipe.vae.config.scaling_factor:.4f})",
        t0,
    )
    return pipe.vae.eval(), (pipe.text_encoder, pipe.unet, pipe.scheduler), pipe.tokenizer


def main(argv: list[str] | None = None) -> None:
    from diffusers import AutoencoderKL

    from common.tokenizer import build_clip_tokenizer

    args = parse_args(argv)
    if args.export_from is not None:
        export_pipeline(Path(args.export_from), Path(args.out), fp16=not args.fp32)
        return
    if args.init_from is not None:  # before minutes of data generation, not after
        _check_init_from(Path(args.init_from))
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    _log(f"args {vars(args)}", t0)

    images_np, captions = generate_scenes(args.n_images, args.seed, args.pair_fraction)
    images = torch.from_numpy(images_np).permute(0, 3, 1, 2).contiguous()
    n_pairs = sum(" of " in c or " above " in c or " below " in c for c in captions)
    _log(f"data: {len(captions)} scenes ({n_pairs} pairs), {len(set(captions))} distinct captions", t0)

    vae_dir = work / "vae"
    meta: dict = {k: v for k, v in vars(args).items() if k not in ("out", "work", "reuse_vae", "export_from")}
    init = None
    if args.init_from is not None:
        vae, init, tokenizer = _load_init(Path(args.init_from), meta, t0)
    elif args.reuse_vae and (vae_dir / "config.json").is_file():
        vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
        meta["vae_steps"] = json.loads((vae_dir / "steps.json").read_text())["vae_steps"]
        _log(f"vae: reused {vae_dir}", t0)
    else:
        vae, meta["vae_steps"] = train_vae(args, images, t0, args.vae_minutes * 60 - (time.time() - t0))
        vae.save_pretrained(str(vae_dir))
        (vae_dir / "steps.json").write_text(json.dumps({"vae_steps": meta["vae_steps"]}))
    for p in vae.parameters():
        p.requires_grad_(False)

    means, stds = encode_all(vae, images)
    std = float((means + stds * torch.randn_like(stds)).std())
    if init is None:  # a continued model keeps the scaling its UNet was trained with
        vae.register_to_config(scaling_factor=1.0 / std)
    meta["scaling_factor"] = vae.config.scaling_factor
    with torch.no_grad():
        rec = vae.decode(means[:256]).sample.clamp(-1, 1)
        mse = F.mse_loss(rec, images[:256].float() / 127.5 - 1.0).item()
    _log(
        f"encode: latents {tuple(means.shape)}, std {std:.3f} -> scaling_factor {1 / std:.4f}, "
        f"recon PSNR {10 * math.log10(4.0 / mse):.1f} dB",
        t0,
    )

    if init is None:
        tokenizer = build_clip_tokenizer(model_max_length=TEXT_MAX_LENGTH)
    budget = args.minutes * 60 - (time.time() - t0) - 60  # a minute for the saves
    train_unet(args, means, stds, captions, vae, tokenizer, work, out, t0, budget, meta, init)
    _log("done", t0)


if __name__ == "__main__":
    main()
