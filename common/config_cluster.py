"""Where a run computes: the Ray cluster or the local backend (`cluster`), and the trajectory queues between
samplers and learner (`replay`). Re-exported by common.config."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from common.config_base import _Strict


class ActorResources(_Strict):
    num_cpus: float = Field(0.5, ge=0, description="Ray logical CPUs reserved per actor (fractions allowed).")
    num_gpus: float = Field(0.0, ge=0, description="Ray GPUs per actor (fractions share a GPU).")
    torch_threads: int = Field(1, ge=1, description="torch.set_num_threads inside the actor.")


class ClusterConfig(_Strict):
    backend: Literal["ray", "local"] = Field(
        "ray",
        description="ray: sampler, reward and learner actors on a Ray cluster. local: the same classes in one "
        "process without Ray (GPU boxes without Ray, debugging, sweeps); replay.max_staleness must be 0.",
    )
    local_device: str = Field("auto", description="Device of the local backend: auto (CUDA if present), cpu, cuda:N.")
    local_torch_threads: int | None = Field(
        None, ge=1, description="torch threads of the local backend (null: torch's default, all cores)."
    )
    address: str | None = Field(
        None, description="Ray address; null uses RAY_ADDRESS if set, else starts a local Ray."
    )
    num_samplers: int = Field(2, ge=1, description="Sampler actors.")
    num_learners: int = Field(
        1, ge=1, description="Data-parallel learner actors (gloo all-reduce of gradients; Ray backend only)."
    )
    num_reward_actors: int = Field(1, ge=0, description="Reward actors. 0: each sampler scores its own batches (two "
                                   "processes fewer; a learned reward then loads in every sampler).")  # fmt: skip
    sampler: ActorResources = Field(default_factory=ActorResources)
    reward: ActorResources = Field(default_factory=lambda: ActorResources(num_cpus=0.25))
    learner: ActorResources = Field(default_factory=lambda: ActorResources(num_cpus=0.5, torch_threads=2))
    local_num_cpus: int | None = Field(
        None, description="Logical CPUs of a locally started Ray (null: the machine's count)."
    )
    omp_wait_policy: Literal["PASSIVE", "ACTIVE"] = Field(
        "PASSIVE",
        description="OMP_WAIT_POLICY of the actors. Actors share cores: spinning OpenMP threads of one starve "
        "the others (measured: 8 images took 67 s instead of 1.2 s beside a busy process).",
    )
    local_dashboard: bool = Field(True, description="Start the Ray dashboard with a locally started Ray.")
    max_restarts: int = Field(
        3,
        ge=0,
        description="Times Ray restarts a dead sampler or reward actor (preempted, OOM-killed); its unfinished "
        "task runs again and un-acknowledged queue entries are taken back, so nothing is lost or counted twice.",
    )
    start_timeout_s: float = Field(
        300.0, gt=0, description="Seconds to wait for every actor to start before stopping with one line."
    )


class ReplayConfig(_Strict):
    backend: Literal["embedded", "redis"] = Field(
        "embedded",
        description="Trajectory queue backend. embedded: in a Ray actor's memory, nothing to install. redis: "
        "Redis Streams at replay.redis_url (survives a Redis restart with AOF on; see docs/architecture.md).",
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6380/0",
        description="Redis server of the redis backend: redis:// or rediss:// (TLS), AUTH as "
        "redis://user:password@host:port/db. Not 6379 on a Ray head node: Ray's control store takes it.",
    )
    redis_prefix: str = Field("diffexp", description="Key prefix of this project's streams: <prefix>:<run>:<stage>.")
    redis_maxlen: int = Field(
        100_000, ge=100, description="Approximate cap (MAXLEN ~) on a stream's unacknowledged entries."
    )
    max_staleness: int = Field(
        0,
        ge=0,
        description="How many policy versions old a trajectory may be when trained on. 0: strictly "
        "on-policy; >= 1: sampling of the next epoch overlaps learning.",
    )
