"""Evaluation grids carry each row's prompt and each image's reward."""

import numpy as np
import torch
from PIL import Image

from learner.run_dir import RunDir


def test_grid_labels_rows_with_prompts_and_images_with_scores(tmp_path):
    run = RunDir(tmp_path)
    run.samples_dir.mkdir(parents=True)
    images = torch.full((4, 3, 64, 64), 128, dtype=torch.uint8)  # flat grey: any dark pixel is text
    plain = np.asarray(Image.open(run.save_grid(images, "plain", nrow=2)))
    labelled = np.asarray(Image.open(run.save_grid(images, "lab", nrow=2, labels=["a red circle", "a dog"],
                                                   scores=[0.25, 1.0, -3.5, 0.75])))  # fmt: skip
    offset = labelled.shape[1] - plain.shape[1]
    assert offset > 6 * len("a red circle")  # a caption column on the left
    for r in range(2):  # each row's caption has text
        band = labelled[r * 65 : (r + 1) * 65, :offset]
        assert (band < 100).any(), r
    tiles = labelled[:, offset:]
    for i in range(4):  # each image: a score box in its lower left corner, the rest of the tile untouched
        y, x = (i // 2) * 65, (i % 2) * 65 + 1
        corner = tiles[y + 53 : y + 64, x : x + 20]
        assert (corner < 100).any() and (corner == 255).any(), i
        assert (tiles[y + 5 : y + 40, x + 5 : x + 60] == 128).all(), i
    assert (plain[1:64, 1:64] == 128).all()


def test_reward_curve_names_the_rewards_and_exploration(tmp_path):
    import yaml

    run = RunDir(tmp_path)
    assert run._curve_labels() == ("training rollouts", "")  # no config.yaml: plain labels
    cfg = {"reward": {"terms": [{"name": "shapes_soft"}]}, "exploration": {"enabled": False},
           "eval": {"reward": {"terms": [{"name": "shapes"}]}}}  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert run._curve_labels() == ("training rollouts (shapes_soft)", "shapes, ")
    cfg["exploration"]["enabled"], cfg["eval"]["reward"] = True, None
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert run._curve_labels() == ("training rollouts (shapes_soft, with exploration)", "")
