"""The whole run's configuration: pydantic models, YAML presets, dotted overrides.

Every field says what it does and how it interacts with others. Presets are
YAML files in common/presets/; `load_config("tiny", ["train.epochs=3"])`
resolves a preset (or a YAML path) and applies `--set` overrides. Invalid
values raise `ConfigError` with one line naming the field, the value and
what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from common.config_algorithm import AlgorithmConfig, AlignPropConfig, StatTrackerConfig, window_steps  # noqa: F401
from common.config_base import ConfigError, _Strict
from common.config_cluster import ActorResources, ClusterConfig, ReplayConfig  # noqa: F401
from common.config_exploration import CfgScheduleConfig, ExplorationConfig, PromptWeightingConfig  # noqa: F401

PRESET_DIR = Path(__file__).parent / "presets"


class ModelConfig(_Strict):
    pretrained: str = Field(
        "tiny",
        description="Built-in name ('tiny', 'shapes-base'), a hub id (e.g. runwayml/stable-diffusion-v1-5) "
        "or a local directory saved with save_pretrained.",
    )
    revision: str | None = Field(None, description="Hub revision, for hub ids only.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="dtype of the frozen weights; LoRA weights and log-probs stay float32."
    )
    tiny_seed: int = Field(0, description="Seed of the built-in random 'tiny' model's weights.")


class LoraConfig(_Strict):
    rank: int = Field(4, ge=1, description="LoRA rank r.")
    alpha: float = Field(4.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        description="UNet module names (suffixes) that get LoRA; attention only is the SD default.",
    )
    init_seed: int = Field(0, description="Seed of the LoRA initialisation (B starts at zero either way).")


class PromptsConfig(_Strict):
    train: str = Field(
        "tiny_animals", description="Training prompts: a named prompt set or a path to a text file (one per line)."
    )
    eval: list[str] | None = Field(
        None,
        description="Evaluation prompt sources (names or files), each evaluated and logged separately; the "
        "first is the headline eval_reward_*. Null means the training prompts.",
    )

    @field_validator("eval", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class SamplingConfig(_Strict):
    num_steps: int = Field(20, ge=2, le=1000, description="DDIM denoising steps T per image.")
    eta: float = Field(
        1.0, ge=0, le=1, description="DDIM eta; > 0 for DDPO and RWR (each step stochastic, with a log-prob); "
        "AlignProp may use 0 (deterministic DDIM: the layout is a function of the initial noise and the model)."
    )
    guidance_scale: float = Field(
        5.0, ge=1.0, description="Constant CFG scale used when exploration is off, and for evaluation."
    )
    batch_size: int = Field(8, ge=1, description="Images per UNet batch inside a sampler.")
    resolution: int | tuple[int, int] | None = Field(
        None,
        description="Image size: one int (square) or [height, width]; null means the model's native size "
        "(512 for SD1.x, 1024 for SDXL, 64 for tiny and shapes-base). Must suit the VAE and UNet downsampling.",
    )
    channels_last: bool = Field(
        False,
        description="Samplers keep the UNet's convolution weights in channels-last (NHWC) memory format, which "
        "GPU convolution kernels use natively (without it cuDNN converts each convolution's input). The "
        "same model, but other kernels: in bf16 results differ in the last bits, so check logprob_mismatch.",
    )
    compile: str | None = Field(
        None,
        description="torch.compile backend for the samplers' UNet (e.g. 'inductor'; None: eager). Only calls "
        "without gradients use it (the learner's recomputation runs eagerly). The first call compiles (about a "
        "minute per graph for a full-size UNet; fused and unfused LoRA are two graphs); check logprob_mismatch.",
    )
    fuse_lora: bool = Field(
        False,
        description="Samplers fold the LoRA into the frozen UNet weights for each generate call (one matmul a "
        "layer instead of three; the base weights are swapped back after, not subtracted). Faster, and in "
        "float32 on-policy to ~1e-6; in bf16 the fused weights round differently from the learner's unfused "
        "forward, so check logprob_mismatch.",
    )
    tail_steps: int | None = Field(
        None,
        ge=1,
        description="DDPO only: training rollouts take (and record) only the steps up to the end of "
        "algorithm.timestep_window as configured, then finish each image from there in this many deterministic "
        "DDIM jumps; the learner never sees the untrained steps, so it needs no log-probs of them. None: the "
        "whole chain. Evaluation always samples the whole chain. bench/tail_check.py measures how well a coarse "
        "tail scores a layout as the real chain would; check it on a moved policy too: on the Shapes recipe a "
        "6-jump tail that agreed with the real one on the base model broke down once DDPO had moved the layout "
        "steps, and the run learned nothing (docs/results.md, session 43).",
    )


class RewardTerm(_Strict):
    name: str = Field(description="Registered reward name (see rewards.registry).")
    weight: float = Field(1.0, description="Weight of this term in the summed reward.")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword options for the reward.")


class RewardConfig(_Strict):
    terms: list[RewardTerm] = Field(
        default_factory=lambda: [RewardTerm(name="jpeg_compressibility")],
        description="Rewards summed with their weights.",
    )
    batch_size: int = Field(16, ge=1, description="Images per reward call.")


class TrainConfig(_Strict):
    epochs: int = Field(20, ge=1, description="Training epochs (one sample-score-learn round each).")
    samples_per_epoch: int = Field(16, ge=1, description="Training images sampled (and scored) per epoch.")
    prompts_per_epoch: int = Field(
        0,
        ge=0,
        description="0: each sample's prompt is drawn at random. k > 0: k prompts per epoch with "
        "samples_per_epoch / k samples each (groups, so per-prompt advantages compare like with like).",
    )
    seed: int = Field(0, description="Seed of prompts, noise and exploration.")
    checkpoint_every: int = Field(5, ge=0, description="Checkpoint every N epochs (0: only at the end).")


class EvalConfig(_Strict):
    every: int = Field(5, ge=0, description="Evaluate every N epochs and before the first update (0: never).")
    at_start: bool = Field(
        True, description="Evaluate before the first update (studies skip it for runs that share one base model)."
    )
    final: bool = Field(
        True,
        description="Evaluate after the last epoch (with every > 0). A multi-stage run's first stages can skip it: "
        "the last stage's final evaluation is paired with the base, and each skipped one saves its images' time.",
    )
    images_per_prompt: int = Field(2, ge=1, description="Evaluation images per evaluation prompt.")
    max_prompts: int = Field(8, ge=1, description="At most this many evaluation prompts (the first ones).")
    seed: int = Field(12345, description="Fixed seed of evaluation noise, the same for every evaluation.")
    reward: RewardConfig | None = Field(
        None,
        description="The reward evaluation reports (null: the training reward). E.g. train AlignProp on the "
        "differentiable shapes_soft and evaluate the hard shapes detector.",
    )


class OutputConfig(_Strict):
    dir: str | None = Field(None, description="Run directory; null means runs/<timestamp>.")
    grid_every: int = Field(5, ge=0, description="Save a sample image grid every N epochs (0: never).")
    tensorboard: bool = Field(True, description="Also write TensorBoard events.")


class StageConfig(_Strict):
    config: str = Field(description="The stage's preset name or YAML path; it must not have stages of its own.")
    set: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides of that config, dotted key -> value as --set takes them, e.g. {train.epochs: 12}.",
    )


class RunConfig(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    exploration: ExplorationConfig = Field(default_factory=ExplorationConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    stages: list[StageConfig] = Field(
        default_factory=list,
        description="Further training stages after this run, in order (learner/stages.py): each starts from the "
        "previous stage's final LoRA fused into its model and runs in <run>/stage<k>, with this run's train.seed "
        "and cluster section. Its evaluation must be this run's (prompts, noise, steps, guidance, reward), so "
        "every stage's eval_*_change columns are paired changes from this run's base model.",
    )

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        per_step = self.algorithm.minibatch_size * self.algorithm.gradient_accumulation
        if self.cluster.backend == "local" and self.replay.max_staleness:
            raise ValueError(
                f"replay.max_staleness must be 0 with cluster.backend=local (got {self.replay.max_staleness}): "
                "one process cannot sample ahead while it learns"
            )
        if self.train.samples_per_epoch % self.algorithm.minibatch_size:
            raise ValueError(
                f"train.samples_per_epoch ({self.train.samples_per_epoch}) must be a multiple of "
                f"algorithm.minibatch_size ({self.algorithm.minibatch_size})"
            )
        k = self.train.prompts_per_epoch
        if k and self.train.samples_per_epoch % k:
            raise ValueError(
                f"train.samples_per_epoch ({self.train.samples_per_epoch}) must be a multiple of "
                f"train.prompts_per_epoch ({k})"
            )
        if self.cluster.backend == "local" and self.cluster.num_learners > 1:
            raise ValueError(
                f"cluster.num_learners must be 1 with cluster.backend=local (got {self.cluster.num_learners}): "
                "data-parallel learners are Ray actors"
            )
        if self.cluster.num_learners > self.algorithm.gradient_accumulation:
            raise ValueError(
                f"cluster.num_learners ({self.cluster.num_learners}) must not exceed algorithm.gradient_accumulation "
                f"({self.algorithm.gradient_accumulation}): each learner runs whole minibatches of an optimizer step, "
                "so the learners beyond it would only wait; raise gradient_accumulation (and lower minibatch_size)"
            )
        if self.sampling.eta == 0 and self.algorithm.name != "alignprop":
            raise ValueError(
                f"sampling.eta must be > 0 with algorithm.name={self.algorithm.name}: its update needs each "
                "step's log-prob, which a deterministic DDIM step (eta 0) does not have; use eta 1 (DDPO's)"
            )
        if self.sampling.tail_steps and self.algorithm.name != "ddpo":
            raise ValueError(
                f"sampling.tail_steps is for algorithm.name=ddpo (got {self.algorithm.name}): only DDPO trains a "
                "window of recorded steps and ignores the rest; remove sampling.tail_steps"
            )
        if self.algorithm.name == "alignprop" and self.replay.max_staleness:
            raise ValueError(
                f"replay.max_staleness must be 0 with algorithm.name=alignprop (got {self.replay.max_staleness}): "
                "the learner samples its own training images"
            )
        if self.algorithm.name == "alignprop" and self.algorithm.alignprop.truncation[1] > self.sampling.num_steps:
            raise ValueError(
                f"algorithm.alignprop.truncation {list(self.algorithm.alignprop.truncation)}: K cannot exceed "
                f"sampling.num_steps ({self.sampling.num_steps})"
            )
        if per_step > self.train.samples_per_epoch:
            raise ValueError(
                f"algorithm.minibatch_size x gradient_accumulation ({per_step}) exceeds "
                f"train.samples_per_epoch ({self.train.samples_per_epoch}): no optimizer step would run"
            )
        return self

    def derived(self) -> dict[str, int]:
        """Sizes worth printing at start-up."""
        a = self.algorithm
        steps = window_steps(self.sampling.num_steps, a.timestep_window, a.timestep_fraction)[1]
        if a.name == "rwr":  # noise levels drawn per kept sample; optimizer steps depend on how many are kept
            steps = a.rwr.timesteps_per_sample
        passes = a.inner_epochs
        if a.name == "alignprop":  # each sample is drawn with gradients once; at most k_max steps carry them
            steps, passes = a.alignprop.truncation[1], 1
        return {
            "samples_per_epoch": self.train.samples_per_epoch,
            "effective_batch": a.minibatch_size * a.gradient_accumulation,
            "optimizer_steps_per_epoch": passes  # a last step of fewer minibatches counts too
            * -(-self.train.samples_per_epoch // (a.minibatch_size * a.gradient_accumulation)),
            "trained_timesteps_per_sample": steps,
            "reward_queries_total": self.train.epochs * self.train.samples_per_epoch,
        }


def preset_names() -> list[str]:
    """Names of the YAML presets shipped with the package."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def config_value(cfg: RunConfig, dotted: str) -> Any:
    """The value of a dotted field of `cfg` (a section as a plain dict), e.g. config_value(cfg, "lora.rank")."""
    v = cfg
    for part in dotted.split("."):
        v = getattr(v, part)
    return v.model_dump() if hasattr(v, "model_dump") else v


def apply_override(data: dict, dotted: str) -> None:
    """Apply one `a.b.c=value` override (value parsed as YAML) to nested dict `data` in place."""
    if "=" not in dotted:
        raise ConfigError(f"--set {dotted!r}: expected dotted.key=value, e.g. train.epochs=5")
    key, _, raw = dotted.partition("=")
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {p!r} is not a section")
    value = _parse_scalar(raw)
    glued = _glued_key(value)
    if glued:
        raise ConfigError(
            f"--set {key}: YAML reads {{{glued}}} as one key {glued!r} with no value; put a space after the colon "
            f"({{{glued.replace(':', ': ', 1)}}})"
        )
    node[parts[-1]] = value


def _glued_key(value: Any) -> str | None:
    """A mapping key like 'name:aesthetic' with no value, anywhere in `value`: YAML's reading of {name:aesthetic}."""
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str) and ":" in k and v is None:
                return k
            if found := _glued_key(v):
                return found
    if isinstance(value, list):
        return next((found for v in value if (found := _glued_key(v))), None)
    return None


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"config field {loc}: unknown field (check the spelling; `--help` lists the sections)"
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"config field {loc}: {msg}{shown}" if loc else f"config: {msg}"  # no loc: a check across sections


def validate_config(data: dict) -> RunConfig:
    """Build a RunConfig from nested dicts; raise ConfigError with a one-line message on bad values."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def read_config_source(name_or_path: str) -> dict:
    """The raw nested dict of a preset name or a YAML file path."""
    path = Path(name_or_path)
    if not path.suffix and (PRESET_DIR / f"{name_or_path}.yaml").is_file():
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"config {name_or_path!r}: no such preset or file; presets: {', '.join(preset_names())}"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or err.__class__.__name__
        raise ConfigError(f"config file {path}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections at the top level")
    return data


def load_config(name_or_path: str = "tiny", overrides: list[str] | None = None) -> RunConfig:
    """Resolve a preset or YAML file, apply dotted overrides, validate."""
    data = read_config_source(name_or_path)
    for o in overrides or []:
        apply_override(data, o)
    return validate_config(data)


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (what runs/<name>/config.yaml holds)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
