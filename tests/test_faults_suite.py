"""The fault suite's short run (tests/jepsen.py) on netns hosts, and a deposed leader's reads.

One lab for both: 5 managers + 1 worker (the issue's 5 + 3, reduced by two workers to fit
the short CI run on 2 shared cores; workers only take part in partitions here: the workload
talks to managers, and the register services run no tasks). ``SHOAL_FAULT_SEED`` and
``SHOAL_FAULT_DURATION`` override the seed (printed with the schedule) and the length.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import pytest
from jepsen import KINDS, Suite, SuiteConfig, small_disks

from netlab import Lab

pytestmark = pytest.mark.netns

CFG = SuiteConfig(managers=5, workers=1, clients=5, calm=(1.5, 3.0), fault_len=(2.5, 5.0),
                  kinds=KINDS,
                  duration=float(os.environ.get("SHOAL_FAULT_DURATION", "60")),
                  seed=int(os.environ.get("SHOAL_FAULT_SEED", "1515")))


async def _deposed_leader_reads(suite: Suite) -> None:
    """A leader cut off from every other node by a partition does not answer a default
    (linearizable) read; with ``?stale=1`` it answers from its own copy, which lacks the
    write the majority acknowledged meanwhile. Healed, it serves the write."""
    old = await suite.leader()
    assert old is not None
    rest = [h for h in suite.lab.hosts if h is not old]
    old.block(h.ip for h in rest)
    for h in rest:
        h.block([old.ip])
    try:
        spec = {"spec": {"name": "after-cut", "task": {"container": {"command": ["true"]}},
                         "mode": {"replicas": 0}}}
        for _ in range(30):  # the majority elects a new leader, then commits
            status, body = await suite.http(rest[0], "POST", "/v1/services", spec)
            if status == 200:
                break
            await asyncio.sleep(0.5)
        assert status == 200, body
        status, body = await suite.http(old, "GET", "/v1/services", timeout=20)
        assert status == 503 and "--stale" in body["error"]["message"], body
        status, body = await suite.http(old, "GET", "/v1/services?stale=1")
        assert status == 200 and "after-cut" not in {s["name"] for s in body}
        status, body = await suite.http(rest[1], "GET", "/v1/services")
        assert status == 200 and "after-cut" in {s["name"] for s in body}
    finally:
        for h in suite.lab.hosts:
            h.heal()
    for _ in range(60):
        status, body = await suite.http(old, "GET", "/v1/services", timeout=5)
        if status == 200:
            break
        await asyncio.sleep(0.5)
    assert status == 200 and "after-cut" in {s["name"] for s in body}


def test_short_fault_run_loses_nothing_and_stays_linearizable(
        lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(CFG.managers + CFG.workers)
    small_disks(lab, CFG.managers)  # (the disk-full fault fills one of these tmpfs)
    lab.form_cluster(managers=CFG.managers, workers=CFG.workers, timeout=120)
    asyncio.run(_deposed_leader_reads(Suite(lab, CFG)))
    report = asyncio.run(Suite(lab, CFG).run())
    print(report.summary())
    print(report.table_row())
    assert report.ok, report.summary()
    assert report.set_result.acknowledged > 0 and report.faults
    assert all(r.ops > 0 for r in report.registers)
