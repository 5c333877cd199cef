"""Bad input through the command line: one clear line each, before any actor starts, no checkpoint left."""

import pytest

from learner.main import main


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--config", "nonexistent"], "config 'nonexistent': no such preset or file; presets: "),
        (["--set", "sampling.num_steps=1"], "config field sampling.num_steps: Input should be greater than or equal to 2"),
        (["--set", "prompts.train=no_such_set"], "unknown prompt set 'no_such_set'; known sets: "),
        (["--set", "reward.terms=[{name: aesthetc}]"], "unknown reward 'aesthetc'; known rewards: "),
        (["--set", "model.pretrained=/no/such/model"], "model.pretrained='/no/such/model': no such directory"),
        (["--set", "lora.rank=0"], "config field lora.rank"),
        (["--set", "reward.terms=[{name:aesthetic}]"], ("--set reward.terms: YAML reads {name:aesthetic} as one "
                                                         "key 'name:aesthetic' with no value; put a space after the "
                                                         "colon ({name: aesthetic})")),
        (["--config", "tiny", "--set", "train.samples_per_epoch=10"],
         "error: config: train.samples_per_epoch (10) must be a multiple of algorithm.minibatch_size (8)"),
        (["--set", "model.pretrained=no-such-org/no-such-model"],  # a hub id, offline: before any actor starts
         "model.pretrained='no-such-org/no-such-model': no readable model_index.json (HF_HUB_OFFLINE=1 is set"),
        (["--config", "tiny", "--set", "cluster.address=127.0.0.1:1"],  # ray.init would retry for minutes
         "cluster.address=127.0.0.1:1: nothing answers at 127.0.0.1:1 (Connection refused); start the head there"),
        (["--config", "tiny", "--set", "sampling.resolution=60"],
         "sampling.resolution=60: this model needs multiples of 16 (VAE x8, UNet x2); its native size is 64x64"),
    ],
)
def test_bad_input_gives_one_line(capsys, tmp_path, argv, expected):
    code, err = _run(capsys, *argv, "--output", str(tmp_path / "run"))
    assert code == 1
    assert err.startswith("error: ") and expected in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing was started, nothing written


def test_malformed_prompt_file(capsys, tmp_path):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    code, err = _run(capsys, "--set", f"prompts.train={bad}", "--output", str(tmp_path / "run"))
    assert code == 1 and "not UTF-8 text" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    code, err = _run(capsys, "--set", f"prompts.train={empty}", "--output", str(tmp_path / "run"))
    assert code == 1 and "holds no prompts" in err


def test_model_dir_without_model_index(capsys, tmp_path):
    (tmp_path / "m").mkdir()
    code, err = _run(capsys, "--set", f"model.pretrained={tmp_path / 'm'}", "--output", str(tmp_path / "run"))
    assert code == 1 and "has no model_index.json" in err


def test_resume_with_a_config_is_refused_not_ignored(capsys, tmp_path):
    code, err = _run(capsys, "--resume", str(tmp_path), "--config", "tiny")
    assert code == 2 and err == (f"error: --resume {tmp_path} continues with that run's config.yaml, so --config tiny "
                                 "would be ignored: change fields with --set, or start a new run with --config")


def test_resume_needs_a_run_dir(capsys, tmp_path):
    code, err = _run(capsys, "--resume", str(tmp_path))
    assert code == 1 and "no config.yaml there" in err


def test_help_lists_presets(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "presets: " in out and "tiny" in out


def test_a_new_run_never_overwrites_an_earlier_one(capsys, tmp_path):
    """--output naming an earlier run's directory (or a file) stops before anything is written: the earlier
    run's metrics and checkpoints stay as they were."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step_4").mkdir(parents=True)
    (run / "config.yaml").write_text("x: 1\n")
    (run / "metrics.jsonl").write_text('{"epoch": 0}\n')
    before = sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*"))
    code, err = _run(capsys, "--config", "tiny", "--output", str(run))
    assert code == 1 and err == (
        f"error: run directory {run} (--output or output.dir) holds a run already (config.yaml, metrics.jsonl, "
        f"checkpoints): continue it with --resume {run}, or give a new directory"
    )
    assert sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*")) == before
    (tmp_path / "file").write_text("")
    code, err = _run(capsys, "--config", "tiny", "--output", str(tmp_path / "file"))
    assert code == 1 and err.endswith("(--output or output.dir) is a file; give a directory")
    code, err = _run(capsys, "--config", "tiny", "--output", str(tmp_path / "file" / "run"))
    assert code == 1 and err == (f"error: run directory {tmp_path / 'file' / 'run'} (--output or output.dir): "
                                 f"{tmp_path / 'file'} is a file; give a directory")
    (tmp_path / "empty").mkdir()  # an empty directory is a new one
    code, err = _run(capsys, "--config", "tiny", "--set", "train.epochs=0", "--output", str(tmp_path / "empty"))
    assert "holds a run" not in err


@pytest.mark.parametrize(
    "override, expected",
    [
        ("lora.rank=8", "lora.rank is 4 in that run, not 8"),
        ("model.pretrained=shapes-base", "model.pretrained is 'tiny' in that run, not 'shapes-base'"),
        ("algorithm.name=rwr", "algorithm.name is 'ddpo' in that run, not 'rwr'"),
        ("algorithm.optimizer=sgd", "algorithm.optimizer is 'adamw' in that run, not 'sgd'"),
    ],
)
def test_a_resume_cannot_change_what_its_checkpoints_were_trained_for(capsys, tmp_path, override, expected):
    """--resume with --set of the model, the LoRA or the algorithm stops in one line, and the run's config.yaml
    is left as it was (before, it was rewritten first, so every later resume failed too)."""
    from common.config import dump_config, load_config

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(load_config("tiny", ["lora.rank=4"])))
    before = (run / "config.yaml").read_text()
    code, err = _run(capsys, "--resume", str(run), "--set", override)
    assert code == 1 and err.startswith(f"error: --resume {run}: {expected}; its checkpoints were trained for it")
    assert len(err.splitlines()) == 1 and (run / "config.yaml").read_text() == before


def test_an_actor_that_fails_to_start_is_reported_by_its_own_error():
    """Ray reports an actor whose __init__ raised as "The actor died because of an error raised in its creation
    task, <traceback>": the one line is the actor's error, not that header."""
    import ray.exceptions

    from learner.main import _one_line

    err = ray.exceptions.RayActorError(
        None, "The actor died because of an error raised in its creation task, ray::SamplerActor.__init__()\n"
        '  File "common/pipelines.py", line 195\n'
        "common.models.base.ModelLoadError: model.pretrained='m': no readable model_index.json", True)  # fmt: skip
    assert _one_line(err) == "error: model.pretrained='m': no readable model_index.json"
    assert _one_line(ValueError("first line\nsecond")) == "error: first line"


def test_a_config_file_that_is_not_yaml_names_its_line(capsys, tmp_path):
    bad = tmp_path / "run.yaml"
    bad.write_text("train:\n  epochs: 2\n   x: [\n")
    code, err = _run(capsys, "--config", str(bad), "--output", str(tmp_path / "run"))
    assert code == 1 and err == (f"error: config file {bad}: not valid YAML at line 3, column 5: mapping values are "
                                 "not allowed here")


def test_runs_named_alike_in_two_folders_get_their_own_queues(tmp_path):
    """The Redis streams are named by the run id: two sweeps' exp1 shared them (the second run's start emptied
    the first's streams and the learners trained on each other's batches). A resume finds its own again."""
    from learner.main import make_run_id

    a, b = tmp_path / "sweepA" / "exp1", tmp_path / "sweepB" / "exp1"
    assert make_run_id(a) != make_run_id(b) and make_run_id(a).startswith("exp1-")
    assert make_run_id(a) == make_run_id(tmp_path / "sweepA" / "." / "exp1")  # the same directory, however named
    assert make_run_id(a / "stage2", a).startswith("exp1-stage2-")
    assert all(ch.isalnum() or ch in "-_" for ch in make_run_id(tmp_path / "a b:c"))
