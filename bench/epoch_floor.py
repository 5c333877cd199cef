"""The kernel floor of one epoch of ddpo-pytorch's tiny workload: the UNet and VAE work no system can skip.

An epoch of that workload (bench/speed.py --workload reference: 16 samples, 20 DDIM steps, CFG, LoRA r4 on
attention) needs, whatever the system around it:
  sampling   16 samples x 20 steps of UNet forwards without gradients, both CFG halves in each call
  decoding   16 VAE decodes (the reward's input)
  learning   16 samples x 20 timesteps of UNet forward + backward to the LoRA weights, both CFG halves
This script times exactly those calls on the real tiny model, with nothing else around them (random latents,
timesteps and text states of the right shapes), once at the workload's batching (samples in batches of 8,
training microbatches of 8) and once with everything in the largest calls (16 and 16), and prints JSON with
the floor per epoch and the per-epoch speed-up over ddpo-pytorch that the floor allows:

    python bench/epoch_floor.py                     # eager, torch threads = CPUs
    python bench/epoch_floor.py --ddpo-epoch 3.44   # ddpo-pytorch's measured s/epoch here (docs/architecture.md)
    python bench/epoch_floor.py --compile inductor  # the same calls compiled (the first call compiles: minutes)

A system at the floor spends no time outside these calls; bench/speed.py measures the real loop.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def floor(model, samples: int, steps: int, sample_batch: int, train_batch: int, unet, repeats: int) -> dict:
    """Seconds of one epoch's unavoidable calls at the given batching (`unet`: model.unet or its compiled form)."""
    import torch

    g = torch.Generator().manual_seed(0)
    down = 2 ** (len(model.vae.config.block_out_channels) - 1)
    latent = (model.unet.config.in_channels, model.height // down, model.width // down)
    text = (model.encoders[0][0].model_max_length, model.unet.config.cross_attention_dim)

    def unet_calls(n_images: int, calls: int, grad: bool) -> None:
        x = torch.randn(n_images, *latent, generator=g)
        t = torch.randint(0, 1000, (n_images,), generator=g)
        h = torch.randn(n_images, *text, generator=g)
        for _ in range(calls):
            if grad:
                unet(x, t, encoder_hidden_states=h).sample.square().mean().backward()
            else:
                with torch.no_grad():
                    unet(x, t, encoder_hidden_states=h)

    def sampling() -> None:
        for _ in range(samples // sample_batch):
            unet_calls(2 * sample_batch, steps, grad=False)

    def learning() -> None:
        for _ in range(samples // train_batch):
            unet_calls(2 * train_batch * steps, 1, grad=True)
        model.unet.zero_grad(set_to_none=True)

    def decoding() -> None:
        with torch.no_grad():
            z = torch.randn(samples, model.vae.config.latent_channels, *latent[1:], generator=g)
            model.vae.decode(z / model.vae.config.scaling_factor)

    out = {"sampling": _timed(sampling, repeats), "decoding": _timed(decoding, repeats),
           "learning": _timed(learning, repeats)}  # fmt: skip
    out["epoch"] = sum(out.values())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats of each part (the median is kept)")
    ap.add_argument("--compile", default=None, help="torch.compile backend for the UNet (e.g. inductor)")
    ap.add_argument("--ddpo-epoch", type=float, default=3.44,
                    help="ddpo-pytorch's s/epoch on this workload here (bench/startup.py; 3.44 on 2026-12-04)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from bench.speed import REFERENCE
    from common.config import load_config
    from common.pipelines import load_policy

    torch.set_num_threads(args.threads)
    cfg = load_config("tiny", REFERENCE)
    model = load_policy(cfg.model, cfg.lora)
    unet = torch.compile(model.unet, backend=args.compile) if args.compile else model.unet
    s, n = cfg.train.samples_per_epoch, cfg.sampling.num_steps
    rows = {
        "workload batching (8, 8)": floor(model, s, n, cfg.sampling.batch_size, cfg.algorithm.minibatch_size, unet,
                                          args.repeats),
        f"largest calls ({s}, {s})": floor(model, s, n, s, s, unet, args.repeats),
    }  # fmt: skip
    for r in rows.values():
        r["max_speedup_over_ddpo_pytorch"] = args.ddpo_epoch / r["epoch"]
    print(json.dumps({"threads": args.threads, "compile": args.compile, "ddpo_pytorch_epoch_s": args.ddpo_epoch,
                      "floor_s": {k: {kk: round(v, 3) for kk, v in r.items()} for k, r in rows.items()}}, indent=1))


if __name__ == "__main__":
    main()
