"""The Ray backend of the epoch loop (learner/loop.py): sampler, reward and learner actors over replay queues.

With replay.max_staleness 0 every epoch is strictly on-policy: weights are
synced and verified, then samplers, reward actors and the learner run as a
pipeline through the replay queues. With max_staleness >= 1 the next epoch's
sampling is launched before the learner trains, so sampling overlaps learning
and trajectories are at most one version old.
"""

from __future__ import annotations

import functools
import math
import time
import uuid

import ray
import torch

from actors.replay import make_queue
from actors.reward import RewardActor
from actors.sampler import SamplerActor
from common.config import ActorResources, RunConfig
from learner.actor import LearnerActor
from learner.loop import BackendLost, EpochInputs, EvalResult, Trainer, WeightSyncError, epoch_prompts  # noqa: F401  (re-exported)
from learner.ray_metrics import RunMetrics


class ActorStartTimeout(RuntimeError):
    """Actors did not start within cluster.start_timeout_s (missing resources, usually)."""


def _opts(r: ActorResources, wait_policy: str) -> dict:
    env = {"OMP_WAIT_POLICY": wait_policy, "OMP_NUM_THREADS": str(r.torch_threads)}
    return {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus, "runtime_env": {"env_vars": env}}


def _combine_shares(ms: list[dict]) -> dict:
    """One epoch's metrics from data-parallel AlignProp learners, each reporting its share of the images."""
    rewards = torch.cat([m.pop("rewards") for m in ms])
    out = dict(ms[0])
    out.update(reward_mean=float(rewards.mean()), reward_std=float(rewards.std(unbiased=False)),
               trained_samples=int(rewards.numel()))  # fmt: skip
    for k in ms[0]:
        if k.startswith("reward_") and k.endswith("_mean") and k != "reward_mean":
            out[k] = sum(m[k] * m["trained_samples"] for m in ms) / max(
                sum(m["trained_samples"] for m in ms), 1
            )
    return out


def _learner_loss(method):
    """Turn the death of a learner actor inside `method` into BackendLost (the loop restarts from the last
    checkpoint); samplers and reward actors are restarted by Ray itself and never reach here unless their
    restarts are used up."""

    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except ray.exceptions.RayActorError as err:
            learners = {lr._actor_id.hex() for lr in self.learners}
            if getattr(err, "actor_id", None) in learners:
                raise BackendLost(f"the learner actor died ({err.__class__.__name__})") from err
            raise

    return wrapped


def _split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


class RaySystem:
    """The actors and queues of one run."""

    def __init__(self, cfg: RunConfig, run_id: str | None = None):
        """`run_id` names the run's queues (the Redis streams); a fresh one by default."""
        self.cfg = cfg
        c = cfg.cluster
        w = c.omp_wait_policy
        run_id = run_id or uuid.uuid4().hex[:12]
        # with no reward actors the samplers score their own batches and put them straight to the scored queue
        self.rollout_q = make_queue(cfg.replay, "rollouts", run_id) if c.num_reward_actors else None
        self.scored_q = make_queue(cfg.replay, "scored", run_id)
        self._sample_q = self.rollout_q if self.rollout_q is not None else self.scored_q
        # samplers and reward actors are restarted by Ray when they die, and their running task is retried:
        # work is deterministic and queue puts are idempotent, so a retried task repeats nothing that counts
        restart = {"max_restarts": c.max_restarts, "max_task_retries": c.max_restarts}
        sampler_cls, reward_cls = ray.remote(SamplerActor), ray.remote(RewardActor)
        self.samplers = [
            sampler_cls.options(**_opts(c.sampler, w), **restart).remote(cfg, i)
            for i in range(c.num_samplers)
        ]
        self.rewarders = [
            reward_cls.options(**_opts(c.reward, w), **restart).remote(cfg, i)
            for i in range(c.num_reward_actors)
        ]
        # two threads: progress() is answered while train_items runs
        learner_cls = ray.remote(LearnerActor).options(max_concurrency=2, **_opts(c.learner, w))
        self.learners = [learner_cls.remote(cfg) for _ in range(c.num_learners)]
        self.learner = self.learners[0]  # publishes weights, takes rollouts off the queue, checkpoints
        # Sampling does not wait for the learners: a fresh run's samplers already hold policy version 0 (the
        # LoRA's initialisation is seeded), so the first evaluation and the first epoch's rollouts start while
        # the learners still load; _await_learners checks their version 0 against the samplers' before training.
        self._learner_start = [lr.publish.remote() for lr in self.learners]
        self._unverified: str | None = None  # the samplers' version-0 checksum while no learner has confirmed it
        self._ahead = None  # (sampler futures, reward futures, items, epoch) of an epoch launched in advance
        self._weights = None  # (version, [ObjectRef]) last published: samplers restarted by Ray load it
        self._wait_started([a.ready.remote() for a in self.samplers + self.rewarders], "sampler and reward")
        self.run_id = run_id
        self.metrics = RunMetrics(run_id)
        self.sync_ms: float | None = None

    def _wait_started(self, starting: list, kind: str) -> list:
        """ray.get of actor start-up calls, bounded by cluster.start_timeout_s; stops every actor on timeout."""
        c = self.cfg.cluster
        waiting = ray.wait(starting, num_returns=len(starting), timeout=c.start_timeout_s)[1]
        if waiting:
            self.shutdown()
            raise ActorStartTimeout(
                f"{len(waiting)} of {len(starting)} {kind} actors did not start within cluster.start_timeout_s="
                f"{c.start_timeout_s:.0f} s: the cluster lacks the resources they ask for (cluster.sampler/reward/"
                "learner.num_cpus and num_gpus) or cannot reach their dependencies; lower those or add nodes"
            )
        return ray.get(starting)

    def _await_learners(self) -> None:
        """Before the first call that needs the learners: wait for them to start, form their group, and check
        that the policy the samplers used meanwhile (version 0) is the learners' version 0."""
        if self._learner_start is None:
            return
        try:
            published = self._wait_started(self._learner_start, "learner")
        except ray.exceptions.RayActorError as err:  # a start-up failure is not a loss to restart from
            self.shutdown()
            raise RuntimeError(f"the learner actor failed to start: {err}") from err
        self._learner_start = None
        n = len(self.learners)
        if n > 1:  # one gloo group: gradients are summed across learners before every step
            group = f"learners-{uuid.uuid4().hex[:8]}"
            ray.get([lr.join_group.remote(n, r, group) for r, lr in enumerate(self.learners)])
        version, refs, checksum = published[0]
        if self._unverified is not None:
            if (version, checksum) != (0, self._unverified):
                raise WeightSyncError(
                    f"the samplers sampled with version 0 checksum {self._unverified} before the learner started; "
                    f"the learner holds version {version} checksum {checksum}"
                )
            self._unverified = None
            self._weights = (version, refs)

    @property
    def sampling_ahead(self) -> bool:
        return self._ahead is not None

    def shutdown(self) -> None:
        """Stop every actor of this run (the Ray cluster itself stays up)."""
        for a in self.samplers + self.rewarders + self.learners:
            ray.kill(a)
        for q in (self.rollout_q, self.scored_q):
            if q is not None:
                q.close()

    @_learner_loss
    def sync_weights(self) -> tuple[int, str]:
        """Broadcast the learner's LoRA (one ray.put) and verify every sampler's version and checksum."""
        t0 = time.perf_counter()
        if self._learner_start is not None:  # a fresh run before the learners are up: the samplers hold version 0
            held = set(ray.get([s.held.remote() for s in self.samplers]))
            if len(held) != 1 or next(iter(held))[0] != 0:
                raise WeightSyncError(f"fresh samplers disagree on version 0: (version, checksum) {sorted(held)}")
            self._unverified = next(iter(held))[1]
            return 0, self._unverified
        version, (ref,), checksum = ray.get(self.learner.publish.remote())
        self._weights = (version, [ref])
        answers = ray.get([s.set_weights.remote(version, ref) for s in self.samplers])
        for i, (v, c) in enumerate(answers):
            if v != version or c != checksum:
                raise WeightSyncError(
                    f"sampler {i} holds version {v} checksum {c}, learner published {version} checksum {checksum}"
                )
        self.sync_ms = 1000 * (time.perf_counter() - t0)
        return version, checksum

    def report(self, row: dict) -> None:
        """The loop's row as Ray dashboard metrics (learner/ray_metrics.py), with the queues' depths."""
        if row.get("final_eval"):
            self.metrics.evaluation(row)
        else:
            rollouts = len(self.rollout_q) if self.rollout_q is not None else 0  # none without reward actors
            self.metrics.epoch(row, {"rollouts": rollouts, "scored": len(self.scored_q)}, self.sync_ms)

    def launch_sampling(self, inputs: EpochInputs) -> tuple[list, list, int, int]:
        """Start samplers and reward actors on one epoch; returns (sampler futures, reward futures, rollout
        batches of the epoch, the epoch)."""
        bs = self.cfg.sampling.batch_size
        prompts, seeds, epoch = inputs
        futs, start, items = [], 0, 0
        for s, n in zip(self.samplers, _split(len(prompts), len(self.samplers))):
            if n:
                futs.append(s.sample.remote(self._sample_q, prompts[start : start + n], seeds[start : start + n],
                                            epoch, self._weights))  # fmt: skip
                items += math.ceil(n / bs)
            start += n
        rfuts = [r.score_epoch.remote(self.rollout_q, self.scored_q, epoch, items) for r in self.rewarders]
        return futs, rfuts, items, epoch

    def _progress(self, progress, epoch: int, n: int) -> None:
        """Counts from the queues (batches of sampling.batch_size samples; exact but for a partial last batch)
        and the learner."""
        bs = self.cfg.sampling.batch_size
        sampled = self._sample_q.puts(epoch) * bs
        scored = self.scored_q.puts(epoch) * bs
        progress.update(
            sampled=min(sampled, n), scored=min(scored, n), trained=ray.get(self.learner.progress.remote())
        )

    def _wait_watching(self, target, watch: list, progress, epoch: int, n: int) -> None:
        """Wait for `target` (the learner's call), showing progress, and raise at once the error of any of
        `watch` (the epoch's sampler and reward calls) that fails meanwhile: the learner would otherwise wait for
        their entries until its queue timeout (600 s) before the real error was seen."""
        pending = list(watch)
        while not ray.wait([target], timeout=1.0)[0]:
            if pending:
                done, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
                ray.get(done)  # a failed call raises its own error here
            if progress is not None:
                self._progress(progress, epoch, n)

    @_learner_loss
    def train_epoch(self, inputs: EpochInputs, next_inputs: EpochInputs | None, progress=None) -> dict:
        """One epoch through the actors. With `next_inputs` (max_staleness >= 1) the next epoch's sampling
        starts as soon as this epoch's rollouts are out of the samplers, before the learner trains."""
        if self.cfg.algorithm.name == "alignprop":
            self._await_learners()  # the learners sample with gradients; no rollouts to move
            learns = [lr.train_prompts.remote(inputs.prompts, inputs.seeds) for lr in self.learners]
            n = len(inputs[0])
            while progress is not None and len(
                ray.wait(learns, num_returns=len(learns), timeout=1.0)[0]
            ) < len(learns):
                k = ray.get(self.learner.progress.remote())
                progress.update(sampled=k, scored=k, trained=k)
            ms = ray.get(learns)
            if progress is not None:
                progress.update(sampled=n, scored=n, trained=n)
            m = _combine_shares(ms)
            m.update(time_sample=0.0, time_reward=0.0)
            self._check_learners_agree()
            return m
        launch, self._ahead = self._ahead or self.launch_sampling(inputs), None
        futs, rfuts, items, epoch = launch
        assert epoch == inputs.epoch, (epoch, inputs.epoch)
        self._await_learners()  # the rollouts are under way meanwhile
        n = len(inputs.prompts)
        if next_inputs is not None:
            sample_stats = ray.get(futs)
            self._ahead = self.launch_sampling(next_inputs)
        if len(self.learners) == 1:
            learn = self.learner.train_items.remote(self.scored_q, items, epoch)
        else:  # every learner gets the same entries (one object, not through the driver) and runs its share
            take = self.learner.take_items.remote(self.scored_q, items, epoch)
            self._wait_watching(take, futs + rfuts, progress, epoch, n)
            learns = [lr.train_got.remote(take) for lr in self.learners]
            learn = learns[0]
        self._wait_watching(learn, futs + rfuts, progress, epoch, n)
        if next_inputs is None:
            sample_stats = ray.get(futs)
        reward_stats = ray.get(rfuts)
        m = ray.get(learn)
        if len(self.learners) > 1:
            ray.get(learns)
            ray.get(self.learner.ack_taken.remote(self.scored_q))
            self._check_learners_agree()
        if progress is not None:
            self._progress(progress, epoch, n)
        if self._ahead is not None:  # the sync would queue behind the running sample calls: wait for them first,
            ray.wait(self._ahead[0], num_returns=len(self._ahead[0]))  # so that sync_ms times the sync alone
            self.sync_weights()  # applies to the epoch after next
        m.update(  # samples (reward queries): counted by the learner, from distinct scored batches
            time_sample=max(s["time_sample"] for s in sample_stats),
            time_reward=sum(r["time_reward"] for r in reward_stats + sample_stats),  # samplers that score report theirs
        )
        return m

    def evaluate(self, prompts: list[str], seeds: list[int]) -> EvalResult:
        """Evaluation images (plain prompts, constant scale) from the samplers, scored by the reward actors (or, with
        none, by the sampler that drew them)."""
        futs, scorers, start = [], [], 0
        for s, n in zip(self.samplers, _split(len(prompts), len(self.samplers))):
            if n:
                futs.append(s.sample_eval.remote(prompts[start : start + n], seeds[start : start + n], self._weights))
                scorers.append(self.rewarders[(len(futs) - 1) % len(self.rewarders)] if self.rewarders else s)
            start += n
        scores = ray.get([r.score_batch.remote(f, True, True) for r, f in zip(scorers, futs)])
        batches = ray.get(futs)
        versions = {b.policy_version for b in batches}
        if len(versions) != 1:
            raise RuntimeError(f"evaluation images came from several policy versions: {sorted(versions)}")
        parts = {k: torch.cat([p[k] for _, p in scores]) for k in scores[0][1]}
        return EvalResult(torch.cat([b.images for b in batches]), torch.cat([t for t, _ in scores]), parts,
                          versions.pop())  # fmt: skip

    def _check_learners_agree(self) -> None:
        """Data-parallel learners must hold identical weights after every update."""
        if len(self.learners) > 1:
            sums = ray.get([lr.checksum.remote() for lr in self.learners])
            if len(set(sums)) > 1:
                raise WeightSyncError(f"data-parallel learners diverged: LoRA checksums {sums}")

    @_learner_loss
    def checkpoint_state(self) -> dict:
        self._await_learners()
        return ray.get(self.learner.checkpoint_state.remote())

    @_learner_loss
    def restore(self, learner_state: dict, lora: dict) -> None:
        self._await_learners()
        ray.get([lr.restore.remote(learner_state, lora) for lr in self.learners])
