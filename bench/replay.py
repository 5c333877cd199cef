"""Trajectory queue figures: put -> get -> ack throughput and latency for SD1.5-size trajectories, N producers x
M consumers, on both backends; and the time a run takes to recover from a SIGKILLed sampler.

    python bench/replay.py                       # both backends, 1x1, 2x1 and 2x2, 48 entries each
    python bench/replay.py --recovery            # also: kill a sampler mid-epoch (tiny model) and time it

An entry is one sampler batch (`--batch` samples) of SD1.5-size trajectories: 50 DDIM steps of 4x64x64
latents (51 of them with x_T), 77x768 conditioning, 512x512 images: ~4.4 MB a sample. Producers and
consumers are Ray actors (one logical CPU between them all); the Redis backend needs `redis-server` on the
PATH and starts its own on a free loopback port. Latency is the time from a producer's put to a consumer's
get returning the entry; throughput counts entries put, got and acknowledged end to end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def sd15_batch(b: int, key: str):
    import torch

    from common.trajectory import TrajectoryBatch

    t = 50
    return TrajectoryBatch(
        prompts=["a photo of a cat"] * b, plans=[{"seed": i} for i in range(b)],
        latents=torch.randn(b, t + 1, 4, 64, 64), log_probs=torch.randn(b, t), timesteps=torch.arange(t, 0, -1) * 20,
        guidance=torch.full((b, t), 5.0), cond={"prompt_embeds": torch.randn(b, 77, 768)},
        images=torch.randint(0, 255, (b, 3, 512, 512), dtype=torch.uint8), policy_version=0, batch_id=key, epoch=0,
    )  # fmt: skip


class Producer:
    def __init__(self, batch: int):
        self.template = sd15_batch(batch, "template")

    def run(self, queue, keys: list[str]) -> int:
        for k in keys:
            self.template.batch_id = k
            self.template.plans[0]["t_put"] = time.time()
            queue.put(self.template)
        return len(keys)


class Consumer:
    def run(self, queue, name: str, total: int, timeout: float = 120.0) -> list[float]:
        """Get and ack until the queue has handed out `total` entries in all; returns each entry's latency."""
        lat = []
        t0 = time.monotonic()
        while True:
            got = queue.get(1, 0.5, name, epoch=0)
            now = time.time()
            for _, b in got:
                lat.append(now - b.plans[0]["t_put"])
            queue.ack([e for e, _ in got])
            if not got and queue.puts(0) >= total and len(queue) == 0:
                return lat
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"consumer {name}: gave up after {timeout:.0f} s")


def start_redis() -> tuple[subprocess.Popen, str, str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = tempfile.mkdtemp(prefix="bench-redis-")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", d, "--appendonly", "yes",
                             "--save", ""], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    import redis

    for _ in range(200):
        try:
            redis.Redis(port=port).ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0", d


def measure(backend: str, url: str | None, producers: int, consumers: int, items: int, batch: int) -> dict:
    import ray

    from actors.replay import EmbeddedTrajectoryQueue
    from actors.replay_redis import RedisTrajectoryQueue

    if backend == "embedded":
        q = EmbeddedTrajectoryQueue()
    else:
        q = RedisTrajectoryQueue(url, f"bench:{producers}x{consumers}:{time.time_ns()}", fresh=True)
    share = 1.0 / (producers + consumers)
    prods = [ray.remote(Producer).options(num_cpus=share).remote(batch) for _ in range(producers)]
    cons = [ray.remote(Consumer).options(num_cpus=share).remote() for _ in range(consumers)]
    ray.get([p.run.remote(q, []) for p in prods])  # actors up before the clock starts
    keys = [f"k{i}" for i in range(items)]
    t0 = time.perf_counter()
    c_futs = [c.run.remote(q, f"c{j}", items) for j, c in enumerate(cons)]
    p_futs = [p.run.remote(q, keys[i::producers]) for i, p in enumerate(prods)]
    ray.get(p_futs)
    lat = [x for part in ray.get(c_futs) for x in part]
    wall = time.perf_counter() - t0
    assert len(lat) == items, (len(lat), items)
    q.close()
    for a in prods + cons:
        ray.kill(a)
    mb = len(sd15_batch(batch, "x").to_bytes()) / 1e6
    lat.sort()
    return {"backend": backend, "producers": producers, "consumers": consumers, "entries": items,
            "entry_mb": mb, "entries_per_s": items / wall, "mb_per_s": items * mb / wall,
            "latency_p50_ms": 1000 * statistics.median(lat), "latency_p95_ms": 1000 * lat[int(0.95 * (len(lat) - 1))]}  # fmt: skip


def recovery(repeats: int) -> list[dict]:
    """Tiny model, 2 samplers x 4 batches: SIGKILL sampler 0 after its first put; time to the restarted
    sampler's next put, and the epoch's wall time against a clean epoch."""
    import signal

    import ray

    from common.config import load_config
    from learner.driver import RaySystem
    from learner.loop import Trainer
    from learner.run_dir import RunDir

    cfg = load_config("tiny", ["sampling.num_steps=6", "train.samples_per_epoch=16", "sampling.batch_size=2",
                               "reward.batch_size=2", "train.epochs=1", "eval.every=0", "cluster.num_samplers=2",
                               "cluster.local_dashboard=false"])  # fmt: skip
    out = []
    for r in range(repeats):
        for fault in (False, True):
            system = RaySystem(cfg)
            run = RunDir(Path(tempfile.mkdtemp()) / "run")
            run.create(cfg)
            import threading

            rows, res = [], {}
            trainer = Trainer(cfg, run, system, log=lambda *_: None)
            th = threading.Thread(target=lambda t=trainer, out=rows: out.extend(t.fit()))
            t0 = time.perf_counter()
            th.start()
            if fault:
                pid = ray.get(system.samplers[0].pid.remote())
                while system.rollout_q.puts(0) < 1:
                    time.sleep(0.01)
                os.kill(pid, signal.SIGKILL)
                t_kill, before = time.perf_counter(), system.rollout_q.puts(0)
                # the restarted sampler re-puts its first batch (a no-op) and then adds its second
                while ray.get(system.samplers[0].pid.remote()) == pid:
                    time.sleep(0.05)
                res["restart_s"] = time.perf_counter() - t_kill
                while system.rollout_q.puts(0) < min(before + 1, 8):
                    time.sleep(0.01)
                res["to_next_put_s"] = time.perf_counter() - t_kill
            th.join()
            res.update(fault=fault, epoch_s=time.perf_counter() - t0, queries=rows[0]["reward_queries"])
            system.shutdown()
            out.append(res)
            print(res, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=48)
    ap.add_argument("--batch", type=int, default=2, help="samples per entry")
    ap.add_argument("--shapes", default="1x1,2x1,2x2", help="producers x consumers")
    ap.add_argument("--backends", default="embedded,redis")
    ap.add_argument("--recovery", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})  # fmt: skip
    proc, url, d = start_redis() if "redis" in args.backends else (None, None, None)
    try:
        print("| backend | producers x consumers | entry MB | entries/s | MB/s | latency p50 ms | p95 ms |")
        print("|---|---|---|---|---|---|---|")
        for shape in args.shapes.split(","):
            n, m = (int(x) for x in shape.split("x"))
            for backend in args.backends.split(","):
                r = measure(backend, url, n, m, args.items, args.batch)
                print(f"| {backend} | {n} x {m} | {r['entry_mb']:.1f} | {r['entries_per_s']:.1f} | {r['mb_per_s']:.0f} | "
                      f"{r['latency_p50_ms']:.0f} | {r['latency_p95_ms']:.0f} |", flush=True)  # fmt: skip
        if args.recovery:
            recovery(args.repeats)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
            shutil.rmtree(d, ignore_errors=True)
        ray.shutdown()


if __name__ == "__main__":
    main()
