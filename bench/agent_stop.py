"""Agent stop time: SIGTERM → exit of a node's agent, idle and under a write load.

    .venv/bin/python bench/agent_stop.py [--runs 3] [--writers 4] [--settle 3] [--loaded-only]

Builds 5 netns hosts (tests/netlab.py), forms 3 managers + 2 workers and runs a 5-replica
`sleep` service. Then, for each case (worker, follower manager, leader manager, or each
manager in turn; idle, then under load), `--runs` times: sends SIGTERM to the agent (a
planned restart: upgrade, `systemctl restart`), times until the process has exited, starts
it again, waits until the cluster sees it ready and caught up, and checks that every task
kept its pid and none was orphaned. The load is `--writers` threads each sending `node
update --label-add` writes back to back to a manager that is not being stopped (each write is
a Raft commit that also reaches the workers' state feeds).

Under load, one more client (tests/write_load.py) writes `node update --label-add` back to
back to whichever manager answers (it moves to the next manager after a failure) and the
longest interval between two of its acknowledged writes around the stop is reported: the
cluster's write unavailability as a client sees it (issue 18: ≤ 2 s per manager).

Prints one line per stop and a summary per case (median/max seconds). Talks to the agents'
unix sockets directly (no CLI process start-up in the figures).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from benchlab import client, leader_of

from netlab import Host, Lab, wait_until
from shoal.cli.main import CliError
from write_load import WriteLoad


def call(h: Host, method: str, path: str, body: Any = None, timeout: float = 5.0) -> Any:
    return client(h, timeout).call(method, path, body)


def task_pids(ask: Host) -> dict[str, int]:
    tasks = call(ask, "GET", "/v1/services/five/tasks")
    return {t["id"]: t["pid"] for t in tasks if t["state"] == "running"}


def orphaned(ask: Host, ids: set[str]) -> int:
    """How many of the tasks ``ids`` the cluster now calls orphaned."""
    tasks = call(ask, "GET", "/v1/services/five/tasks")
    return sum(1 for t in tasks if t["id"] in ids and t["state"] == "orphaned")


class Load:
    """Writer threads: node label updates, back to back, to one manager's API."""

    def __init__(self, target: Host, writers: int) -> None:
        self.target = target
        self.writers = writers
        self.stop = threading.Event()
        self.done = 0
        self.failed = 0
        self._threads: list[threading.Thread] = []

    def _run(self, k: int) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            try:
                call(self.target, "POST", f"/v1/nodes/{self.target.name}",
                     {"label_add": {f"load{k}": str(i)}}, timeout=10.0)
                self.done += 1
            except CliError:
                self.failed += 1
                time.sleep(0.05)

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True)
                         for k in range(self.writers)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=15)


def stop_once(lab: Lab, victim: Host, ask: Host) -> float:
    """SIGTERM the agent; seconds until it exited. Restarts it and waits until it is back."""
    pid = victim.agent_pid
    assert pid is not None and victim._agent is not None
    t0 = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    victim._agent.wait(timeout=120)
    took = time.monotonic() - t0
    victim.start_agent()

    def back() -> bool:
        try:
            nodes = call(ask, "GET", "/v1/nodes")
            me = call(victim, "GET", "/v1/info")
        except CliError:
            return False
        return bool(me.get("ready")) and all(n["state"] == "ready" for n in nodes)
    wait_until(back, timeout=60, what=f"{victim.name} back and ready")
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--settle", type=float, default=3.0,
                    help="seconds to wait after each restart before checking tasks")
    ap.add_argument("--cases", default="worker,follower,leader",
                    help="comma-separated: worker, follower, leader, manager (h1, h2, h3 in "
                    "turn)")
    ap.add_argument("--idle-only", action="store_true", help="skip the loaded runs")
    ap.add_argument("--loaded-only", action="store_true", help="skip the idle runs")
    args = ap.parse_args()
    results: dict[str, list[float]] = {}
    write_gaps: dict[str, list[float]] = {}
    problems: list[str] = []
    with Lab(5) as lab:
        lab.form_cluster(managers=3, workers=2)
        h1 = lab.hosts[0]
        call(h1, "POST", "/v1/services", {"spec": {
            "name": "five", "command": ["sleep", "100000"], "replicas": 5}})
        wait_until(lambda: len(task_pids(h1)) == 5, timeout=60, what="5 running tasks")
        for load in ((False,) if args.idle_only else (True,) if args.loaded_only
                     else (False, True)):
            for case in args.cases.split(","):
                key = f"{case} {'loaded' if load else 'idle'}"
                for run in range(args.runs):
                    leader = wait_until(lambda: leader_of(lab, h1, 5.0) or leader_of(
                        lab, lab.hosts[1], 5.0), timeout=30, what="a leader")
                    managers = lab.hosts[:3]
                    if case == "worker":
                        victim = lab.hosts[3 + run % 2]
                    elif case == "manager":  # each manager in turn, whatever its Raft role
                        victim = managers[run % 3]
                    elif case == "leader":
                        victim = leader
                    else:
                        victim = next(h for h in managers if h is not leader)
                    ask = next(h for h in managers if h is not victim)
                    target = next(h for h in managers if h not in (victim,)
                                  and (h is not ask or case == "worker"))
                    before = task_pids(ask)
                    time.sleep(1.0)
                    if load:
                        writer = WriteLoad([(h.name, h.sock) for h in managers],
                                           node=lab.hosts[3].name)
                        with Load(target, args.writers) as ld, writer:
                            time.sleep(2.0)  # the load is running before the stop
                            took = stop_once(lab, victim, ask)
                            time.sleep(1.0)  # writes after the restart close the last gap
                        gap = max(g.length for g in writer.gaps())
                        write_gaps.setdefault(key, []).append(gap)
                        failed = [f"{w.manager} after {w.ended - w.started:.2f} s: "
                                  f"{w.outcome} {w.error}"
                                  for w in writer.writes if not w.ok]
                        writes = (f", {ld.done} writes ({ld.failed} failed); one client: "
                                  f"longest write gap {gap:.2f} s, {len(failed)} failed"
                                  + "".join(f"\n    failed on {f}" for f in failed))
                    else:
                        took = stop_once(lab, victim, ask)
                        writes = ""
                    time.sleep(args.settle)
                    after = task_pids(ask)
                    orph = orphaned(ask, set(before))
                    kept = sum(1 for t, p in before.items() if after.get(t) == p)
                    results.setdefault(key, []).append(took)
                    line = (f"{key} run {run + 1}: {victim.name} SIGTERM -> exit "
                            f"{took:.2f} s; tasks kept pid {kept}/{len(before)}, orphaned "
                            f"{orph}{writes}")
                    print(line, flush=True)
                    if kept != len(before) or orph:
                        problems.append(line)
                    if orph:  # start the next run from a clean slate
                        call(ask, "POST", "/v1/services/five/scale", {"replicas": 5})
        print()
        print(f"{'case':<18} {'runs':>4} {'median s':>9} {'max s':>7} "
              f"{'write gap median s':>19} {'max s':>7}")
        for key, xs in results.items():
            gaps = write_gaps.get(key)
            wg = (f"{statistics.median(gaps):>19.2f} {max(gaps):>7.2f}" if gaps
                  else f"{'-':>19} {'-':>7}")
            print(f"{key:<18} {len(xs):>4} {statistics.median(xs):>9.2f} {max(xs):>7.2f} {wg}")
        print()
        print("tasks restarted or orphaned: " + ("none" if not problems else
                                                 f"{len(problems)} stop(s)"))
        for p in problems:
            print(f"  {p}")


if __name__ == "__main__":
    main()
