"""The trajectory queue protocol on both backends: idempotent puts, epochs kept apart, pending entries taken
back after a restart, a Redis restart survived with its data, and untrusted bytes never unpickled."""

import os
import pickle
import time
import uuid

import pytest
import torch
from test_trajectory import make_batch

from actors.replay import EmbeddedTrajectoryQueue
from actors.replay_redis import RedisTrajectoryQueue


def _batch(key: str, epoch: int, version: int = 0):
    b = make_batch(b=2, t=3, version=version)
    b.batch_id, b.epoch = key, epoch
    b.reward_terms = {"jpeg": torch.tensor([1.0, 2.0])}
    return b


@pytest.fixture(params=["embedded", "redis"])
def queue(request):
    if request.param == "embedded":
        request.getfixturevalue("ray_session")
        q = EmbeddedTrajectoryQueue()
    else:
        server = request.getfixturevalue("redis_server")
        q = RedisTrajectoryQueue(server.url, f"test:{uuid.uuid4().hex[:8]}:rollouts", fresh=True)
    yield q
    q.close()


def test_queue_protocol(queue):
    a, b, c = _batch("e0-a", 0), _batch("e0-b", 0, version=3), _batch("e1-a", 1)
    ids = [queue.put(x) for x in (a, b, c)]
    assert all(ids) and len(set(ids)) == 3
    assert queue.put(_batch("e0-a", 0)) is None  # the same batch again (a restarted sampler): not added
    assert (queue.puts(0), queue.puts(1), queue.puts(), len(queue)) == (2, 1, 3, 3)

    # asking for epoch 1 gets only epoch 1's entry, although epoch 0's were put first
    got1 = queue.get(10, 1.0, "reward-0", epoch=1)
    assert [x.batch_id for _, x in got1] == ["e1-a"] and got1[0][1].epoch == 1
    got0 = queue.get(10, 1.0, "reward-0", epoch=0)
    assert [x.batch_id for _, x in got0] == ["e0-a", "e0-b"]  # in put order
    back = got0[1][1]
    assert back.policy_version == 3 and torch.equal(back.latents, b.latents)
    assert torch.equal(back.reward_terms["jpeg"], torch.tensor([1.0, 2.0]))
    assert queue.get(10, 0.2, "reward-0", epoch=0) == []  # nothing new: waits the timeout, returns empty

    # un-acknowledged entries stay pending on their consumer: a restarted actor takes them back
    assert len(queue) == 3
    assert [x.batch_id for _, x in queue.pending("reward-0")] == ["e0-a", "e0-b", "e1-a"]
    assert [x.batch_id for _, x in queue.pending("reward-0", epoch=1)] == ["e1-a"]
    assert queue.pending("reward-1") == []
    assert queue.ack([got0[0][0]]) == 1
    assert queue.ack([got0[0][0]]) == 0  # twice: counted once
    assert [x.batch_id for _, x in queue.pending("reward-0")] == ["e0-b", "e1-a"]

    # another consumer takes over what was left pending long enough, and only that
    assert queue.claim("reward-1", 60.0, 10) == []
    time.sleep(0.05)
    claimed = queue.claim("reward-1", 0.01, 10)
    assert sorted(x.batch_id for _, x in claimed) == ["e0-b", "e1-a"]
    assert [x.batch_id for _, x in queue.pending("reward-1", epoch=0)] == ["e0-b"]
    assert queue.ack([e for e, _ in claimed]) == 2
    assert (len(queue), queue.puts()) == (0, 3)


def test_redis_restart_keeps_entries_pending_and_counts(tmp_path):
    from conftest import RedisServer

    server = RedisServer(str(tmp_path))
    try:
        q = RedisTrajectoryQueue(server.url, "test:restart:scored", fresh=True)
        for i in range(3):
            q.put(_batch(f"e0-{i}", 0))
        first = q.get(1, 1.0, "learner", epoch=0)
        server.restart(down_s=0.5)  # a put during the outage waits for the server (retries with backoff)
        q.put(_batch("e0-3", 0))
        assert (len(q), q.puts(0)) == (4, 4)
        assert [e for e, _ in q.pending("learner")] == [first[0][0]]  # the group's pending list survived
        rest = q.get(10, 1.0, "learner", epoch=0)
        assert [b.batch_id for _, b in rest] == ["e0-1", "e0-2", "e0-3"]
        assert q.put(_batch("e0-1", 0)) is None  # the key set survived too: no double count
        q.ack([e for e, _ in first + rest])
        assert len(q) == 0
        q.close()
    finally:
        server.stop()


def test_redis_bytes_never_reach_pickle(redis_server, tmp_path, monkeypatch):
    """A planted pickle payload is rejected as a malformed entry, and pickle is never called."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    calls = []
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: calls.append(1))
    q = RedisTrajectoryQueue(redis_server.url, f"test:{uuid.uuid4().hex[:8]}:rollouts", fresh=True)
    try:
        q.r.xadd(q.stream, {"key": "x", "epoch": 0, "version": 0, "data": pickle.dumps(Exploit())})
        with pytest.raises(ValueError, match=r"redis stream test:.*:rollouts entry .*: not a trajectory entry"):
            q.get(1, 1.0, "reward-0", epoch=0)
        assert calls == [] and not marker.exists()
    finally:
        q.close()


def test_redis_url_unreachable_is_one_clear_error():
    q = None
    with pytest.raises(ConnectionError, match=r"replay.redis_url redis://127.0.0.1:1/0: unreachable"):
        q = RedisTrajectoryQueue("redis://127.0.0.1:1/0", "test:x:rollouts", retry_s=0.3)
    assert q is None


def test_redis_auth_from_the_url(tmp_path):
    """A server with AUTH: the password in replay.redis_url is used; without it the queue refuses to start."""
    from conftest import RedisServer

    server = RedisServer(str(tmp_path), password="s3cret-pw")
    try:
        q = RedisTrajectoryQueue(server.url, "test:auth:rollouts", fresh=True)
        q.put(_batch("e0-a", 0))
        assert [b.batch_id for _, b in q.get(1, 1.0, "c", epoch=0)] == ["e0-a"]
        q.close()
        with pytest.raises(PermissionError, match=r"requires authentication .*redis://\[user\]:PASSWORD@host"):
            RedisTrajectoryQueue(server.url.replace(":s3cret-pw@", ""), "test:auth:rollouts", retry_s=0.5)
        with pytest.raises(PermissionError, match=r"refused the password") as err:
            RedisTrajectoryQueue(server.url.replace("s3cret-pw", "nope"), "test:auth:rollouts", retry_s=0.5)
        assert "nope" not in str(err.value) and ":***@127.0.0.1" in str(err.value)  # the password is masked
    finally:
        server.stop()
