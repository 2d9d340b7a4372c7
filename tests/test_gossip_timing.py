"""Timeout arithmetic of shoal.gossip, table-tested (no clock, no network).

Tables marked "memberlist" are the reference values of HashiCorp memberlist's own tests
(util_test.go, suspicion_test.go), so shoal's timings match the implementation it follows.
"""

from __future__ import annotations

import math

import pytest

from shoal.gossip import Config, timing


@pytest.mark.parametrize(
    ("n", "expected"),
    [(5, 1.0), (10, 1.0), (50, 1.698), (100, 2.0), (500, 2.698), (1000, 3.0)],
)
def test_suspicion_timeout_scales_with_log10_of_cluster_size(n: int, expected: float) -> None:
    # memberlist util_test.go: suspicionTimeout(3, n, 1s) / 3
    assert timing.suspicion_timeout(3, n, 1.0) / 3 == pytest.approx(expected)


def test_suspicion_timeout_never_below_one_log_unit() -> None:
    assert timing.suspicion_timeout(4, 0, 0.5) == pytest.approx(2.0)
    assert timing.suspicion_timeout(4, 1, 0.5) == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("confirmations", "k", "elapsed", "expected"),
    [
        # memberlist suspicion_test.go, min 2 s, max 30 s
        (0, 3, 0.0, 30.0),
        (1, 3, 2.0, 14.0),
        (2, 3, 3.0, 4.81),
        (3, 3, 4.0, -2.0),
        (4, 3, 5.0, -3.0),
        (5, 3, 10.0, -8.0),
    ],
)
def test_remaining_suspicion_time_shrinks_with_confirmations(
    confirmations: int, k: int, elapsed: float, expected: float
) -> None:
    got = timing.remaining_suspicion_time(confirmations, k, elapsed, 2.0, 30.0)
    assert got == pytest.approx(expected, abs=1e-9)


def test_remaining_suspicion_time_without_expected_confirmations_is_the_minimum() -> None:
    assert timing.remaining_suspicion_time(0, 0, 1.0, 2.0, 30.0) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("mult", "n", "k"),
    [(4, 50, 2), (4, 4, 2), (4, 3, 0), (4, 1, 0), (6, 10, 4), (6, 5, 0), (1, 10, 0), (2, 10, 0)],
)
def test_expected_confirmations_need_enough_other_members(mult: int, n: int, k: int) -> None:
    assert timing.suspicion_confirmations(mult, n) == k


@pytest.mark.parametrize(("mult", "n", "limit"), [(3, 0, 0), (3, 1, 3), (3, 99, 6), (4, 50, 8)])
def test_retransmit_limit_is_mult_times_ceil_log10(mult: int, n: int, limit: int) -> None:
    # memberlist util_test.go TestRetransmitLimit
    assert timing.retransmit_limit(mult, n) == limit


@pytest.mark.parametrize(
    ("n", "factor"), [(1, 1), (32, 1), (33, 2), (64, 2), (65, 3), (128, 3), (129, 4)]
)
def test_push_pull_interval_grows_above_32_members(n: int, factor: int) -> None:
    # memberlist util_test.go TestPushPullScale
    assert timing.push_pull_scale(30.0, n) == pytest.approx(30.0 * factor)


@pytest.mark.parametrize(
    ("score", "delta", "max_mult", "expected"),
    [(0, -1, 8, 0), (0, 1, 8, 1), (6, 5, 8, 7), (7, 1, 8, 7), (3, -2, 8, 1), (0, 3, 1, 0)],
)
def test_health_score_is_clamped(score: int, delta: int, max_mult: int, expected: int) -> None:
    assert timing.apply_health_delta(score, delta, max_mult) == expected


@pytest.mark.parametrize(("score", "expected"), [(0, 0.5), (1, 1.0), (7, 4.0)])
def test_unhealthy_member_waits_proportionally_longer(score: int, expected: float) -> None:
    assert timing.scale_by_health(0.5, score) == pytest.approx(expected)


def test_nack_is_sent_at_80_percent_of_the_probe_timeout() -> None:
    assert timing.nack_timeout(0.5) == pytest.approx(0.4)


def test_detection_bound_adds_probe_suspicion_and_spread_phases() -> None:
    cfg = Config.lan()
    n = 50
    low, high = cfg.suspicion_timeouts(n)
    assert low == pytest.approx(4 * 1.698 * cfg.probe_interval)
    assert high == pytest.approx(6 * low)
    spread = timing.retransmit_limit(cfg.retransmit_mult, n) * cfg.gossip_interval
    assert cfg.detection_bound(n) == pytest.approx(11 * cfg.probe_interval + high + 2 * spread)
    assert math.isfinite(Config.local().detection_bound(10))
