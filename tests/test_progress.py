"""Progress inside an epoch: one line rewritten on a terminal, periodic plain lines elsewhere, real counts."""

import io

from learner.progress import EpochProgress


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_terminal_line_is_rewritten_then_cleared():
    out = _Tty()
    p = EpochProgress("epoch 1/2", {"sampled": 8, "scored": 8, "trained": 16}, stream=out)
    p.update(sampled=4)
    p.update(sampled=8, scored=8)
    p.update(trained=20)  # clamped to the total
    text = out.getvalue()
    assert text.count("\r") == 3 and "\n" not in text
    assert "epoch 1/2: sampled 8/8, scored 8/8, trained 16/16" in text
    p.close()
    assert out.getvalue().endswith("\r")


def test_plain_stream_gets_a_line_every_interval():
    out = io.StringIO()
    p = EpochProgress("epoch 3/9", {"sampled": 4, "scored": 4, "trained": 4}, stream=out, every_s=0.0)
    p.update(sampled=2)
    p.update(sampled=4)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("epoch 3/9: sampled 2/4, scored 0/4, trained 0/4") and len(lines) == 2
    quiet = io.StringIO()
    q = EpochProgress("e", {"sampled": 4}, stream=quiet, every_s=3600)
    q.update(sampled=4)
    q.close()
    assert quiet.getvalue() == ""


class _Recorder:
    def __init__(self):
        self.calls = []

    def update(self, **counts):
        self.calls.append(counts)

    def close(self):
        pass


def test_local_epoch_reports_every_stage_up_to_its_total(tiny_cfg):
    from learner.local import LocalSystem
    from learner.loop import EpochInputs

    system = LocalSystem(tiny_cfg)
    rec = _Recorder()
    n = tiny_cfg.train.samples_per_epoch
    system.train_epoch(EpochInputs(["a cat"] * n, list(range(n)), 0), None, progress=rec)
    sampled = [c["sampled"] for c in rec.calls if "sampled" in c]
    trained = [c["trained"] for c in rec.calls if "trained" in c]
    assert sampled == sorted(sampled) and sampled[-1] == n and len(sampled) == n // tiny_cfg.sampling.batch_size
    assert {"scored": n} in rec.calls
    assert trained == sorted(trained) and trained[-1] == n * tiny_cfg.algorithm.inner_epochs
    assert len(trained) == n // tiny_cfg.algorithm.minibatch_size
