"""The trajectory queues between samplers, reward actors and the learner: one protocol, two backends.

`TrajectoryQueue` is typed on `TrajectoryBatch`: callers put and get batches, never Ray object refs or
backend handles. On the wire every entry is the batch's own safe byte format (safetensors + one JSON
document, `TrajectoryBatch.to_bytes`), never pickle, whichever backend holds it.

Delivery is at least once with idempotent puts, which together give exactly-once processing when actors
die:
- `put` is keyed on `batch.batch_id` (deterministic for training rollouts: epoch and first seed), so a
  batch sampled or scored again by a restarted actor enters the queue once; `puts(epoch)` counts the
  distinct batches ever put, which is how an epoch knows it is complete.
- `get` hands entries to a named consumer, where they stay pending until `ack`. A restarted actor takes
  back its own unacknowledged entries with `pending(consumer)`; another one can take over entries left
  pending past a timeout with `claim`.
- Every entry carries its epoch and policy version, and `get(..., epoch=e)` returns only epoch e's
  entries, so overlapped sampling can never mix one epoch's trajectories into the next one's update.

Backends (`replay.backend`): `embedded` (an async Ray actor holding the bytes in memory; nothing to
install; the default) and `redis` (Redis Streams, actors/replay_redis.py).
"""

from __future__ import annotations

from typing import Protocol

from actors.queue_state import QueueState
from common.trajectory import TrajectoryBatch


class TrajectoryQueue(Protocol):
    """What samplers, reward actors, learners and the driver may do with a queue."""

    def put(self, batch: TrajectoryBatch) -> str | None:
        """Append `batch` (its epoch and policy version travel with it); returns the entry id, or None if a
        batch with the same batch_id was put before (nothing is added)."""

    def get(
        self, max_items: int, timeout: float, consumer: str, epoch: int | None = None
    ) -> list[tuple[str, TrajectoryBatch]]:
        """Up to `max_items` new entries (of `epoch` only, if given) for `consumer`, waiting up to `timeout`
        seconds for the first; they stay pending on `consumer` until acknowledged."""

    def ack(self, entry_ids: list[str]) -> int:
        """Mark entries processed (they leave the queue); returns how many were pending."""

    def pending(self, consumer: str, epoch: int | None = None) -> list[tuple[str, TrajectoryBatch]]:
        """`consumer`'s own unacknowledged entries (a restarted actor resumes its unfinished work)."""

    def claim(self, consumer: str, min_idle_s: float, max_items: int) -> list[tuple[str, TrajectoryBatch]]:
        """Take over up to `max_items` entries pending on any consumer for at least `min_idle_s` seconds."""

    def puts(self, epoch: int | None = None) -> int:
        """Distinct batches ever put (of `epoch`, if given)."""

    def __len__(self) -> int:
        """Entries put and not yet acknowledged (waiting or pending)."""

    def close(self) -> None:
        """Release the queue's resources (the embedded actor; the Redis streams of this run)."""


def decode_entry(data: bytes, where: str) -> TrajectoryBatch:
    """Parse an entry's bytes; anything but a trajectory raises ValueError naming where it was read."""
    try:
        return TrajectoryBatch.from_bytes(data)
    except ValueError as err:
        raise ValueError(f"{where}: not a trajectory entry ({err}); entries are never unpickled") from None


class EmbeddedTrajectoryQueue:
    """Client of an in-Ray queue actor (created here, or shared: the client pickles to its actor handle).

    The actor holds each entry's bytes in its own memory, so entries survive the death of the actor that
    put them (a Ray object would die with its owner). The queue actor itself is not restarted: if it
    dies, the run stops; the Redis backend is the one that survives restarts.
    """

    def __init__(self, actor=None):
        import ray

        if actor is None:
            actor = ray.remote(num_cpus=0)(QueueState).remote()
        self.actor = actor

    def _call(self, method: str, *args):
        import ray

        return ray.get(getattr(self.actor, method).remote(*args))

    def put(self, batch: TrajectoryBatch) -> str | None:
        return self._call("put", batch.batch_id, batch.epoch, batch.to_bytes())

    def get(self, max_items: int, timeout: float, consumer: str, epoch: int | None = None):
        got = self._call("get", max_items, timeout, consumer, epoch)
        return [(e, decode_entry(d, f"embedded queue entry {e}")) for e, d in got]

    def ack(self, entry_ids: list[str]) -> int:
        return self._call("ack", list(entry_ids))

    def pending(self, consumer: str, epoch: int | None = None):
        return [(e, decode_entry(d, f"embedded queue entry {e}")) for e, d in self._call("pending", consumer, epoch)]

    def claim(self, consumer: str, min_idle_s: float, max_items: int):
        got = self._call("claim", consumer, min_idle_s, max_items)
        return [(e, decode_entry(d, f"embedded queue entry {e}")) for e, d in got]

    def puts(self, epoch: int | None = None) -> int:
        return self._call("puts", epoch)

    def __len__(self) -> int:
        return self._call("size")

    def close(self) -> None:
        import ray

        ray.kill(self.actor)

    def __reduce__(self):
        return (EmbeddedTrajectoryQueue, (self.actor,))


def make_queue(cfg, stage: str, run_id: str) -> TrajectoryQueue:
    """The queue of one pipeline stage (`rollouts`: sampler -> reward; `scored`: reward -> learner) of a
    run, on the backend `cfg` (a ReplayConfig) names."""
    if cfg.backend == "embedded":
        return EmbeddedTrajectoryQueue()
    if cfg.backend == "redis":
        from actors.replay_redis import RedisTrajectoryQueue

        return RedisTrajectoryQueue(cfg.redis_url, f"{cfg.redis_prefix}:{run_id}:{stage}", maxlen=cfg.redis_maxlen,
                                    fresh=True)  # fmt: skip
    raise ValueError(f"replay.backend: unknown backend {cfg.backend!r}; use 'embedded' or 'redis'")
