"""The algorithm seam: what the epoch loop and both backends need of a training algorithm.

An algorithm owns the trainable LoRA of a policy and its optimizer (`LoRALearner` holds that common
part: weights to broadcast, checksums, checkpoints). It is one of two kinds:

- `uses_rollouts = True` (DDPO): it trains on the samplers' scored trajectories, `train(batch)`;
- `uses_rollouts = False` (AlignProp): it samples with gradients itself and scores with a
  differentiable reward, `train_prompts(prompts, seeds)`; the samplers then serve evaluation only.

Either returns a dict of metrics that the loop logs verbatim beside its own (`reward_mean`,
`reward_std` and `samples`, the reward queries, are required; `policy_version` too). Adding an algorithm
is one file with a LoRALearner subclass plus one line in `ALGORITHMS`.
"""

from __future__ import annotations

import importlib

import torch

from common.config import RunConfig
from common.pipelines import load_lora_state, load_policy, lora_checksum, lora_state, unet_lora_export

ALGORITHMS = {
    "ddpo": "learner.ddpo:DDPOLearner",
    "alignprop": "learner.alignprop:AlignPropLearner",
    "rwr": "learner.rwr:RWRLearner",
}


def algorithm_class(name: str) -> type:
    module, cls = ALGORITHMS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_algorithm(cfg: RunConfig, device: str = "cpu", model=None, **kwargs):
    """The learner of `cfg.algorithm.name` on `device` (optionally around an already loaded `model`;
    AlignProp also takes the `reward` to backpropagate)."""
    return algorithm_class(cfg.algorithm.name)(cfg, device=device, model=model, **kwargs)


class LoRALearner:
    """The LoRA policy, its optimizer and version: the part every algorithm shares."""

    uses_rollouts = True

    def __init__(self, cfg: RunConfig, device: str = "cpu", model=None):
        """`model`: an already loaded policy (a DiffusionModel with LoRA attached) instead of cfg.model's."""
        self.cfg = cfg
        self.model = (
            model if model is not None else load_policy(cfg.model, cfg.lora, device, cfg.sampling.resolution)
        )
        self.uncond = self.model.negative()
        self.params = [p for n, p in self.model.unet.named_parameters() if "lora_" in n]
        if cfg.algorithm.gradient_checkpointing:
            self.model.unet.enable_gradient_checkpointing()  # active in train mode only, i.e. in the update
        if cfg.algorithm.compile:
            self.model.training_unet = self.model.compiled_unet(cfg.algorithm.compile, "algorithm.compile")
        a = cfg.algorithm
        if a.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(self.params, lr=a.learning_rate, momentum=a.adam_betas[0],
                                             weight_decay=a.weight_decay)  # fmt: skip
        else:
            self.optimizer = torch.optim.AdamW(self.params, lr=a.learning_rate, betas=a.adam_betas,
                                               weight_decay=a.weight_decay)  # fmt: skip
        self.version = 0
        self.progress = 0  # samples trained in the running (or last) update
        self.rng = torch.Generator().manual_seed(cfg.train.seed + 99991)  # the same draws on every learner
        self.world, self.rank, self.group = 1, 0, None

    # ------------------------------------------------------------ data parallel
    def join_group(self, world: int, rank: int, group: str) -> int:
        """Join a gloo collective group of `world` learners (ray.util.collective, torch.distributed
        underneath). Each learner then runs only its share of the minibatches, and the gradients are summed
        across learners before every optimizer step, so all hold the same weights after it."""
        if world > 1:
            import ray.util.collective as col

            col.init_collective_group(world, rank, backend="gloo", group_name=group)
        self.world, self.rank, self.group = world, rank, group
        return rank

    def owns(self, minibatch_in_step: int) -> bool:
        """Whether this learner runs the `minibatch_in_step`-th minibatch of an optimizer step."""
        return minibatch_in_step % self.world == self.rank

    def _allreduce_grads(self) -> None:
        if self.world == 1:
            return
        import ray.util.collective as col

        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in self.params]
        )
        col.allreduce(flat, group_name=self.group)  # sum: each minibatch was run by exactly one learner
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def _accumulation_pass(self, chunks, run, on_progress=None, done: int = 0) -> tuple[list[float], int]:
        """One pass over minibatches with gradient accumulation: `run(chunk, owned, step_samples)` for every
        chunk, on every learner (so random draws stay in step; only the owner computes and backpropagates), the
        progress counter after each, an optimizer step every `gradient_accumulation` chunks and after the last.
        `step_samples` is the number of samples in the chunk's optimizer step, whichever learners run them: a
        run weights its loss by its chunk's share of them (`step_share`), so that a step of fewer or smaller
        minibatches (an epoch that does not divide into whole steps, or samples dropped before the update)
        still takes the mean over its samples instead of a fraction of it.
        Returns (the steps' gradient norms, samples done, counting on from `done`)."""
        chunks = list(chunks)
        acc = self.cfg.algorithm.gradient_accumulation
        step_samples = [sum(len(c) for c in chunks[i - i % acc : i - i % acc + acc]) for i in range(len(chunks))]
        grad_norms, pending = [], 0
        for chunk, n_step in zip(chunks, step_samples):
            run(chunk, self.owns(pending), n_step)  # data parallel: each learner runs its share of every step
            done += len(chunk)
            self.progress = done
            if on_progress is not None:
                on_progress(done)
            pending += 1
            if pending == acc:
                grad_norms.append(self._step())
                pending = 0
        if pending:
            grad_norms.append(self._step())
        return grad_norms, done

    def step_share(self, samples: int, step_samples: int) -> float:
        """The factor that, with the loss divided by `gradient_accumulation` as well, weights a minibatch of
        `samples` samples (its loss a mean over them) by its share of its optimizer step's `step_samples`:
        exactly 1.0 when the step is `gradient_accumulation` minibatches of equal size."""
        return samples * self.cfg.algorithm.gradient_accumulation / step_samples

    # ------------------------------------------------------------------ weights
    def weights(self) -> tuple[int, dict[str, torch.Tensor]]:
        """(policy version, LoRA state) to broadcast to the samplers."""
        return self.version, lora_state(self.model.unet)

    def checksum(self) -> str:
        return lora_checksum(lora_state(self.model.unet))

    def snapshot(self) -> torch.Tensor:
        """The LoRA weights as one flat copy, to measure an update against (`update_size`)."""
        return torch.cat([p.detach().flatten() for p in self.params]).clone()

    def update_size(self, before: torch.Tensor) -> dict[str, float]:
        """How far the weights moved since `before` (a `snapshot`): `update_norm`, the L2 norm of the change.

        approx_kl and clipfrac cannot show this when an epoch has one optimizer step (the ratio is 1 while the
        gradient is taken), so this is the diagnostic of a policy that barely moves."""
        return {"update_norm": float((self.snapshot() - before).norm())}

    def _step(self) -> float:
        self._allreduce_grads()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.algorithm.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    # --------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {
            "version": self.version,
            "optimizer": self.optimizer.state_dict(),
            "rng": self.rng.get_state(),
        }

    def checkpoint_state(self) -> dict:
        """Everything a checkpoint needs: the LoRA as the model's own diffusers files (name -> bytes, written
        here, where diffusers is loaded: the process that writes the checkpoint needs no diffusers), the LoRA
        in our own keys, and the learner's state (optimizer, RNG, version and the algorithm's own)."""
        import tempfile
        from pathlib import Path

        from common.models.base import save_lora_files

        peft_state, meta = unet_lora_export(self.model.unet)
        with tempfile.TemporaryDirectory(prefix="lora-export-") as tmp:
            save_lora_files(type(self.model.pipe), tmp, peft_state, meta)
            files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
        return {"lora_files": files, "lora": self.weights()[1], "learner": self.state_dict()}

    def load_state_dict(self, state: dict, lora: dict[str, torch.Tensor]) -> None:
        load_lora_state(self.model.unet, lora)
        self.optimizer.load_state_dict(state["optimizer"])
        # the checkpoint's moments and step counts, but this config's hyperparameters: `--resume --set
        # algorithm.learning_rate=...` takes effect (load_state_dict brings back the saved ones)
        a = self.cfg.algorithm
        for group in self.optimizer.param_groups:
            group["lr"], group["weight_decay"] = a.learning_rate, a.weight_decay
            if "betas" in group:
                group["betas"] = tuple(a.adam_betas)
            if "momentum" in group:
                group["momentum"] = a.adam_betas[0]
        self.rng.set_state(state["rng"])
        self.version = int(state["version"])
