"""The run directory's files under crashes: a torn metrics row, a rewrite cut short, checkpoints on disk."""

import json
import os
import stat

import pytest
import torch

from learner.run_dir import CheckpointError, RunDir


def test_a_torn_last_metrics_row_is_left_out_and_the_resume_rewrite_drops_it(tmp_path):
    """A crash (or a full disk) while a row is appended leaves half a line: the run must still resume (it
    stopped with a JSON error), and the rewrite on resume leaves only whole rows."""
    rd = RunDir(tmp_path)
    rows = [{"epoch": 0, "eval_reward_mean": 0.1}, {"epoch": 1, "reward_mean": 0.2}, {"epoch": 2, "reward_mean": 0.3}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    rd.metrics_path.write_text(text + json.dumps({"epoch": 3, "reward_mean": 0.4})[:17])
    assert rd.read_metrics() == rows
    rd.truncate_metrics(2)
    assert rd.metrics_path.read_text() == "".join(json.dumps(r) + "\n" for r in rows[:2])
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left beside it
    rd.metrics_path.write_text(text.replace('"epoch": 1', '"epoch" 1'))  # damage inside the file is not a crash
    with pytest.raises(CheckpointError, match=r"metrics.jsonl, line 2: not a JSON row .*remove or repair"):
        rd.read_metrics()


def test_checkpoints_follow_the_umask_and_a_resume_clears_cut_off_ones(tmp_path, tiny_cfg):
    rd = RunDir(tmp_path / "run")
    rd.create(tiny_cfg)
    old = os.umask(0o022)
    try:
        step = rd.save_checkpoint(1, {"lora_files": {"a.safetensors": b"x"}, "lora": {"w": torch.zeros(2)},
                                      "learner": {"version": 1}}, {"reward_queries": 8})  # fmt: skip
    finally:
        os.umask(old)
    assert stat.S_IMODE(step.stat().st_mode) == 0o755  # mkdtemp's folder was private (0700)
    assert {stat.S_IMODE(f.stat().st_mode) for f in step.iterdir()} == {0o644}
    cut = rd.ckpt_dir / ".tmp-step_2-abc"  # a crash before the rename
    cut.mkdir()
    (cut / "lora_state.safetensors").write_bytes(b"")
    rd.create(tiny_cfg, resume=True)
    assert [p.name for p in rd.ckpt_dir.iterdir()] == ["step_1"] and rd.latest_checkpoint() == step
