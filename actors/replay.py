"""The replay queue between samplers, reward actors and the learner.

One small protocol (`ReplayQueue`): put items, get up to n of them (each with
an entry id), acknowledge what was processed, and count. Items are lists
holding one Ray ObjectRef of a TrajectoryBatch, so trajectories stay in the
object store and only references travel through the queue. An unacknowledged
item can be handed out again (`requeue_pending`), which is what an
at-least-once backend such as Redis Streams with consumer groups provides.

The embedded backend is an async Ray actor: nothing to install.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from typing import Any, Protocol

import ray


class ReplayQueue(Protocol):
    def put(self, item: Any) -> str: ...

    def get(self, max_items: int, timeout: float) -> list[tuple[str, Any]]: ...

    def ack(self, entry_ids: list[str]) -> int: ...

    def __len__(self) -> int: ...


@ray.remote(num_cpus=0)
class _QueueActor:
    """Holds entries in FIFO order; get() waits (without polling) until something arrives."""

    def __init__(self) -> None:
        self.ready: deque[tuple[str, Any]] = deque()
        self.pending: dict[str, Any] = {}
        self.counter = itertools.count()
        self.puts = 0
        self.cond = asyncio.Condition()

    async def put(self, item: Any) -> str:
        entry_id = f"{next(self.counter)}"
        self.puts += 1
        async with self.cond:
            self.ready.append((entry_id, item))
            self.cond.notify_all()
        return entry_id

    async def get(self, max_items: int, timeout: float) -> list[tuple[str, Any]]:
        async with self.cond:
            try:
                await asyncio.wait_for(self.cond.wait_for(lambda: len(self.ready) > 0), timeout)
            except asyncio.TimeoutError:
                return []
            out = []
            while self.ready and len(out) < max_items:
                entry_id, item = self.ready.popleft()
                self.pending[entry_id] = item
                out.append((entry_id, item))
            return out

    async def ack(self, entry_ids: list[str]) -> int:
        return sum(self.pending.pop(e, None) is not None for e in entry_ids)

    async def requeue_pending(self) -> int:
        async with self.cond:
            n = len(self.pending)
            for entry in sorted(self.pending.items(), key=lambda kv: int(kv[0]), reverse=True):
                self.ready.appendleft(entry)
            self.pending.clear()
            self.cond.notify_all()
            return n

    async def size(self) -> tuple[int, int]:
        return len(self.ready), len(self.pending)

    async def total_puts(self) -> int:
        """Items ever put (progress: the driver compares it with its value at an epoch's launch)."""
        return self.puts


class EmbeddedReplayQueue:
    """Client of an in-Ray queue actor; picklable, so actors can be handed the same queue."""

    def __init__(self, actor=None):
        self.actor = actor if actor is not None else _QueueActor.remote()

    def put(self, item: Any) -> str:
        return ray.get(self.actor.put.remote(item))

    def get(self, max_items: int, timeout: float = 60.0) -> list[tuple[str, Any]]:
        return ray.get(self.actor.get.remote(max_items, timeout))

    def ack(self, entry_ids: list[str]) -> int:
        return ray.get(self.actor.ack.remote(entry_ids))

    def requeue_pending(self) -> int:
        return ray.get(self.actor.requeue_pending.remote())

    def __len__(self) -> int:
        return ray.get(self.actor.size.remote())[0]

    def total_puts(self) -> int:
        return ray.get(self.actor.total_puts.remote())

    def __reduce__(self):
        return (EmbeddedReplayQueue, (self.actor,))


def make_queue(backend: str) -> ReplayQueue:
    if backend == "embedded":
        return EmbeddedReplayQueue()
    raise ValueError(f"replay.backend: unknown backend {backend!r}; use 'embedded'")
