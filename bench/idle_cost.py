"""Idle cost of agents: CPU % of a core and RSS per agent, in a cluster doing nothing.

    .venv/bin/python bench/idle_cost.py [--managers 3] [--workers 2] [--window 60] [--settle 10]

Builds netns hosts (tests/netlab.py), forms the cluster with the agents' default (LAN)
settings, waits ``--settle`` seconds, then reads each agent process's CPU time (utime+stime
from /proc/PID/stat, its threads included: pysyncobj's tick thread, the gossip thread) and
RSS at the start and end of a ``--window`` second window in which nothing is asked of the
cluster. Prints one line per agent (role, leader or not) and the median per role. The agents
run on whichever of the machine's cores the kernel picks; nothing else of shoal runs (the
script only sleeps during the window).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from netlab import Host, Lab

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def rss_mib(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / (1 << 20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--managers", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--window", type=float, default=60.0)
    ap.add_argument("--settle", type=float, default=10.0)
    args = ap.parse_args()
    n = args.managers + args.workers
    with Lab(n) as lab:
        lab.form_cluster(managers=args.managers, workers=args.workers, timeout=120)
        time.sleep(args.settle)
        nodes = lab.hosts[0].cli_json("node", "ls")
        role = {x["addr"]: ("leader" if x["manager_status"] == "leader" else x["role"])
                for x in nodes}
        hosts: list[tuple[Host, int]] = []
        for h in lab.hosts:
            pid = h.agent_pid
            assert pid is not None
            hosts.append((h, pid))
        start = {pid: cpu_seconds(pid) for _, pid in hosts}
        t0 = time.monotonic()
        time.sleep(args.window)
        took = time.monotonic() - t0
        per_role: dict[str, list[float]] = {}
        print(f"idle window {took:.1f} s, {args.managers} managers + {args.workers} workers")
        for h, pid in hosts:
            pct = 100.0 * (cpu_seconds(pid) - start[pid]) / took
            r = role.get(h.ip, "?")
            per_role.setdefault("manager" if r == "leader" else r, []).append(pct)
            print(f"  {h.name} {r:8} cpu {pct:5.2f} % of a core  rss {rss_mib(pid):6.1f} MiB")
        for r, vals in sorted(per_role.items()):
            print(f"median {r}: {statistics.median(vals):.2f} % of a core (n={len(vals)})")


if __name__ == "__main__":
    main()
