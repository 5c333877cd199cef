"""The Shapes base trainer continued from the shipped model, with and without the auxiliary relation loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.pipelines import BUILTIN_DIRS
from common.shapes import train_base
from common.shapes.train_base import main, relation_aux_loss, relation_targets

LEFT = "a red circle to the left of a blue square"
RIGHT = "a red circle to the right of a blue square"


def _left_right_gap(path: Path) -> float:
    """Distance between the mean text states of LEFT and RIGHT, relative to the states' norm."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path), torch_dtype=torch.float32)
    ids = pipe.tokenizer([LEFT, RIGHT], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        s = pipe.text_encoder(ids)[0].mean(dim=1)
    return float((s[0] - s[1]).norm() / s.norm(dim=-1).mean())


def test_relation_targets_name_the_relation_and_skip_single_objects() -> None:
    got = relation_targets([LEFT, RIGHT, "a green triangle below a red square", "a red circle", ""])
    assert got.tolist() == [0, 1, 3, -1, -1]


@pytest.fixture(scope="module")
def continued(tmp_path_factory) -> dict[str, Path]:
    out = {}
    # 50 steps each: "plain" by --unet-steps, "aux" by a zero time budget (the floor of 50 steps after timing),
    # so that the timing path, which trains and then resets the weights, runs with the auxiliary head too.
    for name, aux, length in (("plain", "0", ["--unet-steps", "50"]), ("aux", "1.0", ["--minutes", "0"])):
        d = tmp_path_factory.mktemp(name)
        main(["--out", str(d / "out"), "--work", str(d / "work"), "--init-from", str(BUILTIN_DIRS["shapes-base"]),
              "--n-images", "256", "--pair-fraction", "1.0", *length, "--batch", "8", "--lr", "1e-3",
              "--warmup", "5", "--ema", "0.0", "--aux-relation", aux, "--threads", "2", "--fp32"])  # fmt: skip
        out[name] = d / "out"
    return out


def test_aux_relation_loss_pulls_left_and_right_apart_in_the_text_encoder(continued) -> None:
    base = _left_right_gap(BUILTIN_DIRS["shapes-base"])
    plain, aux = _left_right_gap(continued["plain"]), _left_right_gap(continued["aux"])
    # The shipped encoder has merged the two words (session 24: 0.39 of a state norm of 10.9). Fifty steps of
    # the epsilon loss alone leave them merged; the auxiliary loss separates them several-fold.
    assert base < 0.1 and plain < 2 * base + 0.02
    assert aux > 3 * max(base, plain), (base, plain, aux)


def test_continued_model_keeps_the_vae_scaling_and_records_its_origin(continued) -> None:
    cfg = json.loads((continued["aux"] / "train_config.json").read_text())
    shipped = json.loads((BUILTIN_DIRS["shapes-base"] / "vae" / "config.json").read_text())["scaling_factor"]
    saved = json.loads((continued["aux"] / "vae" / "config.json").read_text())["scaling_factor"]
    assert saved == pytest.approx(shipped) and cfg["scaling_factor"] == pytest.approx(shipped)
    assert cfg["aux_relation"] == 1.0 and cfg["unet_steps"] == 50 and cfg["init_config"]["seed"] == 0
    assert not any("head" in p.name for p in continued["aux"].rglob("*"))


def test_relation_aux_loss_skips_rows_without_a_relation_and_reports_accuracy() -> None:
    head = torch.nn.Linear(4, 3)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3, 4) * 10), head.bias.zero_()
    states = torch.zeros(3, 2, 4)
    states[0, :, 0], states[1, :, 1], states[2, :, 2] = 1.0, 1.0, 1.0  # rows name relations 0, 1, 2
    assert relation_aux_loss(head, states, torch.tensor([-1, -1, -1])) is None
    loss, acc = relation_aux_loss(head, states, torch.tensor([0, 2, -1]))  # row 1 wrong, row 2 skipped
    assert acc == 0.5
    expected = torch.nn.functional.cross_entropy(head(states[:2].mean(1)), torch.tensor([0, 2]))
    assert float(loss) == pytest.approx(float(expected))


def test_init_from_a_directory_without_a_pipeline_names_the_flag(tmp_path, monkeypatch) -> None:
    def no_data(*a, **k):
        raise AssertionError("--init-from must be checked before the data are generated")

    monkeypatch.setattr(train_base, "generate_scenes", no_data)
    with pytest.raises(SystemExit, match="--init-from"):
        main(["--out", str(tmp_path / "o"), "--work", str(tmp_path / "w"), "--init-from", str(tmp_path),
              "--n-images", "8", "--unet-steps", "1"])  # fmt: skip
