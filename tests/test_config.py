import pytest

from common.config import ConfigError, dump_config, load_config, preset_names, validate_config


def test_tiny_is_a_preset_and_valid():
    assert "tiny" in preset_names()
    cfg = load_config("tiny")
    assert cfg.model.pretrained == "tiny"
    assert cfg.sampling.eta > 0
    # the resolved config round-trips through its YAML dump
    import yaml

    assert validate_config(yaml.safe_load(dump_config(cfg))) == cfg


def test_overrides_parse_yaml_values():
    cfg = load_config("tiny", ["train.epochs=3", "exploration.enabled=false", "lora.target_modules=[to_q]"])
    assert cfg.train.epochs == 3 and cfg.exploration.enabled is False and cfg.lora.target_modules == ["to_q"]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("sampling.eta=0", "sampling.eta must be > 0 with algorithm.name=ddpo"),
        ("sampling.eta=-0.5", "config field sampling.eta: Input should be greater than or equal to 0 (got -0.5)"),
        ("exploration.cfg_schedule.low=9", "config field exploration.cfg_schedule: high must be >= low (got 5.0 < 9.0)"),
        ("exploration.cfg_schedule.kind=zigzag", "config field exploration.cfg_schedule.kind"),
        ("train.samples_per_epoch=10", "train.samples_per_epoch (10) must be a multiple of algorithm.minibatch_size (8)"),
        ("sampling.stpes=3", "config field sampling.stpes: unknown field"),
    ],
)
def test_invalid_values_give_one_line_naming_the_field(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    msg = str(err.value)
    assert expected in msg
    assert "\n" not in msg


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="no such preset or file; presets: .*tiny"):
        load_config("nope")


def test_malformed_override():
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config("tiny", ["train.epochs"])


def test_every_field_has_a_description():
    from pydantic import BaseModel

    from common.config import RunConfig

    def walk(model: type[BaseModel], prefix=""):
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                yield from walk(ann, prefix + name + ".")
            else:
                yield prefix + name, field.description

    missing = [n for n, d in walk(RunConfig) if not d]
    assert missing == []


def test_local_backend_cannot_sample_ahead():
    from common.config import ConfigError, load_config

    assert load_config("tiny", ["cluster.backend=local"]).cluster.backend == "local"
    with pytest.raises(ConfigError, match="replay.max_staleness must be 0 with cluster.backend=local"):
        load_config("tiny", ["cluster.backend=local", "replay.max_staleness=1"])
    with pytest.raises(ConfigError, match="cluster.backend"):
        load_config("tiny", ["cluster.backend=slurm"])



def test_learners_beyond_the_accumulation_are_refused_and_a_short_last_step_is_counted():
    """Each data-parallel learner runs whole minibatches of an optimizer step: with more learners than
    gradient_accumulation the rest would only wait. An epoch that does not divide into whole steps ends with a
    shorter step, which the start-up figures count."""
    from common.config import ConfigError, load_config

    base = ["train.samples_per_epoch=24", "algorithm.minibatch_size=4", "algorithm.gradient_accumulation=2"]
    assert load_config("tiny", base + ["cluster.num_learners=2"]).cluster.num_learners == 2
    with pytest.raises(ConfigError, match=r"cluster.num_learners \(3\) must not exceed algorithm.gradient_accumulation"):
        load_config("tiny", base + ["cluster.num_learners=3"])
    cfg = load_config("tiny", ["train.samples_per_epoch=24", "algorithm.minibatch_size=4",
                               "algorithm.gradient_accumulation=4", "algorithm.inner_epochs=1"])  # fmt: skip
    assert cfg.derived()["optimizer_steps_per_epoch"] == 2  # 6 minibatches: a step of 4, then one of 2

def test_every_preset_validates_and_the_paper_presets_name_real_rewards_and_prompts():
    from common.prompts import load_prompts
    from rewards import reward_names, reward_options

    assert {"sd15", "sdxl", "sd15_aesthetic", "sd15_pickscore", "sdxl_aesthetic", "shapes", "tiny"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(name)
        for term in cfg.reward.terms:
            assert term.name in reward_names() and set(term.options) <= set(reward_options(term.name)), (name, term)
        assert load_prompts(cfg.prompts.train)
    assert load_config("sd15_pickscore").prompts.train == "animals_activities"
    assert load_config("sdxl_aesthetic").model.pretrained.startswith("stabilityai/stable-diffusion-xl")


def test_paper_preset_without_its_weights_stops_with_the_file_to_supply(monkeypatch, tmp_path):
    from learner.main import preflight
    from rewards import RewardLoadError

    monkeypatch.chdir(tmp_path)  # no sac+logos+ava1-l14-linearMSE.pth here
    with pytest.raises(RewardLoadError, match=r"reward 'aesthetic': option head_path='sac\+logos\+ava1-l14-linearMSE.pth': no such file"):
        preflight(load_config("sd15_aesthetic", ["model.pretrained=tiny"]))


# Settings that change how fast the Shapes recipes run, not what they compute (docs/results.md, session 43: the
# fused sampler in batches of 64 gave the same training rewards and update sizes to five digits over five epochs;
# AlignProp without checkpointing the same rewards). The presets carry them; the pins below allow only them.
SAME_RESULT_DDPO = ["sampling.fuse_lora=true", "sampling.batch_size=64"]
SAME_RESULT_ALIGNPROP = ["algorithm.gradient_checkpointing=false", "sampling.fuse_lora=true"]


def test_shapes_order_preset_is_the_measured_recipe():
    """`shapes_order` must stay exactly the recipe docs/results.md measured (sessions 26-28): `shapes_alignprop`
    on shapes-base-order with the relation weighted 2/3, so that its figures hold for the preset."""
    measured = load_config(
        "shapes_alignprop",
        ["model.pretrained=shapes-base-order",
         'reward.terms=[{"name":"shapes_soft","options":{"rel_scale":8,"rel_weight":0.667}}]'] + SAME_RESULT_ALIGNPROP,
    )
    assert load_config("shapes_order") == measured
    assert load_config("shapes_order") != load_config("shapes_alignprop")


def test_shapes_order_ddpo_preset_is_the_measured_first_stage():
    """`shapes_order_ddpo` must stay exactly the large-batch DDPO run docs/results.md measured (session 29, seed 0;
    bench/sweep.py's `b480-w03-lr2e-3` arm on the `shapes` preset, whose step 14 the second stage started from;
    that run went on to 28 epochs, which with no learning-rate schedule does not change its first 14), the first
    stage of bench/two_stage.py."""
    measured = load_config(
        "shapes",
        ["model.pretrained=shapes-base-order", "exploration.enabled=false", "train.samples_per_epoch=480",
         "train.prompts_per_epoch=60", "algorithm.minibatch_size=16", "algorithm.gradient_accumulation=30",
         "algorithm.inner_epochs=1", "algorithm.timestep_window=[0.0,0.3]", "algorithm.learning_rate=2e-3",
         "train.epochs=14", "eval.every=14", "train.checkpoint_every=14"] + SAME_RESULT_DDPO,
    )  # fmt: skip
    assert load_config("shapes_order_ddpo") == measured


def test_shapes_two_stage_preset_is_the_measured_one_run_recipe():
    """`shapes_two_stage` must stay the one-run recipe docs/results.md measured (session 44): `shapes_order_ddpo`
    with 6 samples a prompt a step and an 8-jump deterministic tail, then `shapes_order` as its second stage; the
    evaluations skipped (after stage 1, halfway through stage 2) change no training image (their noise is fixed)."""
    from common.config import StageConfig

    measured = load_config(
        "shapes_order_ddpo",
        ["train.samples_per_epoch=360", "algorithm.minibatch_size=12", "algorithm.gradient_accumulation=30",
         "algorithm.stat_tracking.buffer_size=6", "algorithm.stat_tracking.min_count=6", "sampling.tail_steps=8",
         "eval.final=false"],
    )  # fmt: skip
    cfg = load_config("shapes_two_stage")
    assert cfg.stages == [StageConfig(config="shapes_order", set={"eval.every": 24})]  # evaluated at its end only
    assert cfg.model_copy(update={"stages": []}) == measured
