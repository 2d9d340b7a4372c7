"""End-to-end task start: API `service create` (1 replica, default image) → RUNNING.

    .venv/bin/python bench/task_start_e2e.py [--runs 10] [--cluster]

Default: one netns host (tests/netlab.py) running a one-node cluster (manager + worker).
``--cluster``: four netns hosts, three managers drained of tasks and one worker, so the
path crosses hosts: the leader (h1) takes the API call, the worker (h4) learns of the
assignment by Raft replication and forwards its RUNNING report to the leader. Each run
creates a service through h1's unix-socket API and polls `service ps` every 2 ms until the
task is RUNNING, then removes it. In the same run, for reference, a raw
`unshare --fork --pid --mount-proc --uts --ipc --net true` exec is timed. The path measured
includes: the Raft write of the service, the leader's orchestrator+scheduler pass and its
Raft write, the worker's reconcile, the runtime start, and the Raft write of the RUNNING
status — three commits through pysyncobj's batching.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from netlab import Lab
from shoal.cli.main import Client


def raw_unshare(n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(["unshare", "--fork", "--pid", "--mount-proc", "--uts", "--ipc", "--net",
                        "true"], check=True)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--cluster", action="store_true",
                    help="3 drained managers + 1 worker instead of one node")
    args = ap.parse_args()
    with Lab(4 if args.cluster else 1) as lab:
        lab.form_cluster(managers=3 if args.cluster else 1, workers=1 if args.cluster else 0)
        h = lab.hosts[0]
        c = Client(f"unix://{h.sock}")
        managers: set[str] = set()
        if args.cluster:
            for n in c.call("GET", "/v1/nodes"):
                if n["role"] == "manager":
                    managers.add(n["id"])
                    c.call("POST", f"/v1/nodes/{n['id']}", {"availability": "drain"})
        e2e = []
        for i in range(args.runs):
            name = f"s{i}"
            t0 = time.perf_counter()
            c.call("POST", "/v1/services", {"spec": {"name": name, "task": {
                "container": {"command": ["sleep", "100000"]}}}})
            while True:
                ts = c.call("GET", f"/v1/services/{name}/tasks")
                if ts and ts[0]["state"] == "running":
                    break
                time.sleep(0.002)
            e2e.append(time.perf_counter() - t0)
            assert ts[0]["node_id"] not in managers, "task placed on a drained manager"
            c.call("DELETE", f"/v1/services/{name}")
            time.sleep(0.5)
        raw = raw_unshare(args.runs * 2)
    med_raw, med_e2e = statistics.median(raw), statistics.median(e2e)
    print(f"raw unshare exec:            median {med_raw * 1000:.1f} ms")
    print(f"API create -> RUNNING (e2e): median {med_e2e * 1000:.0f} ms "
          f"(min {min(e2e) * 1000:.0f}, max {max(e2e) * 1000:.0f}) over {len(e2e)} runs")
    print(f"e2e - raw: {(med_e2e - med_raw) * 1000:.0f} ms (target <= 50 ms)")


if __name__ == "__main__":
    main()
