"""Command line: `python -m learner.main [--config NAME_OR_PATH] [--set key=value ...] [--output DIR | --resume DIR]`.

Connects to an existing Ray cluster when RAY_ADDRESS (or cluster.address) is
set, so `ray job submit -- python -m learner.main` works; starts a local Ray
otherwise; `--set cluster.backend=local` runs everything in this process
without Ray. Every input is checked before any actor starts; a bad one ends the
run with one line naming it and the fix.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from common.config import (
    ConfigError,
    RunConfig,
    apply_override,
    config_value,
    load_config,
    preset_names,
    read_config_source,
    validate_config,
)

# the default run: the pretrained Shapes model visibly improves within minutes on 2 CPU cores (docs/results.md)
DEFAULT_PRESET = "shapes_quick"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m learner.main",
        description="Reward fine-tuning of diffusion models (DDPO, AlignProp, RWR) with DiffExp "
        "exploration, on Ray or locally.",
        epilog=f"presets: {', '.join(preset_names())}. Example: python -m learner.main --config tiny "
        "--set train.epochs=5 --set exploration.enabled=false",
    )
    p.add_argument("--config", default=None,
                   help=f"preset name or YAML path (default: {DEFAULT_PRESET}, AlignProp on the Shapes testbed)")  # fmt: skip
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field, e.g. --set algorithm.learning_rate=1e-3 (repeatable)")  # fmt: skip
    p.add_argument("--output", help="run directory (default: runs/<timestamp>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last complete checkpoint")
    return p


# what a checkpoint's LoRA and optimizer state were trained for: a resumed run cannot change them
RESUME_FIXED = ("model.pretrained", "model.revision", "model.tiny_seed", "lora", "algorithm.name",
                "algorithm.optimizer", "sampling.resolution")  # (the optimizer's state is of its kind)


def check_resume_overrides(before: RunConfig, after: RunConfig, run_path: Path, fixed=RESUME_FIXED) -> None:
    """One line naming the first field of `fixed` that --set changed on --resume (before config.yaml is
    rewritten: a refused resume leaves the run as it was)."""
    for key in fixed:
        old, new = config_value(before, key), config_value(after, key)
        if old != new:
            if isinstance(old, dict):  # name the sub-field
                key, old, new = next((f"{key}.{k}", old[k], new.get(k)) for k in old if old[k] != new.get(k))
            raise ConfigError(
                f"--resume {run_path}: {key} is {old!r} in that run, not {new!r}; its checkpoints were trained "
                "for it. Start a new run (--output) or train a stage from it (`stages`)"
            )


def resolve_config(args: argparse.Namespace) -> tuple[RunConfig, Path, bool]:
    """The validated config, the run directory, and whether this resumes."""
    if args.resume:
        run_path = Path(args.resume)
        if not (run_path / "config.yaml").is_file():
            raise ConfigError(
                f"--resume {run_path}: no config.yaml there; give the directory of an earlier run"
            )
        data = read_config_source(str(run_path / "config.yaml"))
        before = validate_config(data)
        for o in args.overrides:
            apply_override(data, o)
        cfg = validate_config(data)
        check_resume_overrides(before, cfg, run_path)
        return cfg, run_path, True
    cfg = load_config(args.config or DEFAULT_PRESET, args.overrides)
    out = args.output or cfg.output.dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg, Path(out), False


def preflight(cfg: RunConfig, check_model: bool = True) -> None:
    """Check names, files and the model before any actor starts (raises with a one-line message).
    `check_model=False`: not the model (a later stage's, which the stage before it writes)."""
    from common.models import model_class
    from common.pipelines import check_model_configs, pipeline_class_name, resolve_model_path
    from common.prompts import load_prompts
    from rewards import check_reward

    load_prompts(cfg.prompts.train)
    for source in cfg.prompts.eval or []:
        load_prompts(source)
    for term in cfg.reward.terms + (
        cfg.eval.reward.terms if cfg.eval.reward else []
    ):  # before any actor starts
        check_reward(term.name, term.options)
    if cfg.algorithm.name == "alignprop":
        from rewards.registry import differentiable_rewards

        bad = [t.name for t in cfg.reward.terms if t.name not in differentiable_rewards()]
        if bad:
            raise ConfigError(
                f"reward.terms: algorithm.name=alignprop backpropagates the reward, and {', '.join(bad)} "
                f"{'is' if len(bad) == 1 else 'are'} not differentiable; differentiable rewards: "
                f"{', '.join(differentiable_rewards())}"
            )
    if cfg.cluster.backend == "ray":
        check_ray_address(cfg)
    if check_model:
        source = resolve_model_path(cfg.model)
        # the pipeline class, read from model_index.json (a hub id's is fetched, or found in the hub cache): an
        # unreachable or unsupported model stops here, not in every actor's start
        model_class(pipeline_class_name(source, cfg.model.revision))
        check_model_configs(source, cfg.sampling.resolution)


def check_ray_address(cfg: RunConfig, timeout_s: float = 5.0) -> None:
    """One line if the Ray cluster named by cluster.address (or RAY_ADDRESS) does not answer: ray.init would
    otherwise retry for minutes."""
    import re
    import socket

    name, address = ("cluster.address", cfg.cluster.address) if cfg.cluster.address else (
        "RAY_ADDRESS", os.environ.get("RAY_ADDRESS"))  # fmt: skip
    m = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)/?", address or "")  # not 'auto', 'local' or a URL path
    if not m:
        return
    host, port = m.group(1), int(m.group(2))
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        raise ConfigError(
            f"{name}={address}: nothing answers at {host}:{port} ({err.strerror or err}); start the head there "
            "(`ray start --head`) or fix the address"
        ) from None


def init_ray(cfg: RunConfig) -> None:
    import ray

    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # the dashboard listens on loopback only: it can run code on the cluster (jobs)
        ray.init(num_cpus=cfg.cluster.local_num_cpus, include_dashboard=cfg.cluster.local_dashboard,
                 dashboard_host="127.0.0.1", log_to_driver=True)  # fmt: skip


def check_resources(cfg: RunConfig, available: dict) -> None:
    """Raise ConfigError (one line) if the actors ask for more CPUs or GPUs than a Ray cluster has: Ray
    would otherwise leave the last actors unscheduled and the run would wait forever."""
    c = cfg.cluster
    groups = [("sampler", c.sampler, c.num_samplers), ("reward", c.reward, c.num_reward_actors),
              ("learner", c.learner, c.num_learners)]  # fmt: skip
    for kind in ("CPU", "GPU"):
        field = "num_cpus" if kind == "CPU" else "num_gpus"
        asked = sum(getattr(r, field) * n for _, r, n in groups)
        have = float(available.get(kind, 0.0))
        if asked > have + 1e-9:
            parts = " + ".join(f"{n} x cluster.{name}.{field}={getattr(r, field):g}" for name, r, n in groups)
            raise ConfigError(
                f"the actors ask for {asked:g} {kind}s ({parts}) and this Ray has {have:g}: lower those, fewer "
                f"actors (cluster.num_samplers, num_reward_actors), or more (cluster.local_num_cpus for a local Ray)"
            )


def make_system(cfg: RunConfig, run_id: str | None = None):
    """The backend of cluster.backend: Ray actors (starting or joining Ray) or one local process."""
    if cfg.cluster.backend == "local":
        from learner.local import LocalSystem

        return LocalSystem(cfg)
    from learner.driver import RaySystem

    start_ray(cfg)
    return RaySystem(cfg, run_id=run_id)


def start_ray(cfg: RunConfig) -> None:
    """Join the cluster of cluster.address / RAY_ADDRESS, or start a local Ray and check that it has the CPUs
    and GPUs the actors ask for (once: a Ray already started is left as it is)."""
    import ray

    local = not (cfg.cluster.address or os.environ.get("RAY_ADDRESS")) and not ray.is_initialized()
    init_ray(cfg)
    if local:  # a cluster may still be scaling up: there, cluster.start_timeout_s bounds the wait instead
        check_resources(cfg, ray.cluster_resources())


def check_new_run_path(run_path: Path) -> None:
    """A new run goes where no run is: one there would lose its metrics, and its checkpoints would mix with the
    new run's (a later --resume would take the newest step of either)."""
    path = Path(run_path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run directory {path} (--output or output.dir) is a file; give a directory")
    above = next((p for p in path.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise ConfigError(f"run directory {path} (--output or output.dir): {above} is a file; give a directory")
    held = [n for n in ("config.yaml", "metrics.jsonl", "checkpoints") if (path / n).exists()]
    if held:
        raise ConfigError(
            f"run directory {path} (--output or output.dir) holds a run already ({', '.join(held)}): continue it "
            f"with --resume {path}, or give a new directory"
        )


def check_resumed_stages(cfg: RunConfig, run_path: Path, stages: list[RunConfig]) -> None:
    """On --resume of a run with stages, before anything trains: a stage that will be resumed keeps what its
    checkpoints were trained for (RESUME_FIXED against its own config.yaml; its model is its fused directory by
    construction), and a stage that has not finished (one extended by --set train.epochs, say) has no later
    stage begun, as those were trained from its earlier policy."""
    from learner.stages import is_complete, stage_paths

    runs = [(run_path, cfg)] + [(stage_paths(run_path, k)[0], s) for k, s in enumerate(stages, start=2)]
    for i, (path, scfg) in enumerate(runs):
        if i and (path / "config.yaml").is_file():
            fixed = tuple(k for k in RESUME_FIXED if k != "model.pretrained")
            check_resume_overrides(load_config(str(path / "config.yaml")), scfg, path, fixed)
        if not is_complete(path, scfg):
            begun = [p for k in range(i + 2, len(runs) + 1) for p in stage_paths(run_path, k) if p.exists()]
            if begun:
                raise ConfigError(
                    f"--resume {run_path}: stage {i + 1} ({path}) has not finished its {scfg.train.epochs} epochs, "
                    f"but {begun[0]} was made from its earlier policy; resume without extending stage {i + 1}, "
                    "or start a new run (--output)"
                )
            return


def run(cfg: RunConfig, run_path: Path, resume: bool, log=print) -> list[dict]:
    """Train `cfg` into `run_path` on its backend (cluster.backend), then its `stages` (learner/stages.py), each
    in its own directory under `run_path`; returns the metric rows (a later stage's with its `stage` number).
    Every stage's config is checked before the first trains. A finished run resumed goes on to its stages."""
    from learner.run_dir import RunDir
    from learner.stages import is_complete, run_stages, stage_configs

    if not resume:
        check_new_run_path(run_path)
    preflight(cfg)
    stages = stage_configs(cfg, run_path)  # once, before anything trains: a preset edited meanwhile changes nothing
    for stage in stages:
        preflight(stage, check_model=False)
    if resume and stages:
        check_resumed_stages(cfg, run_path, stages)
    if cfg.cluster.backend == "ray":
        start_ray(cfg)  # before the run directory is written: an unreachable or too small cluster leaves nothing
    if resume and cfg.stages and is_complete(run_path, cfg):
        log(f"{run_path} has finished; going on to its stages")
        rows = RunDir(run_path).read_metrics()
    else:
        rows = train_stage(cfg, run_path, resume, log=log)
    if cfg.stages:
        rows += run_stages(cfg, run_path, stages, lambda c, p, r, base: train_stage(c, p, r, base, log=log), log=log)
    return rows


def make_run_id(run_path: Path, first_stage: Path | None = None) -> str:
    """The run's name for its queues (Redis streams) and dashboard tags: the directory's name (a later stage's
    prefixed by its first stage's), then a hash of its full path, so two runs named alike in two folders (two
    sweeps' exp1) never share streams, and a resumed run finds its own again."""
    import hashlib

    path = Path(run_path).resolve()
    name = path.name if first_stage is None else f"{Path(first_stage).resolve().name}-{path.name}"
    name = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
    return f"{name}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"


def train_stage(cfg: RunConfig, run_path: Path, resume: bool, eval_base_from: Path | None = None,
                log=print) -> list[dict]:  # fmt: skip
    """Train one run (or stage) into `run_path`; returns its metric rows. `eval_base_from`: a run directory whose
    base evaluation this one's evaluations are paired with (a later stage's: the first stage's).

    If the learner dies (BackendLost), the actors are started again and the run continues from its last
    complete checkpoint, up to cluster.max_restarts times; then it stops with one line naming --resume."""
    from learner.loop import BackendLost, Trainer
    from learner.run_dir import RunDir
    from learner.stages import copy_eval_base

    if eval_base_from is not None:
        preflight(cfg)  # the model now exists
    run_dir = RunDir(run_path)
    try:
        run_dir.create(cfg, resume=resume)
    except OSError as err:
        raise ConfigError(
            f"run directory {run_path} (--output or output.dir): cannot write there ({err.strerror}: {err.filename})"
        ) from None
    if eval_base_from is not None and not resume:
        copy_eval_base(eval_base_from, run_path)
    d = cfg.derived()
    log(f"run {run_path} | model {cfg.model.pretrained} | backend {cfg.cluster.backend} | "
        + " ".join(f"{k}={v}" for k, v in d.items()))  # fmt: skip
    run_id = make_run_id(run_path, eval_base_from)
    lost = 0
    try:
        while True:
            system = make_system(cfg, run_id)
            trainer = Trainer(cfg, run_dir, system, log=log, progress=True)
            if (resume or lost) and not trainer.restore():
                log(f"{run_path}: no complete checkpoint yet; starting from epoch 0")
                run_dir.truncate_metrics(0)
            try:
                return trainer.fit()
            except BackendLost as err:
                lost += 1
                if lost > cfg.cluster.max_restarts:
                    raise BackendLost(
                        f"{err}; gave up after {lost} restarts: continue with --resume {run_path}"
                    ) from err
                log(
                    f"{err}; restarting the actors from the last complete checkpoint ({lost}/{cfg.cluster.max_restarts})"
                )
            finally:
                system.shutdown()
    finally:
        run_dir.close()


def _one_line(err: BaseException) -> str:
    cause = getattr(err, "cause", None)  # RayTaskError wraps the actor's exception
    if isinstance(cause, BaseException):
        err = cause
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    if getattr(err, "_actor_init_failed", False) and lines:  # an actor's __init__ raised: its traceback's last
        last = lines[-1].strip()  # line is "module.Error: message"
        return f"error: {last.split(': ', 1)[1] if ': ' in last else last}"
    return f"error: {lines[0] if lines else err.__class__.__name__}"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.resume and args.output:
        print("error: give either --output or --resume, not both", file=sys.stderr)
        return 2
    if args.resume and args.config:
        print(f"error: --resume {args.resume} continues with that run's config.yaml, so --config {args.config} would "
              "be ignored: change fields with --set, or start a new run with --config", file=sys.stderr)  # fmt: skip
        return 2
    try:
        cfg, run_path, resume = resolve_config(args)  # imports no torch yet
        if cfg.cluster.backend != "local":
            # before torch loads OpenMP: the driver shares cores with the actors (see learner/driver.py). The local
            # backend computes everything in this process, where spinning threads are fastest (bench/speed.py)
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        run(cfg, run_path, resume)
    except KeyboardInterrupt:
        print("interrupted; the last complete checkpoint is kept", file=sys.stderr)
        return 130
    except Exception as err:  # one clear line, not a traceback wall
        from common.pipelines import ModelLoadError
        from common.prompts import PromptSetError
        from learner.run_dir import CheckpointError
        from rewards.combined import NonFiniteRewardError
        from rewards.loading import RewardLoadError

        known = (
            ConfigError,
            ModelLoadError,
            PromptSetError,
            CheckpointError,
            NonFiniteRewardError,
            RewardLoadError,
        )
        cause = getattr(err, "cause", None)
        if isinstance(err, known) or isinstance(cause, known) or os.environ.get("DIFFEXP_TRACEBACK") != "1":
            print(_one_line(err), file=sys.stderr)
            if not isinstance(err, known) and not isinstance(cause, known):
                print("(set DIFFEXP_TRACEBACK=1 for the full traceback)", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
