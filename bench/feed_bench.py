"""The workers' state feed at N workers, in one process: before/after the FeedServer changes.

    .venv/bin/python bench/feed_bench.py [--workers 100] [--commits 300] [--tasks 1000]
        [--starts 300] [--rate 200] [--refresh-rate 50] [--configs before,shared,filtered]

Owns: a MemoryStore manager with the real dispatcher (node/control/dispatcher.py) and N real
StateFeeds following it in-process (no network, no TLS: the figures are the feed's own work).
Four settings side by side: "before" = no shared encodings, no batching, no compression
(what the feed did before FeedServer: one encoding per reply, a reply per worker per commit),
"shared" = FeedServer without per-node filtering (``defer_max`` 0), "at-once" = with
it but other nodes' RUNNING reports answered at once (``soon_wait`` 0), "filtered" = the
defaults. Workload: N workers join at once (whole-state catch-ups), a burst of
--commits single-command commits (task status-like node label updates, proposed back to
back), then one big commit (a service of --tasks replicas created and placed by a leader
pass), then --starts of those tasks start as workers report it (node/worker.py): half with
the image present (RUNNING: one commit per task), half pulling it first (three PREPARING
pull-progress reports, then RUNNING), --rate commits per second, spaced as Raft commits
are; then each of them refreshes its health log once, --refresh-rate per second (health
unchanged: what an idle cluster with health checks commits every HealthConfig.log_refresh).
Prints replies, bytes, encodings and this process's CPU seconds for each phase.
Must not touch: anything outside the process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_feed_scale import _manager, _worker

from shoal.node.feed import FeedConfig, StateFeed
from shoal.node.leader import LeaderLoop
from shoal.node.orchestrator import OrchestratorConfig
from shoal.node.pki import CertInfo
from shoal.node.source import MemoryStore
from shoal.raft.models import Health, HealthResult, Task, TaskState, TaskStatus, to_dict


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


async def run(label: str, config: FeedConfig, workers: int, commits: int, tasks: int,
              starts: int, rate: float, refresh_rate: float) -> None:
    import test_feed_scale
    test_feed_scale.WORKERS = workers  # nodes w0..wN-1 in the state
    store = MemoryStore(self_addr="10.0.0.1:2378")
    with tempfile.TemporaryDirectory() as tmp:
        dispatcher = await _manager(Path(tmp), store, config)
        stats = dispatcher.feed.stats
        feeds: list[StateFeed] = [_worker(dispatcher, i, compress=config.compress)
                                  for i in range(workers)]
        runs = [asyncio.create_task(f.run()) for f in feeds]

        async def settled() -> None:
            while not all(f.is_ready() and f.index == store.index for f in feeds):
                await asyncio.sleep(0.005)

        def snap() -> tuple[int, int, int, float]:
            return (sum(stats.replies.values()), sum(stats.bytes.values()), stats.encodes,
                    _cpu())

        def show(what: str, before: tuple[int, int, int, float], n: int, took: float) -> None:
            r, b, e, c = (x - y for x, y in zip(snap(), before, strict=True))
            per = b / max(n, 1) / workers
            print(f"  {label:8} {what:30} {n:5} commits  replies {r:7} ({r / max(n, 1):6.1f}"
                  f"/commit)  bytes {b:11,} ({per:7.1f}/worker/commit)  encodes {e:6}  "
                  f"cpu {c:5.2f} s  wall {took:5.2f} s", flush=True)

        try:
            s0, t0 = snap(), time.monotonic()
            await settled()
            show("join (whole states)", s0, 0, time.monotonic() - t0)
            s0, i0, t0 = snap(), store.index, time.monotonic()
            for i in range(commits):
                await store.propose({"op": "node_update", "id": f"w{i % workers}", "now": 2.0,
                                     "labels": {"k": str(i)}})
                await asyncio.sleep(0)  # let the feed run between commits, as Raft would
            await settled()
            show("burst of small commits", s0, store.index - i0, time.monotonic() - t0)
            s0, i0, t0 = snap(), store.index, time.monotonic()
            leader = LeaderLoop(store, {}, OrchestratorConfig(), asyncio.Event())
            await store.propose({"op": "service_create", "id": "s1", "now": 3.0, "spec": {
                "name": "web", "command": ["sleep", "9"], "replicas": tasks}})
            await leader.one_pass(led_for=0.0)
            await settled()
            show(f"scale 0 → {tasks} (big entries)", s0, store.index - i0,
                 time.monotonic() - t0)
            # the task starts that follow, reported as the workers' reconcilers do
            # (node/worker.py): a start reports its outcome (RUNNING, with its address);
            # a task whose image is pulled first also reports PREPARING with the pull's
            # progress, at most once a second (PROGRESS_PERIOD)
            placed = sorted((t for t in store.snapshot().tasks.values() if t.node_id),
                            key=lambda t: t.id)[:starts]
            gap, due = 1.0 / rate, time.monotonic()

            async def report(t: Task, k: int, state: TaskState, probe: int = 0,
                             message: str = "") -> None:
                nonlocal due
                due += gap  # spaced as Raft commits are (--rate per second)
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                running = state is TaskState.RUNNING
                status = TaskStatus(
                    state=state, timestamp=time.time(), message=message or state.lower(),
                    addr=f"10.1.{k // 250}.{k % 250 + 2}" if running else "",
                    pid=1000 + k if running else None,
                    health=Health.HEALTHY if running else Health.NONE,
                    health_log=tuple(HealthResult(float(i), i + 0.01, 0, "HTTP 200 OK")
                                     for i in range(probe, probe + 5)) if running else ())
                peer = CertInfo(t.node_id, "worker", "c1", 1, 0.0, 4e9)
                await dispatcher.worker_report(peer, {
                    "op": "task_status", "task_id": t.id, "node_id": t.node_id,
                    "now": time.time(), "status": to_dict(status)})

            half = len(placed) // 2
            s0, i0, t0 = snap(), store.index, time.monotonic()
            for k, t in enumerate(placed[:half]):
                await report(t, k, TaskState.RUNNING)
            await settled()
            show(f"{half} starts, image present", s0, store.index - i0,
                 time.monotonic() - t0)
            s0, i0, t0 = snap(), store.index, time.monotonic()
            for step in range(3):
                for k, t in enumerate(placed[half:], half):
                    await report(t, k, TaskState.PREPARING,
                                 message=f"pulling shoal.test/app:1: {25 * (step + 1)} MB of "
                                 "100 MB")
            for k, t in enumerate(placed[half:], half):
                await report(t, k, TaskState.RUNNING)
            await settled()
            show(f"{len(placed) - half} starts with a pull", s0, store.index - i0,
                 time.monotonic() - t0)
            # then idle with health checks: each task's node refreshes its health log
            # (HealthConfig.log_refresh), health unchanged
            s0, i0, t0 = snap(), store.index, time.monotonic()
            due, gap = time.monotonic(), 1.0 / refresh_rate
            for k, t in enumerate(placed):
                await report(t, k, TaskState.RUNNING, probe=10)
            await settled()
            show(f"{len(placed)} refreshes, {refresh_rate:g}/s", s0, store.index - i0,
                 time.monotonic() - t0)
        finally:
            for r in runs:
                r.cancel()
            await asyncio.gather(*runs, return_exceptions=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=100)
    ap.add_argument("--commits", type=int, default=300)
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--starts", type=int, default=300,
                    help="tasks whose start is replayed: half with the image present (one "
                    "report each), half pulling it first (3 progress reports, then running)")
    ap.add_argument("--rate", type=float, default=200.0,
                    help="status commits per second during the starts")
    ap.add_argument("--refresh-rate", type=float, default=50.0,
                    help="health-log refresh commits per second (1,000 tasks refreshing "
                    "every 30 s: 33/s)")
    ap.add_argument("--configs", default="before,shared,at-once,filtered",
                    help="which feed settings to run: before (no sharing, batching, "
                    "compression), shared (those, no per-node filtering), at-once "
                    "(filtering, but other nodes' RUNNING reports sent at once: soon_wait "
                    "0), filtered (defaults)")
    args = ap.parse_args()
    print(f"feed bench: {args.workers} workers in-process; load "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    before = FeedConfig(wait=20.0, retry=0.01, compress=False, batch_wait=0.0, reply_cache=0,
                        defer_max=0.0)
    shared = FeedConfig(wait=20.0, retry=0.01, defer_max=0.0)
    at_once = FeedConfig(wait=20.0, retry=0.01, soon_wait=0.0)
    after = FeedConfig(wait=20.0, retry=0.01)
    runs = {"before": before, "shared": shared, "at-once": at_once, "filtered": after}
    for label in args.configs.split(","):
        asyncio.run(run(label, runs[label], args.workers, args.commits, args.tasks,
                        args.starts, args.rate, args.refresh_rate))


if __name__ == "__main__":
    main()
