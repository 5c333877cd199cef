"""Can AlignProp move Shapes relations when the text encoder trains too? A fixed-batch probe.

The base model draws a relation's axis but not its order (docs/shapes.md), and AlignProp with LoRA on the
UNet repairs objects without moving relations (docs/results.md). One explanation is that the frozen text
encoder's token states do not separate "A left of B" from "B left of A" in a way a UNet LoRA can use. This
probe trains LoRA on the text encoder (attention and MLP, rank 8), on the UNet, or on both, on one fixed
batch (N `shapes_pairs` prompts x 1 noise seed, re-sampled with the same noise every update, AlignProp
through every step) and prints the hard detector's full / shapes / relation rates of that batch, and of the
same prompts with other noise, every 4 updates.

    THREADS=1 python bench/shapes_text_encoder_probe.py SEED {unet,te,both} \
        [PROMPTS=16 UPDATES=12 STEPS=20 LR=3e-4 TELR=3e-4 MODEL=shapes-base REL_WEIGHT (the preset's 1/3 when
         unset) as environment variables; MODEL=shapes-base-order probes the base whose text encoder keeps the
         order (session 25)]

The text encoder's conditioning (and the CFG negative, the empty prompt) is recomputed with gradients every
minibatch; prompt weighting is off (exploration is off in the `shapes_alignprop` preset).
Measured: docs/results.md, "Relations: a trainable text encoder".
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def attach_text_encoder_lora(learner, lr: float, rank: int = 8) -> None:
    """LoRA on the learner model's text encoder, trained by the learner's optimizer at `lr`; the model's
    conditioning and the learner's CFG negative are then computed with gradients (no prompt cache)."""
    from peft import LoraConfig, inject_adapter_in_model

    from common.exploration import parse_prompt, tokenize_weighted

    tok, te = learner.model.encoders[0]
    te.requires_grad_(False)
    targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights="gaussian"), te)
    params = [p for n, p in te.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    learner.optimizer.add_param_group({"params": params, "lr": lr})
    learner.params = learner.params + params  # clipped with the UNet's

    def condition(prompts):
        ids = torch.tensor([tokenize_weighted(tok, wp)[0] for wp in prompts])
        return {"prompt_embeds": te(ids)[0].float()}

    learner.model.condition = condition
    learner.model.negative = lambda: condition([parse_prompt("")])
    sample = learner.minibatch_loss

    def minibatch_loss(prompts, seeds, k):
        learner.uncond = learner.model.negative()
        return sample(prompts, seeds, k)

    learner.minibatch_loss = minibatch_loss


def rates(learner, prompts: list[str], seeds: list[int]) -> dict[str, float]:
    """The hard detector's full / shapes / relation rates of the policy's images (plain prompts, no exploration)."""
    from bench.shapes_fixed_batch import hard_details

    _, d = hard_details(learner, prompts, seeds)
    return {k: round(float(d[k].mean()), 3) for k in ("full", "shapes", "relation")}


def main() -> None:
    from common.config import load_config
    from common.prompts import load_prompts
    from learner.alignprop import AlignPropLearner

    seed, mode = int(sys.argv[1]), sys.argv[2]
    if mode not in ("unet", "te", "both"):
        raise SystemExit("mode: unet, te or both")
    env = os.environ.get
    n, updates, steps = int(env("PROMPTS", "16")), int(env("UPDATES", "12")), int(env("STEPS", "20"))
    lr = float(env("LR", "3e-4"))
    overrides = [f"model.pretrained={env('MODEL', 'shapes-base')}"]
    if env("REL_WEIGHT"):  # otherwise the preset's shapes_soft term as it is
        soft = {"name": "shapes_soft", "options": {"rel_scale": 8.0, "rel_weight": float(env("REL_WEIGHT"))}}
        overrides.append(f"reward.terms={json.dumps([soft])}")
    torch.set_num_threads(int(env("THREADS", "1")))
    cfg = load_config("shapes_alignprop", [f"train.samples_per_epoch={n}", f"train.prompts_per_epoch={n}",
                                           f"algorithm.gradient_accumulation={max(1, n // 8)}", f"sampling.num_steps={steps}",
                                           f"algorithm.alignprop.truncation=[{steps},{steps}]", f"algorithm.learning_rate={lr}",
                                           f"train.seed={seed}", *overrides])  # fmt: skip
    learner = AlignPropLearner(cfg)
    unet_params = list(learner.params)
    if mode in ("te", "both"):
        attach_text_encoder_lora(learner, float(env("TELR", str(lr))))
    if mode == "te":  # the UNet's LoRA stays at its (zero) start
        for p in unet_params:
            p.requires_grad_(False)
        learner.params = learner.params[len(unet_params):]
    g = torch.Generator().manual_seed(seed)
    pool = load_prompts("shapes_pairs")
    prompts = [pool[int(i)] for i in torch.randperm(len(pool), generator=g)[:n]]
    seeds = [int(x) for x in torch.randint(0, 2**31 - 1, (n,), generator=g)]
    other = [s + 1 for s in seeds]
    t0 = time.time()
    print(f"{mode} seed {seed} before: trained noise {rates(learner, prompts, seeds)} other noise {rates(learner, prompts, other)}", flush=True)
    for u in range(updates):
        soft = learner.train_prompts(prompts, seeds)["reward_mean"]
        if (u + 1) % 4 == 0 or u + 1 == updates:
            print(f"{mode} seed {seed} after {u + 1} (shapes_soft {soft:.3f}): trained noise {rates(learner, prompts, seeds)} "
                  f"other noise {rates(learner, prompts, other)} [{time.time() - t0:.0f} s]", flush=True)  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
