import pytest
import torch

from common.config import LoraConfig, ModelConfig
from common.pipelines import (
    ModelLoadError,
    attach_lora,
    build_tiny_pipeline,
    load_lora_state,
    load_pipeline,
    lora_checksum,
    lora_state,
)
from common.tokenizer import build_clip_tokenizer


def test_tokenizer_matches_open_clip():
    import open_clip

    tok = build_clip_tokenizer(model_max_length=77)
    text = "a photo of a red cat riding a bicycle, 4k!"
    assert len(tok) == 49408
    ref = open_clip.tokenize([text])[0].tolist()
    ids = tok(text).input_ids
    assert ids == ref[: len(ids)] and ref[len(ids)] == 0


def test_tiny_model_loads_by_name_and_by_directory(tmp_path, tiny_pipe):
    assert tiny_pipe.unet.config.sample_size == 8 and tiny_pipe.vae.config.sample_size == 64
    assert type(tiny_pipe.scheduler).__name__ == "DDIMScheduler"
    tiny_pipe.save_pretrained(tmp_path / "saved")
    again = load_pipeline(ModelConfig(pretrained=str(tmp_path / "saved")))
    for a, b in zip(tiny_pipe.unet.state_dict().values(), again.unet.state_dict().values()):
        assert torch.equal(a, b)
    # the same seed builds the same weights
    rebuilt = build_tiny_pipeline(0)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.vae.state_dict().values(), tiny_pipe.vae.state_dict().values()))


@pytest.mark.parametrize(
    "name, message",
    [("/definitely/missing", "no such directory"), ("shapes-base-typo", "no such directory; give a built-in name")],
)
def test_bad_model_names(name, message):
    with pytest.raises(ModelLoadError, match=message):
        load_pipeline(ModelConfig(pretrained=name))


def test_lora_state_copy_and_checksum(tiny_cfg):
    a, b = load_pipeline(tiny_cfg.model), load_pipeline(tiny_cfg.model)
    attach_lora(a.unet, tiny_cfg.lora)
    attach_lora(b.unet, tiny_cfg.lora)
    with torch.no_grad():
        for n, p in a.unet.named_parameters():
            if "lora_B" in n:
                p.normal_()
    assert lora_checksum(lora_state(a.unet)) != lora_checksum(lora_state(b.unet))
    load_lora_state(b.unet, lora_state(a.unet))
    assert lora_checksum(lora_state(a.unet)) == lora_checksum(lora_state(b.unet))
    with pytest.raises(ValueError, match="does not match the adapter"):
        load_lora_state(b.unet, {"x": torch.zeros(1)})
    with pytest.raises(ModelLoadError, match="lora.target_modules"):
        attach_lora(load_pipeline(tiny_cfg.model).unet, LoraConfig(target_modules=["nope"]))
