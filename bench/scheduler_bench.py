"""The leader's pure work on synthetic clusters: the scheduler and whole leader passes.

    .venv/bin/python bench/scheduler_bench.py [--nodes 1000 10000] [--pending N] [--cpu 1]
                                              [--repeat 3] [--only schedule|scale|steady]

Owns: building synthetic Snapshots (nodes with zone labels and memory/CPU, services, tasks)
in memory and timing, in this one process pinned to one core (``--cpu``):

* ``schedule``   — the pure scheduler placing N (``--pending``) tasks of one service on N nodes
  (placements/s), plain and with a placement constraint plus a memory reservation;
* ``scale``      — ``plan_pass`` for a service scaled 0 → N on N nodes: the orchestrator
  creates N tasks, the scheduler places them; pass time, ops, and how the ops split into
  Raft entries (``shoal.node.leader.batches``: count and msgpack bytes of the largest),
  with the new tasks written as full creates and as schema 5's spawns, and the time a
  replica (each manager, each worker) takes to decode and apply them;
* ``steady``     — ``plan_pass`` with nothing to do over 100,000 running tasks (100 services)
  on N nodes: the cost a leader pays every 0.5 s on a quiet cluster, as a whole pass and
  with the leader's PassIndex (what it does from its second pass on); then with the index
  after 100 tasks of 10 services failed (the pass replaces them: restart delay 0), and
  after 10 nodes died (gossip's verdict: the pass takes them down and replaces their tasks).

Figures are the best of ``--repeat`` runs (least disturbed by the other processes sharing
the machine). Must not touch: the network, Raft, the runtime; it never writes anything.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import msgpack

from shoal.node import leader
from shoal.node.leader import plan_pass
from shoal.node.orchestrator import OrchestratorConfig
from shoal.node.scheduler import schedule
from shoal.raft import models
from shoal.raft.models import (
    Node,
    NodeRole,
    NodeState,
    Service,
    Task,
    TaskState,
    TaskStatus,
)
from shoal.raft.schema import SCHEMA
from shoal.raft.state import ClusterState, Snapshot
from shoal.raft.validate import validate_spec

NOW = 1000.0
GiB = 1 << 30


def make_nodes(n: int) -> dict[str, Node]:
    out = {}
    for i in range(n):
        nid = f"node{i:05d}"
        out[nid] = Node(id=nid, hostname=f"h{i}", addr=f"10.{i >> 16 & 255}.{i >> 8 & 255}."
                        f"{i & 255}", api_port=2377, raft_port=2378, role=NodeRole.WORKER,
                        state=NodeState.READY, labels={"zone": "abc"[i % 3]},
                        memory_bytes=8 * GiB, cpus=4.0)
    return out


def make_service(sid: str, replicas: int, constraint: bool = False) -> Service:
    spec: dict[str, Any] = {"name": f"svc-{sid}", "command": ["sleep", "1000"],
                            "replicas": replicas, "restart_delay": 0.0}
    if constraint:
        spec["constraints"] = ["node.labels.zone!=c"]
        spec["reserve_memory"] = 64 << 20
    return Service(id=sid, spec=validate_spec(spec), version=1, created_at=NOW,
                   updated_at=NOW)


def make_task(svc: Service, slot: int, node_id: str, running: bool) -> Task:
    state = TaskState.RUNNING if running else TaskState.NEW
    return Task(id=f"{svc.id}-t{slot:06d}", service_id=svc.id, service_name=svc.spec.name,
                slot=slot, spec=svc.spec.task, service_version=svc.version,
                desired_state=TaskState.RUNNING, node_id=node_id,
                status=TaskStatus(state=state, timestamp=NOW), created_at=NOW,
                updated_at=NOW)


def snapshot(nodes: dict[str, Node], services: list[Service], tasks: list[Task]) -> Snapshot:
    st = ClusterState(nodes=nodes, services={s.id: s for s in services},
                      tasks={t.id: t for t in tasks})
    return st.snapshot()


def best_of(repeat: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_schedule(n: int, p: int, repeat: int, constraint: bool) -> None:
    nodes = make_nodes(n)
    svc = make_service("s1", p, constraint)
    pending = [make_task(svc, slot, "", False) for slot in range(1, p + 1)]
    snap = snapshot(nodes, [svc], pending)
    secs, plan = best_of(repeat, lambda: schedule(snap, pending))
    what = "constraint+memory" if constraint else "plain"
    print(f"schedule   nodes={n:>6} pending={p:>6} {what:<17} {secs * 1000:9.1f} ms  "
          f"{len(plan.assignments) / secs:>9.0f} placements/s  "
          f"(unschedulable {len(plan.unschedulable)})")


def bench_scale(n: int, p: int, repeat: int) -> None:
    nodes = make_nodes(n)
    svc = make_service("s1", p)
    snap = snapshot(nodes, [svc], [])
    seen = dict.fromkeys(nodes, NOW)

    def one() -> list[Any]:
        ops, _ = plan_pass(snap, seen, NOW, NOW, OrchestratorConfig(), liveness=True)
        return ops

    secs, ops = best_of(repeat, one)
    placed = sum(1 for op in ops if op[0] == "assign")
    split = getattr(leader, "batches", None)  # (absent before the leader split its batches)
    compact = getattr(models, "spawn_ops", None)  # (schema 5: creates written as spawns)
    for how, written in (("creates", ops), ("spawns", compact(ops, snap.services)
                                            if compact else None)):
        if written is None:
            continue
        entries = list(split(written)) if split else [written]
        blobs = [msgpack.packb({"op": "leader", "term": 1, "now": NOW, "ops": b},
                               use_bin_type=True) for b in entries]
        sizes = [len(b) for b in blobs]

        def replica(blobs: list[bytes] = blobs) -> None:
            """What every manager and worker does with the entries: decode and apply."""
            st = ClusterState(nodes=dict(snap.nodes), services=dict(snap.services))
            st.cluster = replace(st.cluster, schema=SCHEMA)
            for blob in blobs:
                res = st.apply(msgpack.unpackb(blob, raw=False, strict_map_key=False))
                assert "ok" in res, res
            assert len(st.tasks) == p, len(st.tasks)
        apply_secs, _ = best_of(repeat, replica)
        print(f"scale 0→N  nodes={n:>6} tasks={p:>6} {'plan_pass':<17} {secs * 1000:9.1f} ms  "
              f"{placed / secs:>9.0f} placements/s  ops={len(ops)} as {how}: "
              f"entries={len(entries)} largest={max(sizes) / 1024:.0f} KiB "
              f"total={sum(sizes) / 1024:.0f} KiB; a replica decodes and applies them in "
              f"{apply_secs * 1000:.1f} ms")


def bench_steady(n: int, repeat: int, tasks: int = 100_000, services: int = 100) -> None:
    nodes = make_nodes(n)
    node_ids = sorted(nodes)
    per = tasks // services
    svcs = [make_service(f"s{i:03d}", per) for i in range(services)]
    all_tasks = [make_task(s, slot, node_ids[(k * per + slot) % n], True)
                 for k, s in enumerate(svcs) for slot in range(1, per + 1)]
    snap = snapshot(nodes, svcs, all_tasks)
    seen = dict.fromkeys(nodes, NOW)

    def whole() -> list[Any]:
        ops, _ = plan_pass(snap, seen, NOW, NOW, OrchestratorConfig(), liveness=True)
        return ops

    secs, ops = best_of(repeat, whole)
    print(f"steady     nodes={n:>6} tasks={tasks:>6} {'whole pass':<17} "
          f"{secs * 1000:9.1f} ms  ops={len(ops)}")
    index_cls = getattr(leader, "PassIndex", None)
    if index_cls is None:
        return
    index = index_cls()
    plan_pass(snap, seen, NOW, NOW, OrchestratorConfig(), index=index)  # the first: whole

    def incremental() -> list[Any]:
        ops, _ = plan_pass(snap, seen, NOW, NOW, OrchestratorConfig(), index=index)
        return ops

    secs, ops = best_of(repeat, incremental)
    print(f"steady     nodes={n:>6} tasks={tasks:>6} {'indexed pass':<17} "
          f"{secs * 1000:9.1f} ms  ops={len(ops)}")
    # 100 tasks of 10 services fail: the pass replaces them (create + assign)
    st = ClusterState(nodes=dict(snap.nodes), services=dict(snap.services),
                      tasks=dict(snap.tasks))
    for t in all_tasks[:10 * per:per // 10]:
        st.tasks[t.id] = replace(t, status=replace(t.status, state=TaskState.FAILED))
    changed = st.snapshot()

    def after_failures() -> list[Any]:
        idx = index_cls()
        plan_pass(snap, seen, NOW, NOW, OrchestratorConfig(), index=idx)  # primed, untimed
        plan_pass(snap, seen, NOW, NOW, OrchestratorConfig(), index=idx)
        gc.collect()
        t0 = time.perf_counter()
        ops, _ = plan_pass(changed, seen, NOW, NOW, OrchestratorConfig(), index=idx)
        timings.append(time.perf_counter() - t0)
        return ops

    timings: list[float] = []
    _, ops = best_of(repeat, after_failures)
    secs = min(timings)
    print(f"steady     nodes={n:>6} tasks={tasks:>6} {'indexed, 100 fail':<17} "
          f"{secs * 1000:9.1f} ms  ops={len(ops)}")
    # 10 nodes die (gossip's verdict): the pass takes them DOWN and replaces their tasks —
    # the leader's part of the scale lab's "kill 10 workers"
    view = dict.fromkeys(nodes, "alive")
    for nid in node_ids[:10]:
        view[nid] = "dead"

    def after_deaths() -> list[Any]:
        idx = index_cls()
        plan_pass(snap, seen, NOW, NOW, OrchestratorConfig(), index=idx)  # primed, untimed
        plan_pass(snap, seen, NOW, NOW, OrchestratorConfig(), index=idx)
        gc.collect()
        t0 = time.perf_counter()
        ops, _ = plan_pass(snap, seen, NOW, NOW, OrchestratorConfig(), gossip=view, index=idx)
        timings.append(time.perf_counter() - t0)
        return ops

    timings.clear()
    _, ops = best_of(repeat, after_deaths)
    print(f"steady     nodes={n:>6} tasks={tasks:>6} {'indexed, 10 die':<17} "
          f"{min(timings) * 1000:9.1f} ms  ops={len(ops)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--cpu", type=int, default=1, help="core to pin this process to")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--pending", type=int, default=0,
                    help="tasks to place (default: as many as nodes)")
    ap.add_argument("--only", choices=["schedule", "scale", "steady"], action="append")
    args = ap.parse_args()
    os.sched_setaffinity(0, {args.cpu})
    print(f"pinned to core {args.cpu}; load average {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} cores")
    only = set(args.only or ["schedule", "scale", "steady"])
    for n in args.nodes:
        p = args.pending or n
        if "schedule" in only:
            bench_schedule(n, p, args.repeat, constraint=False)
            bench_schedule(n, p, args.repeat, constraint=True)
        if "scale" in only:
            bench_scale(n, p, args.repeat)
        if "steady" in only:
            bench_steady(n, args.repeat)


if __name__ == "__main__":
    main()
