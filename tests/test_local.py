"""The local backend (one process, no Ray) through the shared epoch loop."""

from common.pipelines import lora_checksum
from learner.local import LocalSystem
from learner.loop import Trainer
from learner.run_dir import RunDir
from tests.test_system import _cfg, _run_dir


def test_local_backend_evaluates_the_current_policy_and_stays_on_policy(tiny_cfg, tmp_path):
    cfg = _cfg(tiny_cfg, "cluster.backend=local", "train.epochs=3", "eval.every=1", "eval.max_prompts=2",
               "train.checkpoint_every=1",
               "exploration.prompt_weighting.num_phrases=2", "prompts.eval=[tiny_animals, animals]")  # fmt: skip
    system = LocalSystem(cfg)
    rows = Trainer(cfg, _run_dir(tmp_path, cfg), system, log=lambda *_: None).fit()
    epochs, final = rows[:-1], rows[-1]
    # evaluation at the top of epoch e sees the policy after e updates (it once lagged one version behind)
    assert [r["eval_policy_version"] for r in epochs] == [0, 1, 2] and final["eval_policy_version"] == 3
    assert [r["policy_version"] for r in epochs] == [1, 2, 3]
    assert all(r["logprob_mismatch"] < 1e-4 and abs(r["ratio_mean"] - 1) < 1e-4 for r in epochs)
    assert [r["reward_queries"] for r in epochs] == [8, 16, 24]
    # the policy moved, so evaluation images (fixed prompts and noise) changed between versions
    assert epochs[0]["eval_reward_mean"] != final["eval_reward_mean"]
    assert {"eval_reward_ci95", "eval_animals_reward_ci95", "eval_tiny_animals_reward_mean"} <= set(epochs[0])
    # later evaluations are also compared image by image with the base policy's (the same noise): the mean
    # paired change equals the change of the means, with its own (paired) CI
    assert "eval_reward_change_mean" not in epochs[0]
    for r in epochs[1:] + [final]:
        for s in ("animals", "tiny_animals"):
            base = epochs[0][f"eval_{s}_reward_mean"]
            assert abs(r[f"eval_{s}_reward_change_mean"] - (r[f"eval_{s}_reward_mean"] - base)) < 1e-5
            assert r[f"eval_{s}_reward_change_ci95"] > 0
    run = RunDir(tmp_path)
    # the base policy's evaluation images are kept beside its scores: same prompts and noise as the final ones
    for s in ("animals", "tiny_animals"):
        base_img, base_prompts = RunDir.load_eval_images(run.samples_dir / f"eval_base_{s}.images.safetensors")
        final_img, final_prompts = RunDir.load_eval_images(run.samples_dir / f"epoch_0003_final_{s}.safetensors")
        assert base_prompts == final_prompts and base_img.shape == final_img.shape
        assert not base_img.equal(final_img)  # the policy moved
    lora, _state, counters = run.load_checkpoint(run.latest_checkpoint())
    assert counters == {"epoch": 3, "reward_queries": 24, "policy_version": 3}
    assert system.learner.checksum() == lora_checksum(lora)

    # bench/paired_eval.py judges every checkpoint afresh from its files and reproduces the in-run paired
    # changes (the same prompts and noise); the base model's scores come back from its on-disk cache
    from bench.paired_eval import paired_eval

    kw = {"images": 2, "max_prompts": 2, "sets": ["tiny_animals"], "all_checkpoints": True,
          "base_cache": tmp_path / "base_cache", "log": lambda *_: None}  # fmt: skip
    judged = paired_eval([tmp_path], **kw)
    assert [e["reward_queries"] for e in judged] == [8, 16, 24]
    assert len(list((tmp_path / "base_cache").glob("base-*.safetensors"))) == 1
    for e, r in zip(judged, epochs[1:] + [final]):
        got = e["sets"]["tiny_animals"]["reward"]
        assert abs(got["diff"] - r["eval_tiny_animals_reward_change_mean"]) < 1e-4, (got, r)
        assert abs(got["base"] - epochs[0]["eval_tiny_animals_reward_mean"]) < 1e-4
    again = paired_eval([tmp_path], **{**kw, "all_checkpoints": False})  # the last only, base from the cache
    assert [e["checkpoint"] for e in again] == [judged[-1]["checkpoint"]]
    assert again[0]["sets"]["tiny_animals"]["reward"]["diff"] == judged[-1]["sets"]["tiny_animals"]["reward"]["diff"]


def _run_fresh(code: str) -> None:
    """Run `code` in a fresh interpreter (what a module imports shows only there) and fail with its stderr."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_the_local_path_never_imports_ray():
    """GPU boxes without Ray run bench/study.py and `--set cluster.backend=local` through these modules."""
    code = (
        "import sys\n"
        "from common.config import load_config\n"
        "from learner.main import make_system\n"
        "import bench.study, bench.sweep, bench.grad_snr\n"
        "make_system(load_config('tiny', ['cluster.backend=local', 'sampling.num_steps=2']))\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    _run_fresh(code)


def test_start_up_imports_only_what_each_process_uses():
    """Start-up on few cores is dominated by imports (docs/architecture.md, Speed): the Ray driver creates
    actors, runs the loop and writes checkpoints but builds no model, so it must not import diffusers,
    transformers or peft (about 3.5 s here), and the replay queues' actor module must not import torch (each queue is its own
    process). The sampler and learner import them when they build the model."""
    code = (
        "import sys\n"
        "import actors.queue_state\n"
        "assert 'torch' not in sys.modules, 'the queue actor module imported torch'\n"
        "import learner.main, learner.driver, learner.loop, learner.run_dir\n"
        "from learner.main import preflight\n"
        "from common.config import load_config\n"
        "preflight(load_config('shapes_quick', []))\n"
        "import tempfile, torch\n"
        "from learner.run_dir import RunDir\n"
        "run = RunDir(tempfile.mkdtemp())\n"
        "run.create(load_config('tiny', []), resume=False)\n"
        "state = {'lora_files': {'pytorch_lora_weights.safetensors': b'x'}, 'lora': {'w': torch.zeros(1)}, 'learner': {}}\n"
        "run.save_checkpoint(1, state, {'epoch': 1})\n"
        "heavy = [m for m in ('diffusers', 'transformers', 'peft', 'open_clip') if m in sys.modules]\n"
        "assert not heavy, f'the driver imported {heavy}'\n"
    )
    _run_fresh(code)
