"""The study's arithmetic: curves averaged over seeds with Student-t CIs, queries to reach a target, the
shared base evaluation."""

import json
import math

import pytest

from bench.runs import seed_mean_ci
from bench.study import analyse
from bench.study_paired import analyse_paired, markdown_paired, pool_paired, reach, reach_bootstrap


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


def _write_paired(path, diffs):
    """paired.json of bench/paired_eval.py --all-checkpoints: one entry per checkpoint, 128 queries apart."""
    path.mkdir(parents=True)
    entries = [{"run": str(path), "checkpoint": f"step_{2 * (i + 1)}", "reward_queries": 128 * (i + 1),
                "sets": {"train": {"reward": {"diff": d, "ci95": 0.02}}}} for i, d in enumerate(diffs)]  # fmt: skip
    (path / "paired.json").write_text(json.dumps(entries))


def test_paired_curves_start_at_zero_and_reach_the_plain_arms_final_change(tmp_path):
    _write_paired(tmp_path / "plain-s0", [0.02, 0.04])
    _write_paired(tmp_path / "plain-s1", [0.04, 0.06])  # plain's final mean change: 0.05
    _write_paired(tmp_path / "diffexp-s0", [0.05, 0.08])
    _write_paired(tmp_path / "diffexp-s1", [0.03, 0.06])
    res = analyse_paired(tmp_path, ["plain", "diffexp"], [0, 1], ["reward"])
    dx = res["arms"]["diffexp"]["train:reward"]
    assert [q for q, *_ in dx["mean"]] == [0, 128, 256] and dx["mean"][0][1:] == (0.0, 0.0)
    assert dx["mean"][2][1] == pytest.approx(0.07) and dx["mean"][2][2] == pytest.approx(12.706 * 0.01)
    assert dx["reach_target"] == pytest.approx(0.05)
    # per seed: s0 reaches 0.05 exactly at 128; s1 between 128 (0.03) and 256 (0.06), at 2/3 of the way
    assert dx["reach"]["reached"] == 2 and dx["reach"]["queries"][0] == pytest.approx((128 + 128 + 256 / 3) / 2)
    # the seed-mean curve (0.04 at 128, 0.07 at 256) reaches 0.05 a third of the way: 128 + 128 / 3
    mc = dx["reach"]["mean_curve"]
    assert mc["queries"] == pytest.approx(128 + 128 / 3) and mc["reached"] == 1.0
    assert 0 < mc["ci95"][0] < mc["queries"] < mc["ci95"][1] <= 256  # resampled targets move too
    assert res["arms"]["plain"]["train:reward"]["reach"]["mean_curve"]["queries"] == pytest.approx(256)
    assert "| diffexp | +0.040 ± 0.127 | +0.070 ± 0.127 | 171 [" in markdown_paired(res)


def test_pooling_two_studies_equals_one_study_of_all_their_seeds(tmp_path):
    diffs = {("plain", 0): [0.02, 0.04], ("plain", 1): [0.04, 0.06], ("plain", 2): [0.0, 0.01],
             ("diffexp", 0): [0.05, 0.08], ("diffexp", 1): [0.03, 0.06], ("diffexp", 2): [0.02, 0.03]}  # fmt: skip
    for (arm, s), d in diffs.items():
        _write_paired(tmp_path / "all" / f"{arm}-s{s}", d)
        _write_paired(tmp_path / ("a" if s < 2 else "b") / f"{arm}-s{s}", d)
    arms, protocol = ["plain", "diffexp"], {"config": "shapes", "common": ["x=1"]}
    files = []
    for part, seeds in (("a", [0, 1]), ("b", [2])):
        r = analyse_paired(tmp_path / part, arms, seeds, ["reward"])
        r["protocol"] = dict(protocol, seeds=seeds)
        files.append(tmp_path / part / "paired.json")
        files[-1].write_text(json.dumps(r))
    pooled, whole = pool_paired(files), analyse_paired(tmp_path / "all", arms, [0, 1, 2], ["reward"])
    for arm in arms:
        p, w = pooled["arms"][arm]["train:reward"], whole["arms"][arm]["train:reward"]
        assert p["seeds"] == [0, 1, 2] and [x for m in p["mean"] for x in m] == pytest.approx([x for m in w["mean"] for x in m])
        assert p["reach"]["mean_curve"]["queries"] == pytest.approx(w["reach"]["mean_curve"]["queries"])
    assert pooled["protocol"]["seeds"] == {"plain": [0, 1, 2], "diffexp": [0, 1, 2]}

    with pytest.raises(SystemExit, match="repeats seed"):
        pool_paired([files[0], files[0]])
    other = json.loads(files[1].read_text())
    other["protocol"]["common"] = ["x=2"]
    files[1].write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="another protocol .common"):
        pool_paired(files)


def test_reach_bootstrap_counts_resamples_that_never_get_there():
    plain = [[(0, 0.0), (100, 0.1)], [(0, 0.0), (100, 0.3)]]
    arm = [[(0, 0.0), (100, 0.05)], [(0, 0.0), (100, 0.25)]]  # mean 0.15 < plain's 0.2: never on the point estimate
    r = reach_bootstrap(plain, arm, n=400)
    assert r["queries"] is None and 0.0 < r["reached"] < 1.0


def test_run_pool_runs_jobs_in_parallel_and_names_the_failures(tmp_path):
    import os
    import sys
    import time

    from bench.runs import run_pool

    # two jobs that each wait for the other's file: they finish only if both run at once
    a, b = tmp_path / "a", tmp_path / "b"
    wait = "import pathlib, sys, time; pathlib.Path(sys.argv[1]).touch(); t = time.time()\n" \
           "while not pathlib.Path(sys.argv[2]).exists() and time.time() - t < 20: time.sleep(0.05)\n" \
           "sys.exit(0 if pathlib.Path(sys.argv[2]).exists() else 3)"  # fmt: skip
    jobs = [("a", [sys.executable, "-c", wait, str(a), str(b)], tmp_path / "a.log"),
            ("b", [sys.executable, "-c", wait, str(b), str(a)], tmp_path / "b.log"),
            ("bad", [sys.executable, "-c", "print('broken'); raise SystemExit(5)"], tmp_path / "logs" / "bad.log")]  # fmt: skip
    lines = []
    t0 = time.time()
    failed = run_pool(jobs, 2, dict(os.environ), log=lines.append)
    assert failed == ["bad"] and time.time() - t0 < 20
    assert (tmp_path / "logs" / "bad.log").read_text().strip() == "broken"
    assert any(line.startswith("FAILED (exit 5") and "bad.log" in line for line in lines)


def test_run_paired_judges_the_unjudged_and_trusts_runs_moved_without_checkpoints(tmp_path, monkeypatch):
    """A run judged on the GPU machine comes back with paired.json but without its checkpoints (device_check
    packs those apart, for runs the time limit left unjudged): it counts as judged. A run whose checkpoints
    came back without a paired.json is judged; so is one whose paired.json misses its last checkpoint."""
    import bench.study_paired as sp

    def run(name, steps, judged):
        d = tmp_path / name
        for k in steps:
            (d / "checkpoints" / f"step_{k}").mkdir(parents=True)
            (d / "checkpoints" / f"step_{k}" / "counters.json").write_text("{}")
        d.mkdir(exist_ok=True)
        if judged is not None:
            entries = [{"checkpoint": str(d / "checkpoints" / f"step_{k}")} for k in judged]
            (d / "paired.json").write_text(json.dumps(entries))

    run("moved", [], [1, 2])  # judged there, checkpoints left behind
    run("unjudged", [1, 2], None)  # its checkpoints came back in a ckpt_RUN.tgz
    run("behind", [1, 2], [1])  # judged before its last checkpoint
    run("done", [1, 2], [1, 2])
    jobs = []
    monkeypatch.setattr(sp, "run_pool", lambda js, parallel, env, log: jobs.extend(j[0] for j in js) or [])
    lines = []
    sp.run_paired(tmp_path, ["moved", "unjudged", "behind", "done"], 4, 60, "", 2, 1, log=lines.append)
    assert jobs == ["paired unjudged", "paired behind"]
    assert lines == ["paired evaluation: 2 of 4 runs already judged; judging 2"]


def _write_stage(path, points):
    """metrics.jsonl of one stage: an evaluation (queries, value) per point, the first before any update."""
    path.mkdir(parents=True)
    rows = [{"epoch": i, "reward_queries": max(q, 1), "eval_reward_queries": q, "eval_policy_version": i,
             "eval_shapes_full_mean": y, "eval_shapes_full_ci95": 0.05} for i, (q, y) in enumerate(points)]  # fmt: skip
    rows[-1]["reward_queries"] = points[-1][0]
    rows[-1]["final_eval"] = True
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_two_stage_curves_continue_across_stages_and_subtract_plain_seed_by_seed(tmp_path, monkeypatch):
    import sys

    from bench import study
    from bench.runs import chain_rows, eval_curve, read_rows

    # per seed: first stage 0 -> 100 queries, second stage (its 0 row = the fused first stage) 0 -> 40 -> 80
    ends = {("plain", 0): 0.8, ("plain", 1): 0.9, ("cfg", 0): 0.75, ("cfg", 1): 0.8}
    for (arm, s), end in ends.items():
        _write_stage(tmp_path / arm / f"first-s{s}", [(0, 0.6), (100, 0.5 + s / 10)])
        _write_stage(tmp_path / arm / f"second-s{s}", [(0, 0.5 + s / 10), (40, end - 0.05), (80, end)])
    rows = chain_rows(read_rows(tmp_path / "cfg/first-s1"), read_rows(tmp_path / "cfg/second-s1"))
    assert [(q, round(y, 3)) for q, y, _ in eval_curve(rows, "eval_shapes_full")] == [
        (0, 0.6), (100, 0.6), (140, 0.75), (180, 0.8)]  # the fused model's repeat of (100, 0.6) is dropped
    assert rows[-1]["reward_queries"] == 180

    out = tmp_path / "study"
    argv = ["study.py", "--out", str(out), "--seeds", "0,1", "--metrics", "eval_shapes_full",
            "--two-stage", f"plain={tmp_path / 'plain'}", "--two-stage", f"cfg={tmp_path / 'cfg'}"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(study, "diversity_at_end", lambda run: {})
    study.main()
    res = json.loads((out / "study.json").read_text())
    cfg = res["arms"]["cfg"]["eval_shapes_full"]
    assert [p[0] for p in cfg["mean"]] == [0, 100, 140, 180]
    assert cfg["minus_plain"]["per_seed"] == pytest.approx([-0.05, -0.1])
    assert cfg["minus_plain"]["mean"] == pytest.approx(list(seed_mean_ci([-0.05, -0.1])))
    assert cfg["reach"]["reached"] == 0  # cfg never reaches plain's final mean, 0.85
    assert "| cfg |" in (out / "study.md").read_text() and (out / "study.png").stat().st_size > 0

    (tmp_path / "cfg/second-s1/metrics.jsonl").unlink()
    with pytest.raises(SystemExit, match="cfg/second-s1"):
        study.main()
