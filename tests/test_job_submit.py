"""The README's cluster commands, end to end: `ray start --head`, `ray job submit -- python -m learner.main`,
then stopping that cluster. It runs beside the test session's Ray, which `ray stop` would also kill, so the
cluster gets its own temp dir and free ports, and is stopped by killing exactly the processes that carry
its session id."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_in_session(sid: int, live_only: bool = False) -> list[int]:
    """Processes of session `sid`. `ray start` runs in a new session, and every process of the test cluster
    (the raylet, GCS, dashboard and its agents, workers, the job's driver) stays in it, while their command
    lines and environments are overwritten by their process titles."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            state, _, _, session = stat.rsplit(")", 1)[1].split()[:4]  # the fields after "(comm)"
            if int(session) == sid and not (
                live_only and state == "Z"
            ):  # a killed one is a zombie until reaped
                out.append(int(d.name))
    return out


def test_ray_start_then_job_submit_runs_a_tiny_training(tmp_path):
    temp = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # short: Ray's socket paths must stay short
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_MODE", None)  # Ray's own default, as a new user has it
    bin_dir = Path(sys.executable).parent
    # the job's `python` is the head's PATH lookup: this interpreter's, also when pytest runs without the venv active
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    # every port the head listens on is a free one: the suite's own Ray holds the defaults (the dashboard
    # agent's 52365 above all; with it taken the job agent never starts: "No available agent to submit job")
    port, dash, agent, agent_grpc, client, metrics, rt_env = (_free_port() for _ in range(7))
    out = tmp_path / "run"
    sid = None
    try:
        ray = str(bin_dir / "ray")
        start = subprocess.Popen([ray, "start", "--head", f"--port={port}", f"--dashboard-port={dash}", "--num-cpus=2",
                        f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                        f"--ray-client-server-port={client}", f"--metrics-export-port={metrics}",
                        f"--runtime-env-agent-port={rt_env}", f"--temp-dir={temp}", "--disable-usage-stats"],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)  # fmt: skip
        sid = start.pid
        started = start.communicate(timeout=180)[0]
        assert start.returncode == 0, started[-3000:]
        deadline = time.monotonic() + 300
        # right after start the head may have no job agent yet ("try again later"): slow on a busy machine
        while True:
            job = subprocess.run(
                [ray, "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", str(ROOT), "--",
                 "python", "-m", "learner.main", "--config", "tiny", "--set", "train.epochs=2",
                 "--set", "sampling.num_steps=4", "--set", "train.samples_per_epoch=8", "--set", "algorithm.minibatch_size=4", "--set", "eval.every=0",
                 "--set", "cluster.local_dashboard=false", "--set", "cluster.num_samplers=1", "--output", str(out)],
                env=env, capture_output=True, text=True, timeout=600, check=False,
            )  # fmt: skip
            log = job.stdout + job.stderr
            if "No available agent" not in log or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert job.returncode == 0, log[-3000:]
        assert "epoch 2/2 | queries 16" in log, log[-3000:]
        assert "succeeded" in log.lower(), log[-3000:]
        assert (out / "metrics.jsonl").read_text().count("\n") == 2
    finally:
        if sid is not None:
            for pid in _pids_in_session(sid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for _ in range(20):
                if not _pids_in_session(sid, live_only=True):
                    break
                time.sleep(0.5)
            assert not _pids_in_session(sid, live_only=True), "processes of the test cluster survived"


if not Path("/proc").is_dir():  # the scoped stop reads /proc
    pytest.skip("needs /proc", allow_module_level=True)
