import numpy as np

from learner.stat_tracker import PerPromptStatTracker


def test_batch_stats_until_min_count_then_per_prompt():
    t = PerPromptStatTracker(buffer_size=4, min_count=3)
    r = np.array([1.0, 2.0, 10.0, 20.0])
    adv = t.update(["a", "a", "b", "b"], r)
    np.testing.assert_allclose(adv, (r - r.mean()) / (r.std() + 1e-6))
    adv = t.update(["a", "b"], np.array([3.0, 30.0]))
    np.testing.assert_allclose(adv[0], (3 - 2) / (np.std([1, 2, 3]) + 1e-6))
    np.testing.assert_allclose(adv[1], (30 - 20) / (np.std([10, 20, 30]) + 1e-6))
    t.update(["a", "a"], np.array([4.0, 5.0]))
    assert list(t.buffers["a"]) == [2.0, 3.0, 4.0, 5.0]  # bounded buffer keeps the most recent


def test_state_round_trip():
    t = PerPromptStatTracker(8, 2)
    t.update(["x", "y", "x"], np.array([1.0, 2.0, 3.0]))
    u = PerPromptStatTracker(8, 2)
    u.load_state_dict(t.state_dict())
    assert u.state_dict() == t.state_dict()
    np.testing.assert_allclose(u.update(["x"], np.array([5.0])), t.update(["x"], np.array([5.0])))


def test_a_min_count_the_buffer_cannot_reach_is_refused():
    """Per-prompt statistics need min_count rewards of a prompt among the buffer_size kept: above it, every
    advantage would silently use the batch's statistics."""
    import pytest

    from common.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"algorithm.stat_tracking: min_count \(40\) exceeds buffer_size \(32\)"):
        load_config("tiny", ["algorithm.stat_tracking.min_count=40"])
    assert load_config("tiny", ["algorithm.stat_tracking.min_count=32"]).algorithm.stat_tracking.min_count == 32
