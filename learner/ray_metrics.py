"""The run's metrics on the Ray dashboard (Ray's Prometheus export, through `ray.util.metrics`).

The driver records these after every epoch and evaluation, tagged with the run's id, so several runs on
one cluster stay apart. On a local Ray they are served by the node's metrics agent at
`http://127.0.0.1:<metrics_export_port>/metrics` (Prometheus text; names get Ray's `ray_` prefix), and
the dashboard's Metrics tab shows them once Prometheus and Grafana are set up as Ray's docs describe.

| metric | what |
|---|---|
| diffexp_reward_mean | the epoch's mean training reward |
| diffexp_eval_reward_mean {eval_set} | evaluation reward of each evaluation set |
| diffexp_reward_queries | reward queries so far (training images scored) |
| diffexp_samples_per_second | the epoch's images per second, end to end |
| diffexp_queue_depth {stage} | unacknowledged entries of the rollouts and scored queues, at the epoch's end |
| diffexp_staleness_max | policy lag: versions between the trajectories trained on and the learner |
| diffexp_weight_sync_ms | the last weight broadcast and verification, milliseconds |
| diffexp_dropped_total {reason} | samples dropped: stale, nonfinite |
| diffexp_learner {metric} | the update's health: update_norm (L2 norm of the LoRA's change), approx_kl, clipfrac, loss, grad_norm (those the algorithm logs) |
"""

from __future__ import annotations

from ray.util import metrics

GAUGES = {
    "diffexp_reward_mean": ("Mean training reward of the last epoch", ()),
    "diffexp_eval_reward_mean": ("Mean evaluation reward, per evaluation set", ("eval_set",)),
    "diffexp_reward_queries": ("Reward queries (training images scored) so far", ()),
    "diffexp_samples_per_second": ("Training images per second over the last epoch, end to end", ()),
    "diffexp_queue_depth": (
        "Unacknowledged entries of a trajectory queue at the end of the epoch",
        ("stage",),
    ),
    "diffexp_staleness_max": ("Policy lag: most versions between a trained trajectory and the learner", ()),
    "diffexp_weight_sync_ms": ("Duration of the last weight broadcast and verification, ms", ()),
    "diffexp_learner": (
        "The last epoch's update: update_norm (L2 norm of the LoRA's change), approx_kl, clipfrac, loss, grad_norm",
        ("metric",),
    ),
}
# the learner's metrics that say whether, and how far, the policy moved (DDPO logs approx_kl and clipfrac, AlignProp
# loss and grad_norm; both update_norm)
LEARNER_METRICS = ("update_norm", "approx_kl", "clipfrac", "loss", "grad_norm")


class RunMetrics:
    """Records the rows the epoch loop logs as Ray metrics (one instance per driver)."""

    def __init__(self, run_id: str):
        self.tags = {"run": run_id}
        keys = ("run",)
        self.gauges = {
            name: metrics.Gauge(name, desc, tag_keys=keys + extra) for name, (desc, extra) in GAUGES.items()
        }
        self.dropped = metrics.Counter("diffexp_dropped_total", "Samples dropped, by reason (stale, nonfinite)",
                                       tag_keys=("run", "reason"))  # fmt: skip

    def _set(self, name: str, value, **tags) -> None:
        if isinstance(value, (int, float)):
            self.gauges[name].set(float(value), tags={**self.tags, **tags})

    def epoch(self, row: dict, queue_depths: dict[str, int], sync_ms: float | None) -> None:
        self._set("diffexp_reward_mean", row.get("reward_mean"))
        self._set("diffexp_reward_queries", row.get("reward_queries"))
        self._set("diffexp_samples_per_second", row.get("samples_per_s"))
        self._set("diffexp_staleness_max", row.get("staleness_max"))
        if sync_ms is not None:
            self._set("diffexp_weight_sync_ms", sync_ms)
        for metric in LEARNER_METRICS:
            self._set("diffexp_learner", row.get(metric), metric=metric)
        for stage, depth in queue_depths.items():
            self._set("diffexp_queue_depth", depth, stage=stage)
        for reason in ("stale", "nonfinite"):
            n = row.get(f"dropped_{reason}", 0)
            if n:
                self.dropped.inc(float(n), tags={**self.tags, "reason": reason})
        self.evaluation(row)

    def evaluation(self, row: dict) -> None:
        for key, value in row.items():
            if key.startswith("eval_") and key.endswith("_reward_mean"):
                name = key[len("eval_") : -len("_reward_mean")] or "default"
                self._set("diffexp_eval_reward_mean", value, eval_set=name)
