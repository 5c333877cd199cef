"""The embedded replay backend's actor state (actors/replay.py): entries as bytes, FIFO per epoch.

It lives in its own module, which imports neither torch nor the project's model code, because Ray
imports an actor's module in the actor's process: each queue actor then starts in well under a second
instead of spending seconds on importing torch it never uses.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque


class QueueState:
    """The embedded backend's state: entries as bytes, FIFO per epoch; get() waits without polling."""

    def __init__(self) -> None:
        self.ready: dict[int, deque[str]] = {}  # epoch -> entry ids in put order
        self.data: dict[str, tuple[int, bytes]] = {}  # entry id -> (epoch, bytes), until acked
        self.pending_on: dict[str, tuple[str, float]] = {}  # entry id -> (consumer, time delivered)
        self.keys: set[str] = set()
        self.count: dict[int, int] = {}
        self.next_id = 0
        self.cond = asyncio.Condition()

    async def put(self, key: str, epoch: int, data: bytes) -> str | None:
        async with self.cond:
            if key in self.keys:
                return None
            self.keys.add(key)
            entry_id = f"{self.next_id}"
            self.next_id += 1
            self.data[entry_id] = (epoch, data)
            self.ready.setdefault(epoch, deque()).append(entry_id)
            self.count[epoch] = self.count.get(epoch, 0) + 1
            self.cond.notify_all()
            return entry_id

    def _waiting(self, epoch: int | None) -> list[deque[str]]:
        if epoch is not None:
            return [self.ready[epoch]] if self.ready.get(epoch) else []
        return [q for _, q in sorted(self.ready.items()) if q]

    async def get(self, max_items: int, timeout: float, consumer: str, epoch: int | None) -> list[tuple[str, bytes]]:
        async with self.cond:
            try:
                await asyncio.wait_for(self.cond.wait_for(lambda: bool(self._waiting(epoch))), timeout)
            except asyncio.TimeoutError:
                return []
            out = []
            for q in self._waiting(epoch):
                while q and len(out) < max_items:
                    entry_id = q.popleft()
                    self.pending_on[entry_id] = (consumer, time.monotonic())
                    out.append((entry_id, self.data[entry_id][1]))
            return out

    async def ack(self, entry_ids: list[str]) -> int:
        n = 0
        for e in entry_ids:
            if self.pending_on.pop(e, None) is not None:
                self.data.pop(e, None)
                n += 1
        return n

    async def pending(self, consumer: str, epoch: int | None) -> list[tuple[str, bytes]]:
        return [(e, self.data[e][1]) for e, (c, _) in sorted(self.pending_on.items(), key=lambda kv: int(kv[0]))
                if c == consumer and (epoch is None or self.data[e][0] == epoch)]  # fmt: skip

    async def claim(self, consumer: str, min_idle_s: float, max_items: int) -> list[tuple[str, bytes]]:
        now = time.monotonic()
        out = []
        for e, (_, t) in sorted(self.pending_on.items(), key=lambda kv: int(kv[0])):
            if len(out) < max_items and now - t >= min_idle_s:
                self.pending_on[e] = (consumer, now)
                out.append((e, self.data[e][1]))
        return out

    async def puts(self, epoch: int | None) -> int:
        return sum(self.count.values()) if epoch is None else self.count.get(epoch, 0)

    async def size(self) -> int:
        return len(self.data)
