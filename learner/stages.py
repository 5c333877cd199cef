"""Multi-stage runs: further training stages after a run, each from the previous stage's policy fused into its model.

A config's `stages:` list names what to train after the run itself finishes, e.g. the two-stage Shapes recipe
(DDPO moves the layout, then AlignProp repairs the objects; docs/results.md):

    python -m learner.main --config shapes_two_stage            # stages: [{config: shapes_order}]

    runs/<name>/                 stage 1: the run itself (config.yaml keeps the stages, for --resume)
    runs/<name>/stage2-model/    stage 1's final LoRA fused into its model (`merge_lora`, checked, atomic)
    runs/<name>/stage2/          stage 2: the stage's preset and overrides, model.pretrained = stage2-model,
                                 with the run's train.seed, cluster and output sections

Every stage evaluates with the run's own protocol (prompts, noise, steps, guidance, reward; `protocol_difference`
refuses a stage that does not, naming the field), and its run directory starts with a copy of the run's base
evaluation, so its `eval_*_change` columns are paired changes from the original model, image by image, not
from the previous stage. The previous stage's final evaluation already measured the policy a stage starts
from, so a stage skips its evaluation at the start. `--resume <run>` continues wherever it stopped: a finished
stage is skipped, a fused model that exists is used, an unfinished stage resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from common.config import (
    ConfigError,
    RunConfig,
    apply_override,
    config_value,
    read_config_source,
    validate_config,
)

# what makes two runs' evaluation images the same prompts and noise, and their scores comparable
PROTOCOL = ("prompts.eval", "eval.seed", "eval.images_per_prompt", "eval.max_prompts", "sampling.num_steps",
            "sampling.guidance_scale", "sampling.eta", "sampling.resolution")  # fmt: skip


def protocol_difference(first: RunConfig, second: RunConfig) -> str | None:
    """None if the two configs evaluate on the same images with the same reward; else the first difference,
    as 'field is X, not Y' (second's value, then first's)."""
    for f in PROTOCOL:
        if config_value(first, f) != config_value(second, f):
            return f"{f} is {config_value(second, f)!r}, not {config_value(first, f)!r}"
    t1, t2 = ((c.eval.reward or c.reward).model_dump()["terms"] for c in (first, second))
    if t1 != t2:  # the batch size does not change a score
        return f"the evaluation reward (eval.reward, or reward) is {t2}, not {t1}"
    return None


def stage_paths(run_path: Path, k: int) -> tuple[Path, Path]:
    """(stage k's run directory, the fused model it starts from); stage 1 is the run itself."""
    return run_path / f"stage{k}", run_path / f"stage{k}-model"


def stage_configs(cfg: RunConfig, run_path: Path) -> list[RunConfig]:
    """The resolved config of each of cfg.stages (stage 2, 3, ...), checked before anything trains: its own preset
    and overrides, then the run's train.seed, cluster and output sections, the fused model and its directory."""
    out = []
    for k, spec in enumerate(cfg.stages, start=2):
        where = f"stages[{k - 2}] ({spec.config})"
        try:
            data = read_config_source(spec.config)
            for key, value in spec.set.items():
                apply_override(data, f"{key}={json.dumps(value)}")
            data.get("train", {}).pop("seed", None)
            stage = validate_config(data)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        if stage.stages:
            raise ConfigError(f"{where}: a stage cannot have stages of its own; list them all in the run's stages")
        diff = protocol_difference(cfg, stage)
        if diff:
            raise ConfigError(
                f"{where}: {diff}; every stage evaluates on the run's images so that its changes pair with the "
                "base model's: set it to the run's value"
            )
        stage_dir, model_dir = stage_paths(run_path, k)
        # the previous stage's final evaluation measured the policy a stage starts from (or was skipped on purpose)
        at_start = stage.eval.at_start and cfg.eval.every == 0
        stage = stage.model_copy(
            update={
                "model": stage.model.model_copy(update={"pretrained": str(model_dir)}),
                "train": stage.train.model_copy(update={"seed": cfg.train.seed}),
                "eval": stage.eval.model_copy(update={"at_start": at_start}),
                "cluster": cfg.cluster.model_copy(),
                "output": cfg.output.model_copy(update={"dir": str(stage_dir)}),
            }
        )
        out.append(validate_config(stage.model_dump()))
    return out


def is_complete(run_path: Path, cfg: RunConfig) -> bool:
    """Whether the run in `run_path` has finished: its final evaluation after `cfg.train.epochs` is logged (or,
    without evaluation, its last checkpoint is the last epoch's). A run resumed with more epochs has not."""
    from learner.run_dir import RunDir

    rd = RunDir(run_path)
    if cfg.eval.every > 0 and cfg.eval.final:
        return any(r.get("final_eval") and r.get("epoch") == cfg.train.epochs for r in rd.read_metrics())
    last = rd.latest_checkpoint()
    return last is not None and last.name == f"step_{cfg.train.epochs}"


def copy_eval_base(src_run: Path, dst_run: Path) -> int:
    """Copy the base model's evaluation scores and images (samples/eval_base_*) of `src_run` into `dst_run`;
    returns how many files."""
    n = 0
    (dst_run / "samples").mkdir(parents=True, exist_ok=True)
    for f in sorted((src_run / "samples").glob("eval_base_*")):
        shutil.copy2(f, dst_run / "samples" / f.name)
        n += 1
    return n


def merge_lora(run: Path, out: Path, checkpoint: str | None = None, tolerance: float = 1e-4, log=print) -> float:
    """Fuse `run`'s checkpoint (the last complete one, or checkpoints/`checkpoint`) into its base model, save it to
    `out` (atomically), and return the fused UNet's largest relative output difference from the run's LoRA policy.
    Raises CheckpointError if `out` exists, there is no such checkpoint, or the difference exceeds `tolerance`
    (then nothing is written)."""
    from common.config import load_config
    from common.pipelines import load_lora_state, load_pipeline, load_policy
    from learner.run_dir import CheckpointError, RunDir

    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise CheckpointError(f"{run}: not a run directory (no config.yaml)")
    if out.exists():
        raise CheckpointError(f"{out} exists: give a new directory (nothing is overwritten)")
    cfg = load_config(str(run / "config.yaml"))
    rd = RunDir(run)
    ckpts = rd.checkpoints()
    if checkpoint is not None:
        ckpts = [p for p in ckpts if p.name == checkpoint]
    if not ckpts:
        names = ", ".join(p.name for p in rd.checkpoints()) or "none"
        raise CheckpointError(f"{run}: no complete checkpoint {checkpoint or ''} (complete: {names})")
    ckpt = ckpts[-1]
    lora, learner_state, counters = rd.load_checkpoint(ckpt)

    policy = load_policy(cfg.model, cfg.lora)  # what the learner held: base + LoRA in our keys
    c = policy.unet.config
    if getattr(c, "addition_embed_type", None) == "text_time":  # before the second load and the fuse
        raise ConfigError(
            "merge_lora: SDXL-shaped UNets are not supported yet (the check needs their added conditions)"
        )
    load_lora_state(policy.unet, lora)
    pipe = load_pipeline(cfg.model)
    pipe.load_lora_weights(str(ckpt))
    pipe.fuse_lora()
    pipe.unload_lora_weights()

    g = torch.Generator().manual_seed(0)
    size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
    x = torch.randn(4, c.in_channels, size, size, generator=g)
    t = torch.tensor([999, 700, 300, 10])
    cond = torch.randn(4, 8, c.cross_attention_dim, generator=g)
    with torch.no_grad():
        want = policy.unet(x, t, encoder_hidden_states=cond).sample
        got = pipe.unet(x, t, encoder_hidden_states=cond).sample
    rel = float((got - want).abs().max() / want.abs().max())
    log(f"{run} {ckpt.name} (reward queries {counters.get('reward_queries')}, version {learner_state['version']}): "
        f"fused UNet vs LoRA policy, max relative difference {rel:.2e}")  # fmt: skip
    if not rel <= tolerance:
        raise CheckpointError(
            f"fused UNet differs from the run's policy by {rel:.2e} > {tolerance:.0e}: nothing written"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    try:  # everything into a temporary folder, renamed last: no half-written model directory
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "merged_from.json").write_text(json.dumps(
            {"run": str(run), "checkpoint": ckpt.name, "base": cfg.model.pretrained,
             "reward_queries": counters.get("reward_queries"), "max_relative_difference": rel}, indent=1))  # fmt: skip
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return rel


def run_stages(cfg: RunConfig, run_path: Path, stages: list[RunConfig], train, log=print) -> list[dict]:
    """Train `stages` (`stage_configs(cfg, run_path)`, resolved before the run began) after the run in `run_path`
    has finished; `train(stage_cfg, stage_dir, resume, eval_base_from)` trains one stage (learner.main's).
    Returns the stages' metric rows, each with its `stage`."""
    from learner.run_dir import RunDir

    rows = []
    prev = run_path
    for k, scfg in enumerate(stages, start=2):
        stage_dir, model_dir = stage_paths(run_path, k)
        if is_complete(stage_dir, scfg):
            log(f"stage {k}: {stage_dir} has finished; skipped")
            stage_rows = RunDir(stage_dir).read_metrics()
        else:
            if not (model_dir / "merged_from.json").is_file():  # written last: its presence means complete
                rel = merge_lora(prev, model_dir, log=log)
                log(f"stage {k}: {prev.name}'s final policy fused into {model_dir} (reproduced to {rel:.1e} relative)")
            resume = (stage_dir / "config.yaml").is_file() and RunDir(stage_dir).latest_checkpoint() is not None
            log(f"stage {k} of {len(cfg.stages) + 1}: {cfg.stages[k - 2].config} from {model_dir}"
                + (" (resumed)" if resume else ""))  # fmt: skip
            stage_rows = train(scfg, stage_dir, resume, run_path)
        rows += [{**r, "stage": k} for r in stage_rows]
        prev = stage_dir
    plot_stages([RunDir(run_path).read_metrics()] + [[r for r in rows if r["stage"] == k]
                                                     for k in range(2, len(cfg.stages) + 2)], run_path / "stages.png")
    final = next((r for r in reversed(rows) if r.get("final_eval")), None)
    if final is not None and "eval_reward_change_mean" in final:
        log(f"after {len(cfg.stages) + 1} stages: evaluation reward {final['eval_reward_mean']:.4f}, "
            f"{final['eval_reward_change_mean']:+.4f} +- {final['eval_reward_change_ci95']:.4f} (95% CI) from the "
            "base model, paired image by image")  # fmt: skip
    return rows


def plot_stages(stage_rows: list[list[dict]], path: Path) -> Path | None:
    """Each evaluation set's paired change from the base model (reward and, for Shapes, full success) against
    the reward queries of all stages so far, with 95% CIs and a line where each stage begins; `stage_rows`:
    each stage's metric rows in order. Returns the PNG's path, or None when nothing was evaluated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    offset, starts = 0, []
    for rows in stage_rows:
        starts.append(offset)
        for r in rows:
            for key, mean in r.items():
                if not (key.startswith("eval_") and key.endswith("_change_mean")):
                    continue
                name = key[len("eval_"): -len("_change_mean")]
                for metric in ("shapes_full", "reward"):
                    if name == metric or name.endswith("_" + metric):  # the headline (first set), or a set's
                        q = offset + r.get("eval_reward_queries", r.get("reward_queries", 0))
                        label = name[: -len(metric) - 1] or "evaluation"
                        points.setdefault((metric, label), []).append(
                            (q, mean, r.get(key.replace("_mean", "_ci95"), 0.0)))
        offset += max((r.get("reward_queries", 0) for r in rows), default=0)
    for metric in ("shapes_full", "reward"):  # with several sets the headline repeats the first: drop it
        if (metric, "evaluation") in points and sum(k[0] == metric for k in points) > 1:
            del points[(metric, "evaluation")]
    if not points:
        return None
    metrics = [m for m in ("shapes_full", "reward") if any(k[0] == m for k in points)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), dpi=100, squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for (m, name), pts in sorted(points.items()):
            if m != metric:
                continue
            x, y, ci = zip(*([(0, 0.0, 0.0)] + sorted(pts)))
            ax.errorbar(x, y, yerr=ci, marker="o", capsize=3, label=name)
        for k, start in enumerate(starts[1:], start=2):
            ax.axvline(start, color="grey", ls="--", lw=1)
            ax.text(start, ax.get_ylim()[1], f" stage {k}", va="top", fontsize=8, color="grey")
        ax.axhline(0, color="black", lw=0.5)
        ax.set_xlabel("reward queries, all stages")
        ax.set_ylabel(f"{'full success' if metric == 'shapes_full' else 'reward'}: change from the base model")
        ax.set_title("paired with the base model's images; 95% CI over images", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
