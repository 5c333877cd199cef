"""bench/two_stage.py: stage 1, its LoRA fused, stage 2 from the fused model, and the paired total per seed."""

import json

import pytest

from bench.two_stage import main, stage_dirs
from common.config import load_config
from learner.run_dir import RunDir

TINY = ["sampling.num_steps=4", "train.samples_per_epoch=8", "algorithm.minibatch_size=4",
        "algorithm.gradient_accumulation=1", "train.epochs=1", "train.checkpoint_every=1", "eval.every=1",
        "eval.max_prompts=2", "eval.images_per_prompt=2", "exploration.enabled=false",
        "cluster.num_reward_actors=0"]  # fmt: skip


def test_two_stages_per_seed_and_their_total_over_the_base(tmp_path, capsys):
    out = tmp_path / "study"
    argv = ["--out", str(out), "--first", "tiny", "--second", "tiny", "--seeds", "3", "--threads", "1",
            "--first-set", "algorithm.learning_rate=0.05"]  # fmt: skip
    for o in TINY:
        argv += ["--set", o]
    summary = main(argv)

    seed = 3  # one seed: each stage is a process start (~12 s); the over-seeds summary is stage_changes'
    first, merged, second = stage_dirs(out, seed)
    assert json.loads((merged / "merged_from.json").read_text())["run"] == str(first)
    c2 = load_config(str(second / "config.yaml"))
    assert c2.model.pretrained == str(merged.resolve()) and c2.train.seed == seed
    assert load_config(str(first / "config.yaml")).algorithm.learning_rate == 0.05  # --first-set: stage 1 only
    assert c2.algorithm.learning_rate == load_config("tiny").algorithm.learning_rate
    # the fused model's base evaluation is stage 1's final evaluation: same prompts, same noise, same policy
    (final1,) = RunDir(first).samples_dir.glob("epoch_*_final.safetensors")  # one evaluation set: no suffix
    a, pa = RunDir.load_eval_images(final1)
    b, pb = RunDir.load_eval_images(RunDir(second).samples_dir / "eval_base_tiny_animals.images.safetensors")
    assert pa == pb and len(pa) == 4
    assert int((a.int() - b.int()).abs().max()) <= 2  # uint8 images of a model fused to ~1e-6

    rows = summary["per_seed"]["3"]["tiny_animals"]
    assert rows["reward"]["n"] == 4
    assert "over_seeds" not in summary  # one seed: nothing to summarise over (tests/test_stage_changes.py has that)
    assert "seed 3 tiny_animals reward:" in capsys.readouterr().out

    # bench/paired_eval.py --base-model judges stage 2 against the original base afresh: its base is stage 1's
    # base evaluation and its fine-tuned policy stage 2's final one (both scored from float images; stage_changes
    # scores the kept uint8 images, so its total differs by the rounding)
    from bench.paired_eval import paired_eval

    (judged,) = paired_eval([second], images=2, max_prompts=2, base_model=load_config(str(first / "config.yaml"))
                            .model.pretrained, log=lambda *_: None)  # fmt: skip
    got = judged["sets"]["tiny_animals"]["reward"]
    base_row = RunDir(first).read_metrics()[0]
    final_row = RunDir(second).read_metrics()[-1]
    assert final_row.get("final_eval")
    assert abs(got["base"] - base_row["eval_reward_mean"]) < 1e-4
    # the fine-tuned policy generates in other batches than the run's samplers did, which moves the rounding to
    # uint8 and so the JPEG sizes by ~0.1% after stage 1's large steps (lr 0.05)
    assert abs(got["tuned"] - final_row["eval_reward_mean"]) < 5e-3  # one set: no set name in the keys
    assert abs(got["diff"] - rows["reward"]["diff"]) < 5e-3

    # bench/before_after.py --base-model: the left half comes from the original base, not the fused first stage
    from bench.before_after import main as before_after

    grid = ["--prompts", "2", "--images", "2", "--threads", "1"]
    original = load_config(str(first / "config.yaml")).model.pretrained
    one = before_after([str(first), *grid, "--out", str(tmp_path / "one.png")])  # stage 1 against the base
    fused = before_after([str(second), *grid, "--out", str(tmp_path / "fused.png")])  # stage 2 against stage 1
    both = before_after([str(second), *grid, "--base-model", original, "--out", str(tmp_path / "both.png")])
    assert both["base_model"] == original and fused["base_model"] == str(merged.resolve())
    assert one["prompts"] == both["prompts"] == fused["prompts"]
    assert (both["base"] - one["base"]).abs().max() < 1e-6  # the same base, prompts and noise
    assert (fused["base"] - one["tuned"]).abs().max() < 5e-3  # the fused model is stage 1's policy
    assert (both["tuned"] - fused["tuned"]).abs().max() < 1e-6  # the right half does not depend on --base-model
    assert (both["base"] - fused["base"]).abs().max() > 1e-3  # stage 1 (lr 0.05) moved the left half
    assert (tmp_path / "both.png").stat().st_size > 0

    mtimes = {p: p.stat().st_mtime for p in out.glob("*/config.yaml")}
    again = main(argv)  # everything is done: nothing runs again, the summary is the same
    assert {p: p.stat().st_mtime for p in out.glob("*/config.yaml")} == mtimes
    assert again["per_seed"] == json.loads(json.dumps(summary["per_seed"]))
    assert json.loads((out / "summary.json").read_text())["per_seed"] == json.loads(json.dumps(summary["per_seed"]))


def test_stage_two_model_is_not_overridable(tmp_path):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--second-set", "model.pretrained=tiny"])
    assert not any(tmp_path.iterdir())


def test_seeds_launched_side_by_side_summarise_together(tmp_path):
    """One `--seeds S` process per seed (the way 3 seeds share 2 cores): whichever finishes last finds the
    others' done pairs with the same settings; a seed with other settings, or a stage not done, is left out."""
    from bench.two_stage import seeds_of_the_same_arm
    from common.config import dump_config

    def fake_run(path, overrides, done=True):
        path.mkdir(parents=True)
        (path / "config.yaml").write_text(dump_config(load_config("tiny", overrides)))
        rows = [{"epoch": 1}] + ([{"epoch": 1, "final_eval": True}] if done else [])
        (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    arm = ["algorithm.learning_rate=0.05"]
    for seed, first_set, threads, second_done in [(0, arm, 1, True), (1, arm, 1, False), (2, [], 1, True),
                                                  (3, arm, 2, True), (4, arm, 1, True)]:  # fmt: skip
        first, merged, second = stage_dirs(tmp_path, seed)
        common = [f"train.seed={seed}", f"cluster.local_torch_threads={threads}"]
        fake_run(first, first_set + common + [f"output.dir={first}"])
        fake_run(second, common + [f"model.pretrained={merged}", f"output.dir={second}"], done=second_done)
    # seed 1: stage 2 unfinished; seed 2: stage 1 at another learning rate (another arm); seed 3: other threads only
    assert seeds_of_the_same_arm(tmp_path, 0) == [0, 3, 4]
    assert seeds_of_the_same_arm(tmp_path, 2) == [2]
