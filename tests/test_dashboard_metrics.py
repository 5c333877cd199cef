"""The run's metrics reach Ray's metrics export (what the dashboard and Prometheus read)."""

import re
import time
import urllib.request

import ray

from learner.driver import RaySystem, Trainer
from test_system import _cfg, _run_dir


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def _value(text: str, name: str, **tags) -> float | None:
    for line in text.splitlines():
        if line.startswith(f"ray_{name}{{") and all(f'{k}="{v}"' in line for k, v in tags.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_run_metrics_reach_the_prometheus_export(ray_session, tiny_cfg, tmp_path):
    cfg = _cfg(tiny_cfg, "cluster.num_samplers=1", "train.epochs=2", "eval.every=1",
               "prompts.eval=[tiny_animals, animals]", "eval.max_prompts=2")  # fmt: skip
    system = RaySystem(cfg, run_id="metrics-test")
    try:
        rows = Trainer(cfg, _run_dir(tmp_path, cfg), system, log=lambda *_: None).fit()
    finally:
        system.shutdown()
    last = [r for r in rows if not r.get("final_eval")][-1]
    final = rows[-1]
    port = ray._private.worker._global_node.metrics_export_port
    want = {
        ("diffexp_reward_queries", ()): 16.0,
        ("diffexp_reward_mean", ()): last["reward_mean"],
        ("diffexp_samples_per_second", ()): last["samples_per_s"],
        ("diffexp_staleness_max", ()): 0.0,
        ("diffexp_queue_depth", (("stage", "rollouts"),)): 0.0,
        ("diffexp_queue_depth", (("stage", "scored"),)): 0.0,
        ("diffexp_eval_reward_mean", (("eval_set", "tiny_animals"),)): final["eval_tiny_animals_reward_mean"],
        ("diffexp_eval_reward_mean", (("eval_set", "animals"),)): final["eval_animals_reward_mean"],
        ("diffexp_learner", (("metric", "update_norm"),)): last["update_norm"],
        ("diffexp_learner", (("metric", "approx_kl"),)): last["approx_kl"],
    }
    def close(a, b) -> bool:
        return a is not None and abs(a - b) <= 1e-4 * max(1.0, abs(b))

    # the metrics agent exports every few seconds, so a scrape may still show an earlier epoch's values
    deadline = time.monotonic() + 120
    while True:
        try:
            text = _scrape(port)
        except OSError:  # a busy machine can time the metrics agent out: retry until the deadline
            if time.monotonic() > deadline:
                raise
            time.sleep(2)
            continue
        got = {k: _value(text, k[0], run="metrics-test", **dict(k[1])) for k in want}
        if all(close(got[k], v) for k, v in want.items()) or time.monotonic() > deadline:
            break
        time.sleep(2)
    for k, v in want.items():
        assert got[k] is not None, f"{k} not exported; diffexp lines: {re.findall(r'ray_diffexp.*', text)[:20]}"
        assert close(got[k], v), (k, got[k], v)
    assert last["update_norm"] > 0  # the tiny run's LoRA moved, so the gauge shows a real update
    sync = _value(text, "diffexp_weight_sync_ms", run="metrics-test")
    assert sync is not None and 0 < sync < 60_000
