"""The Redis Streams backend of the trajectory queue (`replay.backend: redis`).

One stream per pipeline stage per run (`<prefix>:<run>:<stage>`) with one consumer group, whose consumers
are the actors of the stage that reads it (reward actors on `rollouts`, learners on `scored`). An entry's
fields are its batch key, epoch, policy version and the trajectory's safetensors + JSON bytes; bytes read
back are parsed by `TrajectoryBatch.from_bytes` and never reach pickle.

- `put` runs one Lua script: add the batch key to the stream's key set, and XADD (with MAXLEN ~ trimming)
  only if the key is new, counting distinct puts per epoch in a hash. A batch put again after an actor
  restart is therefore a no-op, atomically.
- `get` is XREADGROUP. An entry of another epoch than the one asked for stays pending on the consumer
  that read it (a consumer group delivers an entry once) and is served when that consumer asks for its
  epoch; a new client of the same consumer finds it with `pending`, another consumer with `claim`.
- `ack` is XACK + XDEL, so the stream's length is the number of unacknowledged entries.
- `pending` re-reads the consumer's own history (XREADGROUP from id 0); `claim` is XAUTOCLAIM.
- Every command retries on connection errors with backoff, so a Redis restart (with AOF) mid-run is
  survived: the stream, the group and its pending entries are all in the append-only file.

`replay.redis_url` takes `redis://` and `rediss://` (TLS) URLs, with AUTH as `redis://user:password@host`.
"""

from __future__ import annotations

import time

from actors.replay import decode_entry
from common.trajectory import TrajectoryBatch

GROUP = "consumers"

_PUT = """
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return false end
redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
redis.call('HINCRBY', KEYS[3], 'all', 1)
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'key', ARGV[1], 'epoch', ARGV[3],
                  'version', ARGV[4], 'data', ARGV[5])
"""


class RedisTrajectoryQueue:
    """A TrajectoryQueue on one Redis stream. Picklable: a copy reconnects by URL in the receiving actor."""

    def __init__(self, url: str, stream: str, maxlen: int = 100_000, fresh: bool = False,
                 retry_s: float = 60.0):  # fmt: skip
        """`fresh`: delete what a previous run under the same name left (a resumed run recomputes it)."""
        self.url, self.stream, self.maxlen, self.retry_s = url, stream, maxlen, retry_s
        self.keys, self.counts = f"{stream}:keys", f"{stream}:counts"
        # entries a consumer read while asking for another epoch: still pending on it, served when it asks
        self._held: dict[tuple[str, int], list[tuple[str, TrajectoryBatch]]] = {}
        self._connect()
        if fresh:
            self._do(lambda r: r.delete(self.stream, self.keys, self.counts))
        self._ensure_group()

    def _connect(self) -> None:
        import redis

        self.r = redis.Redis.from_url(self.url, socket_connect_timeout=5, health_check_interval=10)
        self._put = self.r.register_script(_PUT)

    def _do(self, fn):
        """fn(client), retried on connection errors for up to retry_s seconds (a restarting server)."""
        import redis

        deadline = time.monotonic() + self.retry_s
        delay = 0.05
        while True:
            try:
                return fn(self.r)
            except (redis.AuthenticationError, redis.AuthenticationWrongNumberOfArgsError, redis.ResponseError) as err:
                text = str(err)
                if not isinstance(err, redis.ResponseError) or "NOAUTH" in text or "WRONGPASS" in text:
                    from urllib.parse import urlsplit

                    what = "refused the password" if urlsplit(self.url).password else "requires authentication"
                    raise PermissionError(
                        f"replay.redis_url {self._shown_url()}: the server {what} ({text}); give the password "
                        "in the URL: redis://[user]:PASSWORD@host:port/db"
                    ) from None
                raise
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as err:
                if time.monotonic() > deadline:
                    raise ConnectionError(
                        f"replay.redis_url {self._shown_url()}: unreachable for {self.retry_s:.0f} s ({err})"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _shown_url(self) -> str:
        """The URL with its password masked (error messages end up in logs)."""
        from urllib.parse import urlsplit

        u = urlsplit(self.url)
        if u.password:
            netloc = f"{u.username or ''}:***@{u.hostname}" + (f":{u.port}" if u.port else "")
            return u._replace(netloc=netloc).geturl()
        return self.url

    def _ensure_group(self) -> None:
        import redis

        try:
            self._do(lambda r: r.xgroup_create(self.stream, GROUP, id="0", mkstream=True))
        except redis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise

    def __reduce__(self):
        return (RedisTrajectoryQueue, (self.url, self.stream, self.maxlen, False, self.retry_s))

    def _decode(self, entries) -> list[tuple[str, int, TrajectoryBatch | None]]:
        out = []
        for entry_id, fields in entries:
            eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            if not fields:  # deleted after delivery (acked by another consumer)
                out.append((eid, -1, None))
                continue
            data = fields.get(b"data")
            if data is None:
                raise ValueError(f"redis stream {self.stream} entry {eid}: no data field")
            batch = decode_entry(data, f"redis stream {self.stream} entry {eid}")
            out.append((eid, int(fields.get(b"epoch", b"-1")), batch))
        return out

    def put(self, batch: TrajectoryBatch) -> str | None:
        data = batch.to_bytes()
        args = [batch.batch_id, self.maxlen, batch.epoch, batch.policy_version, data]
        eid = self._do(lambda r: self._put(keys=[self.stream, self.keys, self.counts], args=args))
        return None if eid is None else eid.decode()

    def get(self, max_items: int, timeout: float, consumer: str, epoch: int | None = None):
        held = self._take_held(consumer, epoch, max_items)
        if held:
            return held
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            block = max(1, int(min(left, 5.0) * 1000))  # short blocks: a restarted server is noticed
            res = self._do(lambda r, b=block: r.xreadgroup(GROUP, consumer, {self.stream: ">"}, count=max_items, block=b))
            out = []
            for eid, ep, batch in self._decode(res[0][1] if res else []):
                if batch is None:
                    continue
                if epoch is None or ep == epoch:
                    out.append((eid, batch))
                else:
                    self._held.setdefault((consumer, ep), []).append((eid, batch))
            if out or time.monotonic() >= deadline:
                return out

    def _take_held(self, consumer: str, epoch: int | None, max_items: int) -> list:
        keys = [(consumer, epoch)] if epoch is not None else sorted(k for k in self._held if k[0] == consumer)
        out = []
        for k in keys:
            q = self._held.get(k, [])
            while q and len(out) < max_items:
                out.append(q.pop(0))
            if not q:
                self._held.pop(k, None)
        return out

    def ack(self, entry_ids: list[str]) -> int:
        if not entry_ids:
            return 0

        def run(r):
            p = r.pipeline()
            p.xack(self.stream, GROUP, *entry_ids)
            p.xdel(self.stream, *entry_ids)
            return p.execute()[0]

        return int(self._do(run))

    def pending(self, consumer: str, epoch: int | None = None):
        out, start = [], "0"
        while True:
            res = self._do(lambda r, s=start: r.xreadgroup(GROUP, consumer, {self.stream: s}, count=100))
            entries = res[0][1] if res else []
            if not entries:
                break
            for eid, ep, batch in self._decode(entries):
                if batch is None:
                    self._do(lambda r, e=eid: r.xack(self.stream, GROUP, e))
                elif epoch is None or ep == epoch:
                    out.append((eid, batch))
            start = entries[-1][0]
        held_ids = {e for (c, _), q in self._held.items() if c == consumer for e, _ in q}
        return [(e, b) for e, b in out if e not in held_ids]

    def claim(self, consumer: str, min_idle_s: float, max_items: int):
        out, start = [], "0-0"
        while len(out) < max_items:
            want = max_items - len(out)
            res = self._do(lambda r, s=start, k=want: r.xautoclaim(self.stream, GROUP, consumer, int(min_idle_s * 1000),
                                                                   s, count=k))  # fmt: skip
            start, entries = res[0], res[1]
            out += [(e, b) for e, _, b in self._decode(entries) if b is not None]
            if start in (b"0-0", "0-0"):
                break
        return out

    def puts(self, epoch: int | None = None) -> int:
        v = self._do(lambda r: r.hget(self.counts, "all" if epoch is None else str(epoch)))
        return int(v or 0)

    def __len__(self) -> int:
        return int(self._do(lambda r: r.xlen(self.stream)))

    def close(self) -> None:
        """Delete this run's stream, key set and counts, and disconnect."""
        self._do(lambda r: r.delete(self.stream, self.keys, self.counts))
        self.r.close()
