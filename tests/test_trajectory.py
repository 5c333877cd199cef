import pickle

import pytest
import torch

from common.trajectory import TrajectoryBatch


def make_batch(b=3, t=4, version=2, rewards=True):
    g = torch.Generator().manual_seed(0)
    return TrajectoryBatch(
        prompts=[f"a cat {i}" for i in range(b)], plans=[{"seed": i, "picks": [["cat", 1.2]]} for i in range(b)],
        latents=torch.randn(b, t + 1, 4, 8, 8, generator=g), log_probs=torch.randn(b, t, generator=g),
        timesteps=torch.arange(t, 0, -1) * 10, guidance=torch.rand(b, t, generator=g) * 5,
        cond={"prompt_embeds": torch.randn(b, 6, 16, generator=g)}, images=torch.randint(0, 255, (b, 3, 16, 16), generator=g, dtype=torch.uint8),
        policy_version=version, rewards=torch.randn(b, generator=g) if rewards else None,
    ).validate()  # fmt: skip


def test_bytes_round_trip_exactly():
    b = make_batch()
    back = TrajectoryBatch.from_bytes(b.to_bytes())
    for k in ("latents", "log_probs", "timesteps", "guidance", "images", "rewards"):
        assert torch.equal(getattr(b, k), getattr(back, k)), k
    assert back.cond.keys() == b.cond.keys() and torch.equal(back.cond["prompt_embeds"], b.cond["prompt_embeds"])
    assert (back.prompts, back.plans, back.policy_version, back.batch_id) == (b.prompts, b.plans, 2, b.batch_id)
    unscored = make_batch(rewards=False)
    assert TrajectoryBatch.from_bytes(unscored.to_bytes()).rewards is None


def test_untrusted_bytes_never_reach_pickle(monkeypatch):
    calls = []
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: calls.append(1))
    payload = pickle.dumps({"latents": 1})
    for bad in (payload, b"", b"\x00" * 8, b"\xff" * 16, make_batch().to_bytes()[:-10]):
        with pytest.raises(ValueError, match="trajectory bytes"):
            TrajectoryBatch.from_bytes(bad)
    assert calls == []


def test_validate_names_the_bad_field():
    b = make_batch()
    b.log_probs = torch.zeros(3, 5)
    with pytest.raises(ValueError, match="log_probs"):
        b.validate()


def test_sdxl_conditioning_round_trips_and_concatenates():
    b = make_batch()
    b.cond = {"prompt_embeds": torch.randn(3, 6, 24), "text_embeds": torch.randn(3, 12), "time_ids": torch.ones(3, 6)}
    back = TrajectoryBatch.from_bytes(b.validate().to_bytes())
    assert sorted(back.cond) == ["prompt_embeds", "text_embeds", "time_ids"]
    assert all(torch.equal(back.cond[k], b.cond[k]) for k in b.cond)
    both = TrajectoryBatch.concat([b, back])
    assert both.cond["text_embeds"].shape == (6, 12)
    b.cond["time_ids"] = torch.ones(2, 6)  # a batch-size mismatch names the tensor
    with pytest.raises(ValueError, match="cond.time_ids"):
        b.validate()


def test_concat_keeps_the_oldest_version():
    c = TrajectoryBatch.concat([make_batch(version=3), make_batch(b=2, version=1)])
    assert len(c) == 5 and c.policy_version == 1 and c.latents.shape[0] == 5


def test_seed_order_does_not_depend_on_how_an_epoch_was_split():
    whole = make_batch(b=4)
    for i, s in enumerate([7, 2, 9, 4]):
        whole.plans[i] = {"seed": s}
    parts = [whole.select(torch.tensor([2, 0])), whole.select(torch.tensor([3])), whole.select(torch.tensor([1]))]
    a, b = whole.in_seed_order(), TrajectoryBatch.concat(parts).in_seed_order()
    assert [p["seed"] for p in a.plans] == [p["seed"] for p in b.plans] == [2, 4, 7, 9]
    for name in ("latents", "log_probs", "guidance", "images", "rewards"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.latents[0], whole.latents[1])  # rows move with their seed
