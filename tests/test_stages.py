"""learner/stages.py: a run's `stages` train one after another, each from the previous stage's policy fused into
its model, with every evaluation paired with the original base model's."""

import json
import shutil

import pytest
import torch

from common.config import ConfigError, load_config
from learner.main import main, run
from learner.run_dir import RunDir
from learner.stages import stage_configs

SMALL = ["sampling.num_steps=6", "train.samples_per_epoch=8", "algorithm.minibatch_size=4",
         "algorithm.gradient_accumulation=2", "eval.every=2", "eval.images_per_prompt=1", "eval.max_prompts=4",
         "train.checkpoint_every=2", "output.grid_every=0", "output.tensorboard=false"]  # fmt: skip
STAGE = {"sampling.num_steps": 6, "train.samples_per_epoch": 8, "algorithm.minibatch_size": 4,
         "algorithm.gradient_accumulation": 2, "train.epochs": 2, "eval.every": 2, "eval.images_per_prompt": 1,
         "eval.max_prompts": 4, "algorithm.learning_rate": 0.003}  # fmt: skip


def _cfg(stages, extra=()):
    return load_config("tiny", SMALL + ["train.epochs=2", "cluster.backend=local", "train.seed=3",
                                        f"stages={json.dumps(stages)}", *extra])  # fmt: skip


def test_a_stage_takes_its_preset_and_the_runs_seed_cluster_and_output(tmp_path):
    cfg = _cfg([{"config": "tiny", "set": {**STAGE, "train.seed": 9, "cluster.backend": "ray"}}],
               ["cluster.local_torch_threads=1"])  # fmt: skip
    (stage,) = stage_configs(cfg, tmp_path / "run")
    assert stage.model.pretrained == str(tmp_path / "run" / "stage2-model")
    assert stage.train.seed == 3 and stage.cluster == cfg.cluster and stage.cluster.local_torch_threads == 1
    assert stage.output.dir == str(tmp_path / "run" / "stage2") and stage.output.tensorboard is False
    assert stage.algorithm.learning_rate == 0.003 and stage.train.epochs == 2
    assert stage.eval.at_start is False  # the run's final evaluation measured the policy it starts from
    assert stage.stages == []


@pytest.mark.parametrize(
    "stage, expected",
    [
        ({"config": "tiny", "set": {**STAGE, "sampling.num_steps": 20}},
         r"stages\[0\] \(tiny\): sampling.num_steps is 20, not 6; every stage evaluates on the run's images"),
        ({"config": "tiny", "set": {**STAGE, "eval.seed": 1}}, r"stages\[0\] \(tiny\): eval.seed is 1, not 12345"),
        ({"config": "tiny", "set": {**STAGE, "train.epochs": 0}},
         r"stages\[0\] \(tiny\): config field train.epochs: Input should be greater"),
        ({"config": "no_such_preset"}, r"stages\[0\] \(no_such_preset\): config 'no_such_preset': no such preset"),
        ({"config": "tiny", "set": {**STAGE, "stages": [{"config": "tiny"}]}},
         r"stages\[0\] \(tiny\): a stage cannot have stages of its own"),
    ],
)  # fmt: skip
def test_a_bad_stage_is_refused_before_anything_trains(tmp_path, stage, expected):
    with pytest.raises(ConfigError, match=expected):
        run(_cfg([stage]), tmp_path / "run", resume=False, log=lambda *_: None)
    assert not (tmp_path / "run").exists()


def test_two_stages_pair_every_evaluation_with_the_original_base_and_resume(tmp_path):
    logs = []
    cfg = _cfg([{"config": "tiny", "set": STAGE}])
    rows = run(cfg, tmp_path / "run", resume=False, log=logs.append)
    first, second = RunDir(tmp_path / "run"), RunDir(tmp_path / "run" / "stage2")
    merged = json.loads((tmp_path / "run" / "stage2-model" / "merged_from.json").read_text())
    assert merged["checkpoint"] == "step_2" and merged["max_relative_difference"] < 1e-4
    base = next(r for r in first.read_metrics() if r["epoch"] == 0)
    end1 = next(r for r in first.read_metrics() if r.get("final_eval"))
    end2 = next(r for r in second.read_metrics() if r.get("final_eval"))
    assert [r.get("stage") for r in rows if r.get("final_eval")] == [None, 2]
    # stage 2 skipped its first evaluation (stage 1's final one measured that policy) ...
    assert not any("eval_reward_mean" in r for r in second.read_metrics() if not r.get("final_eval"))
    # ... and its changes are from the original model, image by image: on the same images the paired mean
    # difference is the difference of the means
    for end in (end1, end2):
        diff = end["eval_reward_mean"] - base["eval_reward_mean"]
        assert end["eval_reward_change_mean"] == pytest.approx(diff, abs=1e-5)
    s1 = first.load_eval_base("tiny_animals", 4)
    s2 = second.load_eval_base("tiny_animals", 4)
    assert torch.equal(s1["reward"], s2["reward"])
    assert end2["eval_reward_mean"] != end1["eval_reward_mean"]  # stage 2 trained
    assert any("after 2 stages: evaluation reward" in line for line in logs)
    assert (tmp_path / "run" / "stages.png").is_file()  # the changes over both stages' queries

    # resuming the finished run trains nothing; with stage 2's directory gone, it runs stage 2 again from the
    # fused model that exists (not merged twice) and ends where it ended
    logs.clear()
    before = (first.read_metrics(), second.read_metrics())
    assert main(["--resume", str(tmp_path / "run")]) == 0
    assert (first.read_metrics(), second.read_metrics()) == before
    shutil.rmtree(tmp_path / "run" / "stage2")
    rows = run(cfg, tmp_path / "run", resume=True, log=logs.append)
    assert not any("fused into" in line for line in logs) and any("going on to its stages" in line for line in logs)
    again = next(r for r in RunDir(tmp_path / "run" / "stage2").read_metrics() if r.get("final_eval"))
    assert again["eval_reward_mean"] == pytest.approx(end2["eval_reward_mean"], abs=1e-6)

    # more epochs for a first stage whose stage 2 exists are refused (they were taken as "finished" and
    # nothing trained); so is a stage's LoRA changed on resume (a tensor-size error, after its config.yaml
    # was rewritten). Nothing is written either way.
    before = (first.read_metrics(), second.read_metrics(), (second.path / "config.yaml").read_text())
    with pytest.raises(ConfigError, match=r"stage 1 \(.*run\) has not finished its 3 epochs, but .*stage2 was made "
                                          r"from its earlier policy; resume without extending stage 1"):  # fmt: skip
        run(_cfg([{"config": "tiny", "set": STAGE}], ["train.epochs=3"]), tmp_path / "run", resume=True,
            log=lambda *_: None)  # fmt: skip
    with pytest.raises(ConfigError, match=r"--resume .*stage2: lora.rank is 16 in that run, not 8"):
        run(_cfg([{"config": "tiny", "set": {**STAGE, "lora.rank": 8}}]), tmp_path / "run", resume=True,
            log=lambda *_: None)  # fmt: skip
    assert (first.read_metrics(), second.read_metrics(), (second.path / "config.yaml").read_text()) == before


def test_a_first_stage_without_its_final_evaluation(tmp_path):
    """eval.final=false: stage 1 evaluates only the base, stage 2 only at its end, still paired with the base."""
    from learner.stages import is_complete

    cfg = _cfg([{"config": "tiny", "set": STAGE}], ["eval.final=false"])
    run(cfg, tmp_path / "run", resume=False, log=lambda *_: None)
    first, second = RunDir(tmp_path / "run"), RunDir(tmp_path / "run" / "stage2")
    assert [r["epoch"] for r in first.read_metrics() if "eval_reward_mean" in r] == [0]
    assert is_complete(tmp_path / "run", cfg)
    (end,) = [r for r in second.read_metrics() if "eval_reward_mean" in r]
    base = next(r for r in first.read_metrics() if "eval_reward_mean" in r)
    assert end["final_eval"]
    diff = end["eval_reward_mean"] - base["eval_reward_mean"]
    assert end["eval_reward_change_mean"] == pytest.approx(diff, abs=1e-5)


def test_stages_on_ray_are_the_local_backends_computation(ray_session, tmp_path, monkeypatch):
    """The Ray backend runs stages through the same path: with one sampler and one thread everywhere (the same
    kernels on the same batches), both stages end with the local backend's weights and evaluations; stage 2's
    queues are named after its run (<run>-stage2), not shared by every run's stage 2."""
    import learner.main

    run_ids, make_system = [], learner.main.make_system
    monkeypatch.setattr(learner.main, "make_system", lambda cfg, run_id=None: run_ids.append(run_id)
                        or make_system(cfg, run_id))  # fmt: skip
    one = {"train.epochs": 1, "eval.every": 1, "train.checkpoint_every": 1}
    sets = ["train.epochs=1", "eval.every=1", "train.checkpoint_every=1", "cluster.num_samplers=1",
            "cluster.local_torch_threads=1", "cluster.sampler.torch_threads=1", "cluster.learner.torch_threads=1",
            "cluster.num_reward_actors=0", "cluster.local_dashboard=false"]  # fmt: skip
    stages = [{"config": "tiny", "set": {**STAGE, **one}}]
    ends = {}
    for backend in ("local", "ray"):
        cfg = _cfg(stages, [*sets, f"cluster.backend={backend}"])
        rows = run(cfg, tmp_path / backend, resume=False, log=lambda *_: None)
        ends[backend] = [r for r in rows if r.get("final_eval")]
        assert [r.get("stage") for r in ends[backend]] == [None, 2]
    for a, b in zip(ends["local"], ends["ray"], strict=True):
        assert b["eval_reward_mean"] == pytest.approx(a["eval_reward_mean"], abs=1e-6)
        assert b["eval_reward_change_mean"] == pytest.approx(a["eval_reward_change_mean"], abs=1e-6)
    lora = {}
    for backend in ("local", "ray"):
        stage2 = RunDir(tmp_path / backend / "stage2")
        lora[backend], _, counters = stage2.load_checkpoint(stage2.latest_checkpoint())
        assert counters["reward_queries"] == 8
    for k in lora["local"]:
        torch.testing.assert_close(lora["ray"][k], lora["local"][k], atol=1e-6, rtol=1e-5)
    assert [r.rsplit("-", 1)[0] for r in run_ids] == ["local", "local-stage2", "ray", "ray-stage2"]  # + path hash
