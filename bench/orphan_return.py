"""A dead node comes back: heal → its orphaned tasks gone (issue 16; Swarm: 0.67 s).

    .venv/bin/python bench/orphan_return.py [--runs 5] [--replicas 4] [--cut 2] [--jitter 1]

(``ORPHAN_DEBUG=1``: also print the returning node's agent log from the cut on.)

Builds 5 netns hosts (tests/netlab.py): 3 managers + 2 workers, and a `sleep` service of
``--replicas`` tasks constrained to the workers. Each run cuts one worker off (its bridge
port down: a pulled cable), waits until the leader declared it down, orphaned its tasks and
runs their replacements on the other worker — checking that the cut-off node keeps its
tasks running meanwhile (docs/reliability.md, invariant 6) — waits ``--cut`` more seconds
(plus a seeded random 0..``--jitter``: the heal then falls at any phase of the periodic
timers involved, the kernel's ARP retries first),
then plugs the cable back in and times until every orphaned task's process on that node
has exited (polled every 5 ms in /proc). Runs alternate between the workers (the one that
got the replacements is cut next). Also reported, from the returning node's agent log:
when its state feed was back, when its worker stopped the tasks.

Prints one line per run, then the median. Talks to the agents' unix sockets directly.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from benchlab import client

from netlab import Host, Lab, pid_alive, wait_until
from shoal.cli.errors import CliError


def call(h: Host, method: str, path: str, body: Any = None, timeout: float = 5.0) -> Any:
    return client(h, timeout).call(method, path, body)


def tasks(ask: Host) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = call(ask, "GET", "/v1/services/orph/tasks")
    return out


def log_marks(host: Host, since: float) -> list[tuple[float, str]]:
    """(seconds after ``since``, message) of the agent log lines written after ``since``
    (wall clock) that say when the feed came back and tasks stopped."""
    out: list[tuple[float, str]] = []
    for line in host.agent_log.read_text(errors="replace").splitlines():
        if not any(k in line for k in ("state feed from", "stopped task", "interrupted")):
            continue
        try:
            at = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:
            continue
        if at >= since - 0.05:
            out.append((at - since, line[24:].split(": ", 1)[-1][:70]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--cut", type=float, default=2.0,
                    help="seconds the node stays cut off after its tasks were replaced")
    ap.add_argument("--jitter", type=float, default=1.0,
                    help="plus a random 0..JITTER s (seeded): a heal at a fixed delay after "
                    "the cut falls at the same phase of the kernel's 1 s ARP retries")
    ap.add_argument("--seed", type=int, default=16)
    args = ap.parse_args()
    took: list[float] = []
    rng = random.Random(args.seed)
    with Lab(5) as lab:
        lab.form_cluster(managers=3, workers=2)
        h1 = lab.hosts[0]
        workers = lab.hosts[3:]
        node_of = {n["id"]: n["addr"] for n in call(h1, "GET", "/v1/nodes")}
        h1.cli("service", "create", "--name", "orph", "--replicas", str(args.replicas),
               "--constraint", "node.role==worker", "--", "sleep", "100000")

        def running() -> list[dict[str, Any]] | None:
            ts = [t for t in tasks(h1) if t["state"] == "running"
                  and t["desired_state"] == "running"]
            return ts if len(ts) == args.replicas else None
        wait_until(running, timeout=60, what=f"{args.replicas} running tasks")
        print(f"load average at start: {os.getloadavg()[0]:.1f}", flush=True)
        for run in range(args.runs):
            current = wait_until(running, timeout=60, what="all tasks running")
            victim = max(workers, key=lambda w: sum(node_of[t["node_id"]] == w.ip
                                                     for t in current))
            pids = {t["id"]: int(t["pid"]) for t in current if node_of[t["node_id"]] == victim.ip}
            cut_wall = time.time()
            victim.cut_link()

            def replaced(victim: Host = victim, pids: dict[str, int] = pids) -> bool:
                try:
                    ts = {t["id"]: t for t in tasks(h1)}
                    nodes = {n["addr"]: n["state"] for n in call(h1, "GET", "/v1/nodes")}
                except CliError:
                    return False
                live = [t for t in ts.values() if t["state"] == "running"
                        and t["desired_state"] == "running" and t["id"] not in pids]
                return nodes.get(victim.ip) == "down" and len(live) == args.replicas and \
                    all(ts[i]["state"] == "orphaned" for i in pids if i in ts)
            wait_until(replaced, timeout=60, interval=0.2, what="the tasks replaced")
            time.sleep(args.cut + rng.uniform(0.0, args.jitter))
            kept = sum(pid_alive(p) for p in pids.values())
            assert kept == len(pids), f"cut-off {victim.name} stopped tasks early"
            wall, t0 = time.time(), time.monotonic()
            victim.restore_link()
            while any(pid_alive(p) for p in pids.values()):
                if time.monotonic() - t0 > 60:
                    raise SystemExit(f"{victim.name}: orphaned tasks still run 60 s after heal")
                time.sleep(0.005)
            gone = time.monotonic() - t0
            took.append(gone)
            time.sleep(1.0)  # (the log lines of the stops come after the processes exited)
            if os.environ.get("ORPHAN_DEBUG"):
                for line in victim.agent_log.read_text().splitlines():
                    with contextlib.suppress(ValueError):
                        at = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                        if at.timestamp() >= cut_wall:
                            print(f"  {at.timestamp() - wall:+.3f} {line[24:160]}")
            marks = "; ".join(f"{at:+.2f} s {what}" for at, what in log_marks(victim, wall))
            print(f"run {run + 1}: {victim.name} {len(pids)} orphaned tasks gone {gone:.2f} s "
                  f"after heal (load {os.getloadavg()[0]:.1f}) [{marks}]", flush=True)
            wait_until(lambda: all(n["state"] == "ready" for n in call(h1, "GET", "/v1/nodes")),
                       timeout=60, what="every node ready again")
        print()
        print(f"heal -> orphaned tasks gone: median {statistics.median(took):.2f} s, "
              f"min {min(took):.2f} s, max {max(took):.2f} s over {len(took)} runs; "
              f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
