"""shoal.gossip across separate OS processes on loopback (``python -m shoal.gossip``).

Ten member processes (uvloop, encrypted, Config.local timings) print their membership events as
JSON lines; the test follows each process's view from those lines. Properties:

* a process paused with SIGSTOP for less than the minimum suspicion timeout, then resumed with
  SIGCONT, is never marked dead by anyone;
* a process killed with SIGKILL is marked dead by every other process.

Every process started here is killed by PID in the fixture's teardown, also on failure.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest

from shoal.gossip import Config
from shoal.gossip.proctest import ProcessCluster

N = 10
CFG = Config.local()


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessCluster]:
    with ProcessCluster(tmp_path_factory.mktemp("gossip-procs")) as cluster:
        cluster.start(N)
        yield cluster


def test_process_paused_shorter_than_suspicion_timeout_is_not_declared_dead(
    procs: ProcessCluster,
) -> None:
    low, _high = CFG.suspicion_timeouts(N)
    pause = 0.75 * low
    since = time.monotonic()
    procs.signal("p3", signal.SIGSTOP)
    try:
        time.sleep(pause)
    finally:
        procs.signal("p3", signal.SIGCONT)
    procs.wait_for(lambda: procs.all_see("p3", "alive"), 15, "everyone to see p3 alive")
    time.sleep(2 * low)  # a suspicion still running would have expired by now
    assert procs.all_see("p3", "alive")
    for name in procs.procs:
        assert procs.events_about(name, "dead", since) == [], name
    suspected = procs.events_about("p3", "suspect", since)
    print(f"paused {pause:.2f}s: {len(suspected)} observers suspected p3, all refuted")


def test_killed_process_is_marked_dead_by_all_others(procs: ProcessCluster) -> None:
    procs.wait_for(procs.converged, 15, "the cluster to be converged")
    since = procs.kill("p7")
    bound = CFG.detection_bound(N)
    took = procs.wait_for(lambda: procs.all_see("p7", "dead"), bound + 10, "p7 dead everywhere")
    dead = procs.events_about("p7", "dead", since)
    assert {e["node"] for e in dead} == set(procs.running())
    for name in procs.procs:
        if name != "p7":
            assert procs.events_about(name, "dead", since) == [], name
    print(f"kill -9 -> dead everywhere in {took:.2f}s (bound {bound:.2f}s from Config.local())")
