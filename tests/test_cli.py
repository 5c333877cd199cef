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


def test_resume_needs_a_run_dir(capsys, tmp_path):
    code, err = _run(capsys, "--resume", str(tmp_path))
    assert code == 1 and "no config.yaml there" in err


def test_help_lists_presets(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "presets: " in out and "tiny" in out
