"""The distributed path on a local Ray: on-policy invariant, weight syncs, staleness."""

import itertools

import pytest
import ray
import torch

from actors.sampler import SamplerActor
from learner.driver import RaySystem, Trainer, WeightSyncError
from learner.run_dir import RunDir


def _cfg(base, *overrides):
    from common.config import apply_override, validate_config

    data = base.model_dump(mode="json")
    for o in overrides:
        apply_override(data, o)
    return validate_config(data)


def _run_dir(path, cfg):
    run = RunDir(path)
    run.create(cfg)
    return run


def _checked_syncs(system, record):
    """Wrap sync_weights: after each sync, every sampler's LoRA tensors must equal the learner's."""
    original = system.sync_weights

    def checked():
        out = original()
        learner_state = ray.get(system.learner.lora_state.remote())
        for s in system.samplers:
            state = ray.get(s.lora_state.remote())
            assert state.keys() == learner_state.keys()
            assert all(torch.equal(state[k], learner_state[k]) for k in state)
        record.append(out)
        return out

    system.sync_weights = checked


def test_on_policy_invariant_through_the_distributed_path(ray_session, tiny_cfg, tmp_path):
    cfg = _cfg(tiny_cfg, "cluster.num_samplers=2", "train.epochs=3", "eval.every=2", "exploration.enabled=true",
               "exploration.prompt_weighting.num_phrases=2", "algorithm.inner_epochs=2",
               "prompts.eval=[tiny_animals, animals]", "eval.max_prompts=2")  # fmt: skip
    system = RaySystem(cfg)
    syncs = []
    _checked_syncs(system, syncs)
    try:
        rows = Trainer(cfg, _run_dir(tmp_path, cfg), system, log=lambda *_: None).fit()
    finally:
        system.shutdown()
    epochs = [r for r in rows if not r.get("final_eval")]
    assert len(epochs) == 3 and len(syncs) >= 3
    assert [v for v, _ in syncs][:3] == [0, 1, 2]
    for r in epochs:
        assert r["logprob_mismatch"] < 1e-4, r
        assert abs(r["ratio_mean"] - 1) < 1e-4, r
        assert r["dropped_stale"] == 0 and r["staleness_max"] == 0
        assert r["reward_jpeg_compressibility_mean"] == pytest.approx(r["reward_mean"], abs=1e-5)  # the one term, logged
    # a second inner epoch moves the policy, so the whole-epoch ratio is no longer exactly 1
    assert any(abs(r["ratio_mean_all"] - 1) > 1e-6 for r in epochs)
    assert [r["reward_queries"] for r in epochs] == [8, 16, 24]
    assert [r["policy_version"] for r in epochs] == [1, 2, 3]
    assert "eval_reward_mean" in epochs[0] and "eval_reward_mean" in epochs[2] and rows[-1]["final_eval"]
    assert epochs[0]["eval_reward_mean"] == epochs[0]["eval_tiny_animals_reward_mean"]
    assert "eval_animals_reward_std" in epochs[2]
    assert (tmp_path / "samples" / "epoch_0000_animals.png").is_file()
    assert RunDir(tmp_path).plot_reward_curve().stat().st_size > 1000
    # evaluation sees the policy after e updates at the top of epoch e (it once lagged one version)
    assert [epochs[0]["eval_policy_version"], epochs[2]["eval_policy_version"], rows[-1]["eval_policy_version"]] == [0, 2, 3]

    # the same loop without Ray: the first epoch (same weights, prompts, seeds) gives the same rollouts, up to
    # float differences of other UNet batch shapes (a JPEG size then moves by a byte or two: 0.001 kB each)
    from learner.local import LocalSystem

    local_cfg = _cfg(cfg, "cluster.backend=local", "train.epochs=1")
    local = Trainer(local_cfg, _run_dir(tmp_path / "local", local_cfg), LocalSystem(local_cfg), log=lambda *_: None).fit()
    assert abs(local[0]["reward_mean"] - epochs[0]["reward_mean"]) < 0.005
    assert abs(local[0]["eval_reward_mean"] - epochs[0]["eval_reward_mean"]) < 0.005


def test_overlapped_sampling_trains_on_one_version_old_rollouts(ray_session, tiny_cfg, tmp_path):
    cfg = _cfg(tiny_cfg, "replay.max_staleness=1", "train.epochs=3", "eval.every=0")
    system = RaySystem(cfg)
    try:
        rows = Trainer(cfg, _run_dir(tmp_path, cfg), system, log=lambda *_: None).fit()
    finally:
        system.shutdown()
    assert [r["staleness_max"] for r in rows] == [0, 1, 1]
    assert all(r["dropped_stale"] == 0 for r in rows)
    assert rows[0]["logprob_mismatch"] < 1e-4
    assert rows[1]["logprob_mismatch"] > 1e-6  # the data is one update old: ratios are real importance weights


def test_samplers_that_score_their_own_batches_train_as_reward_actors_do(ray_session, tiny_cfg, tmp_path):
    """cluster.num_reward_actors 0: no reward actor and no rollout queue; each sampler scores what it draws and
    the run trains and evaluates on the same rewards as the one-process loop."""
    cfg = _cfg(tiny_cfg, "cluster.num_reward_actors=0", "cluster.num_samplers=1", "train.epochs=2", "eval.every=1",
               "eval.max_prompts=2")  # fmt: skip
    system = RaySystem(cfg)
    try:
        assert system.rewarders == [] and system.rollout_q is None
        rows = Trainer(cfg, _run_dir(tmp_path, cfg), system, log=lambda *_: None).fit()
    finally:
        system.shutdown()
    epochs = [r for r in rows if not r.get("final_eval")]
    assert [r["reward_queries"] for r in epochs] == [8, 16]
    assert all(r["logprob_mismatch"] < 1e-4 and r["time_reward"] > 0 for r in epochs)
    from learner.local import LocalSystem

    local_cfg = _cfg(cfg, "cluster.backend=local")
    local = Trainer(local_cfg, _run_dir(tmp_path / "local", local_cfg), LocalSystem(local_cfg), log=lambda *_: None).fit()
    for key in ("reward_mean", "eval_reward_mean", "approx_kl"):
        assert [r[key] for r in rows if key in r] == pytest.approx([r[key] for r in local if key in r], rel=1e-3, abs=1e-6), key


class _NoOpSampler(SamplerActor):
    def set_weights(self, version, state):
        return version, self.gen.set_weights(self.gen.version, self.gen.lora_state())[1]


class _FailingSampler(SamplerActor):
    def sample(self, queue, prompts, seeds, epoch, weights):
        raise RuntimeError("sampler boom (a CUDA out-of-memory, say)")


def _system_with_sampler(cfg, sampler_cls) -> RaySystem:
    """A Ray system whose one sampler is a `sampler_cls` (a misbehaving subclass of SamplerActor)."""
    system = RaySystem(cfg)
    bad = ray.remote(sampler_cls).options(num_cpus=0.5).remote(cfg, 0)
    ray.kill(system.samplers[0])
    system.samplers = [bad]
    return system


def test_a_failing_sampler_stops_the_run_with_its_own_error_at_once(ray_session, tiny_cfg, tmp_path):
    """The driver waited on the learner alone, which waits for the epoch's scored entries up to its queue timeout
    (600 s): a sampler's error surfaced ten minutes late. It must stop the run within seconds, as itself."""
    import time

    cfg = _cfg(tiny_cfg, "cluster.num_samplers=1", "train.epochs=1", "eval.every=0")
    system = _system_with_sampler(cfg, _FailingSampler)
    try:
        t = time.perf_counter()
        with pytest.raises(ray.exceptions.RayTaskError, match="sampler boom"):
            Trainer(cfg, _run_dir(tmp_path, cfg), system, log=lambda *_: None).fit()
        assert time.perf_counter() - t < 120
    finally:
        system.shutdown()


def test_a_silent_noop_weight_sync_stops_the_run(ray_session, tiny_cfg, tmp_path):
    cfg = _cfg(tiny_cfg, "cluster.num_samplers=1", "train.epochs=2", "eval.every=0")
    system = _system_with_sampler(cfg, _NoOpSampler)
    try:
        with pytest.raises(WeightSyncError, match="sampler 0 holds version 1 checksum"):
            Trainer(cfg, _run_dir(tmp_path, cfg), system, log=lambda *_: None).fit()
    finally:
        system.shutdown()



def test_a_restarted_sampler_evaluates_with_the_published_weights(ray_session, tiny_cfg):
    """Ray restarts a crashed sampler with its initial weights; between the weight sync and the evaluation that
    sampler would draw its share of the evaluation images from version 0, and the run stop on the mixed
    versions. Evaluation carries the published weights as training rollouts do."""
    from common.pipelines import lora_checksum

    sampler = SamplerActor(tiny_cfg, 0)  # in this process: a fresh sampler holds version 0, as a restarted one
    state = {k: v + 0.01 for k, v in sampler.lora_state().items()}
    batch = sampler.sample_eval(["a photo of a cat"], [1], (3, [ray.put(state)]))
    assert batch.policy_version == 3 and sampler.held() == (3, lora_checksum(state))
    assert sampler.sample_eval(["a photo of a cat"], [1]).policy_version == 3  # no weights: as held

def test_sdxl_on_policy_invariant_through_the_distributed_path(ray_session, tiny_cfg, tmp_path):
    """SDXL's conditioning (two encoders' states, pooled embedding, time ids) travels sampler -> learner intact."""
    cfg = _cfg(tiny_cfg, "model.pretrained=tiny-sdxl", "cluster.num_samplers=1", "train.epochs=2", "eval.every=0",
               "exploration.enabled=true", "exploration.prompt_weighting.num_phrases=2")  # fmt: skip
    system = RaySystem(cfg)
    progress = []

    class _Rec:
        def __init__(self, label, totals):
            self.label = label

        def update(self, **counts):
            progress.append((self.label, counts))

        def close(self):
            pass

    def recorder(label, totals):
        return _Rec(label, totals)

    try:
        rows = Trainer(cfg, _run_dir(tmp_path, cfg), system, log=lambda *_: None, progress=recorder).fit()
    finally:
        system.shutdown()
    epochs = [r for r in rows if not r.get("final_eval")]
    assert len(epochs) == 2
    # progress inside each epoch, from the queues and the learner actor: monotonic, ending at the totals
    for label in ("epoch 1/2", "epoch 2/2"):
        seen = [c for lab, c in progress if lab == label]
        assert seen[-1] == {"sampled": 8, "scored": 8, "trained": 8}, seen
        assert all(a[k] <= b[k] for a, b in itertools.pairwise(seen) for k in a), seen
    for r in epochs:
        assert r["logprob_mismatch"] < 1e-4 and abs(r["ratio_mean"] - 1) < 1e-4, r
    ckpt = RunDir(tmp_path).latest_checkpoint()
    assert (ckpt / "pytorch_lora_weights.safetensors").is_file()


def test_alignprop_through_ray_evaluates_with_the_verified_weights(ray_session, tiny_cfg, tmp_path):
    """AlignProp trains in the learner actor; the samplers receive its weights (checked after every sync)
    and evaluate with them."""
    cfg = _cfg(tiny_cfg, "algorithm.name=alignprop", "reward.terms=[{name: shapes_soft}]", "prompts.train=shapes_pairs",
               "cluster.num_samplers=1", "train.epochs=2", "eval.every=1", "eval.max_prompts=2",
               "algorithm.alignprop.truncation=[1,2]", "eval.reward={terms: [{name: shapes}]}")  # fmt: skip
    system = RaySystem(cfg)
    syncs = []
    _checked_syncs(system, syncs)
    try:
        rows = Trainer(cfg, _run_dir(tmp_path, cfg), system, log=lambda *_: None).fit()
    finally:
        system.shutdown()
    epochs = [r for r in rows if not r.get("final_eval")]
    assert [r["reward_queries"] for r in epochs] == [8, 16] and [r["policy_version"] for r in epochs] == [1, 2]
    assert [r["eval_policy_version"] for r in epochs] + [rows[-1]["eval_policy_version"]] == [0, 1, 2]
    assert [v for v, _ in syncs] == [0, 1, 2] and "eval_shapes_full_mean" in rows[-1]
    assert all(r["grad_norm"] > 0 and "approx_kl" not in r for r in epochs)


def _two_learners(cfg, group):
    from learner.actor import LearnerActor

    cls = ray.remote(LearnerActor).options(num_cpus=0.25, max_concurrency=2)
    learners = [cls.remote(cfg) for _ in range(2)]
    ray.get([lr.join_group.remote(2, r, group) for r, lr in enumerate(learners)])
    return learners


def _assert_same(states, single):
    a, b = states
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical across learners
    # and the update of one learner on the whole batch, up to float summation order (SGD, so that weights
    # differ as gradients do; Adam's first steps are sign-like and would hide a wrong gradient's size)
    for k in a:
        torch.testing.assert_close(a[k], single[k], atol=1e-5, rtol=1e-4)  # measured: 1.3e-6 at most
    assert any((single[k] != 0).any() for k in single if "lora_B" in k)  # the update really moved B


def test_two_data_parallel_ddpo_learners_equal_one(ray_session, tiny_cfg):
    from common.rollouts import RolloutGenerator
    from learner.ddpo import DDPOLearner

    cfg = _cfg(tiny_cfg, "cluster.num_learners=2", "algorithm.minibatch_size=2", "algorithm.gradient_accumulation=2",
               "algorithm.optimizer=sgd", "algorithm.learning_rate=1.0")  # fmt: skip
    batch = RolloutGenerator(cfg).generate(["a cat", "a dog"] * 4, list(range(8)))
    batch.rewards = torch.linspace(-1, 1, 8)
    single = DDPOLearner(cfg)
    learners = _two_learners(cfg, "test-ddpo-dp")
    try:
        for epoch in range(2):  # two epochs of two optimizer steps each
            batch.policy_version = epoch  # as if sampled by the current policy (else dropped as stale)
            single.train(batch)
            ms = ray.get([lr.train_got.remote([("0", batch)]) for lr in learners])
            assert ms[0]["trained_samples"] == 8
            _assert_same(ray.get([lr.lora_state.remote() for lr in learners]), single.weights()[1])
        assert ms[0]["policy_version"] == ms[1]["policy_version"] == 2
    finally:
        for lr in learners:
            ray.kill(lr)


def test_two_data_parallel_alignprop_learners_equal_one(ray_session, tiny_cfg):
    from learner.alignprop import AlignPropLearner

    cfg = _cfg(tiny_cfg, "cluster.num_learners=2", "algorithm.name=alignprop", "reward.terms=[{name: shapes_soft}]",
               "prompts.train=shapes_pairs", "algorithm.minibatch_size=2", "algorithm.gradient_accumulation=2",
               "algorithm.alignprop.truncation=[1,3]", "algorithm.optimizer=sgd", "algorithm.learning_rate=1.0")  # fmt: skip
    prompts = ["a red circle above a blue square", "a green triangle below a yellow circle"] * 4
    single = AlignPropLearner(cfg)
    learners = _two_learners(cfg, "test-alignprop-dp")
    try:
        m1 = single.train_prompts(prompts, list(range(8)))
        ms = ray.get([lr.train_prompts.remote(prompts, list(range(8))) for lr in learners])
        _assert_same(ray.get([lr.lora_state.remote() for lr in learners]), single.weights()[1])
        both = torch.cat([m["rewards"] for m in ms])  # each learner scored its own half of the images
        assert both.numel() == 8 and torch.allclose(both.sort().values, m1["rewards"].sort().values, atol=1e-5)
    finally:
        for lr in learners:
            ray.kill(lr)


def test_data_parallel_run_checkpoints_and_resumes(ray_session, tiny_cfg, tmp_path):
    """Two learners through the driver: rollouts shared, weights verified equal after every update, and a
    resumed run restores both."""
    cfg = _cfg(tiny_cfg, "cluster.num_learners=2", "cluster.num_samplers=1", "train.epochs=2", "eval.every=0",
               "algorithm.minibatch_size=2", "algorithm.gradient_accumulation=2", "train.checkpoint_every=1")  # fmt: skip
    system = RaySystem(cfg)
    try:
        rows = Trainer(cfg, _run_dir(tmp_path, cfg), system, log=lambda *_: None).fit()
        assert [r["policy_version"] for r in rows] == [1, 2] and all(r["trained_samples"] == 8 for r in rows)
    finally:
        system.shutdown()
    more = _cfg(cfg, "train.epochs=3")
    system = RaySystem(more)
    try:
        trainer = Trainer(more, RunDir(tmp_path), system, log=lambda *_: None)
        assert trainer.restore()
        assert len(set(ray.get([lr.checksum.remote() for lr in system.learners]))) == 1
        rows = trainer.fit()
        assert [r["policy_version"] for r in rows] == [3]
    finally:
        system.shutdown()


def _gated_learner(gate, perturb: bool):
    """A LearnerActor that does not finish starting until the file `gate` exists (and, with `perturb`, whose
    version 0 differs from the samplers'): defined in a function so that Ray ships the class by value."""
    from learner.actor import LearnerActor

    class Gated(LearnerActor):
        def __init__(self, cfg):
            import time

            while not gate.exists():
                time.sleep(0.05)
            super().__init__(cfg)
            if perturb:
                with torch.no_grad():
                    self.learner.params[0].add_(1e-3)

    return Gated


def test_sampling_starts_before_the_learner_and_its_version_0_is_checked(ray_session, tiny_cfg, tmp_path,
                                                                         monkeypatch):  # fmt: skip
    """A fresh run evaluates and samples with the samplers' version 0 while the learner still loads (on a
    cluster it loads a model of its own); training waits for it, and a learner whose version 0 is not what was
    sampled with stops the run before any update."""
    from learner import driver

    cfg = _cfg(tiny_cfg, "cluster.num_samplers=1", "cluster.num_reward_actors=0", "train.epochs=1", "eval.every=1",
               "eval.max_prompts=2")  # fmt: skip
    gate = tmp_path / "go"
    monkeypatch.setattr(driver, "LearnerActor", _gated_learner(gate, perturb=False))
    system = RaySystem(cfg)  # returns once the sampler is up: the learner is still held at its gate
    try:
        version, checksum = system.sync_weights()
        res = system.evaluate(["a red cube", "a blue ball"], [1, 2])
        assert version == res.policy_version == 0 and len(res.rewards) == 2
        assert not ray.wait(system._learner_start, timeout=0)[0]  # everything above ran without the learner
        gate.touch()
        rows = Trainer(cfg, _run_dir(tmp_path / "run", cfg), system, log=lambda *_: None).fit()
        assert ray.get(system.learner.checksum.remote()) != checksum  # it trained, from what was sampled with
    finally:
        system.shutdown()
    assert rows[0]["eval_policy_version"] == 0 and rows[0]["logprob_mismatch"] < 1e-4 and rows[1]["final_eval"]

    monkeypatch.setattr(driver, "LearnerActor", _gated_learner(gate, perturb=True))
    system = RaySystem(cfg)
    try:
        with pytest.raises(WeightSyncError, match="sampled with version 0 checksum"):
            Trainer(cfg, _run_dir(tmp_path / "bad", cfg), system, log=lambda *_: None).fit()
    finally:
        system.shutdown()
