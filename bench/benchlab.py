"""Helpers the netns-lab benchmarks share (bench/failover.py, bench/agent_stop.py,
bench/events_latency.py, bench/mqtt_latency.py): an API client of a lab host, who leads, and
latency figures.

Owns: ``client``, ``leader_of``, ``pct``, ``fmt``. A script imports it after putting tests/ on
sys.path (for tests/netlab.py), as every lab benchmark does first. Must not touch: the lab's
life cycle (tests/netlab.py), anything a benchmark measures.
"""

from __future__ import annotations

import statistics

from netlab import Host, Lab
from shoal.cli.errors import CliError
from shoal.cli.main import Client


def client(h: Host, timeout: float = 10.0) -> Client:
    """The API of lab host ``h`` over its unix socket."""
    return Client(f"unix://{h.sock}", timeout=timeout)


def leader_of(lab: Lab, ask: Host, timeout: float = 2.0) -> Host | None:
    """The host ``ask`` reports as the Raft leader; None if it cannot say (no leader, an
    election, ``ask`` down)."""
    try:
        nodes = client(ask, timeout).call("GET", "/v1/nodes")
    except CliError:
        return None
    for n in nodes:
        if n["manager_status"] == "leader":
            return lab.host(n["addr"])
    return None


def pct(xs: list[float], p: float) -> float:
    """The ``p``-th percentile of ``xs`` (nearest rank)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def fmt(name: str, xs: list[float], width: int = 22) -> str:
    """One line of p50 / p99 / mean / max of ``xs`` (seconds), in ms."""
    if not xs:
        return f"{name:<{width}} (no samples)"
    ms = [x * 1000 for x in xs]
    return (f"{name:<{width}} p50 {pct(ms, 50):7.2f} ms   p99 {pct(ms, 99):7.2f} ms   "
            f"mean {statistics.mean(ms):7.2f} ms   max {max(ms):7.2f} ms")


def multiplier_args(multiplier: float) -> tuple[str, ...]:
    """The agent flags for ``--raft-multiplier`` (none at the default 1)."""
    return () if multiplier == 1.0 else ("--raft-multiplier", f"{multiplier:g}")
