"""The study's arithmetic: curves averaged over seeds with Student-t CIs, queries to reach a target, the
shared base evaluation."""

import json
import math

import pytest

from bench.runs import seed_mean_ci
from bench.study import analyse, reach


def _write(path, points):
    path.mkdir(parents=True)
    rows = [{"epoch": i, "reward_queries": q, "eval_reward_queries": q, "eval_shapes_full_mean": y,
             "eval_shapes_full_ci95": 0.05} for i, (q, y) in enumerate(points)]  # fmt: skip
    rows[-1]["final_eval"] = True
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_seed_mean_ci_uses_student_t():
    mean, ci = seed_mean_ci([0.4, 0.5, 0.6])
    assert mean == pytest.approx(0.5) and ci == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert seed_mean_ci([0.3]) == (0.3, 0.0)


def test_reach_interpolates_between_evaluations():
    curve = [(0, 0.4, 0), (100, 0.5, 0), (200, 0.7, 0)]
    assert reach(curve, 0.6) == pytest.approx(150)
    assert reach(curve, 0.4) == 0
    assert reach(curve, 0.8) is None


def test_analyse_shares_the_base_evaluation_and_compares_to_the_plain_arm(tmp_path):
    _write(tmp_path / "plain-s0", [(0, 0.4), (100, 0.45), (200, 0.5)])
    _write(tmp_path / "plain-s1", [(100, 0.43), (200, 0.5)])  # skipped the base evaluation: shared from s0
    _write(tmp_path / "diffexp-s0", [(100, 0.5), (200, 0.6)])
    _write(tmp_path / "diffexp-s1", [(100, 0.55), (200, 0.58)])
    res = analyse(tmp_path, ["plain", "diffexp"], [0, 1], ["eval_shapes_full"])
    plain, dx = res["arms"]["plain"]["eval_shapes_full"], res["arms"]["diffexp"]["eval_shapes_full"]
    assert [p[0] for p in plain["mean"]] == [0, 100, 200] and plain["mean"][0][1] == pytest.approx(0.4)
    assert plain["mean"][-1][1] == pytest.approx(0.5) and plain["mean"][-1][2] == pytest.approx(0.0)
    assert dx["reach_target"] == pytest.approx(0.5)
    # diffexp reaches 0.5 at 100 queries (seed 0) and at 2/3 of the way from 0 to 100 (seed 1: 0.4 -> 0.55)
    assert dx["reach"]["reached"] == 2 and dx["reach"]["queries"][0] == pytest.approx((100 + 200 / 3) / 2)
