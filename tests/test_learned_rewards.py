"""Learned rewards through their real code paths, on random weights of their real architectures saved in the
real file formats (reduced width and depth; the aesthetic head at full size). Nothing is downloaded."""

import numpy as np
import pytest
import torch

from rewards import build_reward, check_reward
from rewards.combined import NonFiniteRewardError, WeightedReward
from rewards.loading import RewardLoadError
from rewards.preprocess import clip_preprocess


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Every learned reward's options, on random weights of reduced size saved in the real formats."""
    from rewards.random_weights import reward_terms

    return reward_terms(tmp_path_factory.mktemp("reward-weights"))


@pytest.fixture(scope="module")
def clip_dir(weights):
    return weights["clipscore"]["path"]  # CLIP with projection 768 (ViT-L/14's), so the aesthetic head fits


@pytest.fixture(scope="module")
def head_file(weights):
    return weights["aesthetic"]["head_path"]


@pytest.fixture(scope="module")
def rewards(weights, clip_dir):
    return {
        "aesthetic": build_reward("aesthetic", **weights["aesthetic"]),
        "clipscore": build_reward("clipscore", **weights["clipscore"]),
        "clipscore_w": build_reward("clipscore", w=2.5, **weights["clipscore"]),
        "pickscore": build_reward("pickscore", **weights["pickscore"]),
        "hpsv2": build_reward("hpsv2", **weights["hpsv2"]),
    }


def _images(n=5, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=(size, size), mode="bilinear")


PROMPTS = ["a cat", "a dog riding a bike", "a monkey washing the dishes", "a cat", "an owl"]


@pytest.mark.parametrize("name", ["aesthetic", "clipscore", "clipscore_w", "pickscore", "hpsv2"])
def test_scores_are_finite_batch_invariant_and_deterministic(rewards, name):
    r = rewards[name]
    images = _images()
    with torch.no_grad():
        batched = r(images, PROMPTS)
        single = torch.cat([r(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(5)])
        again = r(images, PROMPTS)
    assert batched.shape == (5,) and batched.dtype == torch.float32 and torch.isfinite(batched).all()
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    assert torch.equal(batched, again)
    assert batched.std() > 0  # different images, different scores


def test_score_values_follow_each_definition(rewards):
    images = _images()
    with torch.no_grad():
        cos = rewards["clipscore"].cosine(images, PROMPTS)
        assert torch.allclose(rewards["clipscore"](images, PROMPTS), 100 * cos)
        assert torch.allclose(rewards["clipscore_w"](images, PROMPTS), 2.5 * cos.clamp(min=0))
        scale = rewards["pickscore"].model.logit_scale.exp()
        assert torch.allclose(rewards["pickscore"](images, PROMPTS), scale * cos, atol=1e-5)
    # the text side depends on the prompt: the same image scores differently against other prompts
    one = images[:1].expand(3, -1, -1, -1)
    with torch.no_grad():
        assert rewards["hpsv2"](one, ["a cat", "a dog", "a red car"]).unique().numel() == 3


@pytest.mark.parametrize("name", ["aesthetic", "pickscore", "hpsv2"])
def test_gradients_flow_to_the_pixels(rewards, name):
    images = _images(2).requires_grad_(True)
    rewards[name](images, PROMPTS[:2]).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()


@pytest.mark.parametrize("size", [(64, 64), (512, 512), (300, 200)])
def test_torch_preprocessing_matches_the_reference_processors(size):
    import open_clip
    from PIL import Image
    from transformers import CLIPImageProcessor

    h, w = size
    g = torch.Generator().manual_seed(h + w)
    smooth = torch.nn.functional.interpolate(torch.rand(3, 3, 8, 8, generator=g), size=(h, w), mode="bilinear")
    smooth = (smooth * 255).round() / 255  # the references see uint8 images
    arr = [(x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for x in smooth]
    ours = clip_preprocess(smooth, 224)
    hf = CLIPImageProcessor()(images=arr, return_tensors="pt").pixel_values
    _, _, oc_transform = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    oc = torch.stack([oc_transform(Image.fromarray(a)) for a in arr])
    for ref in (hf, oc):
        d = (ours - ref).abs()
        assert d.max() < 0.02 and d.mean() < 0.006, (d.max(), d.mean())  # about one grey level at most


def test_weighted_sum_of_two_learned_rewards(clip_dir, head_file):
    from common.config import RewardConfig

    cfg = RewardConfig(terms=[{"name": "aesthetic", "weight": 2.0, "options": {"head_path": head_file, "clip_path": clip_dir}},
                              {"name": "clipscore", "weight": -0.5, "options": {"path": clip_dir}}])  # fmt: skip
    total, parts = WeightedReward(cfg)(_images(), PROMPTS)
    torch.testing.assert_close(total, 2.0 * parts["aesthetic"] - 0.5 * parts["clipscore"])


def test_non_finite_learned_scores_are_refused(clip_dir, head_file):
    from common.config import RewardConfig

    cfg = RewardConfig(terms=[{"name": "aesthetic", "options": {"head_path": head_file, "clip_path": clip_dir}}])
    reward = WeightedReward(cfg)
    with torch.no_grad():
        reward.terms[0][2].head.layers[7].bias.fill_(float("nan"))
    with pytest.raises(NonFiniteRewardError, match="reward 'aesthetic' returned non-finite scores"):
        reward(_images(2), PROMPTS[:2])


def test_bad_inputs_name_the_option_and_the_fix(tmp_path, clip_dir, head_file, monkeypatch):
    from rewards.aesthetic import AestheticHead

    with pytest.raises(RewardLoadError, match=r"option head_path='/nope/head.pth': no such file; give the MLP head's .pth"):
        check_reward("aesthetic", {"head_path": "/nope/head.pth", "clip_path": clip_dir})
    with pytest.raises(RewardLoadError, match=r"reward 'aesthetic' has no option 'clip'; its options: head_path, clip_path"):
        check_reward("aesthetic", {"head_path": head_file, "clip": clip_dir})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RewardLoadError, match=r"option clip_path='openai/clip-vit-large-patch14' is a hub id, but HF_HUB_OFFLINE=1"):
        check_reward("aesthetic", {"head_path": head_file})
    with pytest.raises(RewardLoadError, match=r"option head_path is required"):
        check_reward("aesthetic", {"clip_path": clip_dir})
    wrong = tmp_path / "wrong_head.pth"
    torch.save(AestheticHead(512).state_dict(), wrong)  # a head for CLIP ViT-B (512-d), not ViT-L/14
    with pytest.raises(RewardLoadError, match=r"does not fit aesthetic MLP head \(768 -> 1024"):
        build_reward("aesthetic", head_path=str(wrong), clip_path=clip_dir)
    not_a_head = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(1, 768)}, not_a_head)
    with pytest.raises(RewardLoadError, match=r"is not a aesthetic MLP head"):
        build_reward("aesthetic", head_path=str(not_a_head), clip_path=clip_dir)
    with pytest.raises(RewardLoadError, match=r"hpsv2.*arch='ViT-Q-99' is not an open_clip architecture"):
        check_reward("hpsv2", {"path": head_file, "arch": "ViT-Q-99"})


def test_a_checkpoint_of_another_architecture_is_named(tmp_path, head_file):
    from transformers import CLIPTextConfig, CLIPTextModel

    d = tmp_path / "text_only"
    CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)).save_pretrained(d)
    with pytest.raises(RewardLoadError, match=r"reward 'clipscore': .* is not a (loadable )?CLIPModel \(CLIP ViT-L/14\)"):
        build_reward("clipscore", path=str(d))


def test_cli_stops_before_any_actor_with_the_missing_file(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "learner.main", "--output", str(tmp_path / "run"), "--set", "cluster.backend=local",
         "--set", "reward.terms=[{name: aesthetic, options: {head_path: /missing/aesthetic.pth}}]"],
        cwd=root, capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 1
    lines = [x for x in proc.stderr.strip().splitlines() if x]
    assert len(lines) == 1 and "head_path='/missing/aesthetic.pth': no such file" in lines[0], proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_each_term_is_logged_beside_the_sum(tiny_cfg, clip_dir, head_file):
    from common.config import apply_override, validate_config
    from learner.local import LocalSystem
    from learner.loop import EpochInputs

    data = tiny_cfg.model_dump(mode="json")
    apply_override(data, "reward.terms=[{name: aesthetic, weight: 2.0, options: {head_path: %s, clip_path: %s}}, "
                         "{name: jpeg_compressibility, weight: 0.5}]" % (head_file, clip_dir))  # fmt: skip
    system = LocalSystem(validate_config(data))
    m = system.train_epoch(EpochInputs(["a cat", "a dog"] * 4, list(range(8)), 0))
    assert m["reward_mean"] == pytest.approx(2.0 * m["reward_aesthetic_mean"] + 0.5 * m["reward_jpeg_compressibility_mean"], abs=1e-4)
