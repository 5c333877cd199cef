"""bench/run_changes.py: the last paired changes of each run, and the t-interval over a group of seeds."""

import json
import math
from pathlib import Path

import pytest

from bench.run_changes import last_changes, main
from bench.runs import seed_mean_ci


def _run(root: Path, name: str, full: float, rel: float) -> Path:
    d = root / name
    d.mkdir()
    rows = [
        {"epoch": 0, "reward_queries": 0},
        {"eval_reward_queries": 384, "eval_shapes_pairs_shapes_full_change_mean": 9.0,
         "eval_shapes_pairs_shapes_full_change_ci95": 9.0},  # an earlier evaluation: ignored
        {"epoch": 1, "reward_queries": 768},
        {"eval_reward_queries": 768, "eval_shapes_pairs_shapes_full_change_mean": full,
         "eval_shapes_pairs_shapes_full_change_ci95": 0.05, "eval_shapes_pairs_shapes_relation_change_mean": rel,
         "eval_shapes_pairs_shapes_relation_change_ci95": 0.04},
    ]  # fmt: skip
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_last_evaluation_and_t_interval(tmp_path, capsys):
    for i, (f, r) in enumerate([(0.042, 0.017), (0.054, 0.037), (0.029, 0.017)]):
        _run(tmp_path, f"arm-s{i}", f, r)
    queries, changes = last_changes(tmp_path / "arm-s1")
    assert queries == 768 and changes == {"full": (0.054, 0.05), "relation": (0.037, 0.04)}
    mean, half = seed_mean_ci([0.042, 0.054, 0.029])
    sd = math.sqrt(((0.042 - mean) ** 2 + (0.054 - mean) ** 2 + (0.029 - mean) ** 2) / 2)
    assert mean == pytest.approx(0.041667, abs=1e-6) and half == pytest.approx(4.303 * sd / math.sqrt(3))
    main([str(tmp_path / "arm-s?")])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and "full +0.054 +- 0.050" in out[1]
    assert f"full +0.042 +- {half:.3f}" in out[3] and "3 runs" in out[3]


def test_a_run_without_paired_changes_is_named(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "metrics.jsonl").write_text(json.dumps({"epoch": 0}) + "\n")
    with pytest.raises(SystemExit, match="empty: no evaluation with paired changes"):
        last_changes(d)
    with pytest.raises(SystemExit, match="no run directory matches"):
        main([str(tmp_path / "nothing-*")])


def _final_images(run: Path, images, prompts, base=None) -> None:
    from safetensors.torch import save_file

    (run / "samples").mkdir()
    files = {"epoch_0024_final_shapes_pairs": images, "eval_base_shapes_pairs.images": base}
    for name, img in files.items():
        if img is not None:
            save_file({"images": img}, str(run / "samples" / f"{name}.safetensors"),
                      metadata={"prompts": json.dumps(prompts)})  # fmt: skip


def test_diversity_of_the_final_images(tmp_path, capsys):
    import torch

    from common.shapes.diversity import pairwise_pixel_distance

    prompts = ["a red circle to the left of a blue square"] * 3 + ["a green triangle above a red square"] * 3
    g = torch.Generator().manual_seed(0)
    varied = torch.randint(0, 256, (6, 3, 16, 16), generator=g, dtype=torch.uint8)
    same = varied[:1].repeat(6, 1, 1, 1)  # every image identical: no pixel distance
    _final_images(_run(tmp_path, "arm-s0", 0.1, 0.0), varied, prompts)
    _final_images(_run(tmp_path, "arm-s1", 0.1, 0.0), same, prompts)
    want = sum(pairwise_pixel_distance(varied[i : i + 3].float() / 255) for i in (0, 3)) / 2
    main(["--diversity", str(tmp_path / "arm-s?")])
    out = capsys.readouterr().out.splitlines()
    assert f"pixel_distance {want:.4g}" in out[0] and "pixel_distance 0 " not in out[0]
    assert out[1].endswith("pixel_distance 0")
    mean, half = seed_mean_ci([want, 0.0])
    assert f"pixel_distance {mean:.4g} +- {half:.2g}" in out[2] and "change" not in out[2]
    # runs that kept the base policy's images on the same noise: base -> final, and the change over seeds
    _final_images(_run(tmp_path, "kept-s0", 0.1, 0.0), same, prompts, base=varied)
    _final_images(_run(tmp_path, "kept-s1", 0.1, 0.0), varied, prompts, base=varied)
    main(["--diversity", str(tmp_path / "kept-s?")])
    out = capsys.readouterr().out.splitlines()
    assert f"pixel_distance {want:.4g} -> 0 " in out[0] + " " and f"pixel_distance {want:.4g} -> {want:.4g}" in out[1]
    mean, half = seed_mean_ci([-want, 0.0])
    assert f"pixel_distance change {mean:+.3g} +- {half:.2g}" in out[2]
    with pytest.raises(SystemExit, match="arm-s2: no final evaluation images"):
        main(["--diversity", str(_run(tmp_path, "arm-s2", 0.1, 0.0))])


def test_diversity_from_a_judgement(tmp_path, capsys):
    runs = [_run(tmp_path, f"arm-s{i}", 0.1, 0.0) for i in range(2)]  # no final images kept: judged instead
    rows = lambda b, t: {k: {"base": b, "tuned": t} for k in ("position_spread", "size_spread", "pixel_distance")}
    judged = tmp_path / "judged.json"
    judged.write_text(json.dumps([{"run": str(runs[0]), "diversity": {"shapes_pairs": rows(10.0, 8.0),
                                                                       "shapes_pairs_heldout": rows(1.0, 1.0)}},
                                  {"run": str(runs[1]), "diversity": {"shapes_pairs": rows(10.0, 9.0)}}]))  # fmt: skip
    main(["--diversity", "--judged", str(judged), str(tmp_path / "arm-s?")])
    out = capsys.readouterr().out.splitlines()
    assert "position_spread 10 -> 8" in out[0] and "pixel_distance 10 -> 9" in out[1]  # the first set's
    mean, half = seed_mean_ci([-2.0, -1.0])
    assert f"position_spread change {mean:+.3g} +- {half:.2g}" in out[2]
    with pytest.raises(SystemExit, match="arm-s2: not in"):
        main(["--diversity", "--judged", str(judged), str(_run(tmp_path, "arm-s2", 0.1, 0.0))])
    with pytest.raises(SystemExit, match="add --diversity"):
        main(["--judged", str(judged), str(tmp_path / "arm-s?")])


def test_plot_of_the_groups(tmp_path, capsys):
    from bench.run_changes import group_label

    assert group_label("runs/sweeps/ob_aprw/rw067-diffexp-s?") == "rw067-diffexp"
    assert group_label("runs/x/plain-s*") == "plain" and group_label("runs/x/one-run") == "one-run"
    for i, f in enumerate([0.04, 0.05]):
        _run(tmp_path, f"a-s{i}", f, 0.0)
        _run(tmp_path, f"b-s{i}", -f, 0.0)
    png = tmp_path / "changes.png"
    main([str(tmp_path / "a-s?"), f"lower={tmp_path / 'b-s?'}", "--plot", str(png), "--plot-columns", "full,relation"])
    summaries = [line for line in capsys.readouterr().out.splitlines() if "t-interval" in line]
    assert [line.split()[0] for line in summaries] == ["a", "lower"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="unknown column"):
        main([str(tmp_path / "a-s?"), "--plot", str(png), "--plot-columns", "fulll"])
    with pytest.raises(SystemExit, match="add --diversity"):
        main([str(tmp_path / "a-s?"), "--plot", str(png), "--plot-columns", "pixel_distance"])


def test_versus_a_group_pairs_the_runs_by_seed(tmp_path, capsys):
    for s, (f, g) in enumerate([(0.04, 0.06), (0.05, 0.06), (0.03, 0.08)]):
        _run(tmp_path, f"plain-s{s}", f, 0.0)
        _run(tmp_path, f"cfg-s{s}", g, 0.0)
    _run(tmp_path, "cfg-s7", 0.9, 0.0)  # no plain run of seed 7: left out of the pairing
    main([f"plain={tmp_path / 'plain-s?'}", str(tmp_path / "cfg-s?"), "--versus", "plain"])
    line = capsys.readouterr().out.splitlines()[-1]
    mean, half = seed_mean_ci([0.02, 0.01, 0.05])
    assert line.startswith("  cfg - plain, same seed (seeds [0, 1, 2]") and f"full {mean:+.3f} +- {half:.3f}" in line
    with pytest.raises(SystemExit, match="no such group"):
        main([str(tmp_path / "cfg-s?"), "--versus", "plain"])
