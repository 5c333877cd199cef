"""The model interface: SD1.x and SDXL behind one DiffusionModel, checked against diffusers' own pipelines."""

import json

import pytest
import torch

from common.config import LoraConfig, ModelConfig
from common.exploration import WeightedPrompt, parse_prompt
from common.models import ModelLoadError
from common.pipelines import attach_lora, load_lora_state, load_model, load_pipeline, lora_state, save_lora_diffusers

SDXL = ModelConfig(pretrained="tiny-sdxl")


@pytest.fixture(scope="module")
def sdxl():
    return load_model(SDXL)


def test_the_family_comes_from_model_index(sdxl, tiny_cfg):
    assert type(sdxl).__name__ == "StableDiffusionXL" and type(sdxl.pipe).__name__ == "StableDiffusionXLPipeline"
    assert type(load_model(tiny_cfg.model)).__name__ == "StableDiffusion"
    assert sdxl.latent_shape == (4, 8, 8) and (sdxl.height, sdxl.width) == (64, 64)


def test_sdxl_conditioning_equals_the_pipelines_own(sdxl):
    prompts = ["a red cat on a mat", "two dogs"]
    cond = sdxl.condition([parse_prompt(p) for p in prompts])
    pe, npe, pooled, npooled = sdxl.pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=True)
    assert cond["prompt_embeds"].shape == (2, 32, 32 + 64)  # both encoders' penultimate states, concatenated
    torch.testing.assert_close(cond["prompt_embeds"], pe, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cond["text_embeds"], pooled, atol=1e-6, rtol=1e-6)
    # the CFG negative follows SDXL's convention: zeros for the empty prompt (force_zeros_for_empty_prompt)
    neg = sdxl.negative()
    torch.testing.assert_close(neg["prompt_embeds"], npe[:1])
    torch.testing.assert_close(neg["text_embeds"], npooled[:1])
    want = sdxl.pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), torch.float32, text_encoder_projection_dim=48)
    assert torch.equal(cond["time_ids"], want.expand(2, 6)) and torch.equal(neg["time_ids"], want)


def test_prompt_weighting_changes_both_encoders_at_the_weighted_tokens_only(sdxl):
    plain = sdxl.condition([parse_prompt("a red cat on a mat")])
    weighted = sdxl.condition([WeightedPrompt([("a ", 1.0), ("red", 1.8), (" cat on a mat", 1.0)])])
    diff = (weighted["prompt_embeds"] - plain["prompt_embeds"]).abs()[0]  # [L, D1 + D2]
    changed = [(diff[:, :32].amax(1) > 0).nonzero().flatten().tolist(), (diff[:, 32:].amax(1) > 0).nonzero().flatten().tolist()]
    assert changed == [[2], [2]]  # BOS, "a", "red": token 2 in both encoders' sequences, nothing else
    assert torch.equal(weighted["text_embeds"], plain["text_embeds"])  # the pooled embedding is the plain prompt's


def test_sd_conditioning_equals_the_pipelines_own(tiny_pipe):
    from common.models.sd import StableDiffusion

    model = StableDiffusion(tiny_pipe)
    cond = model.condition([parse_prompt("a cat"), parse_prompt("")])
    pe, npe = tiny_pipe.encode_prompt(["a cat", ""], "cpu", 1, True, negative_prompt=["", ""])
    torch.testing.assert_close(cond["prompt_embeds"], pe, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model.negative()["prompt_embeds"], npe[:1], atol=1e-6, rtol=1e-6)



def test_the_prompt_cache_keeps_what_a_call_reads_and_drops_the_least_recent(tiny_pipe):
    """The encoded-prompt cache is bounded; a call that overflows it must still return every prompt it asked
    for (an old, reused prompt raised KeyError when the oldest half was dropped first) and evict the least
    recently used, so a prompt a run keeps reusing stays."""
    from common.models.sd import StableDiffusion

    model = StableDiffusion(tiny_pipe)
    model.cache_size = 4
    fresh = StableDiffusion(tiny_pipe).condition([parse_prompt(p) for p in ("a zebra", "p9", "p10")])
    model.condition([parse_prompt("a zebra")])
    for k in range(3):
        model.condition([parse_prompt(f"p{k}"), parse_prompt("a zebra")])  # the zebra reused every call
    got = model.condition([parse_prompt(p) for p in ("a zebra", "p9", "p10")])
    torch.testing.assert_close(got["prompt_embeds"], fresh["prompt_embeds"])
    assert len(model._cache) == 4
    from common.exploration import tokenize_weighted

    def key(prompt):
        return (0, tuple(tokenize_weighted(tiny_pipe.tokenizer, parse_prompt(prompt))[0]))

    order = list(model._cache)
    assert set(order[1:]) == {key("a zebra"), key("p9"), key("p10")}
    assert order[0] == key("p2")  # p0 and p1 left first: the least recently used

def test_sdxl_lora_export_loads_in_diffusers_and_reproduces_the_unet(sdxl, tmp_path):
    lora = LoraConfig(rank=4, alpha=8)
    ours = load_model(SDXL)
    attach_lora(ours.unet, lora)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in lora_state(ours.unet).items()}
    load_lora_state(ours.unet, state)
    save_lora_diffusers(ours, tmp_path)
    theirs = load_pipeline(SDXL)
    theirs.load_lora_weights(str(tmp_path))
    cond = sdxl.condition([parse_prompt("a cat"), parse_prompt("a dog")])
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500, 20])
    added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
    with torch.no_grad():
        a = ours.predict(x, t, cond)
        b = theirs.unet(x, t, encoder_hidden_states=cond["prompt_embeds"], added_cond_kwargs=added).sample
        base = sdxl.predict(x, t, cond)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (a - base).abs().max() > 1e-3  # the LoRA is really there (alpha 8 / rank 4 included)


def test_resolution_sets_the_latent_shape_and_bad_ones_name_the_field(tiny_cfg):
    from common.sampling import sample_rollout

    model = load_model(tiny_cfg.model, resolution=(96, 48))
    assert model.latent_shape == (4, 12, 6)
    roll = sample_rollout(model, model.condition([parse_prompt("a cat")]), model.negative(), torch.full((1, 2), 5.0), [3], 2, 1.0)
    assert model.decode(roll.latents[:, -1]).shape == (1, 3, 96, 48)
    with pytest.raises(ModelLoadError, match=r"sampling.resolution=100: this model needs multiples of 16"):
        load_model(tiny_cfg.model, resolution=100)


def test_an_unsupported_pipeline_class_is_named_with_the_supported_ones(tmp_path, tiny_cfg):
    import shutil

    from common.pipelines import resolve_model_path

    src = resolve_model_path(tiny_cfg.model)
    shutil.copytree(src, tmp_path / "m")
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    index["_class_name"] = "KandinskyV22Pipeline"
    (tmp_path / "m" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError) as err:
        load_model(ModelConfig(pretrained=str(tmp_path / "m")))
    msg = str(err.value)
    assert "'KandinskyV22Pipeline' is not supported" in msg and "StableDiffusionXLPipeline" in msg and "\n" not in msg


def test_lora_targets_that_match_nothing_name_the_field(sdxl):
    with pytest.raises(ModelLoadError, match="lora.target_modules"):
        attach_lora(load_model(SDXL).unet, LoraConfig(target_modules=["to_qkv"]))
