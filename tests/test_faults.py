"""Surviving actor deaths: a sampler or reward actor SIGKILLed mid-epoch is restarted by Ray, its task runs
again, and the run's metrics equal those of a run without faults (nothing lost, nothing counted twice)."""

import os
import signal
import threading
import time

import pytest
import ray
from test_system import _cfg, _run_dir

from common.config import ConfigError
from learner.driver import RaySystem, Trainer
from learner.main import check_resources


def _fit(cfg, path, kill=None):
    """Fit on a fresh RaySystem; `kill(system)` runs beside the loop (fault injection). Returns the epoch rows."""
    system = RaySystem(cfg)
    out, err = {}, []

    def loop():
        try:
            out["rows"] = Trainer(cfg, _run_dir(path, cfg), system, log=lambda *_: None).fit()
        except BaseException as e:  # noqa: BLE001 - reported below
            err.append(e)

    t = threading.Thread(target=loop)
    t.start()
    try:
        if kill is not None:
            kill(system)
        t.join(timeout=600)
        assert not t.is_alive(), "the run did not finish"
        if err:
            raise err[0]
        return [r for r in out["rows"] if not r.get("final_eval")], system
    finally:
        if t.is_alive() or err or kill is None:
            system.shutdown()


def _wait(cond, what: str, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def fault_cfg(tiny_cfg):
    # 2 samplers x 4 batches of 2 per epoch: a kill lands between puts
    return _cfg(tiny_cfg, "cluster.num_samplers=2", "train.samples_per_epoch=16", "sampling.batch_size=2",
                "reward.batch_size=2", "train.epochs=2", "eval.every=0", "exploration.enabled=true")  # fmt: skip


@pytest.fixture(scope="module")
def clean_rows(ray_session, fault_cfg, tmp_path_factory):
    return _fit(fault_cfg, tmp_path_factory.mktemp("clean"))[0]


def _same(rows, clean):
    assert len(rows) == len(clean) == 2
    for r, c in zip(rows, clean):
        assert r["reward_queries"] == c["reward_queries"] and r["trained_samples"] == c["trained_samples"] == 16
        assert r["policy_version"] == c["policy_version"] and r["dropped_stale"] == c["dropped_stale"] == 0
        for k in ("reward_mean", "reward_std", "approx_kl", "logprob_mismatch"):
            assert r[k] == pytest.approx(c[k], rel=1e-4, abs=1e-6), k
    assert rows[-1]["reward_queries"] == 32


def test_sigkill_of_a_sampler_then_a_reward_actor_mid_epoch(fault_cfg, clean_rows, tmp_path):
    """Both kinds of actor in one run (each fault costs a whole run of actor start-ups): a sampler dies after
    the first rollouts, then a reward actor after the first scored ones; both are restarted and the run equals
    the clean one."""
    killed = {}

    def kill(system):
        pid = ray.get(system.samplers[0].pid.remote())
        _wait(lambda: system.rollout_q.puts(0) >= 1, "the first rollouts")
        os.kill(pid, signal.SIGKILL)
        killed["sampler"] = pid
        pid = ray.get(system.rewarders[0].pid.remote())
        _wait(lambda: system.scored_q.puts(0) >= 2, "the first scored rollouts")
        os.kill(pid, signal.SIGKILL)
        killed["rewarder"] = pid

    rows, system = _fit(fault_cfg, tmp_path, kill)
    try:
        assert ray.get(system.samplers[0].pid.remote()) != killed["sampler"]  # Ray restarted it
        assert ray.get(system.rewarders[0].pid.remote()) != killed["rewarder"]
        assert system.rollout_q.puts() == system.scored_q.puts() == 16  # 8 batches an epoch, each once
        assert len(system.rollout_q) == len(system.scored_q) == 0
    finally:
        system.shutdown()
    _same(rows, clean_rows)


def test_more_actors_than_cpus_fails_fast_in_one_line(tiny_cfg):
    cfg = _cfg(tiny_cfg, "cluster.num_samplers=3")
    with pytest.raises(ConfigError) as err:
        check_resources(cfg, {"CPU": 2.0})
    msg = str(err.value)
    assert "\n" not in msg
    assert "ask for 2.25 CPUs (3 x cluster.sampler.num_cpus=0.5 + 1 x cluster.reward.num_cpus=0.25" in msg
    assert "this Ray has 2" in msg
    check_resources(_cfg(tiny_cfg, "cluster.num_samplers=2"), {"CPU": 2.0})  # 1.75 fits
    with pytest.raises(ConfigError, match="GPUs"):
        check_resources(_cfg(tiny_cfg, "cluster.learner.num_gpus=1"), {"CPU": 8.0})


def test_redis_backend_on_policy_through_a_server_restart_then_resume(ray_session, tiny_cfg, tmp_path):
    """replay.backend=redis: the on-policy invariant holds, a Redis restart mid-run (AOF) loses nothing, and a
    finished run resumes from its checkpoint with exact reward-query counts."""
    from conftest import RedisServer

    from learner.main import run

    server = RedisServer(str(tmp_path / "redis"))
    try:
        cfg = _cfg(tiny_cfg, "replay.backend=redis", f"replay.redis_url={server.url}", "cluster.num_samplers=2",
                   "train.epochs=3", "train.checkpoint_every=1", "eval.every=0", "exploration.enabled=true",
                   "exploration.prompt_weighting.num_phrases=2")  # fmt: skip
        path = tmp_path / "run"
        metrics = path / "metrics.jsonl"
        out, err = [], []

        def go():
            try:
                out.extend(run(cfg, path, resume=False, log=lambda *_: None))
            except BaseException as e:  # noqa: BLE001
                err.append(e)

        t = threading.Thread(target=go)
        t.start()
        _wait(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, "the first epoch", timeout=300)
        server.restart(down_s=1.0)  # mid-run: epoch 1 is being sampled, scored or trained
        t.join(timeout=600)
        assert not t.is_alive() and not err, err
        rows = [r for r in out if not r.get("final_eval")]
        assert [r["reward_queries"] for r in rows] == [8, 16, 24]
        for r in rows:
            assert r["logprob_mismatch"] < 1e-4 and abs(r["ratio_mean"] - 1) < 1e-4, r
            assert r["trained_samples"] == 8 and r["dropped_stale"] == 0

        more = _cfg(cfg, "train.epochs=4")
        rows2 = [r for r in run(more, path, resume=True, log=lambda *_: None) if not r.get("final_eval")]
        assert [r["epoch"] for r in rows2] == [3] and rows2[0]["reward_queries"] == 32
        assert rows2[0]["logprob_mismatch"] < 1e-4
    finally:
        server.stop()


def test_sigkill_of_the_learner_resumes_from_the_last_checkpoint(ray_session, fault_cfg, clean_rows, tmp_path):
    """The driver restarts the actors and continues from the last complete checkpoint by itself: the run
    finishes with one metrics row per epoch, equal to a run without faults."""
    import json

    import learner.main as main_mod

    cfg = _cfg(fault_cfg, "train.epochs=3", "train.checkpoint_every=1")
    path = tmp_path / "run"
    systems, killed, logs = [], [], []
    real = main_mod.make_system

    def make_and_kill(c, run_id=None):
        system = real(c, run_id)
        systems.append(system)
        if len(systems) == 1:  # the first system's learner dies in epoch 1, after epoch 0's checkpoint

            def kill():
                _wait(lambda: (path / "checkpoints").exists() and any((path / "checkpoints").iterdir())
                      and system.rollout_q.puts(1) >= 1, "epoch 1")  # fmt: skip
                pid = ray.get(system.learner.pid.remote())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

            threading.Thread(target=kill, daemon=True).start()
        return system

    main_mod.make_system = make_and_kill
    try:
        out = main_mod.run(cfg, path, resume=False, log=logs.append)
    finally:
        main_mod.make_system = real
    assert killed and len(systems) == 2, logs
    assert any("the learner actor died" in line and "restarting the actors" in line for line in logs), logs
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if not r.get("final_eval")]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    assert [r["reward_queries"] for r in epochs] == [16, 32, 48]
    _same(epochs[:2], clean_rows)
    assert [r["epoch"] for r in out if not r.get("final_eval")] == [1, 2]  # the second system's rows
