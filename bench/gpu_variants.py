"""The sampler and pipeline variants that bench/gpu.py times, each switched on outside its timed call and
restored after it, their interleaved timing and the profiler's view of one call each."""

from __future__ import annotations

import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

VARIANTS = ("sampler", "sampler_fused", "sampler_fused_cl", "pipeline_with_lora", "pipeline")


@contextmanager
def variant_setting(gen, name: str):
    """The setting a variant's name asks for, outside the timed call, put back afterwards (the pipeline shares
    the module): "_cl" the UNet in channels-last (sampling.channels_last, which the sampler sets once at
    start-up), "_compiled" the compiled UNet of `compile_unet` for the sampler's gradient-free calls."""
    before = gen.model.sampling_unet
    if name.endswith("_cl"):
        gen.model.unet.to(memory_format=torch.channels_last)
    elif name.endswith("_compiled"):
        gen.model.sampling_unet = gen.bench_compiled
    try:
        yield
    finally:
        if name.endswith("_cl"):
            gen.model.unet.to(memory_format=torch.contiguous_format)
        gen.model.sampling_unet = before


def compile_unet(gen, backend: str, warm_up) -> float:
    """torch.compile the sampler's UNet with `backend` (as sampling.compile does) and compile it by one fused
    call, `warm_up(name)`: returns that call's seconds (the compile time, about)."""
    gen.bench_compiled = torch.compile(gen.model.unet, backend=backend)
    t = time.perf_counter()
    with variant_setting(gen, "sampler_fused_compiled"):
        warm_up("sampler_fused_compiled")
    return time.perf_counter() - t


def run_variant(gen, pipe, prompts, seeds, kw, name: str):
    """One call of a variant: our sampler ("sampler"), with sampling.fuse_lora ("sampler_fused"), and with
    sampling.channels_last or sampling.compile too ("sampler_fused_cl", "sampler_fused_compiled", inside
    `variant_setting`), the diffusers pipeline with our
    LoRA adapter active ("pipeline_with_lora") or disabled ("pipeline"); `pipe` shares our modules. The
    settings are restored afterwards."""
    gen.cfg.sampling.fuse_lora = name.startswith("sampler_fused")
    if name == "pipeline":
        pipe.unet.disable_adapters()
    try:
        with torch.no_grad():
            return gen.generate(prompts, seeds) if name.startswith("sampler") else pipe(prompts, **kw)
    finally:
        gen.cfg.sampling.fuse_lora = False
        pipe.unet.enable_adapters()


def timed_variants(gen, pipe, prompts, seeds, kw, repeats: int, device: str, names=VARIANTS) -> dict[str, list[float]]:
    """Seconds of each of `repeats` calls of the variants `names` of `run_variant`, interleaved round by round so
    that a drift of the clocks or the machine's load reaches them all alike."""
    out: dict[str, list[float]] = {n: [] for n in names}
    if "sampler_fused_cl" in names:  # warm-up: other convolution kernels
        with variant_setting(gen, "sampler_fused_cl"):
            run_variant(gen, pipe, prompts, seeds, kw, "sampler_fused_cl")
    for _ in range(repeats):
        for name, seconds in out.items():
            call = partial(run_variant, gen, pipe, prompts, seeds, kw, name)
            with variant_setting(gen, name):
                seconds.append(round(timed(call, device)[1], 4))
    return out


# CUPTI's overhead records (CUpti_ActivityOverheadKind) arrive among the device events but are not device work:
# "Command Buffer Full", for one, is the host waiting for room in the launch queue (0.58 s of a fused SD1.5 call on
# the H200, which the busy figure of 2026-12-04 counted as kernel time)
CUPTI_OVERHEAD = frozenset({"Unknown", "Driver Compiler", "Buffer Flush", "Instrumentation", "Resource",
                            "Runtime Triggered Module Loading", "Lazy Function Loading", "Command Buffer Full",
                            "Activity Buffer Request", "UVM Activity Init"})  # fmt: skip


def device_busy_us(events) -> tuple[float, float]:
    """(busy, overhead) in microseconds over profiler `events` (`prof.events()`): busy is the union of the device
    events' intervals (kernels, copies, memsets; overlapping streams count once), overhead the total of CUPTI's
    overhead records, which are left out of busy."""
    spans, overhead = [], 0.0
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CPU:
            continue
        if e.name in CUPTI_OVERHEAD:
            overhead += e.time_range.end - e.time_range.start
        else:
            spans.append((e.time_range.start, e.time_range.end))
    busy, start, end = 0.0, None, None
    for s, t in sorted(spans):
        if end is None or s > end:  # a gap: close the interval so far
            busy += 0.0 if end is None else end - start
            start, end = s, t
        else:
            end = max(end, t)
    return busy + (0.0 if end is None else end - start), overhead


def profile_calls(calls: dict, device: str, path: Path, rows: int = 25) -> dict[str, float]:
    """torch.profiler over one call of each of `calls` (name -> function): per call, the wall time, the time
    the device was busy (`device_busy_us`: the union of its kernels' and copies' intervals) and the top
    operators, written to `path`. Returns each call's busy fraction (0 on the CPU, where no device time is
    recorded)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    text, busy = [], {}
    for name, fn in calls.items():
        sync(device)
        with profile(activities=acts) as prof:
            t = time.perf_counter()
            fn()
            sync(device)
            wall = time.perf_counter() - t
        dev_us, overhead_us = device_busy_us(prof.events())
        busy[name] = round(dev_us / 1e6 / wall, 3)
        avg = prof.key_averages()
        key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
        # the table's "Self CUDA time total" sums every device row, CUPTI's overhead records among them
        text.append(f"== {name}: wall {wall:.3f} s, device busy {dev_us / 1e6:.3f} s ({busy[name]:.0%}), "
                    f"CUPTI overhead records {overhead_us / 1e6:.3f} s (not device work)\n"
                    + avg.table(sort_by=key, row_limit=rows)
                    + f"\n-- {name}, by host time (synchronisations and copies show here)\n"
                    + avg.table(sort_by="self_cpu_time_total", row_limit=rows // 2))  # fmt: skip
    path.write_text("\n\n".join(text))
    return busy


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> tuple[object, float]:
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t
