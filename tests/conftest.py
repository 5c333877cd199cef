"""Shared test set-up: offline, a per-session model cache, one Ray for the whole session."""

from __future__ import annotations

import os
import tempfile
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
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
        # Idle OpenMP threads of the actors sleep instead of spinning: they share 2 cores (the system's actors
        # set this themselves, from cluster.omp_wait_policy; this covers the tests' own actors). Not in this
        # process: its local-backend runs compute alone, where sleeping threads cost up to 2x (docs/results.md).
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})  # fmt: skip
    yield ray
    ray.shutdown()


class RedisServer:
    """A real redis-server on a free loopback port, append-only file on (`appendfsync always`), restartable
    with its data (Ray's control store takes 6379, so never that port)."""

    def __init__(self, workdir: str, password: str | None = None):
        import shutil
        import socket

        exe = shutil.which("redis-server")
        if exe is None:
            if os.environ.get("DIFFEXP_REQUIRE_REDIS") == "1":
                pytest.fail("redis-server is not installed (apt-get install redis-server); CI requires it")
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        os.makedirs(workdir, exist_ok=True)
        self.exe, self.dir, self.proc, self.password = exe, workdir, None, password
        self.url = f"redis://{f':{password}@' if password else ''}127.0.0.1:{self.port}/0"
        self.start()

    def start(self) -> None:
        import subprocess
        import time

        import redis

        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--appendonly", "yes",
             "--appendfsync", "always", "--save", "", "--protected-mode", "yes"]
            + (["--requirepass", self.password] if self.password else []),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=1)
        for _ in range(200):
            if self.proc.poll() is not None:
                break
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port} (dir {self.dir})")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None

    def restart(self, down_s: float = 0.0) -> None:
        import time

        self.stop()
        time.sleep(down_s)
        self.start()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(str(tmp_path_factory.mktemp("redis")))
    yield server
    server.stop()
