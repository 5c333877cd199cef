"""bench/stage_changes.py: a second stage's final images paired with the first stage's base scores."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bench.stage_changes import main, stage_changes
from common.config import dump_config, load_config
from common.prompts import load_prompts
from common.shapes.scenes import make_scene
from learner.loop import Z95
from learner.run_dir import RunDir

OVERRIDES = ["prompts.eval=[shapes_pairs]", "eval.max_prompts=3", "eval.images_per_prompt=2"]


def _run(root, name, extra=()):
    d = root / name
    (d / "samples").mkdir(parents=True)
    (d / "config.yaml").write_text(dump_config(load_config("shapes_order", OVERRIDES + list(extra))))
    return d


def test_second_stage_is_paired_with_the_first_base(tmp_path, capsys):
    prompts = [p for p in load_prompts("shapes_pairs")[:3] for _ in range(2)]
    first, second = _run(tmp_path, "first"), _run(tmp_path, "second")
    base = {k: torch.zeros(6) for k in ("reward", "shapes_full", "shapes_relation")}
    base["shapes_full"][:2] = 1.0  # two images already right at the base: change 0 there, +1 on the other four
    save_file(base, str(first / "samples" / "eval_base_shapes_pairs.safetensors"))
    rng = np.random.default_rng(0)
    images = torch.stack([torch.from_numpy(make_scene(p, rng).image).permute(2, 0, 1) for p in prompts])
    RunDir(second).save_eval_images("epoch_0024_final", images, prompts)  # as the loop keeps them

    rows = stage_changes(first, second)["shapes_pairs"]
    assert rows["shapes_full"]["final"] == 1.0 and rows["shapes_full"]["base"] == pytest.approx(2 / 6)
    d = torch.tensor([0.0, 0, 1, 1, 1, 1], dtype=torch.float64)
    assert rows["shapes_full"]["diff"] == pytest.approx(4 / 6)
    assert rows["shapes_full"]["ci95"] == pytest.approx(Z95 * float(d.std()) / 6**0.5)
    assert rows["shapes_relation"]["diff"] == 1.0 and rows["shapes_relation"]["n"] == 6
    assert "shapes_colours" not in rows  # only what the first run's base file holds
    main([str(first), str(second)])
    assert "shapes_pairs shapes_full: 0.333 -> 1.000, change +0.667" in capsys.readouterr().out


def test_runs_with_other_evaluation_noise_are_refused(tmp_path):
    first, second = _run(tmp_path, "first"), _run(tmp_path, "second", ["eval.seed=7"])
    with pytest.raises(SystemExit, match="eval.seed is 7"):
        stage_changes(first, second)


def test_another_evaluation_reward_is_refused_but_not_another_batch_size(tmp_path):
    first = _run(tmp_path, "first", ["eval.reward.batch_size=64"])
    second = _run(tmp_path, "second", ['eval.reward.terms=[{"name":"shapes_soft"}]'])
    with pytest.raises(SystemExit, match="the evaluation reward .* is "):
        stage_changes(first, second)
    with pytest.raises(SystemExit, match="missing .*eval_base_shapes_pairs"):  # same reward: gets to the files
        stage_changes(first, _run(tmp_path, "third"))


def test_pairs_of_seeds_are_summarised_over_pairs(tmp_path, capsys, monkeypatch):
    """Each seed has its own first stage; --pair gives each pair's change and the t-interval over pairs."""
    prompts = [p for p in load_prompts("shapes_pairs")[:3] for _ in range(2)]
    rng = np.random.default_rng(0)
    images = torch.stack([torch.from_numpy(make_scene(p, rng).image).permute(2, 0, 1) for p in prompts])
    args, diffs = [], []
    for seed, right_at_base in enumerate((2, 3, 4)):
        first, second = _run(tmp_path, f"first-s{seed}"), _run(tmp_path, f"second-s{seed}")
        base = {k: torch.zeros(6) for k in ("reward", "shapes_full", "shapes")}
        base["shapes_shapes"] = torch.ones(6)  # objects already right at the base: change 0; the term total `shapes` +1
        base["shapes_full"][:right_at_base] = 1.0
        save_file(base, str(first / "samples" / "eval_base_shapes_pairs.safetensors"))
        RunDir(second).save_eval_images("epoch_0024_final", images, prompts)
        row = {"eval_reward_queries": 6720, "eval_shapes_pairs_shapes_full_change_mean": -0.1 * seed,
               "eval_shapes_pairs_shapes_full_change_ci95": 0.05}  # the first stage's own last paired change
        (first / "metrics.jsonl").write_text(json.dumps(row) + "\n")
        args += ["--pair", str(first), str(second)]
        diffs.append(1 - right_at_base / 6)
    drawn = {}
    monkeypatch.setattr("bench.run_changes.plot", lambda groups, cols, path: drawn.update(groups=groups, cols=cols))
    main(args + ["--plot", str(tmp_path / "stages.png")])
    out = capsys.readouterr().out
    assert drawn["cols"] == ["full", "shapes"]  # the default columns these runs have
    assert drawn["groups"]["first stage"]["full"] == [0.0, -0.1, -0.2]
    assert drawn["groups"]["both stages"]["full"] == pytest.approx(diffs)
    # 'shapes' is the objects drawn right (shapes_shapes), not the reward term named `shapes` (every scene is right)
    assert drawn["groups"]["both stages"]["shapes"] == [0.0, 0.0, 0.0]
    mean = sum(diffs) / 3
    half = 4.303 * float(torch.tensor(diffs, dtype=torch.float64).std()) / 3**0.5  # t(0.975, 2)
    assert "over the 3 pairs" in out
    assert f"shapes_pairs shapes_full: {mean:+.3f} +- {half:.3f}; per pair" in out
    d = torch.tensor([0.0] * 4 + [1.0] * 2, dtype=torch.float64)  # seed 2's paired differences
    assert f"{(2 / 6) / (float(d.std()) / 6**0.5):+.1f} SE" in out  # its change in its own standard errors
    with pytest.raises(SystemExit):
        main([str(tmp_path / "first-s0")])  # a first stage alone names no pair


def test_arms_compare_seed_by_seed_on_the_same_images(tmp_path, capsys):
    """--arm per arm, --versus: each seed's change in arm b minus arm a, image by image, and over seeds."""
    prompts = [p for p in load_prompts("shapes_pairs")[:3] for _ in range(2)]
    rng = np.random.default_rng(0)
    images = torch.stack([torch.from_numpy(make_scene(p, rng).image).permute(2, 0, 1) for p in prompts])
    base = {"reward": torch.zeros(6), "shapes_full": torch.tensor([1.0, 1, 0, 0, 0, 0])}
    for arm in ("a", "b"):
        for seed in (0, 1):
            first, second = _run(tmp_path / arm, f"first-s{seed}"), _run(tmp_path / arm, f"second-s{seed}")
            save_file(base, str(first / "samples" / "eval_base_shapes_pairs.safetensors"))
            final = images.clone()
            if arm == "b":
                final[: seed + 1] = 0  # seed s of arm b draws nothing in its first s + 1 images
            RunDir(second).save_eval_images("epoch_0024_final", final, prompts)
    spec = [f"--arm={arm}={tmp_path / arm}/first-s?,{tmp_path / arm}/second-s?" for arm in ("a", "b")]
    res = main(spec + ["--versus", "a"])
    out = capsys.readouterr().out
    assert list(res) == ["b"] and res["b"]["seeds"] == [0, 1]
    for seed in (0, 1):
        row = res["b"]["per_seed"][seed]["shapes_pairs"]["shapes_full"]
        d = torch.tensor([-1.0] * (seed + 1) + [0.0] * (5 - seed), dtype=torch.float64)
        assert row["diff"] == pytest.approx(float(d.mean())) and row["n"] == 6
        assert row["ci95"] == pytest.approx(Z95 * float(d.std()) / 6**0.5)
    over = res["b"]["over_seeds"]["shapes_pairs"]["shapes_full"]
    assert over["mean"] == pytest.approx(-(1 + 2) / 12) and over["n"] == 2
    assert "arm a, seeds [0, 1]" in out and "b - a, same seed, same images" in out
    with pytest.raises(SystemExit):
        main(spec + ["--versus", "c"])
    assert "no such arm; the arms are a, b" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no seed has both"):
        main([f"--arm=c={tmp_path}/a/first-s?,{tmp_path}/none-s?"])
