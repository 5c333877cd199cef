"""bench/epoch_floor.py times the UNet work an epoch needs: the same images, with and without gradients, as one
epoch of the real loop on the same workload, so its floor is a floor of that loop."""

import tempfile
from collections import Counter
from pathlib import Path

import torch

from bench.epoch_floor import floor
from bench.speed import COMMON, REFERENCE


def _counting(monkeypatch) -> Counter:
    """Counts the images of every UNet call, by whether it takes gradients."""
    from diffusers import UNet2DConditionModel

    rows, forward = Counter(), UNet2DConditionModel.forward

    def counted(self, sample, *args, **kwargs):
        rows["grad" if torch.is_grad_enabled() else "no_grad"] += sample.shape[0]
        return forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", counted)
    return rows


def test_the_floor_runs_the_unet_work_of_one_epoch_of_the_loop(monkeypatch):
    from common.config import load_config
    from learner.local import LocalSystem
    from learner.loop import Trainer
    from learner.run_dir import RunDir

    small = ["sampling.num_steps=4", "train.samples_per_epoch=8", "sampling.batch_size=4",
             "algorithm.minibatch_size=4", "train.epochs=1", "cluster.backend=local",
             "cluster.local_torch_threads=2"]  # fmt: skip
    cfg = load_config("tiny", REFERENCE + COMMON + small)
    rows = _counting(monkeypatch)
    run_dir = RunDir(Path(tempfile.mkdtemp(prefix="floor-")))
    run_dir.create(cfg)
    system = LocalSystem(cfg)
    Trainer(cfg, run_dir, system, log=lambda *_: None).fit()
    loop = dict(rows)
    assert loop == {"no_grad": 8 * 4 * 2, "grad": 8 * 4 * 2}  # every step of every sample, both CFG halves

    rows.clear()
    model = system.learner.model
    floor(model, samples=8, steps=4, sample_batch=4, train_batch=4, unet=model.unet, repeats=1)
    assert dict(rows) == {k: 2 * n for k, n in loop.items()}  # a warm-up epoch and a timed one
