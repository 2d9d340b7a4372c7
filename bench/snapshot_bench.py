"""The Raft snapshot of a large cluster: its size, its encoding, a real log compaction, a restart.

    .venv/bin/python bench/snapshot_bench.py [--tasks 10000 100000] [--store-tasks 100000]
                                             [--cpu 1] [--skip-store]

Owns, in this process (pinned to core ``--cpu``; the compaction's forked child is moved to the
other core as soon as it appears, as it would run beside the agent on a 2-core manager):

* ``encode``  — a synthetic state (1,000 nodes, 100 services, N tasks RUNNING with the
  statuses agents report: pid, address, message) as a snapshot holds it
  (``ReplicatedState._serialize`` → ``shoal.raft.wire.state_to_bytes``): bytes, zlib -1 size,
  encode and decode (``state_from_bytes``) seconds;
* ``store``   — one real RaftStore (a single voter on loopback, its own temporary data
  directory, removed at the end) filled through real proposals as the leader and the agents
  write them: node_add, service_create, the leader's scale pass (``plan_pass``) split by
  ``shoal.node.leader.batches`` (≤ MAX_BATCH_OPS ops, ≈ MAX_BATCH_BYTES) and proposed one
  after the other, then one ``task_statuses`` entry per node (100 RUNNING reports each).
  Then a forced log compaction while a probe proposes one task status every ~20 ms: the
  tick thread's time in ``_serialize``, the slowest probe write (the writes' stall), the
  time until the new ``raft.dump`` is in and the journal cut, the dump's size, the journal
  before/after, the forked child's peak RSS. Then two restarts, each in a fresh process on
  core ``--cpu``: from the journal alone (a copy taken before the compaction: every entry
  replayed) and from the dump plus the journal's tail; seconds until the store is ready with
  every task, and that process's RSS.

Must not touch: anything outside its temporary directories; the network beyond loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import resource
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

from scheduler_bench import NOW, make_nodes, make_service, make_task

from shoal.raft.models import TaskState, TaskStatus, to_dict
from shoal.raft.state import ClusterState
from shoal.raft.wire import state_from_bytes, state_to_bytes

NODES, SERVICES = 1000, 100
MiB = 1 << 20


def _mem() -> dict[str, float]:
    """This process's resident memory now and at its peak, MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def running_status(i: int) -> dict[str, Any]:
    """What an agent reports for a started task (shoal.node.reports)."""
    return {"state": int(TaskState.RUNNING), "timestamp": NOW + 5 + i * 1e-4,
            "message": "started", "pid": 20000 + i % 40000,
            "addr": f"10.0.{i >> 8 & 255}.{i & 255}"}


def synthetic_state(tasks: int) -> ClusterState:
    nodes = make_nodes(NODES)
    ids = sorted(nodes)
    per = tasks // SERVICES
    svcs = [make_service(f"s{i:03d}", per) for i in range(SERVICES)]
    out = {}
    for k, svc in enumerate(svcs):
        for slot in range(1, per + 1):
            i = k * per + slot
            t = make_task(svc, slot, ids[i % NODES], True)
            st = running_status(i)
            out[t.id] = replace(t, up_at=NOW + 5, status=TaskStatus(
                state=TaskState.RUNNING, timestamp=st["timestamp"], message=st["message"],
                pid=st["pid"], addr=st["addr"]))
    return ClusterState(nodes=nodes, services={s.id: s for s in svcs}, tasks=out)


def bench_encode(tasks: int) -> None:
    state = synthetic_state(tasks)
    state.cluster = replace(state.cluster, schema=_schema())
    gc.collect()
    t0 = time.perf_counter()
    blob = state_to_bytes(state)
    enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    packed = zlib.compress(blob, -1)
    ztime = time.perf_counter() - t0
    del state
    gc.collect()
    t0 = time.perf_counter()
    back = state_from_bytes(blob)
    dec = time.perf_counter() - t0
    assert len(back.tasks) == tasks
    print(f"encode  tasks={tasks:>6}  state {len(blob) / MiB:7.1f} MiB ({len(blob) / tasks:,.0f} "
          f"B/task)  zlib -1 {len(packed) / MiB:6.2f} MiB ({ztime:.2f} s)  "
          f"encode {enc:6.2f} s  decode {dec:6.2f} s")


def _schema() -> int:
    from shoal.raft.schema import SCHEMA
    return SCHEMA


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _journal_bytes(path: Path) -> tuple[int, int]:
    """(bytes of records in the journal, size of its file): pysyncobj preallocates the file."""
    from pysyncobj.journal import LAST_RECORD_OFFSET_OFFSET
    with open(path, "rb") as f:
        head = f.read(LAST_RECORD_OFFSET_OFFSET + 4)
    return struct.unpack_from("<I", head, LAST_RECORD_OFFSET_OFFSET)[0], path.stat().st_size


def _config() -> Any:
    from shoal.raft.store import RaftConfig
    # compaction only when this bench forces it (the defaults would compact during the fill)
    return RaftConfig(log_compaction_min_entries=10**9, log_compaction_min_time=1e9)


async def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(0.005)


async def fill(store: Any, tasks: int) -> dict[str, float]:
    from shoal.node.leader import batches, plan_pass
    from shoal.node.orchestrator import OrchestratorConfig

    out: dict[str, float] = {}
    now = time.time()
    t0 = time.perf_counter()
    await store.propose({"op": "cluster_init", "cluster_id": "bench", "now": now,
                         "worker_secret": "w", "manager_secret": "m", "digest": "d",
                         "schema": _schema(), "cluster_cidr": "10.112.0.0/12"})
    nodes = make_nodes(NODES)
    sem = asyncio.Semaphore(64)

    async def windowed(cmd: dict[str, Any]) -> None:
        async with sem:
            await store.propose(cmd, timeout=120)

    await asyncio.gather(*(windowed({"op": "node_add", "now": now, "node": to_dict(n)})
                           for n in nodes.values()))
    per = tasks // SERVICES
    for i in range(SERVICES):
        svc = make_service(f"s{i:03d}", per)
        await store.propose({"op": "service_create", "id": svc.id, "now": now,
                             "spec": to_dict(svc.spec)})
    out["setup_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    seen = dict.fromkeys(nodes, time.monotonic())
    ops, _ = plan_pass(store.snapshot(), seen, time.monotonic(), now, OrchestratorConfig())
    out["plan_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    entries = 0
    for batch in batches(ops):
        await store.propose({"op": "leader", "term": store.term(), "now": time.time(),
                             "ops": batch}, timeout=120)
        entries += 1
    out["leader_entries"] = entries
    out["leader_ops"] = len(ops)
    out["leader_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    by_node: dict[str, list[str]] = {}
    for t in store.snapshot().tasks.values():
        by_node.setdefault(t.node_id, []).append(t.id)
    numbered = {tid: i for i, tid in enumerate(sorted(store.snapshot().tasks))}
    await asyncio.gather(*(windowed({
        "op": "task_statuses", "node_id": nid, "now": time.time(),
        "reports": [[tid, running_status(numbered[tid])] for tid in tids]})
        for nid, tids in by_node.items()))
    out["status_entries"] = len(by_node)
    out["status_s"] = time.perf_counter() - t0
    snap = store.snapshot()
    running = sum(1 for t in snap.tasks.values() if t.status.state is TaskState.RUNNING)
    if running != tasks:
        raise SystemExit(f"only {running} of {tasks} tasks RUNNING after the fill")
    return out


async def compact(store: Any, data: Path, other_cpu: int | None) -> dict[str, Any]:
    """Force a compaction while a probe writes a task status every ~20 ms."""
    out: dict[str, Any] = {}
    consumer = store.consumer
    serialize = consumer._serialize
    serialize_s: list[float] = []

    def timed() -> Any:  # (the tick thread's share of the compaction)
        t0 = time.perf_counter()
        try:
            return serialize()
        finally:
            serialize_s.append(time.perf_counter() - t0)

    consumer._serialize = timed
    task = next(iter(store.snapshot().tasks.values()))
    lat: list[tuple[float, float]] = []  # (start, seconds)
    stop = False

    async def probe() -> None:
        i = 0
        while not stop:
            i += 1
            st = running_status(i)
            st["message"] = f"probe {i}"
            s = time.perf_counter()
            await store.propose({"op": "task_status", "task_id": task.id,
                                 "node_id": task.node_id, "now": time.time(), "status": st},
                                timeout=120)
            lat.append((s, time.perf_counter() - s))
            await asyncio.sleep(0.02)  # (~50 writes/s: a busy cluster's status reports)

    serializer = store._sync._SyncObj__serializer
    dump = data / "raft.dump"
    out["journal_before"] = _journal_bytes(data / "raft.journal")
    out["log_len_before"] = store.status()["log_len"]
    prober = asyncio.create_task(probe())
    await asyncio.sleep(1.0)
    base = [s for _, s in lat]
    t_force = time.perf_counter()
    store._sync.forceLogCompaction()
    child = 0
    while not child:
        child = serializer._Serializer__pid
        await asyncio.sleep(0.001)
    t_child = time.perf_counter()
    if other_cpu is not None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(child, {other_cpu})
    await _wait(lambda: serializer._Serializer__pid == 0, 600, "the compaction child")
    t_dump = time.perf_counter()
    lens = [store.status()["log_len"]]  # the cut: the log shrinks (the probe only adds)
    await _wait(lambda: lens.append(store.status()["log_len"]) or lens[-1] < lens[-2], 120,
                "the journal cut")
    t_cut = time.perf_counter()
    await asyncio.sleep(1.0)
    stop = True
    await prober
    if not lat:
        raise SystemExit("no probe write committed")
    during = [s for start, s in lat if start >= t_force - 0.5 and start <= t_cut]
    out.update(
        serialize_s=serialize_s[0] if serialize_s else float("nan"),
        child_seen_s=t_child - t_force, dump_done_s=t_dump - t_force, cut_s=t_cut - t_force,
        probe_median_ms=statistics.median(base) * 1000,
        probe_max_ms=max(during) * 1000, probe_n=len(during),
        dump_bytes=dump.stat().st_size,
        journal_after=_journal_bytes(data / "raft.journal"),
        log_len_after=store.status()["log_len"],
        child_maxrss_mib=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    consumer._serialize = serialize
    return out


def restart(addr: str, data: Path, tasks: int, cpu: int | None) -> dict[str, Any]:
    """Open ``data`` in a fresh process; its JSON report."""
    cmd = [sys.executable, __file__, "--open", str(data), "--addr", addr,
           "--expect", str(tasks)]
    if cpu is not None:
        cmd += ["--cpu", str(cpu)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if res.returncode:
        raise SystemExit(f"restart failed: {res.stderr[-2000:]}")
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


async def open_store(addr: str, data: Path, tasks: int) -> None:
    from shoal.raft.store import RaftStore

    t0 = time.perf_counter()
    store = RaftStore(addr, [addr], data, None, config=_config())
    opened = time.perf_counter() - t0
    try:
        await _wait(lambda: store.is_ready() and len(store.snapshot().tasks) >= tasks, 900,
                    "the restarted store")
        ready = time.perf_counter() - t0
        gc.collect()
        print(json.dumps({"open_s": opened, "ready_s": ready, "tasks": len(store.snapshot().tasks),
                          **_mem()}))
    finally:
        store.close()


async def bench_store(tasks: int, cpu: int | None, other_cpu: int | None) -> None:
    from shoal.raft.store import RaftStore

    tmp = Path(tempfile.mkdtemp(prefix="shoal-snapbench-"))
    try:
        addr = f"127.0.0.1:{_port()}"
        data = tmp / "raft"
        store = RaftStore(addr, [addr], data, None, config=_config())
        try:
            await _wait(store.is_leader, 30, "leadership")
            f = await fill(store, tasks)
            print(f"store   tasks={tasks}: setup {f['setup_s']:.1f} s, plan_pass "
                  f"{f['plan_s']:.1f} s, {f['leader_ops']:.0f} leader ops in "
                  f"{f['leader_entries']:.0f} entries {f['leader_s']:.1f} s, "
                  f"{f['status_entries']:.0f} task_statuses entries {f['status_s']:.1f} s")
            gc.collect()
            mem = _mem()
            print(f"store   RSS at {tasks} tasks (this process, after the fill): "
                  f"{mem['VmRSS']:.0f} MiB (peak {mem['VmHWM']:.0f} MiB)")
            copy = tmp / "journal-only"
            copy.mkdir()
            for name in ("raft.journal", "raft.journal.meta"):
                if (data / name).exists():
                    shutil.copy2(data / name, copy / name)
            c = await compact(store, data, other_cpu)
        finally:
            store.close()
        used, size = c["journal_before"]
        used2, size2 = c["journal_after"]
        print(f"compact tick thread in _serialize {c['serialize_s']:.2f} s; probe writes: "
              f"median {c['probe_median_ms']:.1f} ms before, slowest {c['probe_max_ms']:.0f} ms "
              f"during ({c['probe_n']} writes)")
        print(f"compact fork seen after {c['child_seen_s']:.2f} s, dump written after "
              f"{c['dump_done_s']:.1f} s, journal cut after {c['cut_s']:.1f} s; dump "
              f"{c['dump_bytes'] / MiB:.2f} MiB; child peak RSS {c['child_maxrss_mib']:.0f} MiB")
        print(f"compact journal {used / MiB:.1f} MiB of records ({c['log_len_before']} entries, "
              f"file {size / MiB:.0f} MiB) -> {used2 / MiB:.2f} MiB ({c['log_len_after']} "
              f"entries, file {size2 / MiB:.0f} MiB)")
        await asyncio.sleep(0.5)  # (the closed store's port)
        r = restart(addr, copy, tasks, cpu)
        print(f"restart journal only: ready in {r['ready_s']:.1f} s (constructor "
              f"{r['open_s']:.1f} s), RSS {r['VmRSS']:.0f} MiB (peak {r['VmHWM']:.0f} MiB)")
        r = restart(addr, data, tasks, cpu)
        print(f"restart dump + tail:  ready in {r['ready_s']:.1f} s (constructor "
              f"{r['open_s']:.1f} s), RSS {r['VmRSS']:.0f} MiB (peak {r['VmHWM']:.0f} MiB)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--store-tasks", type=int, default=100_000)
    ap.add_argument("--cpu", type=int, default=1, help="core to pin this process to (-1: none)")
    ap.add_argument("--skip-store", action="store_true")
    ap.add_argument("--open", default="", help=argparse.SUPPRESS)
    ap.add_argument("--addr", default="", help=argparse.SUPPRESS)
    ap.add_argument("--expect", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    cpu = args.cpu if args.cpu >= 0 else None
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    if args.open:
        asyncio.run(open_store(args.addr, Path(args.open), args.expect))
        return
    cores = sorted(os.sched_getaffinity(0) if cpu is None else range(os.cpu_count() or 1))
    other = next((c for c in cores if c != cpu), None) if cpu is not None else None
    print(f"this process on core {cpu if cpu is not None else 'any'}, compaction child on "
          f"core {other if other is not None else 'any'}; load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    for n in args.tasks:
        bench_encode(n)
    if not args.skip_store:
        asyncio.run(bench_store(args.store_tasks, cpu, other))


if __name__ == "__main__":
    main()
