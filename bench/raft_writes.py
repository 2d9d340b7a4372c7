"""Raft state writes per second through shoal's store, 3 managers in 3 processes.

    .venv/bin/python bench/raft_writes.py [--writes 20000] [--window 2000]

Starts two follower processes and runs the third store in this process on loopback
(127.0.0.1, ports 24101-24103), waits until this process leads, then proposes
``--writes`` task-status commands (the most common write in a running cluster) with at
most ``--window`` in flight, through RaftStore.propose (msgpack encoding, replication
to a majority, apply in the state machine, result back to asyncio). Prints writes/s and
the latency of sequential single writes. The 2 cores are shared by all 3 processes.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ADDRS = ["127.0.0.1:24101", "127.0.0.1:24102", "127.0.0.1:24103"]
PASSWORD = "bench-password-0123456789abcdef"


def follower(index: int, data_dir: str) -> None:
    from shoal.raft.store import RaftStore

    store = RaftStore(ADDRS[index], ADDRS, Path(data_dir), PASSWORD)
    try:
        while True:  # the load generator runs in the first process: hand leadership to it
            if store.is_leader():
                store.transfer_leadership(ADDRS[0])
            time.sleep(0.2)
    finally:
        store.close()


async def throughput(store: Any, writes: int, window: int) -> dict[str, Any]:
    """The workload on a leading ``store`` (also bench/security_raft.py's): one node, one
    service with one task, then the latency of 50 sequential task-status writes and
    ``writes`` of them with at most ``window`` in flight. Seconds; wps = writes/s."""
    from shoal.node.leader import plan_pass
    from shoal.node.orchestrator import OrchestratorConfig
    from shoal.raft.models import Node, NodeRole, TaskState, to_dict

    now = time.time()
    node = Node(id="n1", hostname="h1", addr="127.0.0.1", api_port=1, raft_port=2,
                role=NodeRole.MANAGER)
    await store.propose({"op": "node_add", "now": now, "node": to_dict(node)})
    await store.propose({"op": "service_create", "id": "s1", "now": now,
                         "spec": {"name": "web", "task": {"container": {"command": ["true"]}}}})
    ops, _ = plan_pass(store.snapshot(), {"n1": 0.0}, 0.0, now, OrchestratorConfig(),
                       liveness=False)
    await store.propose({"op": "leader", "term": store.term(), "now": now, "ops": ops})
    task_id = next(iter(store.snapshot().tasks))

    def cmd(i: int) -> dict[str, Any]:
        return {"op": "task_status", "task_id": task_id, "node_id": "n1", "now": time.time(),
                "status": {"state": int(TaskState.RUNNING), "timestamp": float(i),
                           "message": f"report {i}"}}

    lat = []  # sequential latency
    for i in range(50):
        s = time.perf_counter()
        await store.propose(cmd(i))
        lat.append(time.perf_counter() - s)
    sem, errors = asyncio.Semaphore(window), 0  # windowed throughput

    async def one(i: int) -> None:
        nonlocal errors
        async with sem:
            try:
                await store.propose(cmd(i), timeout=30)
            except Exception:
                errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(writes)))
    took = time.perf_counter() - start
    return {"wps": writes / took, "took": took, "lat": statistics.median(lat),
            "p90": sorted(lat)[int(len(lat) * 0.9)], "errors": errors}


async def leader(writes: int, window: int, data_dir: str) -> None:
    from shoal.raft.store import RaftStore

    store = RaftStore(ADDRS[0], ADDRS, Path(data_dir), PASSWORD)
    t0 = time.monotonic()
    # the followers hand leadership to this process if they win the election
    while not store.is_leader():
        await asyncio.sleep(0.01)
        if time.monotonic() - t0 > 30:
            raise SystemExit("this process did not become leader in 30 s; run again")
    r = await throughput(store, writes, window)
    print(f"sequential write latency: median {r['lat'] * 1000:.1f} ms, "
          f"p90 {r['p90'] * 1000:.1f} ms")
    print(f"windowed writes: {writes} in {r['took']:.2f} s = {r['wps']:,.0f} writes/s "
          f"(window {window}, errors {r['errors']}, applied index {store.index})")
    store.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--writes", type=int, default=20000)
    ap.add_argument("--window", type=int, default=2000)
    ap.add_argument("--follower", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.follower >= 0:
        follower(args.follower, args.data_dir)
        return
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp:
        procs: list[subprocess.Popen[bytes]] = []
        try:
            loop_task = leader(args.writes, args.window, f"{tmp}/n0")
            procs = [subprocess.Popen([sys.executable, __file__, "--follower", str(i),
                                       "--data-dir", f"{tmp}/n{i}"]) for i in (1, 2)]
            asyncio.run(loop_task)
        finally:
            for p in procs:
                p.kill()
                p.wait()


if __name__ == "__main__":
    main()
