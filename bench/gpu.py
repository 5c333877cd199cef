"""GPU benchmark of the algorithm code on full-size SD1.5- and SDXL-shaped models with random weights.

Nothing is downloaded: each family's pipeline is built from its published architecture with random
weights (directly on the device, in the model dtype), wrapped in its `DiffusionModel`, and run through
the same classes the trainer uses (`RolloutGenerator`, `DDPOLearner`). No Ray import: Ray's wheel cannot
be carried to the GPU machine.

Measured per family, printed as one JSON document (and written to --out):
  sampler_img_s / pipeline_img_s   our sampler vs the plain diffusers pipeline (same weights, steps, scale,
                                   batch, eta; both decode), and their ratio; pipeline_with_lora_img_s is
                                   the pipeline with our (unmerged) LoRA adapter active. With --repeats N
                                   the four are timed N times, interleaved, and the best call counts
                                   (every call's seconds are in "timing")
  update_s_per_sample, peak_gb     one DDPO update over a scored batch at the preset's memory settings
  lora_sync_ms                     learner -> sampler LoRA copy with checksum (the local sync's work)
  logprob_mismatch                 first-minibatch |recomputed - sampled| log-prob, in the model dtype
  sampler_fused_img_s              the sampler with sampling.fuse_lora (LoRA folded into the weights per call)
  sampler_fused_channels_last_img_s  and with sampling.channels_last as well (NHWC convolution weights)
  sampler_fused_compiled_img_s     with --compile BACKEND, last: the fused sampler with sampling.compile,
                                   timed beside the plain pipeline ("timing_compiled"); and
  compile_first_call_s             its first call's seconds, which compile
  logprob_mismatch_after_update    max |recomputed - sampled| log-prob over every step of 4 samples drawn
                                   after the update (non-zero LoRA), from the unfused and the fused sampler,
                                   and the fused one in channels-last
  alignprop                        AlignProp update seconds per sample and peak memory for each K
  device_busy_fraction             with --profile: the fraction of one call's wall time the device
                                   computed, for the fused sampler and the plain pipeline (operator
                                   tables in PATH_FAMILY.txt)

The sampler and the learner get one random pipeline each, built from the same seed; the run stops if their
weights differ (a mismatch figure would then compare two models).

    python bench/gpu.py                      # on a GPU: sd15 and sdxl at full size (< 5 minutes on an H100)
    python bench/gpu.py --family sd15 --batch 16 --steps 50
    python bench/gpu.py --small              # CPU smoke run at toy size (tests/test_bench_gpu.py runs it)
    python bench/gpu.py --family sd15 --profile /tmp/prof.txt   # and where the sampler's time goes
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_variants import (
    VARIANTS,
    compile_unet,
    profile_calls,
    run_variant,
    timed,
    timed_variants,
    variant_setting,
)

# Published architectures (diffusers configs of runwayml/stable-diffusion-v1-5 and
# stabilityai/stable-diffusion-xl-base-1.0), written out so nothing is fetched.
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")  # fmt: skip
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")  # fmt: skip
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)  # fmt: skip
UNET = {
    "sd15": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "sdxl": dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                 cross_attention_dim=2048, attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
}  # fmt: skip
PRESET = {"sd15": "sd15", "sdxl": "sdxl"}


def build_pipeline(family: str, small: bool, device: str, dtype: torch.dtype, seed: int = 0):
    """A random-weight pipeline of `family` built on `device` in `dtype` (toy size if `small`); the same
    `seed` gives the same weights, so the sampler's and the learner's copies agree as two actors' would."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from common.pipelines import build_tiny_pipeline, build_tiny_sdxl_pipeline
    from common.tokenizer import build_clip_tokenizer

    if small:
        pipe = build_tiny_pipeline(0) if family == "sd15" else build_tiny_sdxl_pipeline(0)
        return pipe.to(device, dtype)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    def make_tokenizer():
        try:
            return build_clip_tokenizer(model_max_length=77)
        except ImportError:  # the GPU machine has no open_clip (CLIP's BPE file ships with it): bytes will do
            from common.tokenizer import build_byte_level_clip_tokenizer

            return build_byte_level_clip_tokenizer(77)

    tok = make_tokenizer()
    vocab = dict(vocab_size=49408)
    torch.manual_seed(seed)  # every device's generator: the initialisation below runs on `device`
    with torch.device(device):  # initialise on the device: seconds instead of minutes for SDXL
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel(**UNET[family])
        if family == "sd15":
            vae = AutoencoderKL(**VAE, sample_size=512)
            te = CLIPTextModel(CLIPTextConfig(**CLIP_L, **vocab))
            pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                           safety_checker=None, feature_extractor=None, requires_safety_checker=False)  # fmt: skip
        else:
            vae = AutoencoderKL(**VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
            te = CLIPTextModel(CLIPTextConfig(**CLIP_L, **vocab))
            te2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG, **vocab))
            tok2 = make_tokenizer()
            tok2.pad_token = "!"
            pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                             unet=unet, scheduler=sched)  # fmt: skip
    pipe = pipe.to(device, dtype)
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def same_weights(a, b) -> bool:
    """Whether two models' UNets, VAEs and text encoders hold equal weights (before LoRA is attached)."""
    pairs = [(a.unet, b.unet), (a.vae, b.vae)] + [(x, y) for (_, x), (_, y) in zip(a.encoders, b.encoders)]
    for x, y in pairs:
        sx, sy = x.state_dict(), y.state_dict()
        if sx.keys() != sy.keys() or not all(torch.equal(sx[k], sy[k]) for k in sx):
            return False
    return True


def bench_family(family: str, args, log, res: dict | None = None, save=lambda: None) -> dict:
    """The figures of one family, filled into `res` stage by stage, `save()` called after each stage."""
    from common.config import load_config
    from common.models import model_class
    from common.pipelines import attach_lora
    from common.rollouts import RolloutGenerator
    from learner.ddpo import DDPOLearner

    device, dtype = args.device, getattr(torch, args.dtype)
    overrides = [f"sampling.num_steps={args.steps}", f"sampling.batch_size={args.batch}",
                 f"train.samples_per_epoch={args.batch}", "exploration.enabled=true"]  # fmt: skip
    if args.small:  # the tiny preset's LoRA and update at toy size; --small skips the hub model ids
        overrides += [f"algorithm.minibatch_size={min(args.batch, 2)}", "algorithm.max_unet_batch=8",
                      "algorithm.gradient_checkpointing=true", "lora.target_modules=[to_q,to_k,to_v,to_out.0]"]  # fmt: skip
    else:  # the preset's minibatch and accumulation, cut to the one batch measured (validation requires it)
        a = load_config(PRESET[family]).algorithm
        mb = min(a.minibatch_size, args.batch)
        overrides += [f"algorithm.minibatch_size={mb}",
                      f"algorithm.gradient_accumulation={max(1, min(a.gradient_accumulation, args.batch // mb))}"]  # fmt: skip
    cfg = load_config("tiny" if args.small else PRESET[family], overrides + args.set)
    log(f"[{family}] building {'toy' if args.small else 'full-size'} random pipelines on {device} ({args.dtype})")
    # one pipeline each for the sampler and the learner (as two actors would hold), plus diffusers' own
    models = [model_class(type(p).__name__)(p, cfg.sampling.resolution)
              for p in (build_pipeline(family, args.small, device, dtype) for _ in range(2))]  # fmt: skip
    if not same_weights(*models):  # else the log-prob mismatch measures two different models
        raise SystemExit(f"[{family}] the sampler's and the learner's random pipelines differ: "
                         "seed build_pipeline")
    for m in models:
        attach_lora(m.unet, cfg.lora)
        m.unet.to(device)
    gen = RolloutGenerator(cfg, model=models[0])
    learner = DDPOLearner(cfg, model=models[1])
    gen.set_weights(*learner.weights())
    prompts = [f"a photo of a {w} on a table" for w in ("cat", "dog", "red apple", "blue car")] * (args.batch // 4 + 1)
    prompts = prompts[: args.batch]
    seeds = list(range(args.batch))
    s = cfg.sampling
    res = {} if res is None else res
    res |= {"family": family, "resolution": [models[0].height, models[0].width], "steps": s.num_steps,
           "batch": args.batch, "dtype": args.dtype, "unet_params_m": round(sum(p.numel() for p in models[0].unet.parameters()) / 1e6, 1)}  # fmt: skip

    batch = gen.generate(prompts, seeds)  # warm-up (and the batch the update trains on)
    ref = models[0].pipe  # the same modules: our LoRA adapter, or (disabled) the plain pipeline
    kw = dict(num_inference_steps=s.num_steps, guidance_scale=s.guidance_scale, eta=s.eta, output_type="pt",
              height=models[0].height, width=models[0].width)  # fmt: skip
    with torch.no_grad():
        ref(prompts, **kw)  # warm-up
    times = timed_variants(gen, ref, prompts, seeds, kw, args.repeats, device)
    res["timing"] = {"repeats": args.repeats, "seconds": times}  # every call, interleaved; figures: the best
    t_ours, t_fused, t_cl, t_lora, t_ref = (min(times[n]) for n in VARIANTS)
    res["sampler_img_s"] = round(args.batch / t_ours, 3)
    res["sampler_fused_img_s"] = round(args.batch / t_fused, 3)
    res["pipeline_with_lora_img_s"] = round(args.batch / t_lora, 3)
    res["pipeline_img_s"] = round(args.batch / t_ref, 3)
    res["sampler_vs_pipeline"] = round(t_ref / t_ours, 3)
    res["sampler_fused_vs_pipeline"] = round(t_ref / t_fused, 3)
    res["sampler_fused_channels_last_img_s"] = round(args.batch / t_cl, 3)
    res["sampler_fused_channels_last_vs_pipeline"] = round(t_ref / t_cl, 3)
    save()
    if args.profile:  # where the sampler's time goes beside the pipeline's: device busy, or host-bound
        path = Path(args.profile).with_name(f"{Path(args.profile).stem}_{family}.txt")
        calls = {"sampler (fused)": partial(run_variant, gen, ref, prompts, seeds, kw, "sampler_fused"),
                 "pipeline": partial(run_variant, gen, ref, prompts, seeds, kw, "pipeline")}
        res["device_busy_fraction"] = profile_calls(calls, device, path)
    log(f"[{family}] sampler {res['sampler_img_s']} img/s ({res['sampler_fused_img_s']} fused), diffusers pipeline "
        f"{res['pipeline_img_s']} img/s ({res['pipeline_with_lora_img_s']} with our LoRA adapter); fused and "
        f"channels-last {res['sampler_fused_channels_last_img_s']} img/s")

    batch.rewards = torch.randn(len(batch), generator=torch.Generator().manual_seed(0))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    try:
        info, t_upd = timed(lambda: learner.train(batch), device)
        res["update_s_per_sample"] = round(t_upd / len(batch), 3)
        res["logprob_mismatch"] = float(f"{info['logprob_mismatch']:.3g}")
    except torch.OutOfMemoryError:
        res["update_s_per_sample"] = "out of memory"
    if device.startswith("cuda"):
        res["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    a = cfg.algorithm
    res["update_settings"] = {"minibatch_size": a.minibatch_size, "max_unet_batch": a.max_unet_batch,
                              "timestep_chunk": a.timestep_chunk, "gradient_checkpointing": a.gradient_checkpointing}  # fmt: skip
    version, state = learner.weights()
    _, t_sync = timed(lambda: gen.set_weights(version, state), device)
    res["lora_sync_ms"] = round(1000 * t_sync, 1)
    save()
    res["logprob_mismatch_after_update"] = {}
    # the sampler's variants on 4 samples (the learner's UNet stays contiguous and eager)
    for name in ("unfused", "fused", "fused_channels_last"):
        with variant_setting(gen, name.replace("channels_last", "cl")):
            res["logprob_mismatch_after_update"][name] = mismatch(gen, learner, prompts[:4], seeds[:4], name != "unfused")
        save()
    if args.compile:  # after the rest of the sampler's figures: compiling may take minutes (and before
        # AlignProp, which trains the learner's LoRA away from the sampler's)
        bench_compiled(gen, learner, ref, prompts, seeds, kw, args, res, log, family)
        save()
    res["alignprop"] = bench_alignprop(cfg, models[1], args, device)
    log(f"[{family}] update {res.get('update_s_per_sample')} s/sample, peak {res.get('peak_gb', '-')} GB, sync {res['lora_sync_ms']} ms")
    del gen, learner, models, batch
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return res


def bench_compiled(gen, learner, ref, prompts, seeds, kw, args, res: dict, log, family: str) -> None:
    """The fused sampler with sampling.compile=args.compile: its first call (which compiles), its speed timed
    interleaved with the plain pipeline's (`repeats` rounds, the ratio from these rounds alone) and its
    log-prob mismatch on the timed batch (another batch size would compile again). A compile failure is
    recorded, not raised."""
    try:
        first = compile_unet(gen, args.compile, partial(run_variant, gen, ref, prompts, seeds, kw))
        res["compile_first_call_s"] = round(first, 1)
    except Exception as e:  # noqa: BLE001 (a machine without a compiler toolchain: say so, keep the rest)
        res["compile_error"] = f"{type(e).__name__}: {str(e)[:500]}"
        log(f"[{family}] sampling.compile failed: {res['compile_error']}")
        return
    names = ("sampler_fused_compiled", "pipeline")
    times = timed_variants(gen, ref, prompts, seeds, kw, args.repeats, args.device, names)
    res["timing_compiled"] = times
    t_comp, t_ref = min(times["sampler_fused_compiled"]), min(times["pipeline"])
    res["sampler_fused_compiled_img_s"] = round(args.batch / t_comp, 3)
    res["sampler_fused_compiled_vs_pipeline"] = round(t_ref / t_comp, 3)
    with variant_setting(gen, "sampler_fused_compiled"):
        res["logprob_mismatch_after_update"]["fused_compiled_whole_batch"] = mismatch(gen, learner, prompts, seeds, True)
    log(f"[{family}] compiled ({args.compile}): first call {res['compile_first_call_s']} s, then "
        f"{res['sampler_fused_compiled_img_s']} img/s, {res['sampler_fused_compiled_vs_pipeline']}x the pipeline")


@torch.no_grad()
def mismatch(gen, learner, prompts: list[str], seeds: list[int], fuse: bool) -> float:
    """max |learner's recomputed - sampler's| log-prob over every step of a few fresh samples, the sampler
    fused or not: after an update the LoRA is non-zero, so fusing rounds the weights differently."""
    from common.models.base import cond_index
    from common.sampling import recompute_logprobs

    gen.cfg.sampling.fuse_lora = fuse
    try:
        b = gen.generate(prompts, seeds)
    finally:
        gen.cfg.sampling.fuse_lora = False
    n, t = b.log_probs.shape
    rows_all, j_all = torch.arange(n).repeat_interleave(t), torch.arange(t).repeat(n)
    per_call = max(1, (learner.cfg.algorithm.max_unet_batch or 2 * n * t) // 2)  # the learner's memory bound
    worst = 0.0
    for p0 in range(0, n * t, per_call):
        rows, j = rows_all[p0 : p0 + per_call], j_all[p0 : p0 + per_call]
        lp = recompute_logprobs(learner.model, b.latents[rows, j], b.latents[rows, j + 1], b.timesteps[j],
                                cond_index(b.cond, rows), learner.uncond, b.guidance[rows, j],
                                learner.cfg.sampling.num_steps, learner.cfg.sampling.eta)  # fmt: skip
        worst = max(worst, float((lp.float().cpu() - b.log_probs[rows, j]).abs().max()))
    return float(f"{worst:.3g}")


def bench_alignprop(cfg, model, args, device: str) -> list[dict]:
    """AlignProp update seconds per sample and peak memory against the truncation K (shapes_soft as the
    differentiable reward: any reward times the same on random weights)."""
    from common.config import apply_override, validate_config
    from common.prompts import load_prompts
    from learner.alignprop import AlignPropLearner

    out = []
    for k in [int(x) for x in args.alignprop_ks.split(",") if x]:
        data = cfg.model_dump(mode="json")
        for o in ("algorithm.name=alignprop", "reward.terms=[{name: shapes_soft}]", "prompts.train=shapes_pairs",
                  f"algorithm.alignprop.truncation=[{k},{k}]", "algorithm.gradient_checkpointing=true"):  # fmt: skip
            apply_override(data, o)
        ap = AlignPropLearner(validate_config(data), model=model)
        prompts = (load_prompts("shapes_pairs") * 4)[: args.batch]
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        try:
            _, dt = timed(lambda: ap.train_prompts(prompts, list(range(len(prompts)))), device)
            row = {"k": k, "s_per_sample": round(dt / len(prompts), 3)}
        except torch.OutOfMemoryError:
            row = {"k": k, "s_per_sample": "out of memory"}
        if device.startswith("cuda"):
            row["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
            torch.cuda.empty_cache()
        out.append(row)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="sd15,sdxl", help="comma-separated: sd15, sdxl")
    ap.add_argument("--small", action="store_true", help="toy-size models (CPU smoke run)")
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50; 4 with --small)")
    ap.add_argument("--batch", type=int, default=None, help="images per sampler batch and update (default 16; 4 with --small)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="bfloat16 on a GPU, float32 on the CPU")
    ap.add_argument("--set", action="append", default=[], help="config override, e.g. algorithm.max_unet_batch=32")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--alignprop-ks", default="1,10", help="AlignProp truncations K to time (empty: skip)")
    ap.add_argument("--compile", default="", metavar="BACKEND",
                    help="also time the fused sampler with sampling.compile=BACKEND (e.g. inductor; compiles first)")
    ap.add_argument("--repeats", type=int, default=1, help="timed calls of each sampler and pipeline variant")
    ap.add_argument("--profile", default=None, metavar="PATH",
                    help="profile one fused sampler call and one pipeline call (to PATH's stem_FAMILY.txt)")
    args = ap.parse_args(argv)
    args.steps = args.steps or (4 if args.small else 50)
    args.batch = args.batch or (4 if args.small else 16)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    out = {"device": device_name, "torch": torch.__version__, "results": []}
    def save():  # after each stage, so that a run cut short by a time limit keeps what it measured
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=1))

    for fam in args.family.split(","):
        out["results"].append({})
        bench_family(fam.strip(), args, log, out["results"][-1], save)
        save()
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
