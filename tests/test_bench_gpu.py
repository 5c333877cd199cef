"""bench/gpu.py's CPU smoke run: both families through the trainer's classes, with sane figures."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_small_runs_both_families_without_ray(tmp_path):
    prof = tmp_path / "prof.txt"
    code = (
        "import sys, json; sys.argv = ['gpu.py', '--small', '--steps', '3', '--batch', '4',"
        f" '--alignprop-ks', '1,3', '--profile', {str(prof)!r}, '--repeats', '2', '--compile', 'eager'];"
        "sys.path.insert(0, 'bench'); import gpu; out = gpu.main(sys.argv[1:]);"
        "assert 'ray' not in sys.modules, 'bench/gpu.py imported ray'"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    out = json.loads(proc.stdout)
    assert [r["family"] for r in out["results"]] == ["sd15", "sdxl"]
    for r in out["results"]:
        assert r["resolution"] == [64, 64] and r["steps"] == 3 and r["batch"] == 4
        assert r["sampler_img_s"] > 0 and r["pipeline_img_s"] > 0 and r["lora_sync_ms"] > 0
        # --repeats 2: every variant timed twice, interleaved; each figure is the batch over the best call
        t = r["timing"]["seconds"]
        assert r["timing"]["repeats"] == 2 and all(len(v) == 2 for v in t.values())
        assert r["sampler_img_s"] == round(4 / min(t["sampler"]), 3)
        assert r["pipeline_img_s"] == round(4 / min(t["pipeline"]), 3)
        assert r["update_s_per_sample"] > 0
        assert r["logprob_mismatch"] < 1e-4  # float32 on the CPU: on-policy up to float error
        assert r["sampler_fused_img_s"] > 0  # the fused sampler is on-policy too (its LoRA is non-zero by then)
        assert r["sampler_fused_channels_last_img_s"] > 0 and len(t["sampler_fused_cl"]) == 2
        assert r["sampler_fused_compiled_img_s"] > 0 and len(r["timing_compiled"]["sampler_fused_compiled"]) == 2
        assert r["compile_first_call_s"] > 0
        assert set(r["logprob_mismatch_after_update"]) == {"unfused", "fused", "fused_channels_last",
                                                           "fused_compiled_whole_batch"}  # fmt: skip
        assert all(v < 1e-4 for v in r["logprob_mismatch_after_update"].values())
        assert [a["k"] for a in r["alignprop"]] == [1, 3] and all(a["s_per_sample"] > 0 for a in r["alignprop"])
        # --profile: one table per call, each naming its wall and device time (no device time on the CPU)
        text = (tmp_path / f"prof_{r['family']}.txt").read_text()
        assert text.count("== ") == 2 and "== sampler (fused): wall" in text and "== pipeline: wall" in text
        assert "aten::" in text and r["device_busy_fraction"] == {"sampler (fused)": 0.0, "pipeline": 0.0}


def test_device_busy_is_the_union_of_device_intervals_without_cupti_overhead():
    """The busy figure of --profile: overlapping kernels (two streams) count once, gaps not at all, host events
    and CUPTI's overhead records ("Command Buffer Full": the host waiting for room in the launch queue) never."""
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT))
    from torch.autograd import DeviceType

    from bench.gpu_variants import device_busy_us

    def ev(name, start, end, device=DeviceType.CUDA):
        return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end))

    events = [
        ev("aten::conv2d", 0, 100, DeviceType.CPU),  # the host's op: not device time
        ev("conv_kernel", 10, 30),
        ev("Memcpy DtoH (Device -> Pinned)", 20, 40),  # overlaps the kernel on another stream
        ev("gemm", 40, 50),  # touches the interval before: still one
        ev("Command Buffer Full", 50, 90),  # CUPTI overhead, not device work
        ev("gelu", 70, 75),
        ev("norm", 72, 80),
    ]
    assert device_busy_us(events) == (40 + 10, 40)  # [10, 50] and [70, 80]
    assert device_busy_us([ev("aten::mm", 0, 5, DeviceType.CPU)]) == (0.0, 0.0)
