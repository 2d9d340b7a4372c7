"""`shoal stats` (cli/stats.py) as pure code: the CPU share from two samples, memory against
the limit, Docker's template fields, and the command's query and one-shot output, against a
stand-in client (the agent's side, with real tasks and cgroups:
tests/test_autoscale_cluster.py)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import pytest

from shoal.cli import output, stats
from shoal.cli.main import build_parser


def _task(tid: str, cpu: float | None, mem: int | None = 50 << 20,
          limit: int = 200 << 20) -> dict[str, Any]:
    usage = None if cpu is None else {"cpu_seconds": cpu, "memory_bytes": mem, "pids": 3,
                                      "memory_peak_bytes": mem}
    return {"id": tid, "name": f"web.{tid[-1]}", "service": "web", "node": "h1",
            "usage": usage, "memory_limit": limit, "cpu_limit": 0.5}


def test_cpu_is_the_time_used_between_samples_of_one_core_and_memory_of_the_limit() -> None:
    before = [_task("t1", 10.0), _task("t2", 3.0)]
    after = [_task("t1", 10.5), _task("t2", 5.0), _task("t3", 1.0), _task("t4", None)]
    got = {r["id"]: r for r in stats.rows(before, after, 2.0)}
    assert got["t1"]["cpu_percent"] == pytest.approx(25.0)
    assert got["t2"]["cpu_percent"] == pytest.approx(100.0)  # (one busy core)
    assert got["t3"]["cpu_percent"] is None and got["t3"]["cpu_perc"] == "--"  # (new)
    assert got["t4"]["mem_usage"] == "-- / --" and got["t4"]["pids"] is None  # (no answer)
    assert got["t1"]["memory_percent"] == pytest.approx(25.0)
    assert (got["t1"]["cpu_perc"], got["t1"]["mem_usage"], got["t1"]["mem_perc"]) == (
        "25.00%", "50MiB / 200MiB", "25.00%")
    # a counter that went back (a restarted task's new cgroup) is not a negative share
    assert stats.rows([_task("t1", 9.0)], [_task("t1", 1.0)], 1.0)[0]["cpu_percent"] == 0.0
    table = output.render(stats.rows(before, after, 2.0), "stats")
    assert table.splitlines()[0].split() == ["ID", "NAME", "NODE", "CPU", "%", "MEM", "USAGE",
                                             "/", "LIMIT", "MEM", "%", "NET", "I/O", "BLOCK",
                                             "I/O", "PIDS"]
    assert output.render(stats.rows(before, after[:1], 2.0), "stats",
                         "{{.Container}} {{.Name}} {{.CPUPerc}} {{.MemPerc}} {{.PIDs}}"
                         ) == "t1 web.1 25.00% 25.00% 3"


class Client:
    def __init__(self) -> None:
        self.paths: list[str] = []

    def call(self, method: str, path: str, body: Any = None) -> Any:
        self.paths.append(path)
        return [_task("t1", 10.0 + len(self.paths))]


def test_no_stream_takes_two_samples_a_second_apart_and_prints_once(
        capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["stats", "--no-stream", "--node", "self", "--format",
                                      "json", "web", "a b"])
    assert isinstance(args, argparse.Namespace)
    c, slept, times = Client(), [], iter([100.0, 102.0])
    stats.run(c, args, clock=lambda: next(times), sleep=slept.append)
    assert c.paths == ["/v1/stats?service=web&service=a%20b&node=self"] * 2
    assert slept == [stats.INTERVAL]
    rows = json.loads(capsys.readouterr().out)
    assert [(r["id"], r["cpu_percent"]) for r in rows] == [("t1", 50.0)]


def test_cpu_is_over_the_time_between_the_nodes_reads_not_between_the_replies() -> None:
    """A node reads each task's CPU time when it is asked (``read_at``: its monotonic clock):
    the share is over the time between those reads. The time between the two replies is
    another — a slow node (0.25 s to answer the first time, 0.02 s the second) holds up the
    whole first reply, which shortens the client's interval by 0.23 s for every task and
    overstated their CPU by 30 % — and serves only when a node sends no read time (an older
    agent)."""
    def read(tid: str, cpu: float, at: float | None) -> dict[str, Any]:
        t = _task(tid, cpu)
        if at is not None:
            t["usage"]["read_at"] = at
        return t
    before = [read("t1", 10.0, 500.0), read("t2", 4.0, None)]
    after = [read("t1", 10.5, 501.25), read("t2", 4.5, None)]
    got = {r["id"]: r["cpu_percent"] for r in stats.rows(before, after, 1.02)}
    assert got["t1"] == pytest.approx(40.0)  # 0.5 s of CPU over the node's 1.25 s
    assert got["t2"] == pytest.approx(0.5 / 1.02 * 100)  # (no read time: the client's)


def test_a_node_says_when_it_read_each_tasks_usage() -> None:
    from shoal.node.transfer import local_usage
    from shoal.runtime.cgroups import TaskUsage

    class Runtime:  # (the runtime's usage() of two tasks: what local_usage reports of it)
        def usage(self, tid: str) -> TaskUsage | None:
            return TaskUsage(memory_bytes=1, memory_peak_bytes=2, cpu_seconds=3.0, pids=4) \
                if tid == "t1" else None

    t0 = time.monotonic()
    got = local_usage(Runtime(), ["t1", "t2"])  # type: ignore[arg-type]
    assert list(got) == ["t1"] and t0 <= got["t1"]["read_at"] <= time.monotonic()
