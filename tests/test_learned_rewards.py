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
        "imagereward": build_reward("imagereward", **weights["imagereward"]),
    }


def _images(n=5, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=(size, size), mode="bilinear")


PROMPTS = ["a cat", "a dog riding a bike", "a monkey washing the dishes", "a cat", "an owl"]


@pytest.mark.parametrize("name", ["aesthetic", "clipscore", "clipscore_w", "pickscore", "hpsv2", "imagereward"])
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


@pytest.mark.parametrize("name", ["aesthetic", "pickscore", "hpsv2", "imagereward"])
def test_gradients_flow_to_the_pixels(rewards, name):
    images = _images(2).requires_grad_(True)
    rewards[name](images, PROMPTS[:2]).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()


def _imagereward_by_hand(sd: dict, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ImageReward's score written out from the raw keys of ImageReward.pt (BLIP's timm-style ViT, BLIP's med
    BERT with cross-attention, the MLP), independently of transformers' BLIP modules; heads = width / 64."""
    F = torch.nn.functional

    def lin(x, key):
        return F.linear(x, sd[key + ".weight"], sd[key + ".bias"])

    def norm(x, key, eps):
        return F.layer_norm(x, x.shape[-1:], sd[key + ".weight"], sd[key + ".bias"], eps)

    def attend(q, k, v, bias):
        heads = max(1, q.shape[-1] // 64)
        split = [t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v)]
        return F.scaled_dot_product_attention(*split, attn_mask=bias).transpose(1, 2).flatten(2)

    v = "blip.visual_encoder."
    w = sd[v + "patch_embed.proj.weight"]
    h = F.conv2d(pixels, w, sd[v + "patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    h = torch.cat([sd[v + "cls_token"].expand(len(h), -1, -1), h], 1) + sd[v + "pos_embed"]
    for i in range(len({k.split(".")[3] for k in sd if k.startswith(v + "blocks.")})):
        b = f"{v}blocks.{i}."
        h = h + lin(attend(*lin(norm(h, b + "norm1", 1e-6), b + "attn.qkv").chunk(3, -1), None), b + "attn.proj")
        h = h + lin(F.gelu(lin(norm(h, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
    image_tokens = norm(h, v + "norm", 1e-6)
    t = "blip.text_encoder."
    x = sd[t + "embeddings.word_embeddings.weight"][ids] + sd[t + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    x = norm(x, t + "embeddings.LayerNorm", 1e-12)
    pad = (1.0 - mask[:, None, None, :].float()) * -10000.0
    for i in range(len({k.split(".")[4] for k in sd if k.startswith(t + "encoder.layer.")})):
        b = f"{t}encoder.layer.{i}."
        for part, kv, bias in (("attention", None, pad), ("crossattention", image_tokens, None)):
            src = x if kv is None else kv
            a = attend(lin(x, f"{b}{part}.self.query"), lin(src, f"{b}{part}.self.key"), lin(src, f"{b}{part}.self.value"), bias)
            x = norm(x + lin(a, f"{b}{part}.output.dense"), f"{b}{part}.output.LayerNorm", 1e-12)
        x = norm(x + lin(F.gelu(lin(x, b + "intermediate.dense")), b + "output.dense"), b + "output.LayerNorm", 1e-12)
    r = x[:, 0]
    for i in (0, 2, 4, 6, 7):
        r = lin(r, f"mlp.layers.{i}")
    return ((r - 0.16717362830052426) / 1.0333394966054072).squeeze(-1)


def test_imagereward_is_the_published_forward_on_the_published_keys(rewards, weights):
    """Loaded through transformers' BLIP modules, the score equals the forward written by hand from
    ImageReward.pt's own key layout: the key mapping, the cross-attention and the head are the package's.
    (bench/imagereward_reference.py checks the same against the image-reward package itself.)"""
    r = rewards["imagereward"]
    sd = torch.load(weights["imagereward"]["path"], weights_only=True)
    images = _images(4, size=256)
    prompts = ["a cat", "a monkey washing the dishes", "a red circle to the left of a blue square", "an owl"]
    ids, mask = r.tokens(prompts)
    assert (mask.sum(1) < 35).all() and ids.shape == (4, 35)  # padded to 35 as the package tokenizes
    with torch.no_grad():
        ours = r(images, prompts)
        by_hand = _imagereward_by_hand(sd, clip_preprocess(images, 224), ids, mask)
        swapped = r(images, prompts[::-1])
    torch.testing.assert_close(ours, by_hand, atol=1e-4, rtol=1e-4)
    assert ours.std() > 0.05  # the random weights are expressive enough for the comparison to mean something
    assert (ours - swapped).abs().min() > 1e-4  # the text cross-attends to the image: the prompt matters


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


def test_bad_inputs_name_the_option_and_the_fix(tmp_path, clip_dir, head_file, monkeypatch, weights):
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
    tok = weights["imagereward"]["tokenizer_path"]
    with pytest.raises(RewardLoadError, match=r"imagereward.*option path='/nope/ImageReward.pt': no such file; give the ImageReward checkpoint"):
        check_reward("imagereward", {"path": "/nope/ImageReward.pt", "tokenizer_path": tok})
    with pytest.raises(RewardLoadError, match=r"is not an ImageReward \(BLIP ViT-L/16 \+ BERT-base with cross-attention \+ MLP head\) checkpoint"):
        build_reward("imagereward", path=head_file, tokenizer_path=tok)  # the aesthetic head: another model
    truncated = {k: v for k, v in torch.load(weights["imagereward"]["path"], weights_only=True).items() if ".blocks.0." not in k}
    torch.save(truncated, tmp_path / "truncated.pt")  # the first ViT block is gone
    with pytest.raises(RewardLoadError, match=r"truncated.pt is not an ImageReward .* checkpoint \(missing"):
        build_reward("imagereward", path=str(tmp_path / "truncated.pt"), tokenizer_path=tok)
    with pytest.raises(RewardLoadError, match=r"option tokenizer_path='google-bert/bert-base-uncased' is a hub id, but HF_HUB_OFFLINE=1"):
        check_reward("imagereward", {"path": weights["imagereward"]["path"]})


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
