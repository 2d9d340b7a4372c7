"""Leader failover time: kill -9 the leader's agent (or pull its cable) → first accepted write.

    .venv/bin/python bench/failover.py [--runs 10] [--idle 0] [--fault kill|cut]

Builds 3 netns hosts (tests/netlab.py), forms a cluster of 3 managers, then `--runs`
times: waits 2 s idle, finds the leader, SIGKILLs its agent (`--fault kill`, the default:
its kernel closes its connections) or takes its link down (`--fault cut`: nothing is
closed, the followers only stop hearing from it), and sends a write (`service scale`) to a
survivor's API in a loop until one is accepted. The time from the fault to the accepted
write is the failover time. The killed agent is restarted (the cut link restored) and must
catch up before the next run. `--idle S` afterwards leaves the cluster idle for S
seconds and reports how many elections happened (Raft term changes) — there should be none.

Talks to the agents' unix sockets directly (no CLI process start-up in the figure).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from benchlab import client, leader_of, multiplier_args

from netlab import Host, Lab, wait_until
from shoal.cli.errors import CliError


def info(h: Host) -> dict[str, object]:
    out: dict[str, object] = client(h, 2.0).call("GET", "/v1/info")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--idle", type=float, default=0.0, help="idle seconds to watch for "
                    "spurious elections after the runs")
    ap.add_argument("--fault", choices=("kill", "cut"), default="kill",
                    help="kill -9 the leader's agent, or cut its link (default kill)")
    ap.add_argument("--raft-multiplier", type=float, default=1.0,
                    help="the agents' --raft-multiplier (default 1)")
    args = ap.parse_args()
    with Lab(3, agent_args=multiplier_args(args.raft_multiplier)) as lab:
        lab.form_cluster(managers=3)
        h1 = lab.hosts[0]
        client(h1).call("POST", "/v1/services", {"spec": {
            "name": "probe", "task": {"container": {"command": ["sleep", "100000"]}},
            "mode": {"replicas": 0}}})
        failover: list[float] = []
        for run in range(args.runs):
            time.sleep(2.0)
            old = wait_until(lambda: leader_of(lab, h1) or leader_of(lab, lab.hosts[1]),
                             timeout=20, what="a leader")
            survivors = [h for h in lab.hosts if h is not old]
            if args.fault == "kill":
                old.kill_agent()
            else:
                old.cut_link()
            t0 = time.monotonic()
            attempt = 0
            while True:
                attempt += 1
                try:
                    client(survivors[attempt % 2], 5.0).call(
                        "POST", "/v1/services/probe/scale", {"replicas": run % 2})
                    break
                except CliError:
                    if time.monotonic() - t0 > 30:
                        raise SystemExit("no write accepted within 30 s") from None
                    time.sleep(0.01)
            t_write = time.monotonic() - t0
            failover.append(t_write)
            print(f"run {run + 1}: {'killed' if args.fault == 'kill' else 'cut off'} "
                  f"{old.name}, first accepted write after {t_write * 1000:.0f} ms "
                  f"({attempt} attempt(s))", flush=True)
            if args.fault == "kill":
                old.start_agent()
            else:
                old.restore_link()

            def caught_up(old: Host = old, peer: Host = survivors[0]) -> bool:
                try:
                    a, b = info(old), info(peer)
                except CliError:
                    return False
                return bool(a.get("ready")) and a.get("index") == b.get("index")
            wait_until(caught_up, timeout=30, what=f"{old.name} caught up")
        print()
        fault = "kill -9 leader" if args.fault == "kill" else "leader's link cut"
        print(f"failover ({fault} -> first accepted write), {len(failover)} runs: "
              f"median {statistics.median(failover) * 1000:.0f} ms, "
              f"min {min(failover) * 1000:.0f} ms, max {max(failover) * 1000:.0f} ms")
        if args.idle > 0:
            terms0 = {h.name: info(h)["term"] for h in lab.hosts}
            print(f"idle for {args.idle:.0f} s, terms {terms0} ...", flush=True)
            time.sleep(args.idle)
            terms1 = {h.name: info(h)["term"] for h in lab.hosts}
            changes = max(int(str(terms1[k])) - int(str(terms0[k])) for k in terms0)
            print(f"after idle: terms {terms1}: {changes} election(s) in {args.idle:.0f} s")


if __name__ == "__main__":
    main()
