"""bench/paired_eval.py --diversity: each prompt's diversity for the base and a fine-tuned run on the same noise,
the same measure as the runs' kept final images give (bench/study.py's image_diversity)."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from bench.paired_eval import DIVERSITY, paired_diversity, paired_eval, prompt_diversities
from bench.study import image_diversity
from common.config import load_config
from learner.local import LocalSystem
from learner.loop import Trainer
from learner.run_dir import RunDir


def test_paired_diversity_is_over_the_prompts_both_define():
    base = {k: torch.tensor([1.0, 2.0, float("nan"), 4.0], dtype=torch.float64) for k in DIVERSITY}
    tuned = {k: torch.tensor([2.0, 2.0, 5.0, float("nan")], dtype=torch.float64) for k in DIVERSITY}
    row = paired_diversity(base, tuned)["position_spread"]
    assert row["n"] == 2 and row["base"] == 1.5 and row["tuned"] == 2.0 and row["diff"] == 0.5
    assert row["ci95"] == pytest.approx(1.96 * math.sqrt(0.5) / math.sqrt(2))  # diffs 1 and 0


def test_a_run_and_its_base_measured_afresh_match_their_kept_images(tmp_path):
    cfg = load_config("shapes_order_ddpo", [
        "cluster.backend=local", "cluster.local_torch_threads=2", "train.epochs=1",
        "train.samples_per_epoch=8", "train.prompts_per_epoch=2", "algorithm.gradient_accumulation=1",
        "algorithm.minibatch_size=8", "algorithm.stat_tracking.min_count=4", "algorithm.learning_rate=0.05",
        "train.checkpoint_every=1", "eval.every=1", "eval.max_prompts=3", "eval.images_per_prompt=3",
        "prompts.eval=[shapes_pairs]", "output.grid_every=0"])  # fmt: skip
    run = RunDir(tmp_path / "run")
    run.create(cfg)
    Trainer(cfg, run, LocalSystem(cfg), log=lambda *_: None).fit()

    kw = {"images": 3, "max_prompts": 3, "diversity": True, "base_cache": tmp_path / "cache", "log": lambda *_: None}
    (judged,) = paired_eval([run.path], **kw)
    rows = judged["diversity"]["shapes_pairs"]
    (final,) = run.samples_dir.glob("epoch_*_final*.safetensors")
    kept = {"base": prompt_diversities(*RunDir.load_eval_images(run.samples_dir /
                                                                "eval_base_shapes_pairs.images.safetensors")),
            "tuned": prompt_diversities(*RunDir.load_eval_images(final))}  # fmt: skip
    for k in DIVERSITY:
        for end in ("base", "tuned"):
            # the same images up to the uint8 rounding of a policy that generated in other batches
            got, want = torch.tensor(rows[k][f"per_prompt_{end}"], dtype=torch.float64), kept[end][k]
            assert got.shape == (3,) and got.isnan().equal(want.isnan()), (k, end, got, want)
            assert torch.allclose(got.nan_to_num(), want.nan_to_num(), rtol=0.02, atol=1e-3), (k, end, got, want)
        ok = ~(kept["base"][k].isnan() | kept["tuned"][k].isnan())
        assert rows[k]["n"] == int(ok.sum())  # paired over the prompts defined at both ends
        assert rows[k]["diff"] == pytest.approx(float((kept["tuned"][k] - kept["base"][k])[ok].mean()), abs=0.02)
    assert rows["pixel_distance"]["n"] == 3 and rows["pixel_distance"]["diff"] != 0  # lr 0.05: the policy moved
    # the base's per-prompt diversity is cached beside its scores and read back unchanged
    assert len(list((tmp_path / "cache").glob("base-*.diversity.safetensors"))) == 1
    (again,) = paired_eval([run.path], **kw)
    assert json.dumps(again["diversity"]) == json.dumps(judged["diversity"])  # as text: nan != nan


def test_diversity_needs_two_images_a_prompt():
    with pytest.raises(SystemExit, match="at least 2 images"):
        prompt_diversities(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), ["a red circle", "a blue square"])


def test_prompt_diversities_average_to_image_diversity(tmp_path):
    import numpy as np

    from common.prompts import load_prompts
    from common.shapes.scenes import make_scene

    rng = np.random.default_rng(0)
    prompts = [p for p in load_prompts("shapes_pairs")[:3] for _ in range(4)]
    images = torch.from_numpy(np.stack([make_scene(p, rng).image for p in prompts])).permute(0, 3, 1, 2).contiguous()
    f = tmp_path / "x.safetensors"
    save_file({"images": images}, str(f), metadata={"prompts": json.dumps(prompts)})
    per = prompt_diversities(images, prompts)
    whole = image_diversity(f)
    for k in DIVERSITY:
        assert per[k].shape == (3,) and float(per[k].nanmean()) == pytest.approx(whole[k])
    assert whole["position_spread"] > 1  # ground-truth scenes place objects at random: the spread is not nothing
