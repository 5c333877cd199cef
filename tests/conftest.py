"""Shared test set-up: offline, a per-session model cache, one Ray for the whole session."""

from __future__ import annotations

import os
import tempfile
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep instead of spinning
os.environ.setdefault("DIFFEXP_CACHE", tempfile.mkdtemp(prefix="diffexp-test-cache-"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.pop("RAY_ADDRESS", None)
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_cfg():
    """The tiny preset with small, fast sizes."""
    from common.config import load_config

    return load_config("tiny", ["sampling.num_steps=6", "train.samples_per_epoch=8", "algorithm.minibatch_size=4",
                                "algorithm.gradient_accumulation=2", "cluster.local_dashboard=false",
                                "cluster.learner.torch_threads=1"])  # fmt: skip


@pytest.fixture(scope="session")
def tiny_pipe(tiny_cfg):
    from common.pipelines import load_pipeline

    return load_pipeline(tiny_cfg.model)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray per test session (starting Ray and its workers costs seconds each)."""
    import ray

    # workers must import test modules too (actor classes defined in tests)
    here = os.path.dirname(os.path.abspath(__file__))
    paths = [here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
