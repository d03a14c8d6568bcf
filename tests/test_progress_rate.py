"""The progress bar's tokens/s (generation.RecentRate) is the recent rate, not the run's mean."""

import math

from selfreplay_fast.generation import RecentRate


def test_rate_follows_a_slowdown():
    rate = RecentRate(interval=0.5)
    assert rate.update(0, now=0.0) is None
    got = [rate.update(1000, now=t / 10) for t in range(1, 11)]  # 10k tokens/s for one second
    fast = [r for r in got if r is not None]
    assert fast and all(math.isclose(r, 10_000, rel_tol=1e-9) for r in fast)
    got = [rate.update(100, now=1.0 + t / 10) for t in range(1, 11)]  # then 1k tokens/s
    slow = [r for r in got if r is not None]
    # the run's mean after 2 s would be 5.5k tokens/s; the recent rate shows the slowdown at once
    assert slow and all(math.isclose(r, 1_000, rel_tol=1e-9) for r in slow)
    assert len(fast) == len(slow) == 2  # at most once per interval
