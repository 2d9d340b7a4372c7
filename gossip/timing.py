"""Timeout arithmetic of the gossip protocol, as pure functions.

Owns every formula that turns configuration and cluster size into a duration or a count, so they
can be table-tested without a network or a clock. It must not touch time, randomness or state.
All durations are seconds (float). The formulas follow HashiCorp memberlist (util.go,
suspicion.go, awareness.go) and the Lifeguard paper (Dadgar et al., 2018); where shoal differs it
says so.
"""

from __future__ import annotations

import math

# Cluster size above which the push-pull interval starts to grow (memberlist: 32). The 33rd member
# doubles it, the 65th triples it: full-state syncs cost O(n) bytes, so their rate stays sub-linear.
PUSH_PULL_SCALE_THRESHOLD = 32


def suspicion_timeout(suspicion_mult: int, n: int, probe_interval: float) -> float:
    """Minimum suspicion timeout: ``suspicion_mult * max(1, log10(n)) * probe_interval``.

    ``n`` is the estimated number of live members (including ourselves). The log factor is
    truncated to milliseconds like memberlist (log10(50) = 1.698 → 1.698).
    """
    node_scale = max(1.0, math.log10(max(1.0, float(n))))
    node_scale = int(node_scale * 1000) / 1000
    return suspicion_mult * node_scale * probe_interval


def suspicion_confirmations(suspicion_mult: int, n: int) -> int:
    """How many independent confirmations (k) a suspicion waits for before reaching its minimum.

    memberlist: ``k = suspicion_mult - 2`` (so the minimum is hit about two probe periods before
    the nominal timeout), and 0 when the cluster is too small to provide that many confirmers
    (``n - 2 < k``: minus ourselves and the suspect). ``k == 0`` means "start at the minimum".
    """
    k = suspicion_mult - 2
    if n - 2 < k or k < 0:
        return 0
    return k


def remaining_suspicion_time(
    confirmations: int, k: int, elapsed: float, min_timeout: float, max_timeout: float
) -> float:
    """Time left on a suspicion after ``confirmations`` of ``k`` expected confirmations.

    Lifeguard's dynamic suspicion: the timeout starts at ``max_timeout`` and falls logarithmically
    towards ``min_timeout`` as independent confirmations arrive::

        frac    = log(confirmations + 1) / log(k + 1)
        timeout = max(min_timeout, floor_ms(max_timeout - frac * (max_timeout - min_timeout)))
        return timeout - elapsed            (may be negative: fire now)

    With ``k < 1`` there is nothing to wait for and the timeout is ``min_timeout``.
    """
    if k < 1:
        return min_timeout - elapsed
    frac = math.log(confirmations + 1.0) / math.log(k + 1.0)
    raw = max_timeout - frac * (max_timeout - min_timeout)
    timeout = math.floor(raw * 1000.0 + 1e-6) / 1000.0
    timeout = max(timeout, min_timeout)
    return timeout - elapsed


def retransmit_limit(retransmit_mult: int, n: int) -> int:
    """How many times each broadcast is piggybacked: ``retransmit_mult * ceil(log10(n + 1))``."""
    node_scale = math.ceil(math.log10(float(n + 1))) if n > 0 else 0
    return retransmit_mult * node_scale


def push_pull_scale(interval: float, n: int) -> float:
    """Push-pull interval for ``n`` members: unchanged up to 32, then * (ceil(log2 n - 5) + 1)."""
    if n <= PUSH_PULL_SCALE_THRESHOLD:
        return interval
    multiplier = math.ceil(math.log2(n) - math.log2(PUSH_PULL_SCALE_THRESHOLD)) + 1
    return multiplier * interval


def apply_health_delta(score: int, delta: int, max_multiplier: int) -> int:
    """New local-health (awareness) score: ``score + delta`` clamped to 0 .. max_multiplier-1."""
    return min(max(score + delta, 0), max(max_multiplier - 1, 0))


def scale_by_health(duration: float, score: int) -> float:
    """Lifeguard local health: a member with health score s waits ``(s + 1) *`` longer.

    Applied by shoal to its own probe interval *and* probe timeout (the Lifeguard paper scales
    both; memberlist scales only the interval, arguing a longer UDP wait rarely helps). Scaling
    both keeps ``probe_interval ≥ 2 * probe_timeout`` true under degradation, so indirect probes
    and their nacks still fit in the probe period.
    """
    return duration * (score + 1)


def nack_timeout(probe_timeout: float) -> float:
    """How long an indirect-probe relay waits for the target before sending a nack: 80 % of the
    probe timeout (Lifeguard), so the nack reaches the requester before its probe period ends."""
    return 0.8 * probe_timeout


def detection_bound(
    *,
    probe_interval: float,
    suspicion_mult: int,
    suspicion_max_timeout_mult: int,
    retransmit_mult: int,
    gossip_interval: float,
    n: int,
    first_probe_periods: int = 10,
) -> float:
    """Upper bound on kill → every live member marks the member dead, in a healthy cluster.

    Sum of the worst-case phases (no packet loss, every health score 0):

    1. ``first_probe_periods`` probe periods until some member probes the crashed one. With
       round-robin probing each of the n-1 members reaches it during a given period with
       probability about 1/(n-1), so j periods pass without any probe with probability about
       e^-j: the default 10 is exceeded with probability < 1e-4.
    2. one probe period for that probe (direct + indirect) to fail;
    3. the maximum suspicion timeout (no confirmations assumed; shoal's last-chance probe
       runs in its last probe period);
    4. twice ``retransmit_limit * gossip_interval`` to spread the suspicion and then the death
       (each member retransmits a broadcast that many times, at least one per gossip round).
    """
    min_t = suspicion_timeout(suspicion_mult, n, probe_interval)
    max_t = suspicion_max_timeout_mult * min_t
    spread = retransmit_limit(retransmit_mult, n) * gossip_interval
    return (first_probe_periods + 1) * probe_interval + max_t + 2 * spread
